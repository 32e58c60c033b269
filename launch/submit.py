"""Launches the batch job on one accelerator VM, on Dataflow (TPU or GPU workers), or on Flink or
Spark through Beam's portable runner; builds the worker container. Thin: each mode renders the
command(s) it runs, from the repository root, and `--dry_run` prints them instead.

Flags after `--` are the job's own (pipeline/options.py) and are forwarded unchanged, after the
launcher's, so that a job flag given there wins:

  python -m launch.submit vm --accelerator tpu -- --input 'gs://b/in/*.jsonl' --output gs://b/out \\
      --model configs/models/example-llama.yaml
  python -m launch.submit build-container --accelerator tpu --image us-docker.pkg.dev/p/r/llm-batch:tpu
  python -m launch.submit dataflow-tpu --project p --region us-west1 --temp_location gs://b/tmp \\
      --image us-docker.pkg.dev/p/r/llm-batch:tpu --tpu v5e --topology 2x2 -- --input ... --output ...
  python -m launch.submit dataflow-gpu ... --gpu nvidia-l4 --gpu_count 1 -- ...
  python -m launch.submit flink --flink_master flink-jm:8081 --image IMAGE -- ...
  python -m launch.submit spark --job_endpoint spark-jobserver:8099 --environment_type EXTERNAL \\
      --worker_pool localhost:50000 -- ...
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JAX_EXTRA = {"cpu": "cpu", "gpu": "cuda12", "tpu": "tpu"}  # pip extras of jax (same pinned version)

# Dataflow's single-host TPU workers: (TPU type, topology) and the machine type each one requires.
# https://cloud.google.com/dataflow/docs/tpu/tpu-support
TPU_WORKERS = {
    ("v5e", "1x1"): ("tpu-v5-lite-podslice", "ct5lp-hightpu-1t"),
    ("v5e", "2x2"): ("tpu-v5-lite-podslice", "ct5lp-hightpu-4t"),
    ("v5e", "2x4"): ("tpu-v5-lite-podslice", "ct5lp-hightpu-8t"),
    ("v6e", "1x1"): ("tpu-v6e-slice", "ct6e-standard-1t"),
    ("v6e", "2x2"): ("tpu-v6e-slice", "ct6e-standard-4t"),
    ("v6e", "2x4"): ("tpu-v6e-slice", "ct6e-standard-8t"),
}
# A machine type that carries `count` GPUs of each type; --machine_type overrides.
# https://cloud.google.com/dataflow/docs/gpu/gpu-support, https://cloud.google.com/compute/docs/gpus
GPU_MACHINES = {
    "nvidia-l4": {1: "g2-standard-8", 2: "g2-standard-24", 4: "g2-standard-48", 8: "g2-standard-96"},
    "nvidia-tesla-t4": {1: "n1-standard-8", 2: "n1-standard-16", 4: "n1-standard-32"},
    "nvidia-tesla-a100": {1: "a2-highgpu-1g", 2: "a2-highgpu-2g", 4: "a2-highgpu-4g", 8: "a2-highgpu-8g"},
    "nvidia-h100-80gb": {1: "a3-highgpu-1g", 2: "a3-highgpu-2g", 4: "a3-highgpu-4g", 8: "a3-highgpu-8g"},
}


def _python() -> str:
    return sys.executable or "python3"


def _job(launcher_flags: list[str], job_flags: list[str]) -> list[str]:
    return [_python(), "-m", "pipeline.run", *launcher_flags, *job_flags]


def _flag(flags: list[str], name: str) -> str | None:
    """The value of --name in `flags` (either `--name v` or `--name=v`); the last one wins."""
    value = None
    for i, f in enumerate(flags):
        if f == name and i + 1 < len(flags):
            value = flags[i + 1]
        elif f.startswith(name + "="):
            value = f.split("=", 1)[1]
    return value


def _require_remote_io(job_flags: list[str], where: str) -> None:
    for name in ("--input", "--output"):
        value = _flag(job_flags, name)
        if value is None:
            raise SystemExit(f"job flags need {name} (after `--`)")
        if "://" not in value:
            raise SystemExit(f"{name}={value!r} is a local path; {where} workers need gs:// (or another "
                             "object store) for input and output")


def vm(args, job_flags: list[str]) -> list[list[str]]:
    """One process on this VM: the FnApiRunner in-process, the engine's mesh over the local chips
    (mesh_shape in the --model YAML); installs the jax build for the accelerator first."""
    install = [_python(), "-m", "pip", "install", "-r", "requirements.txt", f"jax[{JAX_EXTRA[args.accelerator]}]"]
    # One process owns the chips: the engine lives in it (no model-server process to share it).
    return [install, _job(["--share_model", "false"], job_flags)]


def _dataflow(args, job_flags: list[str], accelerator: str, machine_type: str) -> list[list[str]]:
    _require_remote_io(job_flags, "Dataflow")
    flags = ["--runner", "DataflowRunner", "--project", args.project, "--region", args.region,
             "--temp_location", args.temp_location,
             "--sdk_container_image", args.image, "--sdk_location", "container",
             "--machine_type", machine_type, "--dataflow_service_options", f"worker_accelerator={accelerator}",
             # one SDK process per worker VM owns its accelerator (a TPU opens in one process only);
             # its threads share one engine, and the job's --share_model keeps one per machine
             "--experiments", "no_use_multiple_sdk_containers",
             "--number_of_worker_harness_threads", str(args.threads),
             "--max_num_workers", str(args.max_num_workers), "--disk_size_gb", str(args.disk_size_gb),
             "--share_model", "true"]
    if args.zone:
        flags += ["--worker_zone", args.zone]
    return [_job(flags, job_flags)]


def dataflow_tpu(args, job_flags: list[str]) -> list[list[str]]:
    """Dataflow with single-host TPU workers. https://cloud.google.com/dataflow/docs/tpu/use-tpus"""
    tpu_type, machine = TPU_WORKERS[(args.tpu, args.topology)]
    return _dataflow(args, job_flags, f"type:{tpu_type};topology:{args.topology}", args.machine_type or machine)


def dataflow_gpu(args, job_flags: list[str]) -> list[list[str]]:
    """Dataflow with GPU workers. https://cloud.google.com/dataflow/docs/gpu/use-gpus"""
    machine = args.machine_type or GPU_MACHINES.get(args.gpu, {}).get(args.gpu_count)
    if machine is None:
        raise SystemExit(f"no default machine type for {args.gpu_count} x {args.gpu}; pass --machine_type")
    return _dataflow(args, job_flags, f"type:{args.gpu};count:{args.gpu_count};install-nvidia-driver", machine)


def _environment(args) -> list[str]:
    """Where the cluster runs the Python SDK workers.
    https://beam.apache.org/documentation/runtime/sdk-harness-config/"""
    if args.environment_type == "DOCKER":
        if not args.image:
            raise SystemExit("--environment_type DOCKER needs --image (see the build-container mode)")
        option = f"docker_container_image={args.image}"
    elif args.environment_type == "PROCESS":
        option = f"process_command={args.process_command}"
    else:
        option = f"external_service_address={args.worker_pool}"
    # one SDK process per worker node; it loads one engine (--share_model) for its threads
    return ["--environment_type", args.environment_type, "--environment_options", option,
            "--sdk_worker_parallelism", "1", "--share_model", "true"]


def flink(args, job_flags: list[str]) -> list[list[str]]:
    """Flink through Beam's portable runner. https://beam.apache.org/documentation/runners/flink/"""
    runner = (["--runner", "PortableRunner", "--job_endpoint", args.job_endpoint] if args.job_endpoint
              else ["--runner", "FlinkRunner", "--flink_master", args.flink_master])
    return [_job(runner + _environment(args), job_flags)]


def spark(args, job_flags: list[str]) -> list[list[str]]:
    """Spark through Beam's portable runner. https://beam.apache.org/documentation/runners/spark/"""
    runner = (["--runner", "PortableRunner", "--job_endpoint", args.job_endpoint] if args.job_endpoint
              else ["--runner", "SparkRunner", "--spark_master_url", args.spark_master_url])
    return [_job(runner + _environment(args), job_flags)]


def build_container(args, job_flags: list[str]) -> list[list[str]]:
    """The worker image (launch/Dockerfile) with the jax build for the accelerator, pushed."""
    build = ["docker", "build", "-f", "launch/Dockerfile", "--build-arg", f"JAX_EXTRA={JAX_EXTRA[args.accelerator]}",
             "-t", args.image, "."]
    return [build] + ([["docker", "push", args.image]] if args.push else [])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch.submit", allow_abbrev=False,
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry_run", action="store_true", help="print the commands instead of running them")
    modes = p.add_subparsers(dest="mode", required=True)

    def mode(name, fn, help):
        m = modes.add_parser(name, help=help, allow_abbrev=False)
        m.add_argument("--dry_run", action="store_true", default=argparse.SUPPRESS, help="print, don't run")
        m.set_defaults(fn=fn)
        return m

    m = mode("vm", vm, "one process on this TPU or GPU VM")
    m.add_argument("--accelerator", choices=JAX_EXTRA, default="tpu")

    for name, fn in (("dataflow-tpu", dataflow_tpu), ("dataflow-gpu", dataflow_gpu)):
        m = mode(name, fn, f"Dataflow with {name.split('-')[1].upper()} workers")
        m.add_argument("--project", required=True)
        m.add_argument("--region", required=True)
        m.add_argument("--temp_location", required=True, help="gs:// staging and temp directory")
        m.add_argument("--image", required=True, help="worker container image (see build-container)")
        m.add_argument("--zone", help="worker zone (e.g. the zone of an accelerator reservation)")
        m.add_argument("--machine_type", help="override the machine type matched to the accelerator")
        m.add_argument("--max_num_workers", type=int, default=4)
        m.add_argument("--threads", type=int, default=8, help="SDK harness threads per worker")
        m.add_argument("--disk_size_gb", type=int, default=100, help="room for the accelerator image")
        if name == "dataflow-tpu":
            m.add_argument("--tpu", choices=["v5e", "v6e"], default="v5e")
            m.add_argument("--topology", choices=["1x1", "2x2", "2x4"], default="1x1",
                           help="chips on the worker's single host")
        else:
            m.add_argument("--gpu", default="nvidia-l4", help="Dataflow GPU type, e.g. nvidia-l4, nvidia-tesla-t4")
            m.add_argument("--gpu_count", type=int, default=1)

    for name, fn, master in (("flink", flink, "--flink_master"), ("spark", spark, "--spark_master_url")):
        m = mode(name, fn, f"{name.capitalize()} through Beam's portable runner")
        where = m.add_mutually_exclusive_group(required=True)
        where.add_argument(master, help="the cluster's master; Beam starts a job server for it")
        where.add_argument("--job_endpoint", help="a running Beam job server (host:port): PortableRunner")
        m.add_argument("--environment_type", choices=["DOCKER", "PROCESS", "EXTERNAL"], default="DOCKER")
        m.add_argument("--image", help="DOCKER: the worker container image")
        m.add_argument("--process_command", default="/opt/apache/beam/boot",
                       help="PROCESS: the SDK worker boot command installed on each node")
        m.add_argument("--worker_pool", default="localhost:50000",
                       help="EXTERNAL: a Beam SDK worker pool beside each node (container run with --worker_pool)")

    m = mode("build-container", build_container, "build (and push) the worker image")
    m.add_argument("--image", required=True)
    m.add_argument("--accelerator", choices=JAX_EXTRA, default="tpu")
    m.add_argument("--push", action=argparse.BooleanOptionalAction, default=True)
    return p


def plan(argv: list[str]) -> tuple[argparse.Namespace, list[list[str]]]:
    """Parses the launcher's flags (before `--`) and renders the commands of its mode."""
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser().parse_args(argv[:cut])
    return args, args.fn(args, argv[cut + 1:])


def main(argv: list[str] | None = None) -> int:
    args, commands = plan(sys.argv[1:] if argv is None else argv)
    for cmd in commands:
        print(shlex.join(cmd), flush=True)
        if not args.dry_run:
            subprocess.run(cmd, cwd=REPO, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
