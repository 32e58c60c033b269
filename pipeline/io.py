"""Shard discovery, reading, and atomic per-shard writes, through fsspec (local paths and gs://)."""

from __future__ import annotations

import posixpath
from typing import Iterator

import fsspec


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


def shard_format(url: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    return "jsonl" if url.endswith((".jsonl", ".json", ".jsonl.gz")) else "text"


def read_lines(url: str) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw bytes without the newline) for every non-blank line."""
    with fsspec.open(url, "rb", compression="infer") as f:
        for n, raw in enumerate(f, start=1):
            raw = raw.rstrip(b"\r\n")
            if raw.strip():
                yield n, raw


def output_url(output_dir: str, shard_url: str) -> str:
    name = posixpath.basename(shard_url)
    for ext in (".gz",):
        name = name.removesuffix(ext)
    stem = name.rsplit(".", 1)[0] if "." in name else name
    return output_dir.rstrip("/") + "/" + stem + ".jsonl"


def write_atomic(url: str, lines: list[str]) -> None:
    """Writes a whole shard so that readers never see half of it. Local files: a temporary name,
    then a rename. Object stores (gs://) publish an object only when its upload completes, so the
    final name is written directly (a server-side move would be a second, non-atomic step there)."""
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    local = "file" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,))
    target = path + ".inprogress" if local else path
    with fs.open(target, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(line + "\n")
    if local:
        fs.mv(target, path)
