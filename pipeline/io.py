"""Shard discovery, reading, atomic per-shard writes, completion markers and resume, through
fsspec (local paths and gs://).

A finished output shard `OUT/part-3.jsonl` has a completion marker `OUT/_done/part-3.jsonl.json`,
written after the shard. The marker records what produced the shard (input URL and size, the
job's configuration and its hash, the lines covered under --limit) and the shard's counts. A rerun
skips shards whose output and marker both exist and redoes every other one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import posixpath
import random
import time
import uuid
from typing import Any, Callable, Iterator

import fsspec

MARKER_DIR = "_done"
MANIFEST = "_manifest.json"
TEMP_INFIX = ".inprogress-"


def discover_shards(pattern: str) -> list[str]:
    """Input shard URLs matching a glob, sorted; an error if none match or two share a file name
    (output shard i is named after input shard i)."""
    fs, _ = fsspec.core.url_to_fs(pattern)
    paths = sorted(p for p in fs.glob(pattern) if not fs.isdir(p))
    if not paths:
        raise FileNotFoundError(f"--input {pattern!r} matches no files")
    names = [posixpath.basename(p) for p in paths]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"--input {pattern!r} matches several shards named {dup[0]!r}; "
                         "output shards are named after input shards, so names must be unique")
    return [fs.unstrip_protocol(p) for p in paths]


@dataclasses.dataclass(frozen=True)
class OversizedLine:
    """Stands for a line longer than the reader's max_bytes, which is never held in memory whole."""

    size: int  # bytes, without the newline


def read_lines(url: str, max_bytes: int | None = None,
               block: int = 1 << 20) -> Iterator[tuple[int, bytes | OversizedLine]]:
    """(1-based line number, raw bytes without the newline) for every non-blank line; with
    max_bytes, a longer line comes as an OversizedLine and memory stays bounded by max_bytes + block."""
    with fsspec.open(url, "rb", compression="infer") as f:
        lines = f if max_bytes is None else _bounded_lines(f, max_bytes, block)
        for n, raw in enumerate(lines, start=1):
            if isinstance(raw, OversizedLine):
                yield n, raw
                continue
            raw = raw.rstrip(b"\r\n")
            if raw.strip():
                yield n, raw


def _bounded_lines(f, max_bytes: int, block: int) -> Iterator[bytes | OversizedLine]:
    """Lines of a binary file, without their newline; a line over max_bytes as OversizedLine."""
    head = bytearray()  # the current line so far, while it is within max_bytes
    dropped = 0  # once the current line is over max_bytes: its size so far (its bytes are dropped)
    while chunk := f.read(block):
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            yield _whole_line(head, dropped, chunk[start:end], max_bytes)
            head.clear()
            dropped, start = 0, end + 1
        rest = len(chunk) - start
        if dropped or len(head) + rest > max_bytes:
            dropped += len(head) + rest
            head.clear()
        else:
            head += chunk[start:]
    if head or dropped:
        yield _whole_line(head, dropped, b"", max_bytes)


def _whole_line(head: bytearray, dropped: int, tail: bytes, max_bytes: int) -> bytes | OversizedLine:
    size = dropped + len(head) + len(tail)
    return OversizedLine(size) if size > max_bytes else bytes(head) + tail


def limit_plan(shards: list[str], limit: int,
               read: Callable[[str], Iterator[tuple[int, Any]]]) -> dict[int, int | None]:
    """The shards that hold the first `limit` records (shard order, then line order), reading no
    further than needed: {shard index: last line to process, or None for the whole shard}."""
    plan: dict[int, int | None] = {}
    seen = 0
    for index, url in enumerate(shards):
        if seen == limit:
            break
        records, last = read(url), None
        for line, _ in records:
            seen += 1
            if seen == limit:  # a shard that ends exactly here is covered whole
                last = line if next(records, None) is not None else None
                break
        plan[index] = last
    return plan


def output_url(output_dir: str, shard_url: str) -> str:
    name = posixpath.basename(shard_url)
    for ext in (".gz",):
        name = name.removesuffix(ext)
    stem = name.rsplit(".", 1)[0] if "." in name else name
    return output_dir.rstrip("/") + "/" + stem + ".jsonl"


WRITE_ATTEMPTS = 4


def _transient_errors() -> tuple[type[BaseException], ...]:
    """What a retried write may see from a flaky object store: OSError covers requests' errors,
    timeouts and the 404 of a resumable upload that the server finished but whose answer was lost."""
    errors: list[type[BaseException]] = [OSError]
    try:
        import aiohttp
        from gcsfs.retry import HttpError

        errors += [aiohttp.ClientError, HttpError]
    except ImportError:
        pass
    return tuple(errors)


def retry_transient(write: Callable[..., None]) -> Callable[..., None]:
    """Redoes a whole write, with backoff, when it fails on a transient error. gcsfs retries each
    HTTP request (5xx, 408, 429, dropped connections) up to 6 times, but not a request whose effect
    landed while its answer was lost: rewriting the whole object is idempotent."""
    @functools.wraps(write)
    def wrapper(url: str, *args, **kwargs) -> None:
        for attempt in range(WRITE_ATTEMPTS):
            try:
                return write(url, *args, **kwargs)
            except _transient_errors() as e:
                if attempt == WRITE_ATTEMPTS - 1:
                    raise
                delay = 2 ** attempt * (1 + random.random())
                logging.getLogger(__name__).warning("writing %s failed (%s: %s); retrying in %.1f s",
                                                    url, type(e).__name__, e, delay)
                time.sleep(delay)
    return wrapper


@retry_transient
def write_atomic(url: str, lines: list[str]) -> None:
    """Writes a whole shard so that readers never see half of it. Local files: a temporary name,
    then a rename. Object stores (gs://) publish an object only when its upload completes, so the
    final name is written directly (a server-side move would be a second, non-atomic step there).
    Idempotent: a retried or duplicate attempt writes its own temporary file, and the last rename wins."""
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    local = _is_local(fs)
    target = path + TEMP_INFIX + uuid.uuid4().hex[:12] if local else path
    with fs.open(target, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(line + "\n")
    if local:
        fs.mv(target, path)


def _is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,))


def marker_url(output_url: str) -> str:
    """OUT/part-3.jsonl -> OUT/_done/part-3.jsonl.json"""
    out_dir, name = output_url.rsplit("/", 1)
    return f"{out_dir}/{MARKER_DIR}/{name}.json"


def input_size(url: str) -> int:
    fs, path = fsspec.core.url_to_fs(url)
    return int(fs.size(path))


def write_marker(output_url: str, marker: dict[str, Any]) -> None:
    """Declares the output shard complete; call only after the shard itself is written."""
    write_atomic(marker_url(output_url), [json.dumps(marker, sort_keys=True, ensure_ascii=False)])


def read_marker(output_url: str) -> dict[str, Any] | None:
    fs, path = fsspec.core.url_to_fs(marker_url(output_url))
    try:
        with fs.open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None


class ShardMismatch(ValueError):
    """An output directory holds a shard that a different input or configuration produced."""


def shard_status(output_url: str, expected: dict[str, Any]) -> str:
    """'complete' (output and a matching marker: skip), 'partial' (a temporary file, an output
    without a marker, or a marker for other --limit lines: redo) or 'absent'.

    `expected` holds what this run would write into the marker: input, input_size, config,
    config_hash, last_line. Raises ShardMismatch when an existing marker names another input or
    configuration, so that one output directory never mixes two jobs.
    """
    fs, path = fsspec.core.url_to_fs(output_url)
    marker = read_marker(output_url)
    if marker is not None:
        _check_same_job(output_url, marker, expected)
    exists = fs.exists(path)
    temps = fs.glob(path + TEMP_INFIX + "*") if _is_local(fs) else []
    if marker is not None and exists and marker.get("last_line") == expected.get("last_line"):
        return "complete"
    return "partial" if (marker is not None or exists or temps) else "absent"


def _check_same_job(output_url: str, marker: dict[str, Any], expected: dict[str, Any]) -> None:
    where = f"{output_url} (marker {marker_url(output_url)})"
    if marker.get("input") != expected["input"]:
        raise ShardMismatch(f"{where} was written from input {marker.get('input')!r}; this run reads "
                            f"{expected['input']!r}. Use another --output, or pass --overwrite to redo it")
    if marker.get("input_size") != expected["input_size"]:
        raise ShardMismatch(f"{where} was written from {expected['input']} when it had "
                            f"{marker.get('input_size')} bytes; it has {expected['input_size']} now. "
                            "Pass --overwrite to redo every shard, or use another --output")
    if marker.get("config_hash") != expected["config_hash"]:
        diff = config_diff(marker.get("config") or {}, expected["config"])
        raise ShardMismatch(f"{where} was written with a different configuration "
                            f"(config hash {marker.get('config_hash')} vs {expected['config_hash']}): "
                            f"{'; '.join(diff) or 'unknown difference'}. Pass --overwrite to redo every "
                            "shard with this configuration, or use another --output")


def config_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """['model.max_len: 256 -> 128', ...]: the leaves that differ between two nested dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def plan_shards(outputs: dict[int, str], expected: dict[int, dict[str, Any]],
                overwrite: bool) -> tuple[list[int], list[int]]:
    """(shards to do, shards to skip as complete), by shard index. Checks every shard against its
    marker before touching any (ShardMismatch), then clears what will be redone: its marker and
    temporary files (the output itself is replaced when the shard is written again)."""
    status = {i: "redo" if overwrite else shard_status(outputs[i], expected[i]) for i in sorted(outputs)}
    todo = [i for i, st in status.items() if st != "complete"]
    for i in todo:
        if status[i] != "absent":
            clear_for_redo(outputs[i])
    return todo, [i for i, st in status.items() if st == "complete"]


def clear_for_redo(output_url: str) -> None:
    """Deletes a shard's completion marker and its temporary files (local), before it is redone."""
    for url, remove_itself in ((marker_url(output_url), True), (output_url, False)):
        fs, path = fsspec.core.url_to_fs(url)
        doomed = fs.glob(path + TEMP_INFIX + "*") if _is_local(fs) else []
        for p in doomed + ([path] if remove_itself and fs.exists(path) else []):
            fs.rm(p)


def write_json_atomic(url: str, obj: Any) -> None:
    write_atomic(url, [json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False)])
