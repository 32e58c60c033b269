"""Input formats, record parsing, the OpenAI Batch shapes and finishing completions (stop strings,
logprobs), without the engine; tests/test_formats_job.py runs them through the job."""

import gzip
import json
import struct

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from model import GenerationOutput
from model.tokenizer import decode_completions, load_tokenizer
from pipeline import formats
from pipeline.formats import BadRecord, Columns, read_records, shard_format
from pipeline.openai_batch import output_view
from pipeline.records import Request, Result, finish_completions, parse, token_texts

DEFAULTS = {"max_tokens": 16, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "model": "demo"}
DEMO = "model/assets/demo"


@pytest.fixture(scope="module")
def demo_tokenizer():
    return load_tokenizer(DEMO)


def records_of(path, fmt=None, columns=Columns(), max_bytes=None):
    fmt = fmt or shard_format(str(path), "auto")
    return [(n, parse(raw, 0, path.name, n, fmt, DEFAULTS)) for n, raw in read_records(str(path), fmt, columns,
                                                                                       max_bytes)]


def write_tfrecord(path, examples: list[dict], compress=False):
    import tensorflow as tf

    def feature(v):
        v = v if isinstance(v, list) else [v]
        if all(isinstance(x, bytes) for x in v):
            return tf.train.Feature(bytes_list=tf.train.BytesList(value=v))
        if all(isinstance(x, str) for x in v):
            return tf.train.Feature(bytes_list=tf.train.BytesList(value=[x.encode() for x in v]))
        if all(isinstance(x, int) for x in v):
            return tf.train.Feature(int64_list=tf.train.Int64List(value=v))
        return tf.train.Feature(float_list=tf.train.FloatList(value=v))

    options = tf.io.TFRecordOptions(compression_type="GZIP" if compress else "")
    with tf.io.TFRecordWriter(str(path), options) as w:
        for ex in examples:
            w.write(tf.train.Example(features=tf.train.Features(
                feature={k: feature(v) for k, v in ex.items()})).SerializeToString())


# ------------------------------------------------------------------ which format


def test_auto_format_by_extension_and_first_record(tmp_path):
    (tmp_path / "ours.jsonl").write_text('\n{"id": 1, "prompt": "p"}\n')
    (tmp_path / "oa.jsonl").write_text('{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {}}\n')
    (tmp_path / "broken.jsonl").write_text("{nope\n")
    with gzip.open(tmp_path / "oa.json.gz", "wt") as f:
        f.write('{"custom_id": "a", "body": {}}\n')
    expect = {"ours.jsonl": "jsonl", "oa.jsonl": "openai", "broken.jsonl": "jsonl", "oa.json.gz": "openai",
              "x.parquet": "parquet", "x.tfrecord": "tfrecord", "x.TFREC.gz": "tfrecord", "notes.txt": "text",
              "README": "text"}
    for name, fmt in expect.items():
        assert shard_format(str(tmp_path / name), "auto") == fmt, name
    assert shard_format(str(tmp_path / "oa.jsonl"), "jsonl") == "jsonl"  # an explicit format wins


# ------------------------------------------------------------------ Parquet


def test_parquet_rows_in_order_with_columns_nulls_and_defaults(tmp_path):
    n = formats.PARQUET_BATCH * 2 + 5  # several reader batches
    table = pa.table({"text": [f"prompt {i}" for i in range(n)], "key": [f"k{i}" for i in range(n)],
                      "temperature": [0.5 if i % 2 else None for i in range(n)],
                      "stop": [["\n", "END"] if i == 3 else None for i in range(n)]})
    pq.write_table(table, tmp_path / "rows.parquet", row_group_size=700)
    got = records_of(tmp_path / "rows.parquet", columns=Columns(prompt_column="text", id_column="key"))
    assert [n for n, _ in got] == list(range(n))
    reqs = [r for _, r in got]
    assert all(isinstance(r, Request) for r in reqs)
    assert [r.id for r in reqs[:3]] == ["k0", "k1", "k2"] and reqs[7].prompt == "prompt 7"
    assert (reqs[0].temperature, reqs[1].temperature) == (0.0, 0.5)  # null: the job's default
    assert reqs[3].stop == ("\n", "END")


def test_parquet_default_ids_messages_and_bad_rows(tmp_path):
    table = pa.table({"prompt": ["ok", None, "", "fine", None],
                      "messages": [None, None, None, None, [{"role": "user", "content": "hi"}]],
                      "max_tokens": [4, 4, 4, -1, None], "logprobs": [True, None, None, None, False]})
    pq.write_table(table, tmp_path / "mixed.parquet")
    got = dict(records_of(tmp_path / "mixed.parquet"))
    assert got[0].id == "mixed.parquet:0" and got[0].logprobs and got[0].max_tokens == 4
    assert "no 'prompt'" in got[1].error and got[2].error == "prompt is empty"
    assert "max_tokens must be an integer >= 1; got -1" in got[3].error
    # a row with a null prompt and messages is a chat record
    assert isinstance(got[4], Request) and got[4].messages == [{"role": "user", "content": "hi"}]


def test_parquet_without_the_prompt_column_errs_per_row_keeping_ids(tmp_path):
    pq.write_table(pa.table({"id": ["a", "b"], "body": ["x", "y"]}), tmp_path / "p.parquet")
    got = records_of(tmp_path / "p.parquet")
    assert [(n, r.id, r.error_type) for n, r in got] == [(0, "a", "invalid_record"), (1, "b", "invalid_record")]
    assert "no column 'prompt'" in got[0][1].error and "['id', 'body']" in got[0][1].error
    pq.write_table(pa.table({"other": [1, 2, 3]}), tmp_path / "q.parquet")
    assert [r.id for _, r in records_of(tmp_path / "q.parquet")] == ["q.parquet:0", "q.parquet:1", "q.parquet:2"]


def test_a_file_that_is_not_parquet_is_one_error(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    [(n, r)] = records_of(tmp_path / "bad.parquet")
    assert (n, r.error_type) == (0, "unreadable_shard") and "not a readable Parquet file" in r.error


# ------------------------------------------------------------------ TFRecord


def test_tfrecord_examples_with_features_and_bad_values(tmp_path):
    write_tfrecord(tmp_path / "ex.tfrecord", [
        {"text": "In the beginning", "uid": "u0", "max_tokens": 5, "temperature": 0.5, "stop": ["\n", "."]},
        {"text": "no id here", "logprobs": 1, "include_stop_str_in_output": 0},
        {"text": b"\xff\xfe", "uid": "bad-utf8"},
        {"text": ["two", "prompts"], "uid": "two"},
        {"uid": "no-prompt", "other": "x"},
        {"uid": 7, "messages": json.dumps([{"role": "user", "content": "hi"}])},
        {"uid": "bad-json", "messages": "[not json"},
    ])
    got = records_of(tmp_path / "ex.tfrecord", columns=Columns(prompt_feature="text", id_feature="uid"))
    assert [n for n, _ in got] == list(range(7))
    r = [x for _, x in got]
    assert (r[0].id, r[0].prompt, r[0].max_tokens, r[0].stop) == ("u0", "In the beginning", 5, ("\n", "."))
    assert r[0].temperature == pytest.approx(0.5)
    assert r[1].id == "ex.tfrecord:1" and r[1].logprobs is True and r[1].include_stop is False
    assert (r[2].id, r[2].error_type) == ("bad-utf8", "invalid_utf8") and "feature 'text'" in r[2].error
    assert "feature 'text' must hold one value; it holds 2" in r[3].error and r[3].id == "two"
    assert r[4].id == "no-prompt" and "no feature 'text'" in r[4].error and "'other'" in r[4].error
    assert r[5].id == "7" and r[5].messages == [{"role": "user", "content": "hi"}]
    assert r[6].error_type == "invalid_messages" and "feature 'messages' is not valid JSON" in r[6].error


def test_tfrecord_corruption_and_truncation_are_errors_not_losses(tmp_path):
    write_tfrecord(tmp_path / "a.tfrecord", [{"prompt": f"p{i}"} for i in range(3)])
    data = bytearray((tmp_path / "a.tfrecord").read_bytes())
    first_len = struct.unpack("<Q", data[:8])[0]
    data[12 + 3] ^= 0xFF  # a byte inside record 0's data: its checksum fails, the framing still holds
    (tmp_path / "b.tfrecord").write_bytes(bytes(data))
    got = records_of(tmp_path / "b.tfrecord")
    assert [(n, getattr(r, "error_type", None)) for n, r in got] == [(0, "unreadable_record"), (1, None), (2, None)]
    assert "checksum" in got[0][1].error
    (tmp_path / "c.tfrecord").write_bytes(bytes(data[: 12 + first_len + 4 + 20]))  # cut inside record 1
    got = records_of(tmp_path / "c.tfrecord")
    assert [(n, r.error_type) for n, r in got] == [(0, "unreadable_record"), (1, "unreadable_record")]
    assert "ends inside it" in got[1][1].error


def test_tfrecord_gzip_and_size_limit(tmp_path):
    write_tfrecord(tmp_path / "z.tfrecord.gz", [{"prompt": "short"}, {"prompt": "x" * 5000}, {"prompt": "last"}],
                   compress=True)
    got = records_of(tmp_path / "z.tfrecord.gz", max_bytes=1000)
    assert [r.prompt if isinstance(r, Request) else r.error_type for _, r in got] == [
        "short", "record_too_large", "last"]


# ------------------------------------------------------------------ the project's JSONL


def test_jsonl_messages_flags_and_nulls():
    ok = parse(b'{"id": "c", "messages": [{"role": "user", "content": "hi"}], "logprobs": true, '
               b'"include_stop_str_in_output": true, "temperature": null}', 0, "a", 1, "jsonl", DEFAULTS)
    assert ok.messages == [{"role": "user", "content": "hi"}] and ok.prompt is None
    assert (ok.logprobs, ok.include_stop, ok.temperature) == (True, True, 0.0)
    both = parse(b'{"prompt": "p", "messages": [{"role": "user", "content": "hi"}]}', 0, "a", 2, "jsonl", DEFAULTS)
    assert "both 'prompt' and 'messages'" in both.error
    assert "logprobs must be true or false; got 'yes'" in parse(
        b'{"prompt": "p", "logprobs": "yes"}', 0, "a", 3, "jsonl", DEFAULTS).error
    assert parse(b'{"messages": []}', 0, "a", 4, "jsonl", DEFAULTS).error_type == "invalid_messages"
    for bad, words in [('"top_k": -1', "top_k"), ('"top_p": 0', "top_p"), ('"seed": -3', "seed"),
                       ('"max_tokens": 1.5', "max_tokens"), ('"temperature": "hot"', "temperature")]:
        r = parse(('{"prompt": "p", %s}' % bad).encode(), 0, "a", 5, "jsonl", DEFAULTS)
        assert r.error_type == "invalid_parameter" and words in r.error


# ------------------------------------------------------------------ OpenAI Batch


def oa(custom_id="r1", url="/v1/completions", **body) -> bytes:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body}).encode()


def oa_parse(raw: bytes, line=1):
    return parse(raw, 0, "batch.jsonl", line, "openai", DEFAULTS)


def test_openai_requests_map_to_the_records_vocabulary():
    r = oa_parse(oa(prompt="p", max_tokens=7, temperature=0.5, top_p=0.9, seed=11, stop=["\n"], logprobs=0,
                    model="gpt-x", user="u"))
    assert (r.id, r.prompt, r.max_tokens, r.temperature, r.top_p, r.seed, r.stop, r.logprobs, r.api) == (
        "r1", "p", 7, 0.5, 0.9, 11, ("\n",), True, "/v1/completions")
    c = oa_parse(oa("c1", "/v1/chat/completions", messages=[{"role": "user", "content": "hi"}],
                    max_completion_tokens=3, max_tokens=9, logprobs=True, top_logprobs=0,
                    include_stop_str_in_output=True, top_k=5))
    assert (c.messages, c.max_tokens, c.logprobs, c.include_stop, c.top_k) == (
        [{"role": "user", "content": "hi"}], 3, True, True, 5)
    assert oa_parse(oa(prompt="p")).logprobs is False
    # the default seed comes from custom_id, wherever the line is
    assert oa_parse(oa("same", prompt="p"), 1).seed == oa_parse(oa("same", prompt="q"), 99).seed


@pytest.mark.parametrize("raw, kind, words", [
    (oa(prompt="p", n=2), "unsupported_parameter", "n=2"),
    (oa(prompt="p", logprobs=21), "invalid_parameter", "top_logprobs must be an integer in [0, 20]"),
    (oa(url="/v1/chat/completions", messages=[{"role": "user", "content": "x"}], top_logprobs=2),
     "invalid_parameter", "top_logprobs needs logprobs: true"),
    (oa(prompt=["a", "b"]), "unsupported_parameter", "one string"),
    (oa(prompt="p", temperature=-1), "invalid_parameter", "temperature"),
    (oa(url="/v1/embeddings", input="x"), "invalid_request", "url must be one of"),
    (oa(url="/v1/chat/completions", prompt="x"), "invalid_request", "needs 'messages'"),
    (oa(prompt="p", frequency_penalty=0.5), "unsupported_parameter", "frequency_penalty"),
])
def test_openai_refusals_are_http_400_answers(raw, kind, words):
    r = oa_parse(raw)
    assert r.error_type == kind and words in r.error
    out = json.loads(r.to_json())
    assert out["custom_id"] == "r1" and out["error"] is None and out["id"].startswith("batch_req_")
    assert out["response"]["status_code"] == 400
    assert out["response"]["body"]["error"] == {"message": r.error, "type": "invalid_request_error", "param": None,
                                                "code": kind}


@pytest.mark.parametrize("raw, kind", [(b"{nope", "invalid_json"), (b"[1]", "invalid_record"),
                                       (b'{"body": {}}', "invalid_record"), (b"\xff", "invalid_utf8"),
                                       (BadRecord("record_too_large", "too big"), "record_too_large")])
def test_openai_lines_that_are_not_requests_get_the_error_object(raw, kind):
    out = json.loads(oa_parse(raw, line=4).to_json())
    assert out["custom_id"] is None and out["response"] is None
    assert out["error"]["code"] == kind and out["error"]["message"].startswith("batch.jsonl:4: ")


def done(req: Request, text_ids: list[int], logprobs=None, reason="length") -> Result:
    out = GenerationOutput(token_ids=text_ids, finish_reason=reason, prompt_len=len(req.token_ids),
                           logprobs=logprobs or [-0.5] * len(text_ids))
    return req.result(out)


def test_openai_output_shapes_for_completions_and_chat(demo_tokenizer):
    comp = oa_parse(oa("c1", prompt="The hacker", logprobs=0))
    chat = oa_parse(oa("c2", "/v1/chat/completions", messages=[{"role": "user", "content": "x"}], logprobs=True))
    ids = demo_tokenizer.encode("wrote a kludge", add_bos=False)
    results = []
    for req in (comp, chat):
        req.token_ids = demo_tokenizer.encode("The hacker")
        results.append(done(req, ids, [-float(i) for i in range(len(ids))]))
    finish_completions(demo_tokenizer, results)
    a, b = (json.loads(r.to_json()) for r in results)
    assert a["custom_id"] == "c1" and a["error"] is None and a["response"]["status_code"] == 200
    body = a["response"]["body"]
    assert body["object"] == "text_completion" and body["model"] == "demo" and body["id"].startswith("cmpl-")
    assert body["choices"][0]["text"] == " wrote a kludge" and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": len(ids), "total_tokens": 3 + len(ids)}
    lp = body["choices"][0]["logprobs"]
    assert "".join(lp["tokens"]) == " wrote a kludge" and lp["token_logprobs"] == [-float(i) for i in range(len(ids))]
    assert lp["text_offset"][0] == 0 and lp["text_offset"][1] == len(lp["tokens"][0])
    assert lp["top_logprobs"][0] == {lp["tokens"][0]: 0.0}
    body = b["response"]["body"]
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"][0]["message"] == {"role": "assistant", "content": " wrote a kludge"}
    content = body["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == lp["tokens"] and content[1]["logprob"] == -1.0
    assert content[0]["bytes"] == list(content[0]["token"].encode()) and content[0]["top_logprobs"] == []
    assert output_view(b) == {"id": "c2", "error_type": None, "error_message": None, "completion": " wrote a kludge",
                              "prompt_tokens": 3, "completion_tokens": len(ids)}


def test_openai_generation_failure_is_a_500():
    r = oa_parse(oa(prompt="p")).fail("generation_failed", "RuntimeError: boom")
    out = json.loads(r.to_json())
    assert out["response"]["status_code"] == 500 and out["response"]["body"]["error"]["type"] == "server_error"
    assert output_view(out)["error_type"] == "generation_failed"
    assert output_view(out)["error_message"] == "RuntimeError: boom"


# ------------------------------------------------------------------ stop strings and logprobs


def request(tokenizer, prompt: str, **fields) -> Request:
    req = parse(json.dumps({"id": "x", "prompt": prompt, **fields}).encode(), 0, "a", 1, "jsonl", DEFAULTS)
    req.token_ids = tokenizer.encode(prompt)
    return req


def test_stop_string_split_across_tokens_is_found(demo_tokenizer):
    prompt, ids = "The hacker", demo_tokenizer.encode("wrote a kludge and left", add_bos=False)
    pieces = token_texts(demo_tokenizer, [demo_tokenizer.encode(prompt)], [ids])[0]
    assert "".join(pieces) == " wrote a kludge and left"
    # a stop string made of the end of one token and the start of the next
    k = next(i for i in range(1, len(pieces)) if len(pieces[i - 1]) > 1 and len(pieces[i].strip()) > 1)
    stop = pieces[k - 1][-1] + pieces[k].strip()[:2]
    assert not any(stop in p for p in pieces)
    before = "".join(pieces[:k]).rindex(stop[0])
    lps = [-float(i) for i in range(len(ids))]
    for include in (False, True):
        r = done(request(demo_tokenizer, prompt, stop=[stop, "never"], include_stop_str_in_output=include,
                         logprobs=True), ids, lps)
        finish_completions(demo_tokenizer, [r])
        assert r.finish_reason == "stop"
        assert r.completion == " wrote a kludge and left"[:before + (len(stop) if include else 0)]
        # counted through the token that completes the stop string, as vLLM stops there
        assert r.completion_tokens == k + 1 and r.logprobs == lps[:k + 1]
        assert json.loads(r.to_json())["logprobs"] == lps[:k + 1]


def test_earliest_stop_wins_and_no_stop_keeps_everything(demo_tokenizer):
    ids = demo_tokenizer.encode("and the earth was without form", add_bos=False)
    r1 = done(request(demo_tokenizer, "In the beginning", stop=["form", "earth"]), ids)
    r2 = done(request(demo_tokenizer, "In the beginning", stop=["zzz"]), ids)
    r3 = done(request(demo_tokenizer, "In the beginning"), ids)
    finish_completions(demo_tokenizer, [r1, r2, r3])
    assert r1.completion == " and the " and r1.finish_reason == "stop"
    assert r2.completion == r3.completion == " and the earth was without form"
    assert r2.completion_tokens == len(ids) and r2.finish_reason == "length"
    assert "logprobs" not in json.loads(r3.to_json())


def test_token_texts_join_to_the_completion_across_multibyte_characters(demo_tokenizer):
    prompt = demo_tokenizer.encode("The hacker said")
    for text in ["ünïcödé 你好 🚀 done", "\n\nAnd   spaces", "plain words here", "你好🚀🚀"]:
        ids = demo_tokenizer.encode(text, add_bos=False)
        pieces = token_texts(demo_tokenizer, [prompt], [ids], window=3)[0]
        assert len(pieces) == len(ids)
        assert "".join(pieces) == decode_completions(demo_tokenizer, [prompt], [ids])[0]
    # a token inside a multi-byte character adds "", the one completing it adds the character
    ids = demo_tokenizer.encode(" 你", add_bos=False)
    assert token_texts(demo_tokenizer, [prompt], [ids])[0][-3:] == ["", "", "你"]


def test_parquet_and_tfrecord_read_from_gs(gcs, tmp_path):
    pq.write_table(pa.table({"prompt": ["a", "b"]}), tmp_path / "r.parquet")
    write_tfrecord(tmp_path / "e.tfrecord", [{"prompt": "c"}, {"prompt": "d"}])
    gcs.mkdir("fmt")
    for name in ("r.parquet", "e.tfrecord"):
        gcs.put(str(tmp_path / name), f"fmt/{name}")
    got = {name: [r.prompt for _, r in records_of(tmp_path / name)] for name in ("r.parquet", "e.tfrecord")}
    remote = {}
    for name in ("r.parquet", "e.tfrecord"):
        url = f"gs://fmt/{name}"
        fmt = shard_format(url, "auto")
        remote[name] = [parse(raw, 0, name, n, fmt, DEFAULTS).prompt for n, raw in read_records(url, fmt)]
    assert remote == got == {"r.parquet": ["a", "b"], "e.tfrecord": ["c", "d"]}
