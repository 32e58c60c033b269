"""Fatal errors: one line on stderr (`error: <what> (<where>): <what to do>`) and an exit code, the
traceback only with --verbose; storage errors that a retry cannot fix are raised at once; an
--output the job cannot write is refused before the model loads."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import io
from pipeline.errors import JobError, error_line
from pipeline.run import main

ROOT = Path(__file__).resolve().parent.parent


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err
    return lines[0]


def shard(tmp_path: Path) -> str:
    (tmp_path / "in").mkdir(exist_ok=True)
    (tmp_path / "in" / "a.jsonl").write_text('{"id": "a", "prompt": "The hacker"}\n')
    return str(tmp_path / "in" / "*.jsonl")


def unsupported_checkpoint(tmp_path: Path) -> list[str]:
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({"model_type": "gpt2",
                                                                "architectures": ["GPT2LMHeadModel"]}))
    return ["--model", str(tmp_path / "ckpt")]


def checkpoint_without_tokenizer(tmp_path: Path) -> list[str]:
    (tmp_path / "notok").mkdir()
    (tmp_path / "notok" / "config.json").write_text((ROOT / "model" / "assets" / "demo" / "config.json").read_text())
    return ["--model", str(tmp_path / "notok")]


def output_is_a_file(tmp_path: Path) -> list[str]:
    (tmp_path / "taken").write_text("")
    return ["--output", str(tmp_path / "taken")]


def marker_of_another_config(tmp_path: Path) -> list[str]:
    [url] = io.discover_shards(str(tmp_path / "in" / "*.jsonl"))
    out = tmp_path / "out" / "a.jsonl"
    out.parent.mkdir()
    out.write_text('{"id": "a"}\n')
    io.write_marker(str(out), {"input": url, "input_size": io.input_size(url), "input_fingerprint":
                               io.input_fingerprint(url), "last_line": None, "config_hash": "0123456789abcdef",
                               "config": {"job": {"max_tokens": 5}}, "records": 1})
    return []


# (what the case adds to a good command line, the exit code, fragments of the error line)
CASES = {
    "no input": (lambda p: ["--input", str(p / "none" / "*.jsonl")], 2,
                 ["error: --input matches no files", "none/*.jsonl", "quote the glob"]),
    "output is a file": (output_is_a_file, 2, ["is an existing file", "taken", "pass a directory"]),
    "bad flag value": (lambda p: ["--batch_tokens", "0"], 2, ["--batch_tokens=0", "pass --batch_tokens >= 1"]),
    "bad default": (lambda p: ["--top_k", str(10**12)], 2, ["default is out of range", "top_k must be an integer"]),
    "bad engine size": (lambda p: ["--max_slots", "0"], 2, ["--max_slots=0", "pass --max_slots >= 1"]),
    "unsupported architecture": (unsupported_checkpoint, 2,
                                 ["ckpt/config.json: model_type 'gpt2', architecture 'GPT2LMHeadModel' is not",
                                  "supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"]),
    "no model YAML": (lambda p: ["--model", str(p / "nope.yaml")], 2, ["no model YAML at", "nope.yaml"]),
    "no tokenizer": (checkpoint_without_tokenizer, 2, ["has no tokenizer (tokenizer.json or tokenizer.model)",
                                                       "notok", "put the model's tokenizer file"]),
    "no checkpoint": (lambda p: ["--model", str(p / "nockpt")], 2,
                      ["no checkpoint at", "nockpt/config.json not found", "pass 'demo'"]),
    "another job's output": (marker_of_another_config, 2,
                             ["different configuration", "job.max_tokens: 5 -> 2", "_done/a.jsonl.json",
                              "--overwrite"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_expected_failures_are_one_line_without_traceback(tmp_path, capsys, case):
    extra, code, fragments = CASES[case]
    argv = ["--input", shard(tmp_path), "--output", str(tmp_path / "out"), "--max_tokens", "2"]
    assert main([*argv, *extra(tmp_path)]) == code
    line = one_error_line(capsys)
    for fragment in fragments:
        assert fragment in line, (fragment, line)


def test_unexpected_errors_name_their_type_and_verbose_shows_the_traceback(tmp_path, capsys, monkeypatch):
    def broken(pattern):
        raise KeyError("surprise")

    monkeypatch.setattr(io, "discover_shards", broken)
    argv = ["--input", shard(tmp_path), "--output", str(tmp_path / "out")]
    assert main(argv) == 1
    assert one_error_line(capsys) == "error: KeyError: 'surprise': unexpected; rerun with --verbose for the traceback"

    assert main([*argv, "--verbose"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in broken" in err
    assert err.splitlines()[-1].startswith("error: KeyError: 'surprise'")


def test_a_failure_inside_the_pipeline_is_one_line(tmp_path):
    """A write that fails inside a pipeline step: Beam logs the step's traceback and re-raises the
    error wrapped; the command prints the original error as one line, and no traceback."""
    script = ("import sys\nfrom pipeline import io\nfrom pipeline.run import main\n"
              "def denied(url, marker):\n    raise PermissionError(13, 'Permission denied', url)\n"
              "io.write_marker = denied\nsys.exit(main(sys.argv[1:]))\n")
    argv = ["--input", shard(tmp_path), "--output", str(tmp_path / "out"), "--max_tokens", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script, *argv], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.splitlines()[-1] == (
        f"error: PermissionError: [Errno 13] Permission denied: '{tmp_path / 'out' / 'a.jsonl'}' "
        "(pipeline step WriteShards): shards completed before it are kept; fix the cause and rerun the same "
        "command to resume, with --verbose for the traceback")


def test_error_line_from_a_runner_traceback():
    """Runners other than the in-process one raise a RuntimeError holding the worker's traceback."""
    text = ("Pipeline job failed:\nTraceback (most recent call last):\n  File \"job.py\", line 3, in process\n"
            "    io.write_atomic(url, lines)\nPermissionError: [Errno 13] Permission denied: 'gs://b/out/a.jsonl'"
            " [while running 'WriteShards']\n")
    line, code = error_line(RuntimeError(text))
    assert code == 1 and line.startswith("error: PermissionError: [Errno 13] Permission denied: 'gs://b/out/a.jsonl' "
                                         "(pipeline step WriteShards): shards completed before it are kept")
    assert error_line(JobError("what", "where", "todo")) == ("error: what (where): todo", 2)


# ---------------------------------------------------------------- storage errors


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    """The backoff delays of io.retry_transient, without the waiting."""
    delays: list[float] = []
    monkeypatch.setattr(io.time, "sleep", delays.append)
    return delays


def http_error(code: int) -> Exception:
    from gcsfs.retry import HttpError

    return HttpError({"code": code, "message": "denied"})


@pytest.mark.parametrize("error", [
    PermissionError(13, "Permission denied"), OSError("Forbidden: b/o\nno storage.objects.create access"),
    lambda: http_error(401), lambda: http_error(403), NotADirectoryError(20, "Not a directory")],
    ids=["PermissionError", "gcsfs-403", "HttpError-401", "HttpError-403", "NotADirectoryError"])
def test_permission_errors_are_not_retried(tmp_path, sleeps, error):
    calls = []

    @io.retry_transient
    def write(url):
        calls.append(url)
        raise error() if callable(error) else error

    with pytest.raises(Exception):
        write(str(tmp_path / "a.jsonl"))
    assert len(calls) == 1 and sleeps == []


def test_not_found_is_retried_only_where_the_directory_exists(tmp_path, sleeps):
    """A not-found in an existing bucket or directory is the lost answer to a finished upload
    (tests/test_faults.py): retried. Without the bucket or directory it is permanent."""
    calls = []

    @io.retry_transient
    def write(url):
        calls.append(url)
        if len(calls) == 1 or "missing" in url:
            raise FileNotFoundError(url)

    write(str(tmp_path / "a.jsonl"))
    assert len(calls) == 2 and len(sleeps) == 1
    with pytest.raises(FileNotFoundError):
        write(str(tmp_path / "missing" / "a.jsonl"))
    assert len(calls) == 3 and len(sleeps) == 1


def test_output_check_leaves_nothing_behind(tmp_path):
    io.check_output_writable(str(tmp_path / "out"))
    assert [p.name for p in (tmp_path / "out").rglob("*")] == [io.MARKER_DIR]


def test_an_unwritable_output_is_refused(tmp_path, monkeypatch):
    def denied(url, lines):
        raise PermissionError(13, "Permission denied", url)

    monkeypatch.setattr(io, "write_atomic", denied)
    with pytest.raises(JobError, match=r"cannot write to --output: PermissionError.*\(--output .*out\): pass a "):
        io.check_output_writable(str(tmp_path / "out"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through directory permissions")
def test_a_read_only_output_directory_is_refused(tmp_path):
    (tmp_path / "out").mkdir(mode=0o555)
    with pytest.raises(JobError, match="cannot write to --output: PermissionError"):
        io.check_output_writable(str(tmp_path / "out"))


def test_a_missing_bucket_is_refused_at_once_before_the_model_loads(gcs, tmp_path, capsys, sleeps, monkeypatch):
    from pipeline.handler import ModelSpec

    monkeypatch.setattr(ModelSpec, "load", lambda self: pytest.fail("the model loaded"))
    with pytest.raises(JobError, match=r"gs://no-such-bucket does not exist \(--output gs://no-such-bucket/out\)"):
        io.check_output_writable("gs://no-such-bucket/out")
    assert sleeps == []  # not retried

    assert main(["--input", shard(tmp_path), "--output", "gs://no-such-bucket/out"]) == 2
    assert "gs://no-such-bucket does not exist" in one_error_line(capsys)
