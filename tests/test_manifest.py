"""The run manifest, Beam metrics and the progress line; --limit; big and bad inputs (a 10 MB
line, invalid UTF-8, an empty shard, duplicate ids, a shard of 100k records)."""

import json
import logging
import random
import tracemalloc
from pathlib import Path

import pytest

from pipeline import io
from pipeline.job import run

MODEL_YAML = "checkpoint: demo\ndtype: float32\nmax_len: 128\nmax_slots: 8\nmesh_shape: [1, 1]\n"
PROMPTS = ["In the beginning", "The hacker", "And the LORD said unto Moses,", "A kludge is", "Blessed are the"]


def jsonl(*records) -> bytes:
    return b"".join(r if isinstance(r, bytes) else json.dumps(r).encode() + b"\n" for r in records)


def job(tmp_path: Path, *extra: str, out: str = "out") -> dict:
    model = tmp_path / "model.yaml"
    model.write_text(MODEL_YAML)
    return run(["--input", str(tmp_path / "in" / "*"), "--output", str(tmp_path / out), "--model", str(model),
                "--max_tokens", "4", "--batch_tokens", "64", *extra])


def read_out(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_bad_and_big_inputs_are_accounted_for_in_manifest_and_metrics(tmp_path, caplog):
    (tmp_path / "in").mkdir()
    huge = json.dumps({"id": "huge", "prompt": "word " * (2 << 20)}).encode() + b"\n"  # ~10 MB
    (tmp_path / "in" / "a.jsonl").write_bytes(jsonl(
        {"id": "a1", "prompt": PROMPTS[0]}, huge, b'{"id": "bad-utf8", "prompt": "\xff\xfe"}\n',
        {"id": "dup", "prompt": PROMPTS[1]}, {"id": "a5", "prompt": PROMPTS[2]}))
    (tmp_path / "in" / "b.jsonl").write_bytes(b"")
    (tmp_path / "in" / "c.jsonl").write_bytes(jsonl({"id": "dup", "prompt": PROMPTS[3]},
                                                    {"id": "dup", "prompt": PROMPTS[4]}))
    with caplog.at_level(logging.INFO, logger="pipeline"):
        summary = job(tmp_path, "--progress_interval_s", "0")

    out = tmp_path / "out"
    a = read_out(out / "a.jsonl")
    assert [r["id"] for r in a] == ["a1", "a.jsonl:2", "a.jsonl:3", "dup", "a5"]
    assert a[1]["error"] == {"type": "record_too_large",
                             "message": f"record is {len(huge) - 1} bytes; --max_record_bytes is 1048576"}
    assert a[2]["error"]["type"] == "invalid_utf8"
    assert (out / "b.jsonl").read_text() == "" and io.read_marker(str(out / "b.jsonl"))["records"] == 0
    dups = [r for r in a + read_out(out / "c.jsonl") if r["id"] == "dup"]
    assert len(dups) == 3 and all("completion" in r for r in dups)  # each duplicate is processed

    m = json.loads((out / io.MANIFEST).read_text())
    assert m == {k: v for k, v in summary.items() if k != "samples"}
    assert (m["records"], m["completions"], m["errors"]) == (7, 5, 2)
    assert m["errors_by_type"] == {"invalid_utf8": 1, "record_too_large": 1}
    assert m["duplicate_ids"] == {"ids": 1, "extra_records": 2, "examples": [{"id": "dup", "records": 3}]}
    assert m["shards_done"] == ["a.jsonl", "b.jsonl", "c.jsonl"] and m["shards_skipped"] == []
    assert m["this_run"]["records"] == 7 and m["limit"] is None
    assert m["prompt_tokens"] > 0 and 0 < m["completion_tokens"] <= 5 * 4
    # from the unrounded wall time: wall_s is rounded to 0.01 s, the rate to 0.1
    assert m["completion_tokens_per_s"] == pytest.approx(m["completion_tokens"] / m["wall_s"], rel=0.01, abs=0.06) \
        or m["wall_s"] < 1
    assert m["config"]["model"]["max_len"] == 128 and m["config"]["job"]["max_tokens"] == 4
    assert len(m["config_hash"]) == 16
    assert {"python", "jax", "flax", "apache-beam", "numpy", "tensorflow-text"} <= set(m["versions"])
    assert all(m["versions"].values())

    counters = m["metrics"]["counters"]
    assert counters["records_in"] == counters["records_out"] == m["records"]
    assert (counters["completions"], counters["errors"]) == (m["completions"], m["errors"])
    assert (counters["errors_record_too_large"], counters["errors_invalid_utf8"]) == (1, 1)
    assert (counters["prompt_tokens"], counters["completion_tokens"]) == (m["prompt_tokens"], m["completion_tokens"])
    assert counters["shards_written"] == 3
    dists = m["metrics"]["distributions"]
    assert dists["batch_records"]["sum"] == m["completions"] and dists["batch_latency_ms"]["count"] >= 1
    # one rate per batch, in whole tokens/s: a first batch that compiles the engine on a loaded host
    # can make fewer than one (20 tokens in 23 s). The fastest batch is at least the job's average
    # over all batches (an upper bound on their time: each latency is truncated to the ms).
    assert dists["batch_tokens_per_s"]["count"] == dists["batch_latency_ms"]["count"]
    batches_s = (dists["batch_latency_ms"]["sum"] + dists["batch_latency_ms"]["count"]) / 1000
    assert dists["batch_tokens_per_s"]["max"] >= int(m["completion_tokens"] / batches_s)
    t = m["timings"]  # the totals of the per-batch, per-step and engine numbers above
    assert t["batches"] == dists["batch_engine_wait_us"]["count"] == dists["batch_host_us"]["count"] >= 1
    assert t["steps_s"]["write"] == round(dists["write_shard_us"]["sum"] / 1e6, 3)
    assert dists["write_shard_us"]["count"] == 3 and dists["tokenize_us"]["count"] >= 1
    assert t["engine"]["engines"] == counters["engines"] == 1

    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("progress:")]
    assert progress and "7 records done (5 completions, 2 errors)" in progress[-1], progress


def test_limit_takes_the_first_records_and_a_full_rerun_adds_the_rest(tmp_path):
    (tmp_path / "in").mkdir()
    shard = lambda s, n: [{"id": f"p{s}-{i}", "prompt": PROMPTS[i % 5]} for i in range(n)]  # noqa: E731
    (tmp_path / "in" / "p-0.jsonl").write_bytes(jsonl(*shard(0, 3)))
    recs = shard(1, 4)
    (tmp_path / "in" / "p-1.jsonl").write_bytes(jsonl(recs[0], b"\n", *recs[1:]))  # a blank line is no record
    (tmp_path / "in" / "p-2.jsonl").write_bytes(jsonl(*shard(2, 2)))

    m = job(tmp_path, "--limit", "5")
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*.jsonl")) == ["p-0.jsonl", "p-1.jsonl"]
    assert [r["id"] for r in read_out(out / "p-1.jsonl")] == ["p1-0", "p1-1"]
    assert m["records"] == m["completions"] == 5
    assert m["limit"] == {"records": 5, "shards": ["p-0.jsonl", "p-1.jsonl"], "last_line": 3}
    assert m["input_shards"] == 3 and m["shards"] == 2

    m = job(tmp_path)  # the whole input: p-0 was covered whole, p-1 only in part
    assert m["shards_skipped"] == ["p-0.jsonl"] and m["shards_done"] == ["p-1.jsonl", "p-2.jsonl"]
    assert [r["id"] for r in read_out(out / "p-1.jsonl")] == [r["id"] for r in recs]
    assert m["records"] == m["completions"] == 9 and m["limit"] is None


def test_limit_plan_reads_no_further_than_needed(tmp_path):
    opened, consumed = [], []

    def read(url):
        opened.append(url)
        for line in range(1, 4):  # three records per shard, on lines 1..3
            consumed.append((url, line))
            yield line, b"x"

    assert io.limit_plan(["a", "b", "c", "d"], 5, read) == {0: None, 1: 2}
    assert opened == ["a", "b"] and consumed[-1] == ("b", 3)  # one record past the limit: is b covered whole?
    opened.clear()
    assert io.limit_plan(["a", "b", "c"], 6, read) == {0: None, 1: None}
    assert opened == ["a", "b"]
    assert io.limit_plan(["a"], 100, read) == {0: None}


@pytest.mark.parametrize("seed", range(4))
def test_bounded_line_reader_matches_plain_reading(tmp_path, seed):
    rng = random.Random(seed)
    lines = [bytes(rng.choice(b"ab \r") for _ in range(rng.choice([0, 1, 5, 9, 10, 11, 30, 100])))
             for _ in range(200)]
    data = b"\n".join(lines) + rng.choice([b"", b"\n"])
    (tmp_path / "f.txt").write_bytes(data)
    max_bytes = 10
    want = []
    for n, line in enumerate(data.split(b"\n")[: len(lines)], start=1):
        if len(line) > max_bytes:
            want.append((n, io.OversizedLine(len(line))))
        elif line.rstrip(b"\r\n").strip():
            want.append((n, line.rstrip(b"\r\n")))
    for block in (1, 3, 7, 64, 1 << 20):
        assert list(io.read_lines(str(tmp_path / "f.txt"), max_bytes, block)) == want
    oversized = {n for n, r in want if isinstance(r, io.OversizedLine)}
    assert [(n, r) for n, r in want if n not in oversized] == \
        [(n, r) for n, r in io.read_lines(str(tmp_path / "f.txt")) if n not in oversized]


def test_a_10mb_line_is_never_held_in_memory(tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_bytes(b'{"prompt": "' + b"w" * (10 << 20) + b'"}\n{"prompt": "next"}\n')
    tracemalloc.start()
    got = list(io.read_lines(str(path), max_bytes=1 << 20))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert got == [(1, io.OversizedLine((10 << 20) + 14)), (2, b'{"prompt": "next"}')]
    assert peak < 4 << 20, f"peak {peak / 2**20:.1f} MiB while reading a 10 MiB line"


@pytest.mark.slow
def test_a_shard_of_100k_records(tmp_path):
    (tmp_path / "in").mkdir()
    n = 100_000
    (tmp_path / "in" / "big.jsonl").write_text(
        "".join(json.dumps({"id": f"r{i}", "prompt": PROMPTS[i % 5]}) + "\n" for i in range(n)))
    m = job(tmp_path, "--max_tokens", "1", "--batch_tokens", "8192")
    assert m["records"] == m["completions"] == n and m["errors"] == 0
    assert m["duplicate_ids"]["ids"] == 0 and m["metrics"]["counters"]["records_in"] == n
    ids = [json.loads(line)["id"] for line in (tmp_path / "out" / "big.jsonl").open()]
    assert ids == [f"r{i}" for i in range(n)]
