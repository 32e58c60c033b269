"""A CPU user's job prints no accelerator or TensorFlow start-up noise: only the job's own lines."""

import json
import os
import subprocess
import sys

NOISE = ("TPU", "libtpu", "cuInit", "cuda", "CUDA", "oneDNN", "absl", "apitools", "precompiled_charsmap",
         "Traceback")


def test_a_cpu_job_prints_only_its_own_lines(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"prompt": "In the beginning"}) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "TF_CPP_MIN_LOG_LEVEL", "XLA_FLAGS")}
    proc = subprocess.run([sys.executable, "-m", "pipeline.run", "--input", str(tmp_path / "a.jsonl"), "--output",
                           str(tmp_path / "out"), "--model", "demo", "--max_tokens", "2"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    noisy = [line for line in proc.stderr.splitlines() if any(word in line for word in NOISE)]
    assert not noisy, proc.stderr
    assert "records" in proc.stdout and "completions" in proc.stdout


def test_overlapping_silenced_sections_give_stderr_back():
    import threading

    from model.platform import native_stderr_silenced

    before = os.fstat(2)
    entered, leave = threading.Barrier(3), threading.Event()

    def hold():
        with native_stderr_silenced():
            entered.wait()
            leave.wait()

    threads = [threading.Thread(target=hold) for _ in range(2)]
    for t in threads:
        t.start()
    entered.wait()
    leave.set()
    for t in threads:
        t.join()
    after = os.fstat(2)
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)


def test_a_preview_never_imports_tensorflow():
    """The preview tokenizes with the sentencepiece library (same ids as tensorflow-text), so its
    first answer does not wait seconds for TensorFlow to import."""
    script = ("import sys\nfrom pipeline.preview import generate\n"
              "[r] = generate(['Once upon a time'], max_tokens=4, progress=False)\n"
              "assert r['completion_tokens'] == 4, r\nprint('tensorflow' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_the_benchmark_and_training_scripts_start_quiet_on_a_cpu_host():
    """Each launch script that imports jax itself imports `model` first, whose start-up defaults
    must be set before jax reads them: else JAX probes for a TPU (libtpu is installed for
    deviceless compilation) and logs its host-discovery errors."""
    script = ("import launch.bench_engine, launch.bench_decode_step, launch.bench_draft, launch.distill_draft, "
              "launch.train_demo\nimport jax\nprint(jax.devices()[0].platform)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "TF_CPP_MIN_LOG_LEVEL", "XLA_FLAGS")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "cpu"
    noisy = [line for line in proc.stderr.splitlines() if any(word in line for word in NOISE)]
    assert not noisy, proc.stderr
