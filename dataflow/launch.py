#!/usr/bin/env python3
"""Run `magiclens mine` or `magiclens instruct` on Dataflow or on Flink.

Launcher options come first, then the magiclens command and its own arguments:

  python dataflow/launch.py dataflow --project my-project --region us-central1 \\
      --temp-location gs://my-bucket/tmp --max-workers 50 \\
      mine --crawl CC-MAIN-2024-33 --warc-limit 100 --output gs://my-bucket/mined

  python dataflow/launch.py flink --flink-master flink-jobmanager:8081 \\
      --job-server-jar ./beam-runners-flink-1.19-job-server-2.77.0.jar --environment-type DOCKER \\
      mine --input 'gs://my-bucket/warcs/*.warc.gz' --output gs://my-bucket/mined

It prints the command it runs (a plain `python -m magiclens ...` with Beam's options), so the same
run can be repeated by hand; `--print-only` prints it without running it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETUP_FILE = os.path.join(ROOT, "setup.py")
COMMANDS = ("mine", "instruct")
BEAM_VERSION = "2.77.0"

# Machine types: CPU stages are I/O- and decode-bound; the GPU default pairs one L4 with 8 vCPUs.
DEFAULT_MACHINE = "n2-standard-4"
DEFAULT_GPU_MACHINE = "g2-standard-8"


def worker_accelerator(gpu: str) -> str:
    """`nvidia-l4` or `nvidia-l4:2` -> Dataflow's worker_accelerator service option.

    Dataflow installs the NVIDIA driver on each worker VM when `install-nvidia-driver` is given; the
    CUDA libraries come from the worker container (dataflow/Dockerfile.gpu).
    """
    kind, _, count = gpu.partition(":")
    count = count or "1"
    if not kind.startswith("nvidia-") or not count.isdigit() or int(count) < 1:
        raise SystemExit(f"--gpu {gpu!r}: expected TYPE[:COUNT] such as nvidia-l4 or nvidia-tesla-t4:2")
    return f"worker_accelerator=type:{kind};count:{count};install-nvidia-driver"


def dataflow_options(args: argparse.Namespace) -> list[str]:
    if not args.temp_location.startswith("gs://"):
        raise SystemExit(f"--temp-location must be a gs:// path, got {args.temp_location!r}")
    staging = args.staging_location or args.temp_location.rstrip("/") + "/staging"
    options = [
        "--runner=DataflowRunner",
        f"--project={args.project}",
        f"--region={args.region}",
        f"--temp_location={args.temp_location}",
        f"--staging_location={staging}",
        f"--machine_type={args.machine_type or (DEFAULT_GPU_MACHINE if args.gpu else DEFAULT_MACHINE)}",
        f"--max_num_workers={args.max_workers}",
    ]
    if args.container_image:
        # The image has magiclens installed (dataflow/Dockerfile.cpu or .gpu): nothing to stage.
        options.append(f"--sdk_container_image={args.container_image}")
    else:
        options.append(f"--setup_file={SETUP_FILE}")
    if args.gpu:
        options.append(f"--dataflow_service_options={worker_accelerator(args.gpu)}")
        # One SDK process per VM, so each GPU holds one model (vLLM) instead of one per vCPU.
        options.append("--experiments=no_use_multiple_sdk_containers")
    if args.disk_size_gb:
        options.append(f"--disk_size_gb={args.disk_size_gb}")
    if args.job_name:
        options.append(f"--job_name={args.job_name}")
    if args.template_location:
        options.append(f"--template_location={args.template_location}")
    return options


def flink_options(args: argparse.Namespace) -> list[str]:
    if args.job_endpoint:
        # A job server already running (the Flink job server jar started by hand, or any portable one).
        options = ["--runner=PortableRunner", f"--job_endpoint={args.job_endpoint}"]
    else:
        if not os.path.isfile(args.job_server_jar):
            raise SystemExit(
                f"--job-server-jar {args.job_server_jar!r} is not a file: download "
                f"beam-runners-flink-FLINK_VERSION-job-server-{BEAM_VERSION}.jar from Maven Central first"
            )
        options = [
            "--runner=FlinkRunner",
            f"--flink_master={args.flink_master}",
            f"--flink_job_server_jar={os.path.abspath(args.job_server_jar)}",
        ]
    options.append(f"--environment_type={args.environment_type}")
    config = args.environment_config
    if args.environment_type == "DOCKER":
        image = config or args.container_image or f"apache/beam_python3.11_sdk:{BEAM_VERSION}"
        options.append(f"--environment_options=docker_container_image={image}")
    elif args.environment_type == "PROCESS":
        options.append(f"--environment_options=process_command={config or '/opt/apache/beam/boot'}")
    else:
        if not config:
            raise SystemExit("--environment-type EXTERNAL needs --environment-config HOST:PORT of a Beam worker pool")
        options.append(f"--environment_config={config}")
    # DOCKER and PROCESS workers start from a bare SDK and install the staged package; EXTERNAL
    # worker pools and our own images already have it.
    if args.environment_type != "EXTERNAL" and not args.container_image:
        options.append(f"--setup_file={SETUP_FILE}")
    if args.parallelism:
        options.append(f"--parallelism={args.parallelism}")
    return options


def magiclens_command(command: str, command_args: list[str], runner_options: list[str]) -> list[str]:
    return [sys.executable, "-m", "magiclens", command, *command_args, *runner_options]


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="dataflow/launch.py",
        description="Run `magiclens mine` or `magiclens instruct` on Dataflow or Flink. Launcher options "
        "come first, then the command (mine or instruct) and its own arguments.",
    )
    runners = top.add_subparsers(dest="target", required=True)

    dataflow = runners.add_parser("dataflow", help="Google Cloud Dataflow (DataflowRunner)")
    dataflow.add_argument("--project", required=True, help="Google Cloud project id")
    dataflow.add_argument("--region", required=True, help="Dataflow region, e.g. us-central1")
    dataflow.add_argument("--temp-location", required=True, metavar="GS_PATH", help="gs:// folder for temporary files")
    dataflow.add_argument("--staging-location", metavar="GS_PATH", help="gs:// folder for the staged package (default TEMP/staging)")
    dataflow.add_argument("--machine-type", help=f"worker machine type (default {DEFAULT_MACHINE}; {DEFAULT_GPU_MACHINE} with --gpu)")
    dataflow.add_argument("--max-workers", type=int, default=20, help="autoscaling ceiling (default 20)")
    dataflow.add_argument("--disk-size-gb", type=int, help="worker boot disk size; GPU images need about 50 GB")
    dataflow.add_argument("--container-image", metavar="IMAGE",
                          help="worker container built from dataflow/Dockerfile.cpu or .gpu (then setup.py is not staged)")
    dataflow.add_argument("--gpu", metavar="TYPE[:COUNT]",
                          help="attach GPUs to each worker, e.g. nvidia-l4 or nvidia-tesla-t4:2 (for instruct with vllm)")
    dataflow.add_argument("--job-name", help="Dataflow job name (default: chosen by Beam)")
    dataflow.add_argument("--template-location", metavar="PATH",
                          help="write a classic template (the job spec) here instead of running the job")

    flink = runners.add_parser("flink", help="Apache Flink through Beam's portable runner")
    where = flink.add_mutually_exclusive_group(required=True)
    where.add_argument("--flink-master", metavar="HOST:PORT", help="Flink JobManager REST address (with --job-server-jar)")
    where.add_argument("--job-endpoint", metavar="HOST:PORT",
                       help="a Beam job server that is already running (e.g. the Flink job server jar started by hand)")
    flink.add_argument("--job-server-jar", metavar="PATH",
                       help="local path of beam-runners-flink-VERSION-job-server-BEAM.jar (with --flink-master)")
    flink.add_argument("--environment-type", choices=["EXTERNAL", "DOCKER", "PROCESS"], default="DOCKER",
                       help="how Flink task managers run the Python code: DOCKER (a container per worker, default), "
                            "PROCESS (the Beam boot binary on each host) or EXTERNAL (a worker pool you run beside "
                            "each task manager)")
    flink.add_argument("--environment-config", metavar="VALUE",
                       help="DOCKER: image; PROCESS: boot command; EXTERNAL: HOST:PORT of the worker pool")
    flink.add_argument("--container-image", metavar="IMAGE", help="for DOCKER: an image with magiclens installed")
    flink.add_argument("--parallelism", type=int, help="Flink parallelism (default: the cluster's)")

    for runner in (dataflow, flink):
        runner.add_argument("--print-only", action="store_true", help="print the command and exit without running it")
        runner.add_argument("command", choices=COMMANDS, help="the magiclens command to run")
        runner.add_argument("command_args", nargs=argparse.REMAINDER, help="arguments of the command")
    return top


def build_command(argv: list[str]) -> tuple[list[str], bool]:
    """The command to run for these launcher arguments, and whether to only print it."""
    args = parser().parse_args(argv)
    if args.target == "flink" and args.flink_master and not args.job_server_jar:
        raise SystemExit("--flink-master needs --job-server-jar PATH (or use --job-endpoint of a running job server)")
    runner_options = dataflow_options(args) if args.target == "dataflow" else flink_options(args)
    return magiclens_command(args.command, args.command_args, runner_options), args.print_only


def main(argv: list[str] | None = None) -> int:
    command, print_only = build_command(sys.argv[1:] if argv is None else argv)
    print(shlex.join(command), flush=True)
    if print_only:
        return 0
    return subprocess.call(command, cwd=ROOT)


if __name__ == "__main__":
    raise SystemExit(main())
