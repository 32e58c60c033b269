"""Shard discovery, reading, atomic per-shard writes, completion markers and resume, through
fsspec (local paths and gs://).

A finished output shard `OUT/part-3.jsonl` has a completion marker `OUT/_done/part-3.jsonl.json`,
written after the shard. The marker records what produced the shard (input URL, size and content
fingerprint, the job's configuration and its hash, the lines covered under --limit) and the
shard's counts. A rerun skips shards whose output and marker both exist and redoes every other one.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import posixpath
import random
import time
import uuid
from typing import Any, Callable, Iterator

import fsspec

from pipeline.errors import JobError

MARKER_DIR = "_done"
MANIFEST = "_manifest.json"
TEMP_INFIX = ".inprogress-"


class NoInput(JobError, FileNotFoundError):
    """--input matches no files."""


def discover_shards(pattern: str) -> list[str]:
    """Input shard URLs matching a glob, sorted; an error if none match or two would write the same
    output shard (output shard i is named after input shard i: see output_url)."""
    fs, _ = fsspec.core.url_to_fs(pattern)
    urls = [fs.unstrip_protocol(p) for p in sorted(p for p in fs.glob(pattern) if not fs.isdir(p))]
    if not urls:
        raise NoInput("--input matches no files", pattern,
                      "check the path, and quote the glob so that the shell does not expand it")
    by_output: dict[str, str] = {}
    for url in urls:
        name = posixpath.basename(output_url("", url))
        if name in by_output:
            raise JobError(f"input shards {by_output[name]} and {url} would both be written to {name}",
                           f"--input {pattern}", "an output shard is named after its input shard without the "
                           "extensions; rename one of them, or run them as two jobs with different --output")
        by_output[name] = url
    return urls


BOM = b"\xef\xbb\xbf"  # UTF-8's byte order mark, which some editors write at a file's start


@dataclasses.dataclass(frozen=True)
class OversizedLine:
    """Stands for a line longer than the reader's max_bytes, which is never held in memory whole."""

    size: int  # bytes, without the newline


def read_lines(url: str, max_bytes: int | None = None,
               block: int = 1 << 20) -> Iterator[tuple[int, bytes | OversizedLine]]:
    """(1-based line number, raw bytes without the newline) for every non-blank line; with
    max_bytes, a longer line comes as an OversizedLine and memory stays bounded by max_bytes + block.
    A UTF-8 BOM at the file's start is skipped, as Python's utf-8-sig codec does."""
    with fsspec.open(url, "rb", compression="infer") as f:
        lines = f if max_bytes is None else _bounded_lines(f, max_bytes, block)
        for n, raw in enumerate(lines, start=1):
            if isinstance(raw, OversizedLine):
                yield n, raw
                continue
            raw = raw.rstrip(b"\r\n")
            if n == 1:
                raw = raw.removeprefix(BOM)
            if raw.strip():
                yield n, raw


def _bounded_lines(f, max_bytes: int, block: int) -> Iterator[bytes | OversizedLine]:
    """Lines of a binary file, without their newline; a line over max_bytes as OversizedLine.
    Reads with read1 where the file has it: a GzipFile's read(n) that meets a truncated stream
    raises and drops everything it had decompressed in that call, read1 returns it first."""
    read = getattr(f, "read1", f.read)
    head = bytearray()  # the current line so far, while it is within max_bytes
    dropped = 0  # once the current line is over max_bytes: its size so far (its bytes are dropped)
    while chunk := read(block):
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
    timeouts and the 404 of a resumable upload that the server finished but whose answer was lost.
    _is_permanent takes out of these the errors that a retry cannot fix."""
    errors: list[type[BaseException]] = [OSError]
    try:
        import aiohttp
        from gcsfs.retry import HttpError

        errors += [aiohttp.ClientError, HttpError]
    except ImportError:
        pass
    return tuple(errors)


def _is_permanent(e: BaseException, url: str) -> bool:
    """Whether a failed write of `url` would fail again however often it is redone: permission
    errors (PermissionError locally; from gcsfs an HttpError 401, or the OSError "Forbidden: ..." it
    raises for a 403), a path through a file, and a not-found whose bucket or directory is missing.

    A not-found in an existing bucket is not permanent: it is how gcsfs reports the lost answer to
    the last chunk of a resumable upload (the finished session answers 404 to the retried chunk),
    and gcsfs raises the same FileNotFoundError for a missing bucket, so only a look at the bucket
    tells the two apart."""
    # aiohttp's response errors carry .status (their .code is deprecated), gcsfs's HttpError .code
    status = e.status if hasattr(e, "status") else getattr(e, "code", None)
    if isinstance(e, (PermissionError, NotADirectoryError, IsADirectoryError)) or status in (401, 403) \
            or (isinstance(e, OSError) and str(e).startswith("Forbidden")):
        return True
    if isinstance(e, FileNotFoundError) or status == 404:
        return not _container_exists(url)
    return False


def _container(url: str) -> str:
    """The bucket (object store) or directory (local) that `url` is written into."""
    fs, path = fsspec.core.url_to_fs(url)
    return fs.unstrip_protocol(posixpath.dirname(path) if _is_local(fs) else path.split("/", 1)[0])


def _container_exists(url: str) -> bool:
    """False only when the store says the bucket or directory is not there (fs.exists would say
    False on any error, a transient one included)."""
    fs, path = fsspec.core.url_to_fs(_container(url))
    try:
        fs.info(path)
        return True
    except FileNotFoundError:
        return False
    except Exception:  # noqa: BLE001 (the answer is unknown: retrying is the safe side)
        return True


def retry_transient(write: Callable[..., None]) -> Callable[..., None]:
    """Redoes a whole write, with backoff, when it fails on a transient error. gcsfs retries each
    HTTP request (5xx, 408, 429, dropped connections) up to 6 times, but not a request whose effect
    landed while its answer was lost: rewriting the whole object is idempotent. Errors that a retry
    cannot fix (see _is_permanent) are raised at once."""
    @functools.wraps(write)
    def wrapper(url: str, *args, **kwargs) -> None:
        for attempt in range(WRITE_ATTEMPTS):
            try:
                return write(url, *args, **kwargs)
            except _transient_errors() as e:
                if attempt == WRITE_ATTEMPTS - 1 or _is_permanent(e, url):
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


def _protocols(fs) -> tuple[str, ...]:
    return tuple(fs.protocol) if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)


def _is_local(fs) -> bool:
    return "file" in _protocols(fs)


def check_output_writable(output_dir: str) -> None:
    """Writes and removes a small probe under OUT/_done/, so that an --output the job cannot write
    fails before the model loads rather than after the whole job has run. Only a write tells: an
    object store's permissions are not visible as file modes."""
    fs, path = fsspec.core.url_to_fs(output_dir)
    where = f"--output {output_dir}"
    if fs.isfile(path):
        raise JobError("the output location is an existing file", where,
                       "pass a directory (it is created if missing)")
    probe = f"{output_dir.rstrip('/')}/{MARKER_DIR}/.write-probe-{uuid.uuid4().hex[:12]}"
    try:
        write_atomic(probe, [])
    except Exception as e:  # noqa: BLE001 (whatever it is, the job could not write its output)
        if isinstance(e, FileNotFoundError) and not _container_exists(probe):
            raise JobError(f"{_container(probe)} does not exist", where, "create it, or pass another --output") from e
        raise JobError(f"cannot write to --output: {type(e).__name__}: {e}", where,
                       "pass a location this job may write to, or give it write access") from e
    try:
        fs.rm(fsspec.core.url_to_fs(probe)[1])
    except OSError as e:  # a store may allow creating objects but not deleting them; the job needs only the first
        logging.getLogger(__name__).warning("could not remove the write probe %s (%s)", probe, e)


def marker_url(output_url: str) -> str:
    """OUT/part-3.jsonl -> OUT/_done/part-3.jsonl.json"""
    out_dir, name = output_url.rsplit("/", 1)
    return f"{out_dir}/{MARKER_DIR}/{name}.json"


def input_size(url: str) -> int:
    fs, path = fsspec.core.url_to_fs(url)
    return int(fs.size(path))


def input_fingerprint(url: str) -> str:
    """A fingerprint of a shard's content, which its completion marker records so that a rerun
    notices an edited input even when its size is unchanged.

    gs://: "crc32c:<base64>" from the object's metadata, without reading the object (GCS keeps a
    CRC32C of every object, composite ones included, which have no MD5; "md5:<base64>" where an
    object has no CRC32C). Any other file: "blake2b:<hex>", hashed while read in 1 MiB blocks
    (about a second per GB, once per run, in the launching process)."""
    fs, path = fsspec.core.url_to_fs(url)
    if {"gs", "gcs"} & set(_protocols(fs)):
        info = fs.info(path)
        for key, kind in (("crc32c", "crc32c"), ("md5Hash", "md5")):
            if info.get(key):
                return f"{kind}:{info[key]}"
    digest = hashlib.blake2b(digest_size=16)
    with fs.open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return f"blake2b:{digest.hexdigest()}"


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


class ShardMismatch(JobError, ValueError):
    """An output directory holds a shard that a different input or configuration produced."""


def shard_status(output_url: str, expected: dict[str, Any]) -> str:
    """'complete' (output and a matching marker: skip), 'partial' (a temporary file, an output
    without a marker, or a marker for other --limit lines: redo) or 'absent'.

    `expected` holds what this run would write into the marker: input, input_size,
    input_fingerprint, config, config_hash, last_line. Raises ShardMismatch when an existing marker
    names another input, other input content or another configuration, so that one output
    directory never mixes two jobs and never serves output of an input that has changed since.
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
    where = f"{output_url}, marker {marker_url(output_url)}"
    redo = ("pass --overwrite to redo every shard, delete the marker to redo only this one, "
            "or use another --output")
    source = expected["input"]
    if marker.get("input") != source:
        raise ShardMismatch(f"the output shard was written from input {marker.get('input')!r}; this run reads "
                            f"{source!r}", where, "use another --output, or pass --overwrite to redo it")
    if marker.get("input_size") != expected["input_size"]:
        raise ShardMismatch(f"input {source} changed since the output shard was written: it "
                            f"had {marker.get('input_size')} bytes; it has {expected['input_size']} now", where, redo)
    if "input_fingerprint" not in marker:
        raise ShardMismatch(f"the output shard's marker records no content fingerprint of input {source} "
                            "(an older version wrote it), so a change of that input cannot be ruled out", where, redo)
    if marker["input_fingerprint"] != expected["input_fingerprint"]:
        raise ShardMismatch(f"the content of input {source} changed since the output shard was written "
                            f"(fingerprint {marker['input_fingerprint']}, now {expected['input_fingerprint']})",
                            where, redo)
    if marker.get("config_hash") != expected["config_hash"]:
        diff = config_diff(marker.get("config") or {}, expected["config"])
        raise ShardMismatch(f"the output shard was written with a different configuration "
                            f"(config hash {marker.get('config_hash')} vs {expected['config_hash']}): "
                            f"{'; '.join(diff) or 'unknown difference'}", where,
                            "pass --overwrite to redo every shard with this configuration, or use another --output")


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
