"""Resume: a killed job, rerun, ends with every record exactly once; partial shards are redone;
an output directory written with another configuration is refused unless --overwrite."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import io, manifest
from pipeline.errors import JobError
from pipeline.job import WriteShard, run
from pipeline.records import Result

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["In the beginning", "The hacker", "And the LORD said unto Moses,", "A kludge is", "Blessed are the",
           "The program", "Thou shalt not", "Every hacker knows that"]
# greedy, float32, no prefix cache: the same text whatever shares a batch or a pass; one device
# and few slots: quick to compile
MODEL_YAML = "checkpoint: demo\ndtype: float32\nmax_len: 128\nmax_slots: 8\nmesh_shape: [1, 1]\n"


def write_shards(in_dir: Path, shards: int, per_shard: int) -> list[str]:
    in_dir.mkdir(parents=True)
    ids = []
    for s in range(shards):
        recs = [{"id": f"s{s}-{i}", "prompt": PROMPTS[(s + i) % len(PROMPTS)]} for i in range(per_shard)]
        (in_dir / f"part-{s}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        ids += [r["id"] for r in recs]
    return ids


def outputs(out_dir: Path) -> dict[str, list[dict]]:
    return {p.name: [json.loads(line) for line in p.read_text().splitlines()]
            for p in sorted(out_dir.glob("*.jsonl"))}


def test_killed_job_resumes_without_duplicates_or_loss(tmp_path):
    ids = write_shards(tmp_path / "in", shards=6, per_shard=3)
    (tmp_path / "model.yaml").write_text(MODEL_YAML)
    model_args = ["--model", str(tmp_path / "model.yaml"), "--max_tokens", "4", "--batch_tokens", "64"]
    reference = run(["--input", str(tmp_path / "in" / "*.jsonl"), "--output", str(tmp_path / "ref"), *model_args])
    assert reference["completions"] == 18

    argv = ["--input", str(tmp_path / "in" / "*.jsonl"), "--output", str(tmp_path / "out"), *model_args,
            "--shards_per_pass", "1"]
    log = tmp_path / "first-run.log"
    with open(log, "wb") as f:
        job = subprocess.Popen([sys.executable, "-m", "pipeline.run", *argv], cwd=ROOT, stdout=f, stderr=f)
    markers = tmp_path / "out" / io.MARKER_DIR
    deadline = time.monotonic() + 300
    while not list(markers.glob("*.json")):
        assert job.poll() is None, f"the job ended before it wrote its first shard:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "no shard completed within 300 s"
        time.sleep(0.02)
    job.send_signal(signal.SIGKILL)
    assert job.wait() == -signal.SIGKILL
    done_before = sorted(p.name.removesuffix(".json") for p in markers.glob("*.json"))
    assert 1 <= len(done_before) < 6, done_before

    from pipeline.run import main  # the same command again, in this process

    assert main(argv) == 0
    got = outputs(tmp_path / "out")
    seen = [r["id"] for recs in got.values() for r in recs]
    assert sorted(seen) == sorted(ids) and len(seen) == len(set(seen))
    assert got == outputs(tmp_path / "ref")
    m = json.loads((tmp_path / "out" / io.MANIFEST).read_text())
    assert m["shards_skipped"] == done_before
    assert sorted(m["shards_done"] + m["shards_skipped"]) == [f"part-{s}.jsonl" for s in range(6)]
    assert m["records"] == m["completions"] == 18 and m["this_run"]["records"] == 3 * (6 - len(done_before))
    assert m["metrics"]["counters"]["records_in"] == m["this_run"]["records"]
    assert not list((tmp_path / "out").glob("*" + io.TEMP_INFIX + "*"))

    # the same output directory with another generation config is refused before anything runs
    with pytest.raises(io.ShardMismatch, match=r"job\.max_tokens: 4 -> 5.*--overwrite"):
        run([*argv, "--max_tokens", "5"])


def expected_marker(tmp_path, config=None, last_line=None) -> dict:
    config = config or {"model": {"checkpoint": "demo"}, "job": {"max_tokens": 4}}
    url = str(tmp_path / "in.jsonl")
    return {"input": url, "input_size": os.path.getsize(url), "input_fingerprint": io.input_fingerprint(url),
            "last_line": last_line, "config": config, "config_hash": manifest.config_hash(config)}


def test_partial_shards_are_detected_and_cleared(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"prompt": "x"}\n')
    out = str(tmp_path / "out" / "in.jsonl")
    want = expected_marker(tmp_path)
    assert io.shard_status(out, want) == "absent"

    temp = Path(out + io.TEMP_INFIX + "abc")  # killed while writing
    temp.parent.mkdir()
    temp.write_text('{"id": "half')
    assert io.shard_status(out, want) == "partial"

    Path(out).write_text('{"id": "a"}\n')  # renamed, killed before the marker
    assert io.shard_status(out, want) == "partial"
    todo, skipped = io.plan_shards({0: out}, {0: want}, overwrite=False)
    assert (todo, skipped) == ([0], []) and not temp.exists()

    io.write_marker(out, {**want, "records": 1})
    assert io.shard_status(out, want) == "complete"
    assert io.plan_shards({0: out}, {0: want}, overwrite=False) == ([], [0])
    # written under --limit (first 3 lines only): not complete for a run that wants the whole shard
    assert io.shard_status(out, {**want, "last_line": 3}) == "partial"
    os.remove(out)  # a marker without its shard
    assert io.shard_status(out, want) == "partial"


def test_other_config_or_changed_input_is_refused_unless_overwrite(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"prompt": "x"}\n')
    out = str(tmp_path / "out" / "in.jsonl")
    old = expected_marker(tmp_path, {"model": {"checkpoint": "demo", "max_len": 256}, "job": {"max_tokens": 4}})
    Path(out).parent.mkdir()
    Path(out).write_text('{"id": "a"}\n')
    io.write_marker(out, {**old, "records": 1})

    new = expected_marker(tmp_path, {"model": {"checkpoint": "other", "max_len": 256}, "job": {"max_tokens": 4}})
    with pytest.raises(io.ShardMismatch, match=r"model\.checkpoint: 'demo' -> 'other'"):
        io.plan_shards({0: out}, {0: new}, overwrite=False)
    assert io.read_marker(out) is not None  # a refused run changes nothing

    (tmp_path / "in.jsonl").write_text('{"prompt": "x"}\n{"prompt": "y"}\n')
    with pytest.raises(io.ShardMismatch, match=r"had 16 bytes; it has 32 now"):
        io.plan_shards({0: out}, {0: expected_marker(tmp_path, old["config"])}, overwrite=False)

    assert io.plan_shards({0: out}, {0: new}, overwrite=True) == ([0], [])
    assert io.read_marker(out) is None  # redone from scratch; a kill now leaves a resumable directory


def test_writing_a_shard_twice_gives_the_same_shard(tmp_path):
    """Beam may run a bundle again: the retry rewrites the same shard and marker, and leaves no
    temporary files."""
    url = str(tmp_path / "out" / "a.jsonl")
    write = WriteShard([url], {0: {"input": "in/a.jsonl", "last_line": None}})
    results = [Result(id="r2", shard=0, line=2, completion="b", prompt_tokens=3, completion_tokens=1,
                      finish_reason="length"),
               Result(id="r1", shard=0, line=1, error_type="invalid_json", error="line is not valid JSON"), None]
    assert list(write.process((0, results))) == [(0, 2)]
    first = (Path(url).read_bytes(), io.read_marker(url))
    assert list(write.process((0, results))) == [(0, 2)]
    assert (Path(url).read_bytes(), io.read_marker(url)) == first
    assert [json.loads(line)["id"] for line in Path(url).read_text().splitlines()] == ["r1", "r2"]
    assert first[1]["records"] == 2 and first[1]["errors_by_type"] == {"invalid_json": 1}
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == ["_done", "a.jsonl", "a.jsonl.json"]


def test_resume_on_gs(gcs, tmp_path):
    """On an object store the shard is written under its final name (objects appear whole), then
    the marker; a rerun skips what has both."""
    gcs.mkdir("resume")
    for s in range(2):
        with gcs.open(f"resume/in/part-{s}.jsonl", "w") as f:
            f.write("".join(json.dumps({"id": f"g{s}-{i}", "prompt": PROMPTS[i]}) + "\n" for i in range(2)))
    (tmp_path / "model.yaml").write_text(MODEL_YAML)
    argv = ["--input", "gs://resume/in/*.jsonl", "--output", "gs://resume/out", "--model",
            str(tmp_path / "model.yaml"), "--max_tokens", "4"]
    first = run(argv)
    assert first["shards_done"] == ["part-0.jsonl", "part-1.jsonl"] and first["records"] == 4
    assert sorted(gcs.ls("resume/out/_done", detail=False)) == [
        "resume/out/_done/part-0.jsonl.json", "resume/out/_done/part-1.jsonl.json"]
    with gcs.open("resume/out/part-1.jsonl", "rb") as f:
        part1 = f.read()

    gcs.rm("resume/out/_done/part-1.jsonl.json")  # as if killed between the shard and its marker
    second = run(argv)
    assert second["shards_skipped"] == ["part-0.jsonl"] and second["shards_done"] == ["part-1.jsonl"]
    assert second["records"] == 4 and second["this_run"]["records"] == 2
    with gcs.open("resume/out/part-1.jsonl", "rb") as f:
        assert f.read() == part1
    with gcs.open("resume/out/_manifest.json", "r") as f:
        assert json.load(f)["shards_skipped"] == ["part-0.jsonl"]


def test_an_input_edited_to_the_same_size_is_refused(tmp_path):
    """The marker holds a fingerprint of the input's content: an edit that keeps the size is found."""
    (tmp_path / "in").mkdir()
    shard = tmp_path / "in" / "a.jsonl"
    shard.write_text('{"id": "a", "prompt": "The hacker", "max_tokens": 2}\n')
    (tmp_path / "model.yaml").write_text(MODEL_YAML)
    argv = ["--input", str(tmp_path / "in" / "*.jsonl"), "--output", str(tmp_path / "out"),
            "--model", str(tmp_path / "model.yaml")]
    assert run(argv)["shards_done"] == ["a.jsonl"]
    marker = io.read_marker(str(tmp_path / "out" / "a.jsonl"))
    assert marker["input_fingerprint"].startswith("blake2b:")
    assert run(argv)["shards_skipped"] == ["a.jsonl"]  # unchanged: skipped

    shard.write_text('{"id": "a", "prompt": "The hacker", "max_tokens": 3}\n')
    with pytest.raises(io.ShardMismatch, match=r"content of input .*a\.jsonl changed.*--overwrite"):
        run(argv)
    redone = run([*argv, "--overwrite"])
    assert redone["shards_done"] == ["a.jsonl"] and redone["completion_tokens"] == 3


def test_a_marker_without_a_fingerprint_counts_as_a_change(tmp_path):
    """A marker written before markers had fingerprints cannot vouch for its input."""
    (tmp_path / "in.jsonl").write_text('{"prompt": "x"}\n')
    out = str(tmp_path / "out" / "in.jsonl")
    Path(out).parent.mkdir()
    Path(out).write_text('{"id": "a"}\n')
    want = expected_marker(tmp_path)
    io.write_marker(out, {**{k: v for k, v in want.items() if k != "input_fingerprint"}, "records": 1})
    with pytest.raises(io.ShardMismatch, match=r"no content fingerprint of input .*in\.jsonl.*--overwrite"):
        io.plan_shards({0: out}, {0: want}, overwrite=False)


@pytest.mark.parametrize("names", [("c.jsonl", "c.txt"), ("c.jsonl", "c.jsonl.gz"), ("a/c.jsonl", "b/c.jsonl")])
def test_two_inputs_that_would_write_one_output_are_refused(tmp_path, names):
    for name in names:
        (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / name).write_text('{"prompt": "x"}\n')
    glob = str(tmp_path / "in" / "**")
    first, second = sorted(names)
    with pytest.raises(JobError, match=rf"{first} and .*{second} would both be written to c\.jsonl"):
        io.discover_shards(glob)
    with pytest.raises(JobError, match="would both be written"):  # the job refuses before it writes anything
        run(["--input", glob, "--output", str(tmp_path / "out"), "--max_tokens", "2"])
    assert not (tmp_path / "out").exists()


def test_an_edited_gs_input_is_refused(gcs, tmp_path, monkeypatch):
    """On gs:// the fingerprint is the object's CRC32C, from its metadata: the object is not read."""
    gcs.mkdir("edited")
    with gcs.open("edited/in/a.jsonl", "w") as f:
        f.write('{"id": "a", "prompt": "The hacker", "max_tokens": 2}\n')
    (tmp_path / "model.yaml").write_text(MODEL_YAML)
    argv = ["--input", "gs://edited/in/*.jsonl", "--output", "gs://edited/out", "--model", str(tmp_path / "model.yaml")]
    assert run(argv)["shards_done"] == ["a.jsonl"]
    crc = gcs.info("edited/in/a.jsonl")["crc32c"]
    with monkeypatch.context() as m:
        m.setattr(type(gcs), "_open", lambda *a, **k: pytest.fail("the fingerprint read the object"))
        assert io.input_fingerprint("gs://edited/in/a.jsonl") == f"crc32c:{crc}"
    with gcs.open("edited/out/_done/a.jsonl.json", "r") as f:
        assert json.load(f)["input_fingerprint"] == f"crc32c:{crc}"

    with gcs.open("edited/in/a.jsonl", "w") as f:
        f.write('{"id": "a", "prompt": "The hacker", "max_tokens": 3}\n')
    with pytest.raises(io.ShardMismatch, match=r"content of input gs://edited/in/a\.jsonl changed.*crc32c:"):
        run(argv)
