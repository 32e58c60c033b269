"""The job on the FnApiRunner with two SDK worker subprocesses gives what one process gives."""

import json
import os

import pytest

from pipeline.job import run

PROMPTS = ["In the beginning", "The hacker", "And the LORD said unto Moses,", "A kludge is", "Blessed are the",
           "The program", "Thou shalt not", "Every hacker knows that"]


@pytest.mark.slow  # kept out of the default run for CI time; make test-slow runs it
def test_two_worker_processes_equal_one_process(tmp_path, monkeypatch, capfd):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    (tmp_path / "in").mkdir()
    for shard in range(3):
        recs = [{"id": f"s{shard}-{i}", "prompt": PROMPTS[(shard + i) % len(PROMPTS)]} for i in range(4)]
        recs.append({"id": f"s{shard}-t", "prompt": "The wizard", "temperature": 0.8})  # seed from the id
        (tmp_path / "in" / f"part-{shard}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    common = ["--input", str(tmp_path / "in" / "*.jsonl"), "--model", os.path.join(repo, "configs/models/demo.yaml"),
              "--max_tokens", "8", "--batch_tokens", "60", "--max_slots", "8", "--max_len", "64"]
    one = run([*common, "--output", str(tmp_path / "one")])
    # Workers start in this directory with no PYTHONPATH: the job itself must let them import it.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    capfd.readouterr()
    two = run([*common, "--output", str(tmp_path / "two"),
               "--direct_num_workers=2", "--direct_running_mode=multi_processing"])
    harness_starts = capfd.readouterr().err.count("Python sdk harness starting")
    assert harness_starts == 2, f"expected 2 SDK worker subprocesses, saw {harness_starts}"
    for shard in range(3):
        name = f"part-{shard}.jsonl"
        assert (tmp_path / "two" / name).read_text() == (tmp_path / "one" / name).read_text()
    assert one["records"] == two["records"] == 15 and two["errors"] == 0
