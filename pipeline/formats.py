"""Input formats: which one a shard is in, and its records as (number, raw record) pairs.

  format    a record is                               number            raw record
  text      a non-blank line: the prompt              1-based line      bytes
  jsonl     a line: the project's JSON record         1-based line      bytes
  openai    a line: an OpenAI Batch API request       1-based line      bytes
  parquet   a row (--prompt_column, --id_column)      0-based row       dict
  tfrecord  a tf.train.Example (--prompt_feature, …)  0-based record    dict

Rows and Examples arrive as dicts in the project's record vocabulary ("id", "prompt",
"messages", "max_tokens", ...), so `records.parse` checks them as it checks a JSONL line. A record
that cannot be read (or is over --max_record_bytes) becomes a BadRecord at its number: nothing is
skipped silently. A shard that cannot be read past some point (a truncated .gz, a storage error
after retries) keeps every record read before it and ends with one BadRecord saying where and why.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from typing import Any, Iterator

import fsspec

from pipeline import io

FORMATS = ("auto", "jsonl", "openai", "text", "parquet", "tfrecord")
# columns / features read under their own names, besides the prompt and id
OPTIONAL_FIELDS = ("messages", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "logprobs",
                   "include_stop_str_in_output", "top_logprobs", "prompt_logprobs", "score_choices", "response_format", "guided_json", "guided_regex", "guided_choice")
# Fields the job does not implement yet but a user plausibly means (OpenAI's and vLLM's names), with
# the values that ask for nothing (null always does). Any other value is refused per record with
# unsupported_parameter rather than silently ignored; fields outside the vocabulary are ignored.
UNSUPPORTED_FIELDS: dict[str, tuple] = {
    "n": (1,), "best_of": (1,), "echo": (False,), "suffix": ("",), "stream": (False,),
    "presence_penalty": (0,), "frequency_penalty": (0,), "repetition_penalty": (1,), "logit_bias": ({},),
    "tools": ([],), "functions": ([],), "tool_choice": ("none",), "guided_grammar": (), "structured_outputs": (),
    "min_p": (0,), "min_tokens": (0,), "stop_token_ids": ([],),
    "ignore_eos": (False,), "use_beam_search": (False,), "length_penalty": (1,), "logits_processors": ([],),
}
BOOL_FIELDS = ("logprobs", "include_stop_str_in_output")
LIST_FIELDS = ("stop", "guided_choice", "score_choices")
PARQUET_BATCH = 1024


@dataclasses.dataclass(frozen=True)
class Columns:
    """Where the prompt and the id are in columnar inputs (--prompt_column, --id_feature, ...)."""

    prompt_column: str = "prompt"
    id_column: str = "id"
    prompt_feature: str = "prompt"
    id_feature: str = "id"


@dataclasses.dataclass(frozen=True)
class BadRecord:
    """A record that could not be read; `id` when it was readable."""

    kind: str
    message: str
    id: str | int | None = None


def shard_format(url: str, fmt: str) -> str:
    """The format of one shard. auto: .jsonl/.json -> jsonl, or openai when the first record has
    both "custom_id" and "body"; .parquet -> parquet; .tfrecord/.tfrec -> tfrecord; else text.
    A trailing .gz is looked through."""
    if fmt != "auto":
        return fmt
    name = url.lower().removesuffix(".gz")
    if name.endswith((".jsonl", ".json")):
        return "openai" if _first_record_is_openai(url) else "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".tfrecord", ".tfrec")):
        return "tfrecord"
    return "text"


def read_records(url: str, fmt: str, columns: Columns = Columns(),
                 max_bytes: int | None = None) -> Iterator[tuple[int, Any]]:
    """(record number, raw record) for every record of a shard whose format is `fmt` (not auto).
    Never raises once iterated: a failure partway ends the shard with one BadRecord."""
    if fmt in ("text", "jsonl", "openai"):
        return _until_failure(_lines(url, max_bytes), first=1, unit="line")
    if fmt == "parquet":
        return _until_failure(_parquet_rows(url, columns), first=0, unit="row")
    if fmt == "tfrecord":
        return _until_failure(_tfrecord_examples(url, columns, max_bytes), first=0, unit="record")
    raise ValueError(f"unknown input format {fmt!r}; expected one of {FORMATS}")


def _until_failure(records: Iterator[tuple[int, Any]], first: int, unit: str) -> Iterator[tuple[int, Any]]:
    """The records of `records` until it raises; then one unreadable_shard BadRecord, numbered
    after the last record read, that says where reading stopped and why (a truncated or corrupt
    .gz, a storage error that outlived gcsfs's retries, a file that vanished)."""
    last = None
    try:
        for number, raw in records:
            last = number
            yield number, raw
    except Exception as e:  # noqa: BLE001 (whatever stops a shard, its records so far are kept)
        where = f"after {unit} {last}" if last is not None else "from its start"
        yield (first if last is None else last + 1), BadRecord(
            "unreadable_shard", f"the shard could not be read {where}: {type(e).__name__}: {str(e).strip()}; the records "
            "before this point were kept")


def _lines(url: str, max_bytes: int | None) -> Iterator[tuple[int, bytes | BadRecord]]:
    for n, raw in io.read_lines(url, max_bytes):
        yield n, _too_large(raw.size, max_bytes) if isinstance(raw, io.OversizedLine) else raw


def _too_large(size: int, max_bytes: int) -> BadRecord:
    return BadRecord("record_too_large", f"record is {size} bytes; --max_record_bytes is {max_bytes}")


def _first_record_is_openai(url: str, peek: int = 1 << 20) -> bool:
    """Whether the first non-blank line (read up to `peek` bytes, after a UTF-8 BOM) has
    "custom_id" and "body". A shard that cannot be read or parsed here is read as jsonl, whose
    reader then reports the problem at its record."""
    head = b""
    try:
        with fsspec.open(url, "rb", compression="infer") as f:
            while len(head) < peek and b"\n" not in head.lstrip() and (chunk := f.read(1 << 16)):
                head += chunk
        obj = json.loads(head.removeprefix(io.BOM).lstrip().split(b"\n", 1)[0])
    except Exception:  # noqa: BLE001 (unreadable, not JSON, nested too deep, an integer too long)
        return False
    return isinstance(obj, dict) and "custom_id" in obj and "body" in obj


# ------------------------------------------------------------------ Parquet


def _parquet_rows(url: str, columns: Columns) -> Iterator[tuple[int, dict | BadRecord]]:
    """Rows in file order, a batch of rows in memory at a time. Row groups are read one by one, so
    a damaged group costs only its own rows (each an unreadable_record error)."""
    import pyarrow.parquet as pq

    with fsspec.open(url, "rb") as f:
        try:
            pf = pq.ParquetFile(f)
        except Exception as e:  # not Parquet, or a broken footer: the shard's rows cannot be counted
            yield 0, BadRecord("unreadable_shard", f"not a readable Parquet file: {type(e).__name__}: {e}")
            return
        names = pf.schema_arrow.names
        rename = {src: dst for src, dst in ((columns.prompt_column, "prompt"), (columns.id_column, "id"),
                                            *((n, n) for n in OPTIONAL_FIELDS + tuple(UNSUPPORTED_FIELDS)))
                  if src in names}
        missing = None
        if "prompt" not in rename.values() and "messages" not in rename.values():
            missing = f"no column {columns.prompt_column!r} (or 'messages'); the columns are {names}"
        if not rename:
            for row in range(pf.metadata.num_rows):
                yield row, BadRecord("invalid_record", missing)
            return
        start = 0
        for group in range(pf.num_row_groups):
            size, row = pf.metadata.row_group(group).num_rows, start
            try:
                for batch in pf.iter_batches(batch_size=PARQUET_BATCH, row_groups=[group], columns=list(rename)):
                    for values in batch.to_pylist():
                        rec = {rename[k]: v for k, v in values.items()}
                        yield row, (BadRecord("invalid_record", missing, rec.get("id")) if missing
                                    else _columnar_record(rec, lambda k: f"column {_source(k, rename)!r}"))
                        row += 1
            except Exception as e:  # a corrupt row group: its rows not yet read are errors; the next group is read
                for r in range(row, start + size):
                    yield r, BadRecord("unreadable_record", f"row {r} (row group {group}) could not be read: "
                                       f"{type(e).__name__}: {str(e).strip()}")
            start += size


def _source(key: str, rename: dict[str, str]) -> str:
    return next(src for src, dst in rename.items() if dst == key)


def _columnar_record(rec: dict[str, Any], where) -> dict[str, Any] | BadRecord:
    """A row or Example in the record vocabulary: nulls dropped (the job's defaults apply), JSON
    text in `messages` parsed, 0/1 accepted for booleans."""
    out = {}
    for key, value in rec.items():
        if value is None:
            continue
        if key == "messages" and isinstance(value, (str, bytes)):
            try:
                value = json.loads(value)
            except ValueError as e:
                return BadRecord("invalid_messages", f"{where(key)} is not valid JSON: {e}", rec.get("id"))
        if key in BOOL_FIELDS and value in (0, 1) and not isinstance(value, bool):
            value = bool(value)
        out[key] = value
    return out


# ------------------------------------------------------------------ TFRecord


def _tfrecord_examples(url: str, columns: Columns,
                       max_bytes: int | None) -> Iterator[tuple[int, dict | BadRecord]]:
    """Examples in file order, one in memory at a time. Each TFRecord is framed as
    uint64 length, uint32 masked crc32c(length), data, uint32 masked crc32c(data), little-endian;
    the file is read through fsspec like every other format (local, gs://, .gz)."""
    with fsspec.open(url, "rb", compression="infer") as f:
        index = 0
        while header := f.read(12):
            if len(header) < 12:
                yield index, BadRecord("unreadable_record", f"record {index}: the file ends inside its header")
                return
            (length,) = struct.unpack("<Q", header[:8])
            if _masked_crc(header[:8]) != struct.unpack("<I", header[8:])[0]:
                yield index, BadRecord("unreadable_record", f"record {index}: its length field fails its "
                                       "checksum; the rest of the file cannot be framed")
                return
            if max_bytes and length > max_bytes:
                f.seek(length + 4, 1)
                yield index, _too_large(length, max_bytes)
                index += 1
                continue
            data, footer = f.read(length), f.read(4)
            if len(data) < length or len(footer) < 4:
                yield index, BadRecord("unreadable_record", f"record {index}: the file ends inside it")
                return
            if _masked_crc(data) != struct.unpack("<I", footer)[0]:
                yield index, BadRecord("unreadable_record", f"record {index}: its data fails its checksum")
            else:
                yield index, _example_record(data, columns)
            index += 1


def _masked_crc(data: bytes) -> int:
    import google_crc32c

    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _example_record(data: bytes, columns: Columns) -> dict[str, Any] | BadRecord:
    """One serialized tf.train.Example -> a record dict. A feature holds one value, except `stop`
    (any number of strings); strings are bytes_list features in UTF-8."""
    from google.protobuf.message import DecodeError
    from tensorflow.core.example import example_pb2

    try:
        features = example_pb2.Example.FromString(data).features.feature
    except DecodeError as e:
        return BadRecord("invalid_record", f"not a tf.train.Example: {e}")
    rename = {src: dst for src, dst in ((columns.id_feature, "id"), (columns.prompt_feature, "prompt"),
                                        *((n, n) for n in OPTIONAL_FIELDS + tuple(UNSUPPORTED_FIELDS)))
              if src in features}
    rec: dict[str, Any] = {}
    for src, key in rename.items():
        kind = features[src].WhichOneof("kind")
        values = list(getattr(features[src], kind).value) if kind else []
        if kind == "bytes_list":
            try:
                values = [v.decode("utf-8") for v in values]
            except UnicodeDecodeError as e:
                return BadRecord("invalid_utf8", f"feature {src!r} is not valid UTF-8 (byte {e.start})", rec.get("id"))
        if key in LIST_FIELDS:
            rec[key] = values
        elif len(values) != 1:
            return BadRecord("invalid_record", f"feature {src!r} must hold one value; it holds {len(values)}",
                             rec.get("id"))
        else:
            rec[key] = values[0]
    if "prompt" not in rec and "messages" not in rec:
        return BadRecord("invalid_record", f"the Example has no feature {columns.prompt_feature!r} (or 'messages'); "
                         f"it has {sorted(features)}", rec.get("id"))
    return _columnar_record(rec, lambda k: f"feature {_source(k, rename)!r}")
