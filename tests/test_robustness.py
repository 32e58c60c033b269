"""No record can crash a job: each hostile input ends as its own error line, and everything
around it is kept. Unit checks on the read/parse/tokenize path, then small jobs on the demo model."""

import gzip
import json
import struct

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from model import load_tokenizer
from pipeline import formats
from pipeline.formats import read_records, shard_format
from pipeline.job import run
from pipeline.records import Request, Result, finish_completions, parse, prompt_token_ids, serialize
from test_formats import records_of, write_tfrecord

DEMO = "model/assets/demo"
DEFAULTS = {"max_tokens": 4, "temperature": 0.0, "top_p": 1.0, "top_k": 0}


def line(**rec) -> str:
    return json.dumps(rec) + "\n"


def one(raw: bytes, fmt: str = "jsonl") -> Request | Result:
    return parse(raw, 0, "s.jsonl", 7, fmt, DEFAULTS)


def read_out(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


# ------------------------------------------------------------------ hostile records


@pytest.mark.parametrize("raw, kind, words", [
    (b'{"prompt": "a \\ud800 b"}', "invalid_prompt", "lone UTF-16 surrogate"),
    (b'{"id": "x\\udfff", "prompt": "p"}', "invalid_record", "id holds text that cannot be encoded"),
    (b'{"prompt": "p", "stop": ["\\ud800"]}', "invalid_parameter", "stop holds"),
    (b'{"messages": [{"role": "user", "content": "\\udc00"}]}', "invalid_messages", "messages[0]"),
    (b"[" * 100_000 + b"]" * 100_000, "invalid_json", "nested too deeply"),
    (b'{"prompt": "p", "seed": ' + b"9" * 5000 + b"}", "invalid_json", "4300"),
    (b'{"prompt": "p", "top_k": 1000000000000}', "invalid_parameter", "top_k must be an integer in [0, 2**31)"),
    (b'{"prompt": "p", "temperature": ' + b"9" * 400 + b"}", "invalid_parameter", "temperature"),
    (b'{"prompt": "p", "max_tokens": 1e400}', "invalid_parameter", "max_tokens"),
    (b'{"prompt": "p", "response_format": {"type": "xml"}}', "invalid_parameter", "response_format must be"),
    (b'{"prompt": "p", "guided_choice": []}', "invalid_parameter", "guided_choice must be a non-empty list"),
    (b'{"prompt": "p", "guided_regex": "a", "guided_choice": ["a"]}', "invalid_parameter", "give one constraint"),
    (b'{"prompt": "p", "guided_grammar": "root ::= x"}', "unsupported_parameter", "guided_grammar"),
    (b'{"prompt": "p", "n": 3}', "unsupported_parameter", "n=3"),
    (b'{"prompt": "p", "presence_penalty": 0.5}', "unsupported_parameter", "presence_penalty"),
])
def test_a_hostile_record_is_its_own_error_and_can_be_written(raw, kind, words):
    r = one(raw)
    assert isinstance(r, Result) and r.error_type == kind and words in r.error, r
    text, reported = serialize(r)
    assert reported is r and json.loads(text.encode("utf-8"))["error"]["type"] == kind
    if "id" in raw.decode("utf-8", "replace")[:8]:  # an id that cannot be written: the record's own number
        assert r.id == "s.jsonl:7"


def test_neutral_values_of_unsupported_fields_and_unknown_fields_pass():
    r = one(line(prompt="p", n=1, presence_penalty=0.0, response_format={"type": "text"}, guided_json=None,
                 my_own_note="kept out of the way").encode())
    assert isinstance(r, Request)


def test_numbers_the_device_cannot_hold_are_refused_or_mean_off():
    assert one(line(prompt="p", top_k=2**31 - 1).encode()).top_k == 2**31 - 1  # >= vocabulary: every token
    assert one(line(prompt="p", temperature=1e-30).encode()).temperature == 0.0  # greedy, as vLLM does
    assert one(line(prompt="p", seed=2**32).encode()).error_type == "invalid_parameter"
    assert one(line(prompt="p", temperature=1e39).encode()).error_type == "invalid_parameter"


def test_an_openai_request_with_a_bad_custom_id_or_vllm_extras():
    bad = one(b'{"custom_id": "\\ud800", "method": "POST", "url": "/v1/completions", "body": {"prompt": "p"}}',
              "openai")
    assert bad.error_type == "invalid_record" and bad.api == "" and "custom_id holds" in bad.error
    assert json.loads(serialize(bad)[0])["custom_id"] is None
    r = one(line(custom_id="c", method="POST", url="/v1/completions",
                 body={"prompt": "p", "guided_grammar": "root ::= x"}).encode(), "openai")
    out = json.loads(serialize(r)[0])
    assert out["response"]["status_code"] == 400 and out["response"]["body"]["error"]["code"] == "unsupported_parameter"
    deep = one(b'{"custom_id": ' + b"[" * 50_000, "openai")
    assert deep.error_type == "invalid_json"


def test_a_record_that_breaks_the_parser_itself_is_an_internal_error(monkeypatch):
    import pipeline.records as records

    monkeypatch.setattr(records, "parse_object", lambda *a: 1 / 0)
    r = one(line(prompt="p").encode())
    assert (r.id, r.error_type) == ("s.jsonl:7", "internal_error") and "ZeroDivisionError" in r.error


class FlakyTokenizer:
    """The demo tokenizer, except that it fails on any batch holding the text 'BOOM'."""

    def __init__(self):
        self.inner = load_tokenizer(DEMO)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode_batch(self, texts, **kw):
        if any("BOOM" in t for t in texts):
            raise RuntimeError("tokenizer exploded")
        return self.inner.encode_batch(texts, **kw)

    def decode_batch(self, ids):
        if any(7 in row for row in ids):
            raise RuntimeError("detokenizer exploded")
        return self.inner.decode_batch(ids)


def test_tokenizing_falls_back_to_one_record_at_a_time():
    reqs = [one(line(prompt=p).encode()) for p in ("In the beginning", "BOOM", "The hacker")]
    got = prompt_token_ids(FlakyTokenizer(), None, reqs)
    assert isinstance(got[0], list) and isinstance(got[2], list)
    assert got[1].error_type == "internal_error" and "tokenizer exploded" in got[1].error
    assert got[0] == load_tokenizer(DEMO).encode("In the beginning")


def test_detokenizing_falls_back_to_one_result_at_a_time():
    results = [Result(id=str(i), shard=0, line=i, token_ids=ids, prompt_ids=[1, 5], completion_tokens=len(ids),
                      finish_reason="length") for i, ids in enumerate([[30, 31], [7, 8], [40]])]
    out = finish_completions(FlakyTokenizer(), results)
    assert [r.error_type for r in out] == [None, "internal_error", None] and out[0].completion is not None


# ------------------------------------------------------------------ hostile shards


def test_a_truncated_gzip_keeps_every_record_before_the_cut(tmp_path):
    data = "".join(line(id=f"r{i}", prompt=f"prompt {i} " * 4) for i in range(30_000)).encode()
    gz = gzip.compress(data)
    (tmp_path / "cut.jsonl.gz").write_bytes(gz[: len(gz) // 2])
    got = list(read_records(str(tmp_path / "cut.jsonl.gz"), "jsonl", max_bytes=1 << 20))
    *good, (n, last) = got
    assert [k for k, _ in good] == list(range(1, len(good) + 1)) and n == len(good) + 1
    assert last.kind == "unreadable_shard" and f"after line {len(good)}" in last.message and "EOFError" in last.message
    whole = data[: sum(len(raw) + 1 for _, raw in good)]  # the kept lines are exactly the file's first lines
    assert b"\n".join(raw for _, raw in good) + b"\n" == whole
    assert len(good) > 10_000  # nothing decompressed before the cut is lost to a large read


def test_text_named_gz_and_a_truncated_tfrecord_gz(tmp_path):
    (tmp_path / "plain.txt.gz").write_text("not gzip\n")
    [(n, r)] = records_of(tmp_path / "plain.txt.gz")
    assert (n, r.error_type) == (1, "unreadable_shard") and "BadGzipFile" in r.error
    write_tfrecord(tmp_path / "t.tfrecord.gz", [{"prompt": f"p{i} " * 50} for i in range(2000)], compress=True)
    raw = (tmp_path / "t.tfrecord.gz").read_bytes()
    (tmp_path / "cut.tfrecord.gz").write_bytes(raw[: len(raw) // 2])
    got = records_of(tmp_path / "cut.tfrecord.gz")
    assert all(isinstance(r, Request) for _, r in got[:-1]) and len(got) > 100
    assert got[-1][1].error_type in ("unreadable_shard", "unreadable_record")


def test_a_damaged_parquet_row_group_costs_only_its_rows(tmp_path):
    pq.write_table(pa.table({"prompt": [f"prompt {i}" for i in range(300)]}), tmp_path / "g.parquet",
                   row_group_size=100)
    chunk = pq.ParquetFile(tmp_path / "g.parquet").metadata.row_group(1).column(0)
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    data = bytearray((tmp_path / "g.parquet").read_bytes())
    data[start:start + chunk.total_compressed_size] = b"\xab" * chunk.total_compressed_size
    (tmp_path / "g.parquet").write_bytes(bytes(data))
    got = records_of(tmp_path / "g.parquet")
    assert [n for n, _ in got] == list(range(300))
    kinds = [getattr(r, "error_type", None) for _, r in got]
    assert kinds == [None] * 100 + ["unreadable_record"] * 100 + [None] * 100
    assert got[250][1].prompt == "prompt 250" and "row group 1" in got[150][1].error


def test_a_byte_order_mark_is_skipped(tmp_path):
    bom = b"\xef\xbb\xbf"
    (tmp_path / "a.jsonl").write_bytes(bom + line(id="a", prompt="In the beginning").encode())
    (tmp_path / "b.txt").write_bytes(bom + b"In the beginning\n")
    (tmp_path / "c.jsonl").write_bytes(bom + line(custom_id="c", method="POST", url="/v1/completions",
                                                  body={"prompt": "In the beginning"}).encode())
    assert shard_format(str(tmp_path / "c.jsonl"), "auto") == "openai"
    for name in ("a.jsonl", "b.txt", "c.jsonl"):
        [(_, r)] = records_of(tmp_path / name)
        assert isinstance(r, Request) and r.prompt == "In the beginning", (name, r)


def test_a_deeply_nested_first_line_does_not_break_format_detection(tmp_path):
    (tmp_path / "d.jsonl").write_bytes(b"[" * 100_000 + b"\n" + line(prompt="p").encode())
    assert shard_format(str(tmp_path / "d.jsonl"), "auto") == "jsonl"
    kinds = [getattr(r, "error_type", None) for _, r in records_of(tmp_path / "d.jsonl")]
    assert kinds == ["invalid_json", None]


def test_unsupported_fields_in_parquet_and_tfrecord_are_refused(tmp_path):
    pq.write_table(pa.table({"prompt": ["a", "b", "c"], "guided_grammar": [None, "root ::= x", None],
                             "guided_choice": [None, None, ["yes", "no"]]}), tmp_path / "p.parquet")
    rows = [r for _, r in records_of(tmp_path / "p.parquet")]
    assert [getattr(r, "error_type", None) for r in rows] == [None, "unsupported_parameter", None]
    assert rows[2].constraint == ("choice", ["yes", "no"])
    write_tfrecord(tmp_path / "t.tfrecord", [{"prompt": "a", "n": 2}])
    [(_, r)] = records_of(tmp_path / "t.tfrecord")
    assert r.error_type == "unsupported_parameter" and "n=2" in r.error


# ------------------------------------------------------------------ through the job


@pytest.mark.slow  # kept out of the default run for CI time; make test-slow runs it
def test_a_job_over_hostile_shards_accounts_for_every_record(tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    hostile = [b'{"id": "surrogate", "prompt": "In the \\ud800 beginning"}', b'{"id": "\\ud800", "prompt": "p"}',
               b"[" * 100_000, b'{"prompt": "p", "seed": ' + b"1" * 5000 + b"}",
               b'{"id": "big-k", "prompt": "The hacker", "top_k": 1000000000000}',
               b'{"id": "vocab-k", "prompt": "The hacker", "top_k": 100000, "temperature": 0.7}',
               b'{"id": "tiny-t", "prompt": "The hacker", "temperature": 1e-40, "top_p": 1e-50}',
               b'{"id": "schema", "prompt": "The hacker", "response_format": {"type": "json_object"}}',
               b'{"id": "ok", "prompt": "In the beginning"}']
    (inp / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + b"\n".join(hostile) + b"\n")
    data = "".join(line(id=f"g{i}", prompt=f"And the LORD said {i}") for i in range(300)).encode()
    gz = gzip.compress(data)
    (inp / "b.jsonl.gz").write_bytes(gz[: len(gz) * 3 // 4])
    (inp / "c.txt").write_text("A kludge is\n")
    summary = run(["--input", str(inp / "*"), "--output", str(tmp_path / "out"), "--model", "demo",
                   "--max_tokens", "3", "--max_len", "128", "--batch_tokens", "64"])
    a = {r["id"]: r for r in read_out(tmp_path / "out" / "a.jsonl")}
    assert len(a) == len(hostile)
    kinds = {k: (r.get("error") or {}).get("type") for k, r in a.items()}
    assert kinds == {"surrogate": "invalid_prompt", "a.jsonl:2": "invalid_record", "a.jsonl:3": "invalid_json",
                     "a.jsonl:4": "invalid_json", "big-k": "invalid_parameter", "vocab-k": None, "tiny-t": None,
                     "schema": None, "ok": None}
    assert a["schema"]["constraint_satisfied"] is False and a["schema"]["finish_reason"] == "length"  # 3 tokens
    b = read_out(tmp_path / "out" / "b.jsonl")
    assert b[-1]["error"]["type"] == "unreadable_shard" and all("completion" in r for r in b[:-1]) and len(b) > 50
    assert summary["records"] == len(a) + len(b) + 1 == summary["completions"] + summary["errors"]

