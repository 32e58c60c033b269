"""Input records -> Requests, finished completions, and the project's output schema.

Input record (a JSONL line, a Parquet row or a TFRecord Example; see pipeline/formats.py):
  {"id", "prompt" | "messages", optional "max_tokens", "temperature", "top_p", "top_k", "seed",
   "stop", "include_stop_str_in_output", "logprobs", "top_logprobs" (k <= 20), "prompt_logprobs" (0), and one constraint on the output: "response_format"
   ({"type": "json_schema", "json_schema": {"schema": ...}} | {"type": "json_object"} | {"type": "text"}),
   "guided_json" (a schema), "guided_regex" (a pattern) or "guided_choice" (a list of strings);
   or "score_choices" (a list of labels) to score each label as a continuation instead of generating}
  text: the whole line is the prompt; its id is "<shard name>:<line number>"
OpenAI Batch API lines are read and answered by pipeline/openai_batch.py.
Output, one JSON line per input record:
  {"id", "completion", "prompt_tokens", "completion_tokens", "finish_reason"[, "logprobs"]
   [, "top_logprobs": per token, the k likeliest [{"token", "id", "logprob"}, ...]]
   [, "prompt_logprobs": [null, log p of each later prompt token given those before it]]
   [, "constraint_satisfied": whether a constrained completion is complete (false: max_tokens cut it short)]}  or
  {"id", "label", "scores": {label: log p(label | prompt)}, "prompt_tokens"}  (score_choices)  or
  {"id", "error": {"type", "message"}}
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import zlib
from typing import Any, Sequence

from model import GenerationOutput, SamplingParams
from model.sampling import MAX_TOP_LOGPROBS
from model.chat_template import (ChatTemplate, ChatTemplateError, check_messages, load_chat_template,
                                  special_token_strings)
from model.constraints import token_bytes
from model.tokenizer import Tokenizer, decode_completions
from pipeline.formats import UNSUPPORTED_FIELDS, BadRecord

# Record formats besides the project's own, by name: a module with parse(raw, shard, rid, line,
# defaults), to_json(result) and output_view(output_record). pipeline/openai_batch.py (imported by
# the package) adds "openai"; this module never imports it, so the two do not import each other.
API_FORMATS: dict[str, Any] = {}

SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop")
FLAG_FIELDS = ("include_stop_str_in_output", "logprobs")
CONSTRAINT_FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice")


@dataclasses.dataclass
class Request:
    id: str
    shard: int
    line: int
    prompt: str | None  # None for a chat record: `messages` become the prompt at tokenization
    max_tokens: int
    max_tokens_given: bool  # an explicit value must fit the context; the default is clamped
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: tuple[str, ...] = ()
    messages: list[dict[str, Any]] | None = None
    include_stop: bool = False  # vLLM's include_stop_str_in_output
    logprobs: bool = False
    api: str | None = None  # OpenAI endpoint URL for an OpenAI Batch record; None: the project's shape
    model: str = ""  # the served model's name, for OpenAI responses
    token_ids: list[int] = dataclasses.field(default_factory=list)
    constraint: tuple[str, Any] | None = None  # (kind, spec) for Engine.constraint: see parse_constraint
    top_logprobs: int = 0
    score_choices: list[str] | None = None  # labels to score instead of generating
    prompt_logprobs: bool = False
    choice_ids: list[list[int]] = dataclasses.field(default_factory=list)  # their tokens, after the prompt's

    def sampling(self, engine: Any = None) -> SamplingParams:
        """The engine's parameters for this request. A constraint is compiled for `engine` (cached
        by spec, so rows sharing a schema compile it once); ValueError if it cannot be."""
        constraint = engine.constraint(*self.constraint) if self.constraint is not None else None
        return SamplingParams(max_new_tokens=self.max_tokens, temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p, seed=self.seed, stop=self.stop, constraint=constraint,
                              top_logprobs=self.top_logprobs)

    def result(self, out: GenerationOutput) -> Result:
        """The engine's output for this request, to be finished by `finish_completions`."""
        return Result(id=self.id, shard=self.shard, line=self.line, prompt_tokens=len(self.token_ids),
                      completion_tokens=len(out.token_ids), finish_reason=out.finish_reason,
                      token_ids=list(out.token_ids), prompt_ids=self.token_ids, stop=self.stop,
                      include_stop=self.include_stop, want_logprobs=self.logprobs,
                      logprobs=list(out.logprobs) if self.logprobs else None, api=self.api, model=self.model,
                      constraint_satisfied=out.constraint_satisfied, top_ids=out.top_logprobs)

    def scored(self, out: Any) -> Result:
        """The engine's ScoreOutput for this request."""
        return Result(id=self.id, shard=self.shard, line=self.line, prompt_tokens=len(self.token_ids),
                      scores=dict(zip(self.score_choices, out.scores)), label=self.score_choices[out.best],
                      api=self.api, model=self.model)

    def fail(self, kind: str, message: str) -> Result:
        return error(self.id, self.shard, self.line, kind, message, api=self.api, model=self.model)


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
    include_stop: bool = False
    want_logprobs: bool = False
    logprobs: list[float] | None = None  # of the completion's tokens, when the record asked
    token_texts: list[str] | None = None  # the text of each of those tokens (OpenAI logprobs)
    api: str | None = None  # see Request.api; "" for an OpenAI line that is not a request
    model: str = ""
    constraint_satisfied: bool | None = None  # see GenerationOutput; None: no constraint
    top_ids: list[list[tuple[int, float]]] | None = None  # per token, the likeliest (id, logprob)
    top_logprobs: list[list[tuple[str, bytes, int, float]]] | None = None  # the same with (text, bytes)
    scores: dict[str, float] | None = None  # score_choices: log p of each label
    prompt_logprobs: list[float | None] | None = None
    label: str | None = None  # the most likely label

    def to_json(self) -> str:
        if self.api is not None:
            return API_FORMATS["openai"].to_json(self)
        if self.error is not None:
            out = {"id": self.id, "error": {"type": self.error_type, "message": self.error}}
        elif self.scores is not None:
            out = {"id": self.id, "label": self.label, "scores": self.scores, "prompt_tokens": self.prompt_tokens}
        else:
            out = {"id": self.id, "completion": self.completion, "prompt_tokens": self.prompt_tokens,
                   "completion_tokens": self.completion_tokens, "finish_reason": self.finish_reason}
            if self.want_logprobs:
                out["logprobs"] = self.logprobs
            if self.top_logprobs is not None:
                out["top_logprobs"] = [[{"token": t, "id": i, "logprob": lp} for t, _, i, lp in alts]
                                       for alts in self.top_logprobs]
            if self.constraint_satisfied is not None:
                out["constraint_satisfied"] = self.constraint_satisfied
            if self.prompt_logprobs is not None:
                out["prompt_logprobs"] = self.prompt_logprobs
        return json.dumps(out, ensure_ascii=False)


def error(id_: str, shard: int, line: int, kind: str, message: str, api: str | None = None,
          model: str = "") -> Result:
    return Result(id=id_, shard=shard, line=line, error_type=kind, error=message, api=api, model=model)


def default_id(shard_name: str, line: int) -> str:
    return f"{shard_name}:{line}"


def model_name(checkpoint: str) -> str:
    """The name a checkpoint is served under in OpenAI responses: its directory's or preset's name."""
    return os.path.basename(checkpoint.rstrip("/")) or checkpoint


def parse(raw: bytes | dict | BadRecord, shard: int, shard_name: str, line: int, fmt: str,
          defaults: dict[str, Any]) -> Request | Result:
    """One input record (a line's bytes, or a Parquet/TFRecord record dict) -> a Request, or an
    error Result naming what is wrong with it. `defaults`: the job's sampling defaults, and
    "model", the served model's name. Never raises: whatever a record holds, it ends as a Request
    or as its own error line."""
    try:
        return _parse(raw, shard, shard_name, line, fmt, defaults)
    except Exception as e:  # noqa: BLE001 (a record that breaks the parser is that record's error)
        return error(default_id(shard_name, line), shard, line, "internal_error",
                     f"{type(e).__name__} while reading the record: {e}", api="" if fmt == "openai" else None)


def loads(text: str) -> tuple[Any, str | None]:
    """json.loads, or (None, why not). Besides syntax errors: nesting deeper than Python's
    recursion limit, and integers over its int-string limit (4,300 digits)."""
    try:
        return json.loads(text), None
    except json.JSONDecodeError as e:
        return None, f"line is not valid JSON: {e.msg} at column {e.colno}"
    except RecursionError:
        return None, "line is not usable JSON: it is nested too deeply"
    except ValueError as e:  # e.g. "Exceeds the limit (4300 digits) for integer string conversion"
        return None, f"line is not usable JSON: {e}"


def _parse(raw: bytes | dict | BadRecord, shard: int, shard_name: str, line: int, fmt: str,
           defaults: dict[str, Any]) -> Request | Result:
    rid = default_id(shard_name, line)
    if fmt == "openai":
        return API_FORMATS["openai"].parse(raw, shard, rid, line, defaults)
    if isinstance(raw, BadRecord):
        return error(rid if raw.id is None else str(raw.id), shard, line, raw.kind, raw.message)
    if isinstance(raw, dict):
        return parse_object(raw, rid, shard, line, defaults)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return error(rid, shard, line, "invalid_utf8", f"line is not valid UTF-8 (byte {e.start})")
    if fmt == "text":
        return make_request(rid, shard, line, text.rstrip("\r\n"), None, {}, defaults)
    obj, why = loads(text)
    if why:
        return error(rid, shard, line, "invalid_json", why)
    if not isinstance(obj, dict):
        return error(rid, shard, line, "invalid_record", f"record must be a JSON object; got {type(obj).__name__}")
    return parse_object(obj, rid, shard, line, defaults)


def parse_object(obj: dict[str, Any], rid: str, shard: int, line: int, defaults: dict[str, Any]) -> Request | Result:
    """A record in the project's vocabulary (a JSONL object, a Parquet row, a TFRecord Example)."""
    if obj.get("id") is not None:
        if not isinstance(obj["id"], (str, int)) or isinstance(obj["id"], bool):
            return error(rid, shard, line, "invalid_record",
                         f"id must be a string or integer; got {short_repr(obj['id'])}")
        if isinstance(obj["id"], str) and (bad := not_utf8(obj["id"])) is not None:
            return error(rid, shard, line, "invalid_record", f"id {bad}")
        rid = str(obj["id"])
    has_prompt, has_messages = obj.get("prompt") is not None, obj.get("messages") is not None
    if has_prompt and has_messages:
        return error(rid, shard, line, "invalid_record", "record has both 'prompt' and 'messages'; give one")
    if not has_prompt and not has_messages:
        return error(rid, shard, line, "invalid_record", "record has no 'prompt' (or 'messages')")
    return make_request(rid, shard, line, obj.get("prompt"), obj.get("messages"), obj, defaults)


def make_request(rid: str, shard: int, line: int, prompt: Any, messages: Any, obj: dict, defaults: dict,
                 api: str | None = None) -> Request | Result:
    """Checks a record's prompt (or messages) and generation parameters; obj's values override
    `defaults`. The seed defaults to a hash of the id, so a rerun samples the same, however the
    records are sharded or batched."""
    model = defaults.get("model", "")
    fail = lambda kind, message: error(rid, shard, line, kind, message, api=api, model=model)  # noqa: E731
    if (problem := unsupported(obj)) is not None:
        return fail("unsupported_parameter", problem)
    if messages is not None:
        try:
            messages = check_messages(messages)
        except ChatTemplateError as e:
            return fail(e.kind, str(e))
        bad = next(((i, b) for i, m in enumerate(messages) if (b := not_utf8(m["role"] + m["content"]))), None)
        if bad:
            return fail("invalid_messages", f"messages[{bad[0]}] {bad[1]}")
    elif not isinstance(prompt, str):
        return fail("invalid_prompt", f"prompt must be a string; got {type(prompt).__name__}")
    elif not prompt.strip():
        return fail("invalid_prompt", "prompt is empty")
    elif (bad := not_utf8(prompt)) is not None:
        return fail("invalid_prompt", f"prompt {bad}")
    values = {k: obj[k] if obj.get(k) is not None else defaults.get(k) for k in SAMPLING_FIELDS}
    if values["seed"] is None:
        values["seed"] = zlib.crc32(rid.encode("utf-8"))
    flags = {k: obj[k] if obj.get(k) is not None else False for k in FLAG_FIELDS}
    problem = check_sampling(values) or _check_flags(flags)
    if problem:
        return fail("invalid_parameter", problem)
    stop = values["stop"]
    stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if (bad := next((b for s in stop if (b := not_utf8(s))), None)) is not None:
        return fail("invalid_parameter", f"stop {bad}")
    constraint = parse_constraint(obj)
    if isinstance(constraint, str):
        return fail("invalid_parameter", constraint)
    choices = obj.get("score_choices")
    if choices is not None:
        if (not isinstance(choices, list) or not choices or len(choices) > MAX_SCORE_CHOICES
                or not all(isinstance(c, str) and c and not_utf8(c) is None for c in choices)):
            return fail("invalid_parameter", f"score_choices must be a list of 1 to {MAX_SCORE_CHOICES} non-empty "
                        f"strings; got {short_repr(choices)}")
        if len(set(choices)) < len(choices):
            return fail("invalid_parameter", f"score_choices has duplicates: {short_repr(choices)}")
        if constraint is not None:
            return fail("invalid_parameter", "score_choices scores labels instead of generating; it cannot be "
                        "combined with a constraint on the output")
    prompt_lp = obj.get("prompt_logprobs")
    if prompt_lp is not None and (not _is_int(prompt_lp) or prompt_lp < 0):
        return fail("invalid_parameter", f"prompt_logprobs must be an integer >= 0; got {short_repr(prompt_lp)}")
    if prompt_lp:
        return fail("unsupported_parameter", f"prompt_logprobs={prompt_lp} asks for {prompt_lp} alternatives per "
                    "prompt token; only the prompt tokens' own log-probabilities are returned (prompt_logprobs: 0)")
    top = obj.get("top_logprobs") or 0
    if not _is_int(top) or not 0 <= top <= MAX_TOP_LOGPROBS:
        return fail("invalid_parameter", f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}]; "
                    f"got {short_repr(top)}")
    if values["temperature"] < MIN_TEMPERATURE:  # float32 logits / a tiny temperature overflow to inf
        values["temperature"] = 0.0
    return Request(id=rid, shard=shard, line=line, prompt=None if messages is not None else prompt,
                   messages=messages, max_tokens=int(values["max_tokens"]),
                   max_tokens_given=obj.get("max_tokens") is not None, temperature=float(values["temperature"]),
                   top_p=float(values["top_p"]), top_k=int(values["top_k"]), seed=int(values["seed"]), stop=stop,
                   include_stop=flags["include_stop_str_in_output"], logprobs=flags["logprobs"], api=api,
                   model=model, constraint=constraint, top_logprobs=top, score_choices=choices,
                   prompt_logprobs=prompt_lp is not None)


def parse_constraint(obj: dict[str, Any]) -> tuple[str, Any] | None | str:
    """The record's constraint on its output as (kind, spec) for Engine.constraint, None, or a
    message saying what is wrong. Schemas may be given as objects or as JSON text (Parquet and
    TFRecord columns hold text). Whether a schema or regex compiles is found at generation."""
    given = [k for k in CONSTRAINT_FIELDS if obj.get(k) is not None
             and not (k == "response_format" and obj[k] in ({"type": "text"}, '{"type": "text"}'))]
    if not given:
        return None
    if len(given) > 1:
        return f"{' and '.join(given)} are both set; give one constraint on the output"
    key = given[0]
    value = obj[key]
    if key in ("response_format", "guided_json") and isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            return f"{key} is not valid JSON: {e}"
    if key == "response_format":
        if not isinstance(value, dict) or value.get("type") not in ("json_schema", "json_object", "text"):
            return (f"response_format must be {{\"type\": \"json_schema\", \"json_schema\": {{\"schema\": ...}}}}, "
                    f"{{\"type\": \"json_object\"}} or {{\"type\": \"text\"}}; got {short_repr(value)}")
        if value["type"] == "json_object":
            return "json_object", None
        wrapper = value.get("json_schema")
        if not isinstance(wrapper, dict) or not isinstance(wrapper.get("schema"), dict):
            return f"response_format.json_schema must be an object with a 'schema' object; got {short_repr(wrapper)}"
        return "json_schema", wrapper["schema"]
    if key == "guided_json":
        if not isinstance(value, dict):
            return f"guided_json must be a JSON schema (an object, or its JSON text); got {short_repr(value)}"
        return "json_schema", value
    if key == "guided_regex":
        if not isinstance(value, str) or not value:
            return f"guided_regex must be a non-empty string; got {short_repr(value)}"
        if (bad := not_utf8(value)) is not None:
            return f"guided_regex {bad}"
        return "regex", value
    if (not isinstance(value, list) or not value
            or not all(isinstance(c, str) and c and not_utf8(c) is None for c in value)):
        return f"guided_choice must be a non-empty list of non-empty strings; got {short_repr(value)}"
    return "choice", list(value)


# What the device holds: max_tokens, top_k and token counts are int32, seeds uint32, and
# temperature and top_p float32. A temperature below MIN_TEMPERATURE is greedy (as in vLLM): the
# logits divided by it would overflow float32.
INT32_MAX = 2**31 - 1
MAX_SCORE_CHOICES = 64
FLOAT32_MAX = 3.4028234663852886e38
MIN_TEMPERATURE = 1e-5


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    """A finite number that float32 holds (huge Python ints would overflow float())."""
    if _is_int(v):
        return abs(v) <= FLOAT32_MAX
    return isinstance(v, float) and math.isfinite(v) and abs(v) <= FLOAT32_MAX


def short_repr(value: Any, limit: int = 80) -> str:
    """repr(value), cut to `limit` characters: error messages quote values, never whole records.
    repr escapes what UTF-8 cannot hold (lone surrogates), so the message can always be written."""
    if _is_int(value) and value.bit_length() > 64:
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    text = repr(value) if not isinstance(value, (dict, list)) or len(value) < 20 else f"<{type(value).__name__} " \
        f"of {len(value)} items>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def not_utf8(text: str) -> str | None:
    """Why `text` cannot be written as UTF-8 (a lone surrogate from a JSON escape such as
    "\\ud800"), or None. Tokenizers and output files need UTF-8."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        return (f"holds text that cannot be encoded as UTF-8: {text[e.start:e.end]!r} at character {e.start} "
                "(a lone UTF-16 surrogate)")


def unsupported(obj: dict[str, Any]) -> str | None:
    """The first field the record sets that the job does not implement (formats.UNSUPPORTED_FIELDS),
    as a message, or None."""
    for key, neutral in UNSUPPORTED_FIELDS.items():
        value = obj.get(key)
        if value is not None and not any(value == n and isinstance(value, bool) == isinstance(n, bool)
                                         for n in neutral):
            allowed = " or ".join(json.dumps(n) for n in neutral)
            return (f"{key}={short_repr(value)} is not supported by this job; leave it out"
                    + (f" or use {allowed}" if allowed else ""))
    return None


def check_sampling(v: dict[str, Any]) -> str | None:
    """The first problem with a record's generation parameters, as a message, or None."""
    if not _is_int(v["max_tokens"]) or v["max_tokens"] < 1:
        return f"max_tokens must be an integer >= 1; got {short_repr(v['max_tokens'])}"
    if not _is_number(v["temperature"]) or v["temperature"] < 0:
        return f"temperature must be a number in [0, {FLOAT32_MAX:.4g}]; got {short_repr(v['temperature'])}"
    if not _is_number(v["top_p"]) or not 0 < v["top_p"] <= 1:
        return f"top_p must be a number in (0, 1]; got {short_repr(v['top_p'])}"
    if not _is_int(v["top_k"]) or not 0 <= v["top_k"] <= INT32_MAX:
        return f"top_k must be an integer in [0, 2**31) (0, or the vocabulary size or more: off); " \
               f"got {short_repr(v['top_k'])}"
    if not _is_int(v["seed"]) or not 0 <= v["seed"] < 2**32:
        return f"seed must be an integer in [0, 2**32); got {short_repr(v['seed'])}"
    stop = v["stop"]
    if stop is not None and not isinstance(stop, str) and not (
            isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        return f"stop must be a string or a list of non-empty strings; got {short_repr(stop)}"
    if stop == "":
        return "stop must not be an empty string"
    return None


def _check_flags(flags: dict[str, Any]) -> str | None:
    for key, value in flags.items():
        if not isinstance(value, bool):
            return f"{key} must be true or false; got {short_repr(value)}"
    return None


# ------------------------------------------------------------------ prompts -> token ids


def choice_token_ids(tokenizer: Tokenizer, req: Request) -> list[list[int]]:
    """Each of a request's score_choices as tokens that continue its prompt: the tokens its prompt
    text + the choice encode to past the prompt's own, where the prompt's tokens are a prefix of
    them (so a label is scored as the tokenizer would split it after that prompt); otherwise, and
    for chat records, the choice encoded on its own."""
    alone = tokenizer.encode_batch(req.score_choices, add_bos=False)
    if req.prompt is None:
        return alone
    n = len(req.token_ids)
    joined = tokenizer.encode_batch([req.prompt + c for c in req.score_choices])
    return [j[n:] if j[:n] == req.token_ids and len(j) > n else a for j, a in zip(joined, alone)]


def chat_template_for(checkpoint: str, tokenizer: Tokenizer) -> ChatTemplate | ChatTemplateError:
    """The checkpoint's chat template, or the error every chat record of the job reports."""
    try:
        template = load_chat_template(checkpoint, special_token_strings(tokenizer))
    except ValueError as e:
        return ChatTemplateError("chat_template_invalid", f"checkpoint {checkpoint!r}: {e}")
    if template is None:
        return ChatTemplateError("chat_template_missing", f"checkpoint {checkpoint!r} has no chat template "
                                 "(no chat_template.jinja, no chat_template in tokenizer_config.json), "
                                 "so 'messages' cannot become a prompt; send 'prompt' instead")
    return template


def prompt_token_ids(tokenizer: Tokenizer, template: ChatTemplate | ChatTemplateError,
                     requests: Sequence[Request]) -> list[list[int] | Result]:
    """Each request's prompt as token ids, or its error Result. A prompt gets the tokenizer's BOS;
    messages are rendered by the chat template and tokenized as HF's apply_chat_template does:
    no BOS added (templates write their own) and special-token text ('<s>') read as that token.
    Tokenizes the requests together; if that fails, one at a time, so a record that breaks the
    tokenizer is that record's error only."""
    try:
        return _prompt_token_ids(tokenizer, template, requests)
    except Exception:  # noqa: BLE001
        return [_one_prompt_token_ids(tokenizer, template, r) for r in requests]


def _one_prompt_token_ids(tokenizer: Tokenizer, template: ChatTemplate | ChatTemplateError,
                          request: Request) -> list[int] | Result:
    try:
        return _prompt_token_ids(tokenizer, template, [request])[0]
    except Exception as e:  # noqa: BLE001
        return request.fail("invalid_prompt" if isinstance(e, UnicodeError) else "internal_error",
                            f"{type(e).__name__} while tokenizing the prompt: {e}")


def _prompt_token_ids(tokenizer: Tokenizer, template: ChatTemplate | ChatTemplateError,
                      requests: Sequence[Request]) -> list[list[int] | Result]:
    rendered: dict[int, str | Result] = {}
    for i, r in enumerate(requests):
        if r.messages is not None:
            try:
                if isinstance(template, ChatTemplateError):
                    raise template
                rendered[i] = template.render(r.messages)
                if not rendered[i].strip():
                    raise ChatTemplateError("invalid_prompt", "the chat template rendered the messages as an "
                                            "empty prompt")
                if (bad := not_utf8(rendered[i])) is not None:
                    raise ChatTemplateError("chat_template_error", f"the rendered prompt {bad}")
            except ChatTemplateError as e:
                rendered[i] = r.fail(e.kind, str(e))
    plain = [i for i, r in enumerate(requests) if r.messages is None]
    chat = [i for i, text in rendered.items() if isinstance(text, str)]
    out: list[list[int] | Result] = [rendered.get(i) for i in range(len(requests))]
    for i, ids in zip(plain, tokenizer.encode_batch([requests[i].prompt for i in plain])):
        out[i] = ids
    if chat:
        for i, ids in zip(chat, tokenizer.encode_batch([rendered[i] for i in chat], add_bos=False,
                                                       parse_special=True)):
            out[i] = ids
    return out


# ------------------------------------------------------------------ finishing completions


def finish_completions(tokenizer: Tokenizer, results: list[Result]) -> list[Result]:
    """Token ids -> completion text, in place; returns `results`. Finishes the results together;
    if that fails, one at a time, so a result that breaks detokenizing becomes its own
    internal_error line. See _finish_completions for what finishing does."""
    try:
        return _finish_completions(tokenizer, results)
    except Exception:  # noqa: BLE001
        pass
    out = []
    for r in results:
        try:
            out += _finish_completions(tokenizer, [r])
        except Exception as e:  # noqa: BLE001
            out.append(error(r.id, r.shard, r.line, "internal_error",
                             f"{type(e).__name__} while decoding the completion: {e}", api=r.api, model=r.model))
    return out


def _finish_completions(tokenizer: Tokenizer, results: list[Result]) -> list[Result]:
    """Token ids -> completion text, in place; returns `results`.

    Stop strings are matched on the text, so one split across tokens is found. The completion is
    cut at the earliest stop string (the longest, if several start there), which is kept only with
    include_stop_str_in_output, as vLLM does; finish_reason becomes "stop". completion_tokens and
    logprobs then count the tokens up to and including the one that completes the stop string:
    the tokens generation would have stopped after. Token ids are dropped once decoded.
    """
    ok = [r for r in results if r.error is None]
    texts = decode_completions(tokenizer, [r.prompt_ids for r in ok], [r.token_ids for r in ok])
    hits = [_find_stop(text, r.stop) for r, text in zip(ok, texts)]
    need = [i for i, (r, hit) in enumerate(zip(ok, hits)) if hit or (r.want_logprobs and r.api)]
    pieces = dict(zip(need, token_texts(tokenizer, [ok[i].prompt_ids for i in need], [ok[i].token_ids for i in need])))
    for i, (r, text, hit) in enumerate(zip(ok, texts, hits)):
        r.completion = text
        kept = len(r.token_ids)
        if hit:
            start, end = hit
            r.completion, r.finish_reason = text[:end if r.include_stop else start], "stop"
            kept = tokens_through(pieces[i], end)
        r.completion_tokens = kept
        if r.logprobs is not None:
            r.logprobs = r.logprobs[:kept]
        if r.want_logprobs and r.api:
            r.token_texts = pieces[i][:kept]
        if r.top_ids is not None:
            r.top_logprobs = [[(*_token_text(tokenizer, t), t, lp) for t, lp in alts] for alts in r.top_ids[:kept]]
            r.top_ids = None
    for r in results:
        r.token_ids, r.prompt_ids = [], []
    return results


def _token_text(tokenizer: Tokenizer, token: int) -> tuple[str, bytes]:
    """(text, bytes) of one token id on its own, as an alternative in top_logprobs: the bytes it adds
    to a text (a byte piece may be part of a UTF-8 character: its text then holds U+FFFD)."""
    raw = token_bytes(tokenizer)[token] if token < tokenizer.vocab_size else None
    if raw is None:
        text = tokenizer.decode([token])
        return text, text.encode("utf-8")
    return raw.decode("utf-8", "replace"), raw


def _find_stop(text: str, stops: Sequence[str]) -> tuple[int, int] | None:
    """(start, end) of the earliest stop string in `text` (the longest among those starting there)."""
    found = [(i, -len(s)) for s in stops if (i := text.find(s)) >= 0]
    if not found:
        return None
    start, neg_len = min(found)
    return start, start - neg_len


def token_texts(tokenizer: Tokenizer, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                window: int = 8) -> list[list[str]]:
    """The text each completion token adds, decoded with up to `window` tokens before it (from the
    prompt at first), so a SentencePiece word-start space is kept. A token that ends inside a
    multi-byte character adds "", and the token that completes the character carries all of it;
    so the texts join to the completion (which is assumed to hold no U+FFFD of its own). Special
    tokens (EOS) add ""."""
    before, after, sizes = [], [], []
    for p, c in zip(prompts, completions):
        seq = list(p[-window:]) + list(c)
        off = len(seq) - len(c)
        for i in range(len(c)):
            lo = max(0, off + i - window)
            before.append(seq[lo:off + i])
            after.append(seq[lo:off + i + 1])
        sizes.append(len(c))
    decoded = tokenizer.decode_batch(before + after) if before else []
    pieces = []
    for a, b in zip(decoded[:len(before)], decoded[len(before):]):
        # a window may start or end inside a multi-byte character: its bytes decode to U+FFFD
        a, b = a.strip("\ufffd"), b.strip("\ufffd")
        pieces.append(b[len(a):] if b.startswith(a) else b[len(os.path.commonprefix([a, b])):])
    out, at = [], 0
    for n in sizes:
        out.append(pieces[at:at + n])
        at += n
    return out


def tokens_through(pieces: Sequence[str], end: int) -> int:
    """How many tokens it takes for their texts to reach `end` characters (all, if they never do)."""
    total = 0
    for k, piece in enumerate(pieces):
        total += len(piece)
        if total >= end:
            return k + 1
    return len(pieces)


def serialize(r: Result) -> tuple[str, Result]:
    """A Result's output line, and the Result that line reports. Never raises: a result that cannot
    be written as JSON in UTF-8 becomes an internal_error line with the same id."""
    try:
        text = r.to_json()
        text.encode("utf-8")
        return text, r
    except Exception as e:  # noqa: BLE001
        why = f"{type(e).__name__} while writing the result: {short_repr(str(e), 200)}"
        rid = r.id if not_utf8(r.id) is None else f"line {r.line}"
        failed = error(rid, r.shard, r.line, "internal_error", why, api=r.api, model=r.model)
        return failed.to_json(), failed


def output_view(rec: dict[str, Any]) -> dict[str, Any]:
    """An output line of either shape (the project's or OpenAI's) -> {"id", "error_type" and
    "error_message" (None for a completion), "completion", "prompt_tokens", "completion_tokens"},
    for summaries."""
    if "custom_id" in rec:
        return API_FORMATS["openai"].output_view(rec)
    err = rec.get("error")
    return {"id": rec.get("id"), "error_type": err["type"] if err else None,
            "error_message": err.get("message") if err else None, "completion": rec.get("completion"),
            "prompt_tokens": rec.get("prompt_tokens", 0), "completion_tokens": rec.get("completion_tokens", 0)}
