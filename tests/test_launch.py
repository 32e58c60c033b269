"""launch/submit.py renders each launch mode's command; Beam parses every flag it renders."""

import shlex

import pytest
from apache_beam.options.pipeline_options import (DebugOptions, GoogleCloudOptions, PipelineOptions, PortableOptions,
                                                  SetupOptions, StandardOptions, WorkerOptions)

from launch import submit
from pipeline.options import JobOptions

JOB = ["--input", "gs://b/in/*.jsonl", "--output", "gs://b/out", "--model", "configs/models/example-llama.yaml",
       "--max_tokens", "128", "--temperature=0.7"]
DATAFLOW = ["--project", "proj", "--region", "us-west1", "--temp_location", "gs://b/tmp",
            "--image", "us-docker.pkg.dev/proj/repo/llm-batch:1"]


def render(*launcher: str, job=JOB) -> list[list[str]]:
    """The commands main() prints in dry-run mode, split back into argv lists."""
    return submit.plan([*launcher, "--", *job])[1]


def job_options(cmd: list[str]) -> PipelineOptions:
    """Parses a rendered job command as pipeline.run does; fails on any flag Beam does not know."""
    assert cmd[1:3] == ["-m", "pipeline.run"]
    argv = cmd[3:]
    assert argv[-len(JOB):] == JOB, "job flags must come last, unchanged"
    opts = PipelineOptions(argv)
    known = set(opts.get_all_options(retain_unknown_options=False))
    unknown = set(opts.get_all_options(retain_unknown_options=True)) - known
    assert not unknown, f"flags Beam does not know: {sorted(unknown)}"
    job = opts.view_as(JobOptions)
    assert (job.input, job.output, job.model, job.max_tokens) == ("gs://b/in/*.jsonl", "gs://b/out",
                                                                  "configs/models/example-llama.yaml", 128)
    return opts


def test_dry_run_prints_commands_and_runs_nothing(capsys, monkeypatch):
    monkeypatch.setattr(submit.subprocess, "run", lambda *a, **k: pytest.fail(f"ran {a}"))
    assert submit.main(["--dry_run", "dataflow-gpu", *DATAFLOW, "--", *JOB]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [shlex.split(line) for line in lines] == render("dataflow-gpu", *DATAFLOW)


def test_vm_installs_the_accelerator_jax_and_runs_one_process():
    for accelerator, extra in (("tpu", "jax[tpu]"), ("gpu", "jax[cuda12]")):
        install, cmd = render("vm", "--accelerator", accelerator)
        assert install[1:] == ["-m", "pip", "install", "-r", "requirements.txt", extra]
        opts = job_options(cmd)
        assert opts.view_as(StandardOptions).runner is None  # the job's default: the in-process FnApiRunner
        assert opts.view_as(JobOptions).share_model == "false"


@pytest.mark.parametrize("tpu,topology,accel,machine", [
    ("v5e", "1x1", "type:tpu-v5-lite-podslice;topology:1x1", "ct5lp-hightpu-1t"),
    ("v5e", "2x4", "type:tpu-v5-lite-podslice;topology:2x4", "ct5lp-hightpu-8t"),
    ("v6e", "2x2", "type:tpu-v6e-slice;topology:2x2", "ct6e-standard-4t"),
])
def test_dataflow_tpu(tpu, topology, accel, machine):
    [cmd] = render("dataflow-tpu", *DATAFLOW, "--tpu", tpu, "--topology", topology, "--zone", "us-west1-c")
    opts = job_options(cmd)
    assert opts.view_as(StandardOptions).runner == "DataflowRunner"
    gcp, worker = opts.view_as(GoogleCloudOptions), opts.view_as(WorkerOptions)
    assert (gcp.project, gcp.region, gcp.temp_location) == ("proj", "us-west1", "gs://b/tmp")
    assert gcp.dataflow_service_options == [f"worker_accelerator={accel}"]
    assert (worker.machine_type, worker.worker_zone) == (machine, "us-west1-c")
    assert worker.sdk_container_image == "us-docker.pkg.dev/proj/repo/llm-batch:1"
    assert opts.view_as(SetupOptions).sdk_location == "container"
    assert "no_use_multiple_sdk_containers" in opts.view_as(DebugOptions).experiments
    assert opts.view_as(DebugOptions).number_of_worker_harness_threads == 8
    assert opts.view_as(JobOptions).share_model == "true"


def test_dataflow_gpu():
    [cmd] = render("dataflow-gpu", *DATAFLOW, "--gpu", "nvidia-tesla-t4", "--gpu_count", "2",
                   "--max_num_workers", "10")
    opts = job_options(cmd)
    worker = opts.view_as(WorkerOptions)
    assert opts.view_as(GoogleCloudOptions).dataflow_service_options == [
        "worker_accelerator=type:nvidia-tesla-t4;count:2;install-nvidia-driver"]
    assert (worker.machine_type, worker.max_num_workers) == ("n1-standard-16", 10)
    assert "no_use_multiple_sdk_containers" in opts.view_as(DebugOptions).experiments
    assert opts.view_as(JobOptions).share_model == "true"
    [cmd] = render("dataflow-gpu", *DATAFLOW, "--gpu", "nvidia-l4", "--machine_type", "g2-standard-16")
    assert job_options(cmd).view_as(WorkerOptions).machine_type == "g2-standard-16"


def test_dataflow_refuses_local_paths_and_unknown_gpu_shapes():
    with pytest.raises(SystemExit, match="local path"):
        render("dataflow-tpu", *DATAFLOW, job=["--input", "/data/in/*.jsonl", "--output", "gs://b/out"])
    with pytest.raises(SystemExit, match="need --output"):
        render("dataflow-gpu", *DATAFLOW, job=["--input", "gs://b/in/*"])
    with pytest.raises(SystemExit, match="pass --machine_type"):
        render("dataflow-gpu", *DATAFLOW, "--gpu", "nvidia-l4", "--gpu_count", "3")


@pytest.mark.parametrize("mode,master_flag,runner", [("flink", "--flink_master", "FlinkRunner"),
                                                     ("spark", "--spark_master_url", "SparkRunner")])
def test_flink_and_spark_portable(mode, master_flag, runner):
    [cmd] = render(mode, master_flag, "master:1234", "--image", "img:1")
    opts = job_options(cmd)
    portable = opts.view_as(PortableOptions)
    assert opts.view_as(StandardOptions).runner == runner
    assert opts.get_all_options()[master_flag[2:]] == "master:1234"
    assert (portable.environment_type, portable.lookup_environment_option("docker_container_image")) == (
        "DOCKER", "img:1")
    assert str(portable.sdk_worker_parallelism) == "1" and opts.view_as(JobOptions).share_model == "true"

    [cmd] = render(mode, "--job_endpoint", "jobserver:8099", "--environment_type", "EXTERNAL")
    portable = job_options(cmd).view_as(PortableOptions)
    assert job_options(cmd).view_as(StandardOptions).runner == "PortableRunner"
    assert (portable.job_endpoint, portable.environment_type) == ("jobserver:8099", "EXTERNAL")
    assert portable.lookup_environment_option("external_service_address") == "localhost:50000"

    [cmd] = render(mode, master_flag, "m:1", "--environment_type", "PROCESS")
    assert job_options(cmd).view_as(PortableOptions).lookup_environment_option("process_command") == (
        "/opt/apache/beam/boot")
    with pytest.raises(SystemExit, match="needs --image"):
        render(mode, master_flag, "m:1")


def test_build_container_passes_the_jax_extra():
    build, push = render("build-container", "--image", "reg/img:tpu", "--accelerator", "tpu", job=[])
    assert build == ["docker", "build", "-f", "launch/Dockerfile", "--build-arg", "JAX_EXTRA=tpu", "-t",
                     "reg/img:tpu", "."]
    assert push == ["docker", "push", "reg/img:tpu"]
    [build] = render("build-container", "--image", "i", "--accelerator", "gpu", "--no-push", job=[])
    assert "JAX_EXTRA=cuda12" in build


def test_dockerfile_matches_the_pinned_beam_and_python():
    text = open(f"{submit.REPO}/launch/Dockerfile").read()
    beam = next(line.split("==")[1].strip() for line in open(f"{submit.REPO}/requirements.txt")
                if line.startswith("apache-beam=="))
    assert f"ARG BEAM_VERSION={beam}" in text and "ARG PYTHON_VERSION=3.11" in text
    assert "apache/beam_python${PYTHON_VERSION}_sdk:${BEAM_VERSION}" in text
    assert 'jax[${JAX_EXTRA}]' in text and "/opt/apache/beam/boot" in text


def test_bench_decode_step_runs(tmp_path):
    from launch import bench_decode_step
    result = bench_decode_step.main(["--slots", "1", "--max-len", "128", "--runs", "1", "--out", str(tmp_path / "o.json")])
    assert result["rows"] and all(r["ms_per_step"] > 0 for r in result["rows"])


def test_bench_matmul_runs_every_library(tmp_path):
    from launch import bench_matmul
    result = bench_matmul.main(["--rows", "1", "2", "130", "--layers", "1", "--hidden", "32", "--ffw", "64",
                                "--runs", "1", "--out", str(tmp_path / "o.json")])  # 130 rows: past FEATURES_MAX_ROWS
    assert [(r["lib"], r["rows"]) for r in result["rows"]] == [
        (lib, m) for lib in ("jax", "jax-outputs-first", "numpy", "torch") for m in (1, 2, 130)]
    assert all(r["ms"] >= 0 and r["gflop_per_s"] >= 0 for r in result["rows"])


@pytest.mark.slow
def test_bench_speculative_quick_runs(tmp_path, monkeypatch):
    from launch import bench_speculative
    result = bench_speculative.main(["--quick", "--out", str(tmp_path / "o.json")])
    assert {r["workload"] for r in result["rows"]} == {"batch1", "copy", "busy"}


def test_bench_scheduler_before_engine_keeps_the_weights_as_loaded():
    from flax import nnx

    from launch.bench_scheduler import InputsFirst
    from model import Engine, SamplingParams
    kw = dict(mesh_shape=(1, 1), dtype="float32", max_slots=2, max_len=64)
    now, before = Engine.from_pretrained("tiny-llama", **kw), InputsFirst.from_pretrained("tiny-llama", **kw)
    assert "w_down" in nnx.merge(now.graphdef, now.params).outputs_first
    assert nnx.merge(before.graphdef, before.params).outputs_first == ()
    assert Engine.from_pretrained("tiny-llama", **kw).path.outputs_first  # the patch was undone
    prompts, greedy = [[5, 6, 7], [9] * 20], SamplingParams(max_new_tokens=6, ignore_eos=True)
    assert [o.token_ids for o in now.generate(prompts, greedy)] == [o.token_ids for o in before.generate(prompts, greedy)]


def test_bench_pipeline_records_come_from_the_demo_prompt_shards():
    from launch import bench_pipeline
    recs = bench_pipeline.records(5, 8, 16)
    assert [r["id"] for r in recs] == [f"r{i}" for i in range(5)]
    assert all(40 <= len(r["prompt"].split()) <= 90 and 8 <= r["max_tokens"] <= 16 for r in recs)
