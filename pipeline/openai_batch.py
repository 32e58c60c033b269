"""OpenAI Batch API files: request lines in, response lines out, in OpenAI's shapes.

A request line:
  {"custom_id": "r1", "method": "POST", "url": "/v1/completions" | "/v1/chat/completions",
   "body": {"model", "prompt" | "messages", "max_tokens" (or "max_completion_tokens"), "temperature",
            "top_p", "seed", "stop", "logprobs", "top_logprobs", "response_format" (json_schema,
            json_object, text), and vLLM's "top_k", "include_stop_str_in_output", "guided_json",
            "guided_regex", "guided_choice"}}
Its answer:
  {"id": "batch_req_...", "custom_id": "r1", "response": {"status_code": 200, "request_id": "req_...",
   "body": {"id", "object": "text_completion" | "chat.completion", "created", "model", "choices": [...],
            "usage": {"prompt_tokens", "completion_tokens", "total_tokens"}}}, "error": null}
A request this job refuses (a bad parameter, a prompt over the context, no chat template) is answered
as the API answers one: "response" with status_code 400 (500 if generation itself failed) and a
body {"error": {"message", "type", "param", "code"}}. A line that is not a request at all (not
JSON, no custom_id) has "custom_id": null, "response": null and "error": {"code", "message"}, the
message starting with "<shard name>:<line>".

Ids are derived from the shard and line, so a rerun writes the same ids. The body's "model" is
not used to pick a model: the response names the model that served it.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from typing import Any

from pipeline.formats import UNSUPPORTED_FIELDS, BadRecord
from pipeline.records import API_FORMATS, CONSTRAINT_FIELDS, Request, Result, short_repr, error, loads, make_request, not_utf8

ENDPOINTS = {"/v1/completions": "text_completion", "/v1/chat/completions": "chat.completion"}
SERVER_ERRORS = ("generation_failed", "internal_error")


def parse(raw: bytes | BadRecord, shard: int, rid: str, line: int, defaults: dict[str, Any]) -> Request | Result:
    """One line of an OpenAI Batch input file -> a Request, or an error Result in OpenAI's shape."""
    not_request = lambda kind, message: error(rid, shard, line, kind, message, api="")  # noqa: E731
    if isinstance(raw, BadRecord):
        return not_request(raw.kind, raw.message)
    if not isinstance(raw, bytes):
        return not_request("invalid_record", f"not a line of text: {type(raw).__name__}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return not_request("invalid_utf8", f"line is not valid UTF-8 (byte {e.start})")
    obj, why = loads(text)
    if why:
        return not_request("invalid_json", why)
    if not isinstance(obj, dict):
        return not_request("invalid_record", f"request must be a JSON object; got {type(obj).__name__}")
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid:
        return not_request("invalid_record", f"custom_id must be a non-empty string; got {short_repr(cid)}")
    if (bad := not_utf8(cid)) is not None:
        return not_request("invalid_record", f"custom_id {bad}")
    url, body = obj.get("url"), obj.get("body")
    api = url if isinstance(url, str) else "?"  # an HTTP-shaped answer, whatever the endpoint
    refuse = lambda kind, message: error(cid, shard, line, kind, message, api=api,  # noqa: E731
                                         model=defaults.get("model", ""))
    if obj.get("method", "POST") != "POST":
        return refuse("invalid_request", f"method must be 'POST'; got {obj.get('method')!r}")
    if url not in ENDPOINTS:
        return refuse("invalid_request", f"url must be one of {sorted(ENDPOINTS)}; got {url!r}")
    if not isinstance(body, dict):
        return refuse("invalid_request", f"body must be a JSON object; got {type(body).__name__}")
    return _request(cid, shard, line, url, body, defaults, refuse)


def _request(cid: str, shard: int, line: int, url: str, body: dict, defaults: dict, refuse) -> Request | Result:
    chat = url == "/v1/chat/completions"
    fields = {k: body.get(k) for k in ("temperature", "top_p", "top_k", "seed", "stop", "include_stop_str_in_output",
                                       "prompt_logprobs", *CONSTRAINT_FIELDS, *UNSUPPORTED_FIELDS)}
    fields["max_tokens"] = body.get("max_completion_tokens") if chat and body.get(
        "max_completion_tokens") is not None else body.get("max_tokens")
    logprobs = body.get("logprobs")
    if chat:
        if logprobs is not None and not isinstance(logprobs, bool):
            return refuse("invalid_parameter", f"logprobs must be true or false; got {logprobs!r}")
        top = body.get("top_logprobs")
        if top not in (None, 0) and not logprobs:
            return refuse("invalid_parameter", "top_logprobs needs logprobs: true")
        fields["logprobs"], fields["top_logprobs"] = bool(logprobs), top
    else:
        if logprobs is not None and (not isinstance(logprobs, int) or isinstance(logprobs, bool) or logprobs < 0):
            return refuse("invalid_parameter", f"logprobs must be an integer >= 0; got {logprobs!r}")
        fields["logprobs"], fields["top_logprobs"] = logprobs is not None, logprobs
    if chat:
        if "messages" not in body:
            return refuse("invalid_request", "a chat completion body needs 'messages'")
        return make_request(cid, shard, line, None, body["messages"], fields, defaults, api=url)
    if "prompt" not in body:
        return refuse("invalid_request", "a completion body needs 'prompt'")
    if isinstance(body["prompt"], list):
        return refuse("unsupported_parameter", "prompt must be one string; lists of prompts or of token ids "
                      "are not supported (one request per line)")
    return make_request(cid, shard, line, body["prompt"], None, fields, defaults, api=url)


def to_json(r: Result) -> str:
    """A Result of an OpenAI record -> its output line."""
    key = hashlib.sha1(f"{r.shard}:{r.line}:{r.id}".encode("utf-8")).hexdigest()[:24]
    out: dict[str, Any] = {"id": f"batch_req_{key}", "custom_id": r.id, "response": None, "error": None}
    if r.api == "":  # not a request: its id is "<shard name>:<line>", not a custom_id
        out["custom_id"] = None
        out["error"] = {"code": r.error_type, "message": f"{r.id}: {r.error}"}
    elif r.error is not None:
        server = r.error_type in SERVER_ERRORS
        out["response"] = {"status_code": 500 if server else 400, "request_id": f"req_{key}", "body": {"error": {
            "message": r.error, "type": "server_error" if server else "invalid_request_error", "param": None,
            "code": r.error_type}}}
    else:
        out["response"] = {"status_code": 200, "request_id": f"req_{key}", "body": _body(r, key)}
    return json.dumps(out, ensure_ascii=False)


def _body(r: Result, key: str) -> dict[str, Any]:
    chat = r.api == "/v1/chat/completions"
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": r.completion}}
    else:
        choice = {"index": 0, "text": r.completion}
    choice["logprobs"] = _logprobs(r, chat) if r.want_logprobs else None
    choice["finish_reason"] = r.finish_reason
    if r.prompt_logprobs is not None:  # vLLM's extension
        choice["prompt_logprobs"] = r.prompt_logprobs
    return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{key}", "object": ENDPOINTS[r.api], "created": int(time.time()),
            "model": r.model, "choices": [choice],
            "usage": {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
                      "total_tokens": r.prompt_tokens + r.completion_tokens}}


def _logprobs(r: Result, chat: bool) -> dict[str, Any]:
    texts, lps = r.token_texts or [], r.logprobs or []
    tops = r.top_logprobs or [[] for _ in texts]
    if chat:
        return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8")),
                             "top_logprobs": [{"token": a, "logprob": alp, "bytes": list(ab)} for a, ab, _, alp in top]}
                            for t, lp, top in zip(texts, lps, tops)], "refusal": None}
    offsets, at = [], 0
    for t in texts:
        offsets.append(at)
        at += len(t)
    # one entry per token: its k alternatives by text (the chosen one too, as OpenAI's API adds it)
    alternatives = [{**{a: alp for a, _, _, alp in top}, t: lp} if r.top_logprobs else {t: lp}
                    for t, lp, top in zip(texts, lps, tops)]
    return {"tokens": texts, "token_logprobs": lps, "top_logprobs": alternatives, "text_offset": offsets}


def output_view(rec: dict[str, Any]) -> dict[str, Any]:
    """See records.output_view."""
    view = {"id": rec.get("custom_id"), "error_type": None, "error_message": None, "completion": None,
            "prompt_tokens": 0, "completion_tokens": 0}
    response = rec.get("response") or {}
    body = response.get("body") or {}
    if rec.get("error"):
        view["error_type"], view["error_message"] = rec["error"].get("code"), rec["error"].get("message")
    elif response.get("status_code") != 200:
        err = body.get("error") or {}
        view["error_type"] = err.get("code") or f"http_{response.get('status_code')}"
        view["error_message"] = err.get("message")
    else:
        choice = body["choices"][0]
        view["completion"] = choice["message"]["content"] if "message" in choice else choice["text"]
        view["prompt_tokens"] = body["usage"]["prompt_tokens"]
        view["completion_tokens"] = body["usage"]["completion_tokens"]
    return view


API_FORMATS["openai"] = sys.modules[__name__]
