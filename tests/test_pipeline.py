"""The Beam job end to end on the FnApiRunner with the demo model, plus its parts."""

import json
import types

import pytest

from model import Engine, SamplingParams
from model.tokenizer import decode_completions
from pipeline import preview, report
from pipeline.job import BatchByTokens, run
from pipeline.records import Request, Result, parse

MODEL = "demo"
DEFAULTS = {"max_tokens": 16, "temperature": 0.0, "top_p": 1.0, "top_k": 0}
GOOD = ["In the beginning", "The hacker", "And the LORD said unto Moses,", "A kludge is", "Blessed are the",
        "The program", "Thou shalt not", "Every hacker knows that"]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def read_out(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def job(tmp_path, *extra, inp="in/*", model=MODEL) -> dict:
    return run(["--input", str(tmp_path / inp), "--output", str(tmp_path / "out"), "--model", model,
                "--max_tokens", "16", "--batch_tokens", "200", *extra])


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained(MODEL, mesh_shape=None, dtype="float32", max_len=256)


def test_every_id_once_and_greedy_equals_engine_generate(tmp_path, engine):
    (tmp_path / "in").mkdir()
    ids = []
    for shard in range(3):
        recs = [{"id": f"s{shard}-{i}", "prompt": GOOD[(shard * 3 + i) % len(GOOD)]} for i in range(7)]
        write_jsonl(tmp_path / "in" / f"part-{shard}.jsonl", recs)
        ids += [r["id"] for r in recs]
    (tmp_path / "in" / "notes.txt").write_text("The wizard looked at the code and\n\nHear, O Israel:\n")
    summary = job(tmp_path, "--model", "configs/models/demo.yaml")
    out = {p.name: read_out(p) for p in (tmp_path / "out").glob("*.jsonl")}
    assert sorted(out) == ["notes.jsonl", "part-0.jsonl", "part-1.jsonl", "part-2.jsonl"]
    got = [r["id"] for recs in out.values() for r in recs]
    assert sorted(got) == sorted(ids + ["notes.txt:1", "notes.txt:3"]) and len(got) == len(set(got))
    assert summary["records"] == len(got) == summary["completions"] and summary["errors"] == 0
    # the same prompts through the engine directly give the same text
    prompts = [r["prompt"] for s in range(3) for r in
               [{"prompt": GOOD[(s * 3 + i) % len(GOOD)]} for i in range(7)]]
    ids_in = engine.tokenizer.encode_batch(prompts)
    outs = engine.generate(ids_in, SamplingParams(max_new_tokens=16))
    expected = decode_completions(engine.tokenizer, ids_in, [o.token_ids for o in outs])
    written = [r["completion"] for s in range(3) for r in out[f"part-{s}.jsonl"]]
    assert written == expected
    assert all(r["prompt_tokens"] > 0 and 0 < r["completion_tokens"] <= 16 for r in out["part-0.jsonl"])


def test_bad_records_get_reasons_and_good_ones_complete(tmp_path):
    (tmp_path / "in").mkdir()
    lines = [
        json.dumps({"id": "good-1", "prompt": "The hacker"}),
        "{not json",
        json.dumps({"id": "no-prompt", "text": "hi"}),
        json.dumps({"id": "num-prompt", "prompt": 42}),
        json.dumps({"id": "empty", "prompt": "   "}),
        json.dumps({"id": "too-long", "prompt": "word " * 2000}),
        json.dumps({"id": "neg-temp", "prompt": "x", "temperature": -1}),
        json.dumps({"id": "big-top-p", "prompt": "x", "top_p": 2}),
        json.dumps({"id": "zero-tokens", "prompt": "x", "max_tokens": 0}),
        json.dumps({"id": "too-many-tokens", "prompt": "x", "max_tokens": 100000}),
        json.dumps({"id": "bad-stop", "prompt": "x", "stop": [1, 2]}),
        json.dumps(["a", "list"]),
        json.dumps({"id": "good-2", "prompt": "In the beginning", "stop": ["\n"], "temperature": 0.7, "seed": 3}),
    ]
    raw = "\n".join(lines).encode() + b"\n" + b'{"id": "bad-utf8", "prompt": "\xff\xfe"}\n'
    (tmp_path / "in" / "mixed.jsonl").write_bytes(raw)
    summary = job(tmp_path)
    out = {r["id"]: r for r in read_out(tmp_path / "out" / "mixed.jsonl")}
    assert len(out) == len(lines) + 1 == summary["records"]
    assert {k for k, r in out.items() if "completion" in r} == {"good-1", "good-2"}
    expect = {"mixed.jsonl:2": "not valid JSON", "no-prompt": "no 'prompt'", "num-prompt": "must be a string",
              "empty": "prompt is empty", "too-long": "the model's context is 256", "neg-temp": "temperature",
              "big-top-p": "top_p", "zero-tokens": "max_tokens", "too-many-tokens": "leave room",
              "bad-stop": "stop", "mixed.jsonl:12": "JSON object", "mixed.jsonl:14": "not valid UTF-8"}
    for rid, words in expect.items():
        assert words in out[rid]["error"]["message"], (rid, out[rid])
    assert "\n" not in out["good-2"]["completion"]


def test_empty_shard_gets_an_empty_output_shard(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "empty.jsonl").write_text("")
    write_jsonl(tmp_path / "in" / "one.jsonl", [{"id": "a", "prompt": "The hacker"}])
    summary = job(tmp_path)
    assert (tmp_path / "out" / "empty.jsonl").read_text() == ""
    assert summary["records"] == 1 and summary["shards"] == 2


def test_no_input_match_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="matches no files"):
        job(tmp_path, inp="nothing/*.jsonl")


def test_gs_input_and_output(gcs, tmp_path):
    gcs.mkdir("jobs")
    for shard in range(2):
        with gcs.open(f"jobs/in/part-{shard}.jsonl", "w") as f:
            f.write("".join(json.dumps({"id": f"g{shard}-{i}", "prompt": GOOD[i]}) + "\n" for i in range(3)))
    summary = run(["--input", "gs://jobs/in/*.jsonl", "--output", "gs://jobs/out", "--model", MODEL,
                   "--max_tokens", "8"])
    assert summary["records"] == 6 and summary["errors"] == 0
    assert sorted(gcs.ls("jobs/out", detail=False)) == [
        "jobs/out/_done", "jobs/out/_manifest.json", "jobs/out/_metrics.prom", "jobs/out/_report.html",
        "jobs/out/_report_data.json", "jobs/out/part-0.jsonl", "jobs/out/part-1.jsonl"]
    page = gcs.cat("jobs/out/_report.html")
    gcs.rm(["jobs/out/_report.html", "jobs/out/_metrics.prom"])
    report.rebuild("gs://jobs/out")  # what `python -m pipeline.report gs://jobs/out` does
    assert gcs.cat("jobs/out/_report.html") == page and gcs.exists("jobs/out/_metrics.prom")
    with gcs.open("jobs/out/part-1.jsonl", "r") as f:
        assert [json.loads(line)["id"] for line in f] == ["g1-0", "g1-1", "g1-2"]


def test_parse_text_and_jsonl_records():
    req = parse(b"hello there", 0, "a.txt", 7, "text", DEFAULTS)
    assert isinstance(req, Request) and req.id == "a.txt:7" and req.prompt == "hello there"
    req = parse(b'{"id": 5, "prompt": "p", "max_tokens": 3, "stop": "x"}', 0, "a.jsonl", 1, "jsonl", DEFAULTS)
    assert (req.id, req.max_tokens, req.max_tokens_given, req.stop) == ("5", 3, True, ("x",))
    # the default seed comes from the id, so reruns and reshards sample the same
    a, b = (parse(b'{"id": "r1", "prompt": "p"}', s, n, 1, "jsonl", DEFAULTS) for s, n in ((0, "x"), (3, "y")))
    assert a.seed == b.seed
    assert isinstance(parse(b'{"prompt": "p", "top_k": 1.5}', 0, "a", 1, "jsonl", DEFAULTS), Result)


def test_batches_fill_a_token_budget_per_length_bucket_and_a_bundle_ends_in_one_batch():
    """A full batch is one bucket's; what is left when the bundle ends goes out as one batch, not
    one per bucket: the thread waits on each batch before it hands over the next."""
    def req(prompt_len, max_tokens):  # what the batcher reads of a Request
        return types.SimpleNamespace(id=str(prompt_len), token_ids=[1] * prompt_len, max_tokens=max_tokens)

    batcher = BatchByTokens(budget=100, buckets=[16, 32, 64])
    batcher.start_bundle()
    full = [b for r in (req(20, 30), req(5, 10), req(25, 30), req(60, 4)) for b in batcher.process(r)]
    assert [[r.id for r in b] for b in full] == [["20", "25"]]  # 50 + 55 tokens of the 32 bucket
    leftovers = list(batcher.finish_bundle())
    assert len(leftovers) == 1 and sorted(r.id for r in leftovers[0].value) == ["5", "60"]


@pytest.mark.slow  # kept out of the default run for CI time; make test-slow runs it
def test_preview_returns_records(capsys):
    records = preview.generate(["The hacker", "In the beginning"], max_tokens=8, progress=False)
    assert [r["prompt"] for r in records] == ["The hacker", "In the beginning"]
    assert all(r["completion_tokens"] == 8 or r["finish_reason"] == "stop" for r in records)
    assert preview.main(["--max_tokens", "5", "The hacker"]) == 0
    assert "The hacker" in capsys.readouterr().out


def test_stream_yields_every_record_once_as_generate_has_it():
    prompts = ["The hacker", "In the beginning", "A kludge is"]
    got = list(preview.stream(prompts, max_tokens=8, stop=(",",)))
    assert sorted(r.pop("index") for r in got) == [0, 1, 2]
    expected = preview.generate(prompts, max_tokens=8, stop=(",",), progress=False)
    assert sorted(got, key=lambda r: prompts.index(r["prompt"])) == expected


@pytest.mark.parametrize("stop", [(), ("the",)])
def test_stream_text_yields_one_completion_as_it_is_generated(stop):
    pieces = list(preview.stream_text("Once upon a time", max_tokens=40, stop=stop))
    [expected] = preview.generate(["Once upon a time"], max_tokens=40, stop=stop, progress=False)
    assert "".join(pieces) == expected["completion"] and all(pieces)
    if not stop:  # 40 tokens arrive over several decode dispatches, not at the end
        assert len(pieces) > 2


def test_engine_on_tokens_streams_each_prompts_tokens_before_its_future_resolves():
    engine = preview._engine("demo", "float32", None, 16)
    prompts = [engine.tokenizer.encode("The hacker"), engine.tokenizer.encode("In the beginning")]
    seen = {0: [], 1: []}
    order = []
    futures = engine.submit(prompts, SamplingParams(max_new_tokens=20, ignore_eos=True),
                            on_tokens=lambda i, toks: (seen[i].extend(toks), order.append(i)))
    outs = [f.result() for f in futures]
    assert [seen[0], seen[1]] == [o.token_ids for o in outs] and len(order) > 2


def test_model_yaml_is_flat_and_resolves_its_checkpoint_next_to_itself(tmp_path):
    from model import EngineConfig
    from pipeline.handler import ModelSpec

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "m.yaml").write_text("checkpoint: ckpts/mine\ndtype: float32\nmax_slots: 8\n"
                                                 "decode_steps: 4\nmesh_shape: [1, 2]\n")
    spec = ModelSpec.parse(str(tmp_path / "models" / "m.yaml"), max_len=64, max_slots=None)
    assert spec.checkpoint == str(tmp_path / "models" / "ckpts" / "mine")
    assert spec.engine == EngineConfig(max_slots=8, max_len=64, decode_steps=4) and spec.mesh_shape == (1, 2)
    assert spec.flat()["max_slots"] == 8 and spec.flat()["checkpoint"] == spec.checkpoint
    assert ModelSpec.parse("configs/models/demo.yaml").checkpoint == "demo"
    (tmp_path / "models" / "bad.yaml").write_text("checkpoint: demo\nslots: 8\n")
    with pytest.raises(ValueError, match=r"unknown keys \['slots'\]"):
        ModelSpec.parse(str(tmp_path / "models" / "bad.yaml"))
