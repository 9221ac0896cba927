"""Architecture rules the code must keep (checked on the source, so a violation fails here, not in a review)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "llmsim"
QUEUES = {"waiting", "running", "busy"}
QUEUE_MUTATORS = {"append", "appendleft", "extend", "insert", "remove", "pop", "popleft", "clear", "add",
                  "discard", "update", "difference_update", "sort", "reverse"}
BLOCK_MUTATORS = {"allocate", "allocate_slots", "append_slot", "append_slots", "grow_to", "free", "lookup"}
SCHEDULER_STATE = {"num_reserved_seqs", "waiting", "running", "busy"}


def violations(source: str, name: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        where = f"{name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            if isinstance(owner, ast.Attribute):
                if owner.attr in QUEUES and node.func.attr in QUEUE_MUTATORS:
                    found.append(f"{where}: .{owner.attr}.{node.func.attr}()")
                if owner.attr == "blocks" and node.func.attr in BLOCK_MUTATORS:
                    found.append(f"{where}: .blocks.{node.func.attr}()")
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AugAssign, ast.AnnAssign)) else []
        for t in targets:
            if isinstance(t, ast.Attribute) and t.attr in SCHEDULER_STATE and not (
                    isinstance(t.value, ast.Name) and t.value.id == "self"):
                found.append(f"{where}: assigns .{t.attr}")
    return found


def test_only_schedulers_and_the_kv_manager_change_queues_and_block_tables():
    outside = [p for p in PACKAGE.rglob("*.py")
               if "schedulers" not in p.parts and p.name != "kv_cache.py"]
    assert outside
    assert [v for p in outside for v in violations(p.read_text(), str(p.relative_to(PACKAGE.parent)))] == []


def test_the_rule_catches_an_edit_from_outside():
    source = ("def f(rep, r):\n    rep.scheduler.running.remove(r)\n    rep.blocks.free(r)\n"
              "    rep.scheduler.num_reserved_seqs += 1\n    rep.scheduler.waiting[0].priority = 1\n")
    assert sorted(violations(source, "probe.py")) == ["probe.py:2: .running.remove()", "probe.py:3: .blocks.free()",
                                              "probe.py:4: assigns .num_reserved_seqs"]
