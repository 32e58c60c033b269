"""Property tests: whatever a shard holds (random bytes, random JSON, deep or huge values, odd
Unicode, random field values), reading, parsing, tokenizing and writing never raise, and every
record ends as exactly one output line; through the job, the manifest adds up.

The default run is derandomized and short (CI); `make test-slow` runs many more random examples."""

import gzip
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model import load_tokenizer
from pipeline.formats import read_records, shard_format
from pipeline.job import run
from pipeline.records import Request, chat_template_for, parse, prompt_token_ids, serialize

DEMO = "model/assets/demo"
DEFAULTS = {"max_tokens": 2, "temperature": 0.0, "top_p": 1.0, "top_k": 0}
FIELDS = ["id", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "logprobs",
          "include_stop_str_in_output", "n", "response_format", "guided_choice", "custom_id", "body", "url"]

QUICK = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                 suppress_health_check=list(HealthCheck))
LONG = settings(max_examples=2000, deadline=None, database=None, suppress_health_check=list(HealthCheck))

# text with lone surrogates, control characters, a BOM and astral characters
odd_text = st.text(st.characters(codec=None, categories=None), max_size=12) | st.sampled_from(
    ["\ud800", "a\udfffb", "\ufeff", "\x00", "\U0001f600", "In the beginning", "</s>", "<s>", ""])
numbers = (st.integers(min_value=-(2**70), max_value=2**70) | st.floats(allow_nan=True, allow_infinity=True)
           | st.sampled_from([0, 1, -1, 2**31, 2**32, 2**63, 10**400, 1e-45, 1e39]))
leaves = st.none() | st.booleans() | numbers | odd_text
json_values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(odd_text | st.sampled_from(FIELDS), inner, max_size=4), max_leaves=12)
records = st.dictionaries(st.sampled_from(FIELDS), json_values | st.sampled_from(
    ["In the beginning", [{"role": "user", "content": "hi"}], {"prompt": "p"}, "/v1/completions"]), max_size=6)


def _dumps(value) -> bytes:
    try:
        return json.dumps(value).encode()  # ensure_ascii: lone surrogates become "\ud800" escapes
    except ValueError:  # an int past Python's int-string limit
        return b'{"prompt": ' + b"9" * 5000 + b"}"


lines = (records.map(_dumps) | json_values.map(_dumps) | st.binary(max_size=40)
         | st.sampled_from([b"[" * 5000, b'{"a": ' * 3000, b"\xef\xbb\xbf{}", b"\xff\xfe", b"{" + b"1" * 5000]))
shards = st.tuples(st.sampled_from(["s.jsonl", "s.txt", "s.jsonl.gz", "s.json"]),
                   st.lists(lines, max_size=8), st.sampled_from(["whole", "truncated", "bom"]))


def write_shard(directory, name: str, body: list[bytes], damage: str) -> str:
    data = b"\n".join(line.replace(b"\n", b" ") for line in body) + b"\n"
    data = b"\xef\xbb\xbf" + data if damage == "bom" else data
    if name.endswith(".gz"):
        data = gzip.compress(data)
    if damage == "truncated":
        data = data[: len(data) * 2 // 3]
    path = os.path.join(directory, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(DEMO)


def account(url: str, tokenizer, defaults=DEFAULTS) -> list[int]:
    """Runs one shard through the job's per-record steps; returns the record numbers it wrote."""
    fmt = shard_format(url, "auto")
    template = chat_template_for(DEMO, tokenizer)
    numbers, requests, written = [], [], []
    for n, raw in read_records(url, fmt, max_bytes=1 << 20):
        numbers.append(n)
        rec = parse(raw, 0, os.path.basename(url), n, fmt, defaults)
        (requests if isinstance(rec, Request) else written).append(rec)
    for req, ids in zip(requests, prompt_token_ids(tokenizer, template, requests)):
        written.append(req.fail("x", "y") if isinstance(ids, list) else ids)
    for r in written:
        text, _ = serialize(r)
        json.loads(text.encode("utf-8"))  # valid JSON in valid UTF-8
    assert numbers == sorted(set(numbers)), "record numbers must be unique and ascending"
    assert sorted(r.line for r in written) == numbers, "every record read ends as exactly one line"
    return numbers


def _check_read_path(shard, tokenizer, tmp_path_factory):
    name, body, damage = shard
    account(write_shard(tmp_path_factory.mktemp("fz"), name, body, damage), tokenizer)


@QUICK
@given(shard=shards)
def test_any_shard_reads_parses_and_tokenizes_without_raising(shard, tokenizer, tmp_path_factory):
    _check_read_path(shard, tokenizer, tmp_path_factory)


@pytest.mark.slow
@LONG
@given(shard=shards)
def test_any_shard_reads_parses_and_tokenizes_without_raising_long(shard, tokenizer, tmp_path_factory):
    _check_read_path(shard, tokenizer, tmp_path_factory)


def _check_job(batch, tokenizer, tmp_path_factory):
    d = tmp_path_factory.mktemp("fzjob")
    inp = d / "in"
    inp.mkdir()
    expected = {}
    for i, (name, body, damage) in enumerate(batch):
        name = f"{i}-{name}"  # distinct output names
        url = write_shard(str(inp), name, list(body) + [b'{"prompt": "In the beginning"}'], damage)
        expected[name.split(".")[0] + ".jsonl"] = len(account(url, tokenizer))
    summary = run(["--input", str(inp / "*"), "--output", str(d / "out"), "--model", "demo", "--max_tokens", "2",
                   "--max_len", "64", "--batch_tokens", "64", "--overwrite"])
    got = {p.name: len(p.read_bytes().splitlines()) for p in (d / "out").glob("*.jsonl")}
    assert got == expected
    assert summary["records"] == sum(expected.values()) == summary["completions"] + summary["errors"]


@settings(max_examples=6, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(batch=st.lists(shards, min_size=1, max_size=3))
def test_any_shards_through_the_job_account_for_every_record(batch, tokenizer, tmp_path_factory):
    _check_job(batch, tokenizer, tmp_path_factory)


@pytest.mark.slow
@settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(batch=st.lists(shards, min_size=1, max_size=4))
def test_any_shards_through_the_job_account_for_every_record_long(batch, tokenizer, tmp_path_factory):
    _check_job(batch, tokenizer, tmp_path_factory)
