"""Streaming trace readers: BurstGPT CSV, Azure LLM inference 2023 CSV, Mooncake JSONL.

Rows are read one at a time, so a 10-million-row trace is never held in memory; a malformed row raises a
``TraceError`` naming the file and line.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterator

from llmsim.config import TraceConfig
from llmsim.errors import TraceError

BURSTGPT_COLUMNS = ["Timestamp", "Model", "Request tokens", "Response tokens", "Total tokens", "Log Type"]
AZURE_COLUMNS = ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]
MOONCAKE_BLOCK_TOKENS = 512  # the trace's hash_ids name blocks of this many prompt tokens


@dataclass(frozen=True, slots=True)
class TraceRow:
    time_s: float  # on the trace's own clock (seconds since its first row)
    prompt_tokens: int
    output_tokens: int
    failed: bool  # the trace records this request as failed (BurstGPT: Response tokens == 0)
    line: int  # line in the file, for error messages
    hash_ids: tuple[int, ...] = ()  # Mooncake: ids of the prompt's 512-token blocks (equal ids, equal prefix)


def _open(path: Path):
    try:
        return path.open(newline="")
    except OSError as exc:
        raise TraceError(f"cannot read trace {path}: {exc.strerror}") from None


def _int(value: str, path: Path, line: int, column: str) -> int:
    try:
        n = int(float(value))
    except (TypeError, ValueError):
        raise TraceError(f"{path}:{line}: column {column!r} is {value!r}, expected a whole number") from None
    if n < 0:
        raise TraceError(f"{path}:{line}: column {column!r} is negative ({n})")
    return n


def _check_header(header: list[str] | None, expected: list[str], path: Path) -> None:
    if header is None:
        raise TraceError(f"{path}:1: empty file, expected the header {','.join(expected)}")
    missing = [c for c in expected if c not in header]
    if missing:
        raise TraceError(f"{path}:1: header lacks {missing}; expected columns {expected}")


def read_burstgpt(cfg: TraceConfig) -> Iterator[TraceRow]:
    path = Path(cfg.path)
    with _open(path) as f:
        reader = csv.DictReader(f)
        _check_header(reader.fieldnames, BURSTGPT_COLUMNS, path)
        for row in reader:
            line = reader.line_num
            if None in row.values() or None in row:
                raise TraceError(f"{path}:{line}: expected {len(BURSTGPT_COLUMNS)} columns")
            if cfg.model and row["Model"] != cfg.model:
                continue
            if cfg.log_type and row["Log Type"] != cfg.log_type:
                continue
            try:
                t = float(row["Timestamp"])
            except ValueError:
                raise TraceError(f"{path}:{line}: column 'Timestamp' is {row['Timestamp']!r}, expected seconds") from None
            response = _int(row["Response tokens"], path, line, "Response tokens")
            prompt = _int(row["Request tokens"], path, line, "Request tokens")
            yield TraceRow(t, prompt, response, response == 0, line)


def read_azure(cfg: TraceConfig) -> Iterator[TraceRow]:
    path = Path(cfg.path)
    t0 = None
    with _open(path) as f:
        reader = csv.DictReader(f)
        _check_header(reader.fieldnames, AZURE_COLUMNS, path)
        for row in reader:
            line = reader.line_num
            stamp = row["TIMESTAMP"] or ""
            try:
                # Seven fractional digits: trim to microseconds for datetime.
                head, _, frac = stamp.partition(".")
                t = datetime.fromisoformat(f"{head}.{(frac + '000000')[:6]}").timestamp()
            except ValueError:
                raise TraceError(f"{path}:{line}: TIMESTAMP {stamp!r} is not a date-time") from None
            t0 = t if t0 is None else t0
            prompt = _int(row["ContextTokens"], path, line, "ContextTokens")
            output = _int(row["GeneratedTokens"], path, line, "GeneratedTokens")
            yield TraceRow(t - t0, prompt, output, output == 0, line)


def read_mooncake(cfg: TraceConfig) -> Iterator[TraceRow]:
    path = Path(cfg.path)
    with _open(path) as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
                t = float(row["timestamp"]) / 1000.0  # milliseconds in the trace
                prompt, output = row["input_length"], row["output_length"]
                hash_ids = tuple(row.get("hash_ids", ()))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise TraceError(f"{path}:{line}: not a Mooncake row ({exc})") from None
            if not all(type(h) is int and h >= 0 for h in hash_ids):
                raise TraceError(f"{path}:{line}: hash_ids must be a list of non-negative whole numbers")
            prompt = _int(prompt, path, line, "input_length")
            if len(hash_ids) > -(-prompt // MOONCAKE_BLOCK_TOKENS):
                raise TraceError(f"{path}:{line}: {len(hash_ids)} hash_ids cover more than the "
                                 f"{prompt}-token prompt in {MOONCAKE_BLOCK_TOKENS}-token blocks")
            yield TraceRow(t, prompt, _int(output, path, line, "output_length"), False, line, hash_ids)


READERS = {"burstgpt": read_burstgpt, "azure": read_azure, "mooncake": read_mooncake}


def read_trace(cfg: TraceConfig) -> Iterator[TraceRow]:
    """Rows inside the window, times shifted to start at 0 and scaled by ``time_scale``."""
    last = float("-inf")
    for row in READERS[cfg.format](cfg):
        if row.time_s < last:
            raise TraceError(f"{cfg.path}:{row.line}: timestamp goes backwards ({row.time_s} after {last}); "
                             "traces must be sorted by time")
        last = row.time_s
        if row.time_s < cfg.start_s:
            continue
        if cfg.end_s is not None and row.time_s >= cfg.end_s:
            break
        yield TraceRow((row.time_s - cfg.start_s) * cfg.time_scale, row.prompt_tokens, row.output_tokens, row.failed,
                       row.line, row.hash_ids)


def mooncake_segments(hash_ids: tuple[int, ...], prompt_tokens: int) -> tuple[tuple[int, int], ...]:
    """The prompt's named content: block ``j`` of the trace covers tokens ``[512 j, 512 (j + 1))`` (the last one
    what is left of the prompt). The KV manager splits them into its own blocks and chains their hashes."""
    return tuple((h, min(MOONCAKE_BLOCK_TOKENS, prompt_tokens - j * MOONCAKE_BLOCK_TOKENS))
                 for j, h in enumerate(hash_ids))
