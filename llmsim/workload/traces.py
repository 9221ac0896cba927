"""Streaming trace readers: BurstGPT CSV, Azure LLM inference 2023 CSV, Mooncake JSONL, and the lengths-only CSV
of Sarathi-Serve and Vidur (``num_prefill_tokens,num_decode_tokens``).

Rows are read one at a time, so a 10-million-row trace is never held in memory; a malformed row raises a
``TraceError`` naming the file and line.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from llmsim.config import MAX_TOKENS, TraceConfig
from llmsim.errors import TraceError

BURSTGPT_COLUMNS = ["Timestamp", "Model", "Request tokens", "Response tokens", "Total tokens", "Log Type"]
AZURE_COLUMNS = ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]
PREFILL_DECODE_COLUMNS = ["num_prefill_tokens", "num_decode_tokens"]
MOONCAKE_BLOCK_TOKENS = 512  # the trace's hash_ids name blocks of this many prompt tokens


# Not frozen: a frozen dataclass's __init__ sets each field through object.__setattr__, which had taken a third of
# the time to read a million-row trace. ``read_trace`` shifts a reader's fresh rows in place.
@dataclass(slots=True)
class TraceRow:
    time_s: float  # on the trace's own clock (seconds since its first row)
    prompt_tokens: int
    output_tokens: int
    failed: bool  # the trace records this request as failed (BurstGPT: Response tokens == 0)
    line: int  # line in the file, for error messages
    hash_ids: tuple[int, ...] = ()  # Mooncake: ids of the prompt's 512-token blocks (equal ids, equal prefix)
    session: str = ""  # BurstGPT v1.2: the conversation this request belongs to ("" for none)
    elapsed_s: float = math.nan  # BurstGPT v1.2: the real service's full response time (NaN where not given)


def _open(path: Path):
    try:
        # utf-8-sig: a byte-order mark (Excel's "CSV UTF-8" writes one) is no part of the header's first name
        return _Text(path.open(newline="", encoding="utf-8-sig"), path)
    except OSError as exc:
        raise TraceError(f"cannot read trace {path}: {exc.strerror}") from None


class _Text:
    """A trace file's lines; bytes that are not UTF-8 text are a TraceError naming the file."""

    def __init__(self, f, path: Path):
        self.f, self.path = f, path

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()

    def __iter__(self):
        try:
            yield from self.f
        except UnicodeDecodeError:
            raise TraceError(f"{self.path}: not a text file (bytes that are not UTF-8)") from None


def _int(value, path: Path, line: int, column: str, minimum: int = 0) -> int:
    """A whole, finite number >= ``minimum`` ("12" and "12.0" are, "12.5", "nan", "true" are not)."""
    if isinstance(value, bool):
        raise TraceError(f"{path}:{line}: column {column!r} is {value!r}, expected a whole number")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise TraceError(f"{path}:{line}: column {column!r} is {value!r}, expected a whole number") from None
    if not math.isfinite(x) or x != int(x):
        raise TraceError(f"{path}:{line}: column {column!r} is {value!r}, expected a whole number")
    n = int(x)
    if n < minimum:
        raise TraceError(f"{path}:{line}: column {column!r} is {n}, expected at least {minimum}")
    if n > MAX_TOKENS:
        raise TraceError(f"{path}:{line}: column {column!r} is {n}, beyond any context length ({MAX_TOKENS})")
    return n


def _seconds(value, path: Path, line: int, column: str, unit: str = "seconds", scale: float = 1.0) -> float:
    """A finite, non-negative time, read in ``unit`` and returned in seconds (``scale`` converts)."""
    if isinstance(value, bool):  # JSON true is no time, though float() takes it
        raise TraceError(f"{path}:{line}: column {column!r} is {value!r}, expected {unit}")
    try:
        t = float(value) * scale
    except (TypeError, ValueError):
        raise TraceError(f"{path}:{line}: column {column!r} is {value!r}, expected {unit}") from None
    if not math.isfinite(t) or t < 0:
        raise TraceError(f"{path}:{line}: column {column!r} is {value!r}, expected a finite, non-negative time")
    return t


def _check_header(header: list[str] | None, expected: list[str], path: Path) -> None:
    if header is None:
        raise TraceError(f"{path}:1: empty file, expected the header {','.join(expected)}")
    missing = [c for c in expected if c not in header]
    if missing:
        raise TraceError(f"{path}:1: header lacks {missing}; expected columns {expected}")


def _check_width(row: dict, width: int, path: Path, line: int) -> None:
    """A ``csv.DictReader`` row has the header's number of fields (it fills a short row with None, and keeps a long
    row's extra fields under None)."""
    if None in row or None in row.values():
        got = sum(v is not None for k, v in row.items() if k is not None) + len(row.get(None, ()))
        raise TraceError(f"{path}:{line}: expected {width} columns (as the header has), got {got}")


def read_burstgpt(cfg: TraceConfig) -> Iterator[TraceRow]:
    path = Path(cfg.path)
    with _open(path) as f:
        # csv.reader and column positions, not DictReader (a dict per row): a million-row replay reads faster.
        reader = csv.reader(f)
        header = next(reader, None)
        _check_header(header, BURSTGPT_COLUMNS, path)
        col = {name: i for i, name in enumerate(header)}  # a repeated name: its last column, as DictReader has it
        width = len(header)
        i_time, i_model, i_request = col["Timestamp"], col["Model"], col["Request tokens"]
        i_response, i_log = col["Response tokens"], col["Log Type"]
        # v1.2 adds "Session ID" (conversation logs: a conversation's requests share it) and "Elapsed time".
        i_session, i_elapsed = col.get("Session ID"), col.get("Elapsed time")
        for row in reader:
            if not row:
                continue  # a blank line
            line = reader.line_num
            if len(row) != width:
                raise TraceError(f"{path}:{line}: expected {width} columns (as the header has), got {len(row)}")
            if cfg.model and row[i_model] != cfg.model:
                continue
            if cfg.log_type and row[i_log] != cfg.log_type:
                continue
            # Plain numbers take the fast path; anything else the checks that accept "12.0" or name the error.
            try:
                t, response, prompt = float(row[i_time]), int(row[i_response]), int(row[i_request])
            except ValueError:
                t = -1.0
            if not (0.0 <= t < math.inf and 0 <= response <= MAX_TOKENS and 1 <= prompt <= MAX_TOKENS):
                t = _seconds(row[i_time], path, line, "Timestamp")
                response = _int(row[i_response], path, line, "Response tokens")  # 0: a failed request
                prompt = _int(row[i_request], path, line, "Request tokens", minimum=1)
            session = row[i_session].strip() if i_session is not None else ""
            elapsed = row[i_elapsed].strip() if i_elapsed is not None else ""
            elapsed_s = _seconds(elapsed, path, line, "Elapsed time") if elapsed else math.nan
            yield TraceRow(t, prompt, response, response == 0, line, session=session, elapsed_s=elapsed_s)


def read_azure(cfg: TraceConfig) -> Iterator[TraceRow]:
    path = Path(cfg.path)
    t0 = None
    with _open(path) as f:
        reader = csv.DictReader(f)
        _check_header(reader.fieldnames, AZURE_COLUMNS, path)
        for row in reader:
            line = reader.line_num
            _check_width(row, len(reader.fieldnames), path, line)
            stamp = row["TIMESTAMP"]
            t = _azure_time(stamp, path, line)
            t0 = t if t0 is None else t0
            prompt = _int(row["ContextTokens"], path, line, "ContextTokens", minimum=1)
            output = _int(row["GeneratedTokens"], path, line, "GeneratedTokens")
            yield TraceRow(t - t0, prompt, output, output == 0, line)


def read_prefill_decode(cfg: TraceConfig) -> Iterator[TraceRow]:
    """Sarathi-Serve's and Vidur's processed traces: (prompt, output) lengths and no times, so only
    ``workload.lengths_from`` takes them (rows are numbered as seconds to keep them in order)."""
    path = Path(cfg.path)
    with _open(path) as f:
        reader = csv.DictReader(f)
        _check_header(reader.fieldnames, PREFILL_DECODE_COLUMNS, path)
        for i, row in enumerate(reader):
            line = reader.line_num
            _check_width(row, len(reader.fieldnames), path, line)
            prompt = _int(row["num_prefill_tokens"], path, line, "num_prefill_tokens", minimum=1)
            output = _int(row["num_decode_tokens"], path, line, "num_decode_tokens", minimum=1)
            yield TraceRow(float(i), prompt, output, False, line)


def _azure_time(stamp: str, path: Path, line: int) -> float:
    """Seconds of an Azure TIMESTAMP: seven fractional digits, and a timezone offset where the file has one
    (without one, the time is taken as UTC, so the trace's clock never depends on where it is read)."""
    head, dot, rest = stamp.partition(".")
    zone = ""
    if dot:
        digits = rest
        for sign in ("+", "-", "Z"):
            if sign in rest:
                digits, zone = rest[:rest.index(sign)], rest[rest.index(sign):]
                break
        text = f"{head}.{(digits + '000000')[:6]}{zone}"
    else:
        text = head
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise TraceError(f"{path}:{line}: TIMESTAMP {stamp!r} is not a date-time") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return t.timestamp()


def read_mooncake(cfg: TraceConfig) -> Iterator[TraceRow]:
    path = Path(cfg.path)
    with _open(path) as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
                if not isinstance(row, dict):
                    raise TraceError(f"{path}:{line}: not a Mooncake row (a JSON object with timestamp, input_length, "
                                     f"output_length and hash_ids), but a JSON {type(row).__name__}")
                raw_t = row["timestamp"]
                prompt, output = row["input_length"], row["output_length"]
                hash_ids = tuple(row.get("hash_ids", ()))
            except KeyError as exc:
                raise TraceError(f"{path}:{line}: not a Mooncake row: no {exc}") from None
            except (json.JSONDecodeError, TypeError, ValueError, AttributeError) as exc:
                raise TraceError(f"{path}:{line}: not a Mooncake row ({exc})") from None
            t = _seconds(raw_t, path, line, "timestamp", "milliseconds", 1e-3)
            if not all(type(h) is int and h >= 0 for h in hash_ids):
                raise TraceError(f"{path}:{line}: hash_ids must be a list of non-negative whole numbers")
            prompt = _int(prompt, path, line, "input_length", minimum=1)
            if len(hash_ids) > -(-prompt // MOONCAKE_BLOCK_TOKENS):
                raise TraceError(f"{path}:{line}: {len(hash_ids)} hash_ids cover more than the "
                                 f"{prompt}-token prompt in {MOONCAKE_BLOCK_TOKENS}-token blocks")
            yield TraceRow(t, prompt, _int(output, path, line, "output_length", minimum=1), False, line, hash_ids)


READERS = {"burstgpt": read_burstgpt, "azure": read_azure, "mooncake": read_mooncake,
           "prefill_decode": read_prefill_decode}


def read_trace(cfg: TraceConfig) -> Iterator[TraceRow]:
    """Rows inside the window, times shifted to start at 0 and scaled by ``time_scale`` (each reader's rows are
    fresh objects, so they are shifted in place)."""
    last = float("-inf")
    start_s, scale = cfg.start_s, cfg.time_scale
    for row in READERS[cfg.format](cfg):
        if row.time_s < last:
            raise TraceError(f"{cfg.path}:{row.line}: timestamp goes backwards ({row.time_s} after {last}); "
                             "traces must be sorted by time")
        last = row.time_s
        if row.time_s < cfg.start_s:
            continue
        if cfg.end_s is not None and row.time_s >= cfg.end_s:
            break
        if cfg.max_total_tokens is not None and row.prompt_tokens + row.output_tokens > cfg.max_total_tokens:
            continue
        row.time_s = (row.time_s - start_s) * scale
        row.elapsed_s = row.elapsed_s * scale
        yield row


class Conversations:
    """BurstGPT v1.2 sessions as named content, so the prefix cache sees what a chat server sees: turn ``k`` of a
    conversation resends the conversation so far (turn ``k-1``'s prompt and its answer) and adds a new message.
    Each turn's request names its history, its new message and its answer; the next turn names the same history
    plus that answer. A turn whose prompt is shorter than the history it would resend (an edited or truncated
    conversation) starts the history afresh. Content ids are given in order of first appearance, so a replay
    is deterministic."""

    def __init__(self) -> None:
        self._history: dict[str, tuple[tuple[int, int], ...]] = {}  # session -> named content of the next turn
        self._next_id = 0

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def segments(self, session: str, prompt_tokens: int, output_tokens: int) -> tuple[tuple[int, int], ...]:
        history = self._history.get(session, ())
        resent = sum(n for _, n in history)
        if resent > prompt_tokens:  # not a continuation of what this conversation sent before
            history, resent = (), 0
        segments = history + (((self._new_id(), prompt_tokens - resent),) if prompt_tokens > resent else ())
        if output_tokens:
            segments += ((self._new_id(), output_tokens),)
        self._history[session] = segments
        return segments


def mooncake_segments(hash_ids: tuple[int, ...], prompt_tokens: int) -> tuple[tuple[int, int], ...]:
    """The prompt's named content: block ``j`` of the trace covers tokens ``[512 j, 512 (j + 1))`` (the last one
    what is left of the prompt). The KV manager splits them into its own blocks and chains their hashes."""
    return tuple((h, min(MOONCAKE_BLOCK_TOKENS, prompt_tokens - j * MOONCAKE_BLOCK_TOKENS))
                 for j, h in enumerate(hash_ids))
