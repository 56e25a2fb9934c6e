"""Reads one rank's ``timing/rank{R}.jsonl`` (schema 1) fast and tolerantly.

Step lines are most of a log (millions in a study), so they are not parsed one by one: the bytes of every line
that starts like the ones ``TimingLog.step`` writes are cut out with numpy, their keys and JSON punctuation are
deleted with one ``bytes.translate`` and the numbers are read by pandas' C CSV parser. About 5x faster than
``json.loads`` per line (see benchmarks/analysis.py). Whatever does not fit that mould (other key orders, other
spacing, extra fields) is parsed line by line with ``json``, so the fast path can only be a shortcut, never a
different answer. Headers, evaluations and end lines are few and always go through ``json``.

A cut last line (a kill mid-write) is dropped and reported; a damaged line elsewhere raises :class:`LogError`;
a header of an unknown schema version raises :class:`LogError`. Repeated steps (a resumed run re-does the steps
after its checkpoint) keep the later line.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from r2d2_hpc.errors import R2D2Error, problem

SUPPORTED_SCHEMAS = (1,)
STEP_KEYS = (
    "step",
    "epoch",
    "data_wait_s",
    "compute_s",
    "exposed_comm_s",
    "comm_s",
    "other_s",
    "step_s",
    "samples",
    "loss",
    "lr",
    "time",
)
# Step lines written before communication was measured: the same schema, without the three booked parts.
LEGACY_STEP_KEYS = ("step", "epoch", "data_wait_s", "compute_s", "step_s", "samples", "loss", "lr", "time")
STEP_LAYOUTS = (STEP_KEYS, LEGACY_STEP_KEYS)
INT_KEYS = ("step", "epoch", "samples")
REQUIRED_KEYS = ("step", "step_s")
_STEP_PREFIX = b'{"type": "step", '
# Everything in a schema-1 step line that is not part of a number: key letters, quotes, braces, colons,
# spaces. Exponents ("1e-05") are upper-cased first so their "e" survives.
_DELETE = b'abcdefghijklmnopqrstuvwxyz_"{}: '
EVAL_TYPES = ("eval", "evaluation")


class LogError(R2D2Error):
    """A training log is damaged in a way the analysis cannot work around, or of an unknown version."""


@dataclass
class RankLog:
    """What one rank's timing log holds, steps deduplicated (later lines win) and sorted by step."""

    path: Path
    headers: list[dict[str, Any]] = field(default_factory=list)
    steps: pd.DataFrame = field(default_factory=lambda: empty_steps())
    evals: list[dict[str, Any]] = field(default_factory=list)
    ends: list[dict[str, Any]] = field(default_factory=list)
    truncated: bool = False
    num_step_lines: int = 0
    segment_times: dict[int, tuple[float, float]] = field(default_factory=dict)
    fast_path: bool = True


def empty_steps() -> pd.DataFrame:
    """A steps table with no rows and the right columns."""
    cols = {k: np.array([], dtype=np.int64 if k in INT_KEYS else np.float64) for k in STEP_KEYS}
    return pd.DataFrame({**cols, "segment": np.array([], dtype=np.int64)})


def read_rank_log(path: str | Path) -> RankLog:
    """Reads a rank's timing log; see the module docstring for what is tolerated and what raises."""
    path = Path(path)
    data = path.read_bytes()
    log = RankLog(path)
    data, log.truncated = _drop_cut_tail(data)
    if not data:
        return log
    buf = np.frombuffer(data, dtype=np.uint8)
    ends = np.flatnonzero(buf == 10)
    starts = np.empty_like(ends)
    starts[:1] = 0
    starts[1:] = ends[:-1] + 1
    is_step = _has_prefix(buf, starts, ends - starts, _STEP_PREFIX)
    step_lines = np.flatnonzero(is_step)
    other_steps, other_lines = _read_other_lines(path, data, starts, ends, np.flatnonzero(~is_step), log)
    fast = _parse_step_block(_mask_other_lines(data, starts, ends, is_step), step_lines, starts, ends)
    if fast is None:
        log.fast_path = False
        fast = _parse_steps_slow(path, data, starts, ends, step_lines)
    table = _merge_steps(path, fast, step_lines, other_steps, other_lines)
    log.num_step_lines = len(table)
    header_lines = np.array([h["_line"] for h in log.headers], dtype=np.int64)
    table["segment"] = np.maximum(np.searchsorted(header_lines, table.pop("_line"), side="right") - 1, 0)
    for rec in log.evals + log.ends:
        rec["segment"] = max(int(np.searchsorted(header_lines, rec["_line"], side="right")) - 1, 0)
    log.segment_times = _segment_times(table, log.ends)
    log.steps = _last_wins(table, "step")
    by_step = {int(e.get("step", -1)): e for e in log.evals}  # a re-done evaluation replaces the first one
    log.evals = [by_step[s] for s in sorted(by_step)]
    return log


def _drop_cut_tail(data: bytes) -> tuple[bytes, bool]:
    """Drops a last line without its newline unless it is complete JSON (the writer was killed mid-line)."""
    if not data or data.endswith(b"\n"):
        return data, False
    cut = data.rfind(b"\n") + 1
    try:
        json.loads(data[cut:])
    except ValueError:
        return data[:cut], True
    return data + b"\n", False


def _has_prefix(buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray, prefix: bytes) -> np.ndarray:
    mask = lengths >= len(prefix)
    candidates = starts[mask]
    ok = np.ones(len(candidates), dtype=bool)
    for offset, byte in enumerate(prefix):
        ok &= buf[candidates + offset] == byte
    mask[mask] = ok
    return mask


def _mask_other_lines(data: bytes, starts: np.ndarray, ends: np.ndarray, is_step: np.ndarray) -> bytearray:
    """A copy of the log whose non-step lines start with ``#``, so the CSV parser skips them as comments
    (cheaper than cutting the step lines out)."""
    masked = bytearray(data)
    view = np.frombuffer(masked, dtype=np.uint8)
    other = ~is_step & (ends > starts)  # an empty line has no first byte to mark (the parser skips it)
    view[starts[other]] = ord("#")
    return masked


def _parse_step_block(
    block: bytearray, lines: np.ndarray, starts: np.ndarray, ends: np.ndarray
) -> pd.DataFrame | None:
    """Parses schema-1 step lines in bulk; None when they are not exactly in the writer's mould."""
    if len(lines) == 0:
        return pd.DataFrame({k: np.array([], dtype=np.float64) for k in STEP_KEYS})
    first, last = lines[0], lines[-1]
    keys = _layout(block[starts[first] : ends[first]])
    if keys is None or _layout(block[starts[last] : ends[last]]) != keys:
        return None
    for old, new in ((b"null", b"NULL"), (b"e-", b"E-"), (b"e+", b"E+")):
        if old in block:  # each replace copies the whole log
            block = block.replace(old, new)
    numbers = block.translate(None, _DELETE)
    try:
        table = pd.read_csv(
            io.BytesIO(numbers),
            header=None,
            names=("type", *keys),
            dtype=np.float64,
            engine="c",
            comment="#",
            na_values=["NULL", ""],
            keep_default_na=False,
        )
    except (ValueError, pd.errors.ParserError):
        return None
    # A line with fewer fields would be padded with NaN: the columns the writer never leaves empty catch it.
    if len(table) != len(lines) or not np.isnan(table["type"].to_numpy()).all():
        return None
    if np.isnan(table[["step", "epoch", "step_s", "samples", "time"]].to_numpy()).any():
        return None
    table = table.drop(columns="type")
    for key in STEP_KEYS:
        if key not in table:
            table[key] = np.nan  # a legacy line: not measured
    return table[list(STEP_KEYS)]


def _layout(line: bytes) -> tuple[str, ...] | None:
    """The step-key layout a line is written in (one of :data:`STEP_LAYOUTS`), or None."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    return next((keys for keys in STEP_LAYOUTS if tuple(record) == ("type", *keys)), None)


def _parse_steps_slow(
    path: Path, data: bytes, starts: np.ndarray, ends: np.ndarray, lines: np.ndarray
) -> pd.DataFrame:
    records = [_loads(path, data[starts[i] : ends[i]], int(i)) for i in lines]
    return _records_to_table(path, records, lines)


def _records_to_table(path: Path, records: list[dict[str, Any]], lines: np.ndarray) -> pd.DataFrame:
    columns: dict[str, list[float]] = {k: [] for k in STEP_KEYS}
    for rec, line in zip(records, lines, strict=True):
        missing = [k for k in REQUIRED_KEYS if not isinstance(rec.get(k), int | float)]
        if missing:
            raise LogError(
                problem(
                    path,
                    f"the step line {int(line) + 1} has no number for {', '.join(missing)}",
                    f"step lines with {', '.join(STEP_KEYS)}",
                    "delete the damaged line (the log is append-only)",
                )
            )
        for key in STEP_KEYS:
            value = rec.get(key)
            columns[key].append(float(value) if isinstance(value, int | float) else math.nan)
    return pd.DataFrame({k: np.array(v, dtype=np.float64) for k, v in columns.items()})


def _read_other_lines(
    path: Path, data: bytes, starts: np.ndarray, ends: np.ndarray, lines: np.ndarray, log: RankLog
) -> tuple[list[dict[str, Any]], list[int]]:
    """Headers, evaluations, end lines, and step lines the fast path did not recognise."""
    steps: list[dict[str, Any]] = []
    step_lines: list[int] = []
    for i in lines:
        raw = data[starts[i] : ends[i]]
        if not raw.strip():
            continue
        rec = _loads(path, raw, int(i))
        kind = rec.get("type")
        rec["_line"] = int(i)
        if kind == "header":
            _check_schema(path, rec, int(i))
            log.headers.append(rec)
        elif kind == "step":
            steps.append(rec)
            step_lines.append(int(i))
        elif kind in EVAL_TYPES:
            log.evals.append(rec)
        elif kind == "end":
            log.ends.append(rec)
    return steps, step_lines


def _loads(path: Path, raw: bytes, line: int) -> dict[str, Any]:
    try:
        rec = json.loads(raw)
    except ValueError as exc:
        raise LogError(
            problem(
                path,
                f"line {line + 1} is not JSON ({exc})",
                "one JSON object per line",
                "delete the damaged line (the log is append-only) or move the run out of the study",
            )
        ) from exc
    if not isinstance(rec, dict):
        raise LogError(
            problem(path, f"line {line + 1} is not a JSON object", "one JSON object per line", "delete it")
        )
    return rec


def _check_schema(path: Path, header: dict[str, Any], line: int) -> None:
    schema = header.get("schema")
    if schema not in SUPPORTED_SCHEMAS:
        raise LogError(
            problem(
                path,
                f"the header on line {line + 1} is of schema {schema!r}",
                f"schema {', '.join(map(str, SUPPORTED_SCHEMAS))} (what this r2d2_hpc reads)",
                "analyse these logs with the r2d2_hpc version that wrote them, or upgrade r2d2_hpc",
            )
        )


def _merge_steps(
    path: Path,
    fast: pd.DataFrame,
    fast_lines: np.ndarray,
    other: list[dict[str, Any]],
    other_lines: list[int],
) -> pd.DataFrame:
    fast = fast.assign(_line=fast_lines.astype(np.int64))
    if other:
        slow = _records_to_table(path, other, np.array(other_lines)).assign(_line=np.array(other_lines))
        fast = pd.concat([fast, slow], ignore_index=True).sort_values("_line", kind="stable")
    for key in INT_KEYS:
        fast[key] = fast[key].fillna(-1).astype(np.int64)
    return fast.reset_index(drop=True)


def _segment_times(table: pd.DataFrame, ends: list[dict[str, Any]]) -> dict[int, tuple[float, float]]:
    """Per segment: (start of its first logged step, its last step or end line), in unix seconds; taken before
    re-done steps are dropped, so a resumed run's first segment keeps the time it really ran."""
    times: dict[int, tuple[float, float]] = {}
    segment, end_s = table["segment"].to_numpy(), table["time"].to_numpy()
    start_s = end_s - table["step_s"].to_numpy()
    for index in np.unique(segment):
        mask = segment == index
        times[int(index)] = (float(np.nanmin(start_s[mask])), float(np.nanmax(end_s[mask])))
    for end in ends:
        if isinstance(end.get("time"), int | float):
            first, last = times.get(end["segment"], (float(end["time"]), float(end["time"])))
            times[end["segment"]] = (first, max(last, float(end["time"])))
    return times


def _last_wins(table: pd.DataFrame, key: str) -> pd.DataFrame:
    """Keeps the last row of every ``key`` (rows are in file order), sorted by ``key``."""
    values = table[key].to_numpy()
    if len(values) == 0 or (np.all(np.diff(values) > 0)):
        return table.reset_index(drop=True)
    reversed_values = values[::-1]
    _, first_in_reversed = np.unique(reversed_values, return_index=True)
    keep = np.sort(len(values) - 1 - first_in_reversed)
    return table.iloc[keep].sort_values(key, kind="stable").reset_index(drop=True)
