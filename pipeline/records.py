"""Input records and the output schema.

Input, per shard line:
  jsonl: {"id", "prompt", optional "max_tokens", "temperature", "top_p", "top_k", "seed", "stop"}
  text:  the whole line is the prompt; its id is "<shard name>:<line number>"
Blank lines are not records. Output, one JSON line per input record:
  {"id", "completion", "prompt_tokens", "completion_tokens", "finish_reason"}  or
  {"id", "error": {"type", "message"}}
"""

from __future__ import annotations

import dataclasses
import json
import math
import zlib
from typing import Any

from model import SamplingParams

SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop")


@dataclasses.dataclass
class Request:
    id: str
    shard: int
    line: int
    prompt: str
    max_tokens: int
    max_tokens_given: bool  # an explicit value must fit the context; the default is clamped
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: tuple[str, ...] = ()
    token_ids: list[int] = dataclasses.field(default_factory=list)

    def sampling(self) -> SamplingParams:
        return SamplingParams(max_new_tokens=self.max_tokens, temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p, seed=self.seed)


@dataclasses.dataclass
class Result:
    """What the job writes for one input record: a completion or an error."""

    id: str
    shard: int
    line: int
    completion: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    error_type: str | None = None
    error: str | None = None
    token_ids: list[int] = dataclasses.field(default_factory=list)
    prompt_ids: list[int] = dataclasses.field(default_factory=list)
    stop: tuple[str, ...] = ()

    def to_json(self) -> str:
        if self.error is not None:
            out = {"id": self.id, "error": {"type": self.error_type, "message": self.error}}
        else:
            out = {"id": self.id, "completion": self.completion, "prompt_tokens": self.prompt_tokens,
                   "completion_tokens": self.completion_tokens, "finish_reason": self.finish_reason}
        return json.dumps(out, ensure_ascii=False)


def error(id_: str, shard: int, line: int, kind: str, message: str) -> Result:
    return Result(id=id_, shard=shard, line=line, error_type=kind, error=message)


def default_id(shard_name: str, line: int) -> str:
    return f"{shard_name}:{line}"


def parse(raw: bytes, shard: int, shard_name: str, line: int, fmt: str,
          defaults: dict[str, Any]) -> Request | Result:
    """One input line -> a Request, or an error Result naming what is wrong with it."""
    rid = default_id(shard_name, line)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return error(rid, shard, line, "invalid_utf8", f"line is not valid UTF-8 (byte {e.start})")
    if fmt == "text":
        return _request(rid, shard, line, text.rstrip("\r\n"), {}, defaults)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return error(rid, shard, line, "invalid_json", f"line is not valid JSON: {e.msg} at column {e.colno}")
    if not isinstance(obj, dict):
        return error(rid, shard, line, "invalid_record", f"record must be a JSON object; got {type(obj).__name__}")
    if "id" in obj:
        if not isinstance(obj["id"], (str, int)) or isinstance(obj["id"], bool):
            return error(rid, shard, line, "invalid_record", f"id must be a string or integer; got {obj['id']!r}")
        rid = str(obj["id"])
    if "prompt" not in obj:
        return error(rid, shard, line, "invalid_record", "record has no 'prompt'")
    return _request(rid, shard, line, obj["prompt"], obj, defaults)


def _request(rid: str, shard: int, line: int, prompt: Any, obj: dict, defaults: dict) -> Request | Result:
    if not isinstance(prompt, str):
        return error(rid, shard, line, "invalid_prompt", f"prompt must be a string; got {type(prompt).__name__}")
    if not prompt.strip():
        return error(rid, shard, line, "invalid_prompt", "prompt is empty")
    values = {k: obj.get(k, defaults.get(k)) for k in SAMPLING_FIELDS}
    if values["seed"] is None:  # from the id: a rerun samples the same, however records are batched
        values["seed"] = zlib.crc32(rid.encode("utf-8"))
    problem = _check_sampling(values)
    if problem:
        return error(rid, shard, line, "invalid_parameter", problem)
    stop = values["stop"]
    stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
    return Request(id=rid, shard=shard, line=line, prompt=prompt, max_tokens=int(values["max_tokens"]),
                   max_tokens_given="max_tokens" in obj, temperature=float(values["temperature"]),
                   top_p=float(values["top_p"]), top_k=int(values["top_k"]), seed=int(values["seed"]), stop=stop)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _check_sampling(v: dict[str, Any]) -> str | None:
    """The first problem with a record's generation parameters, as a message, or None."""
    if not _is_int(v["max_tokens"]) or v["max_tokens"] < 1:
        return f"max_tokens must be an integer >= 1; got {v['max_tokens']!r}"
    if not _is_number(v["temperature"]) or v["temperature"] < 0:
        return f"temperature must be a number >= 0; got {v['temperature']!r}"
    if not _is_number(v["top_p"]) or not 0 < v["top_p"] <= 1:
        return f"top_p must be a number in (0, 1]; got {v['top_p']!r}"
    if not _is_int(v["top_k"]) or v["top_k"] < 0:
        return f"top_k must be an integer >= 0; got {v['top_k']!r}"
    if not _is_int(v["seed"]) or not 0 <= v["seed"] < 2**32:
        return f"seed must be an integer in [0, 2**32); got {v['seed']!r}"
    stop = v["stop"]
    if stop is not None and not isinstance(stop, str) and not (
            isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        return f"stop must be a string or a list of non-empty strings; got {stop!r}"
    if stop == "":
        return "stop must not be an empty string"
    return None
