"""Transient storage faults: the job reads and writes gs:// through a proxy that answers 503s and
drops connections mid-request and mid-response, and still writes every record exactly once."""

import json
import os
import urllib.parse

import pytest

from pipeline import io
from pipeline.job import run
from fault_proxy import KINDS, FaultProxy

DEMO_YAML = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs/models/demo.yaml")
PROMPTS = ["In the beginning", "The hacker", "Thou shalt not", "A kludge is", "Blessed are the"]


def _shards(gcs, bucket: str, n_shards: int = 3, per_shard: int = 4) -> list[str]:
    ids = []
    for s in range(n_shards):
        recs = [{"id": f"f{s}-{i}", "prompt": PROMPTS[(s + i) % len(PROMPTS)]} for i in range(per_shard)]
        with gcs.open(f"{bucket}/in/part-{s}.jsonl", "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in recs))
        ids += [r["id"] for r in recs]
    return ids


def _outputs(gcs, prefix: str) -> dict[str, str]:
    """The output shards (not the markers or the manifest) by name."""
    shards = sorted(p for p in gcs.ls(prefix, detail=False) if p.endswith(".jsonl"))
    return {path.rsplit("/", 1)[1]: gcs.cat(path).decode() for path in shards}


@pytest.mark.slow
def test_job_completes_through_503s_and_dropped_connections(gcs, monkeypatch):
    gcs.mkdir("faults")
    ids = _shards(gcs, "faults")
    job = ["--input", "gs://faults/in/*.jsonl", "--model", DEMO_YAML, "--max_tokens", "6", "--max_slots", "8",
           "--max_len", "64"]  # small shapes: less to compile
    clean = run([*job, "--output", "gs://faults/clean"])

    emulator = urllib.parse.urlparse(os.environ["STORAGE_EMULATOR_HOST"])  # set by the gcs fixture
    with FaultProxy((emulator.hostname, emulator.port), rate=0.2) as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)  # gcsfs reads it on every request
        faulty = run([*job, "--output", "gs://faults/faulty"])
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.geturl())

    # the faults happened, of every kind, and the job went through them
    assert all(proxy.counts[kind] >= 1 for kind in KINDS), proxy.counts
    assert proxy.faults >= 6 and proxy.counts["forwarded"] >= 2 * proxy.faults, proxy.counts
    assert faulty["records"] == clean["records"] == len(ids) and faulty["errors"] == 0
    got, want = _outputs(gcs, "faults/faulty"), _outputs(gcs, "faults/clean")
    assert got == want and sorted(got) == ["part-0.jsonl", "part-1.jsonl", "part-2.jsonl"]
    written = [json.loads(line)["id"] for text in got.values() for line in text.splitlines()]
    assert sorted(written) == sorted(ids), "every record exactly once"


def test_a_lost_answer_to_a_finished_upload_is_retried_by_the_job(gcs, monkeypatch):
    """The final chunk of a resumable upload reaches the server, its answer is lost: gcsfs retries
    the chunk, the finished session answers 404, and gcsfs gives up. io.write_atomic redoes the
    whole write; without that retry the same fault fails the write."""
    gcs.mkdir("lost")
    emulator = urllib.parse.urlparse(os.environ["STORAGE_EMULATOR_HOST"])  # set by the gcs fixture
    lines = [json.dumps({"id": i, "completion": "x" * i}) for i in range(50)]
    for write, expect_error in ((io.write_atomic.__wrapped__, True), (io.write_atomic, False)):
        with FaultProxy((emulator.hostname, emulator.port), rate=0.5, kinds=("drop_response",),
                        only=b"upload_id=", max_faults=1) as proxy:
            monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
            if expect_error:
                with pytest.raises(FileNotFoundError):
                    write("gs://lost/out/part-0.jsonl", lines)
            else:
                write("gs://lost/out/part-0.jsonl", lines)
            monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.geturl())
        assert proxy.counts["drop_response"] == 1
    assert gcs.cat("lost/out/part-0.jsonl").decode() == "".join(line + "\n" for line in lines)


def test_proxy_rate_is_exact_and_spread():
    proxy = FaultProxy(("127.0.0.1", 9), rate=0.25)
    faults = [proxy._next_fault() for _ in range(12)]
    assert faults == ["503", None, None, None, "drop_request", None, None, None, "drop_response", None, None, None]
    capped = FaultProxy(("127.0.0.1", 9), rate=0.5, only=b"PUT", max_faults=2)
    assert [capped._next_fault(h) for h in (b"GET /", b"PUT /", b"PUT /", b"PUT /", b"PUT /", b"PUT /")] == [
        None, "503", None, "drop_request", None, None]
    with pytest.raises(ValueError, match="rate"):
        FaultProxy(("127.0.0.1", 9), rate=1.0)
    for p in (proxy, capped):
        p._listener.close()
