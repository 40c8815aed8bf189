"""The whole `mine` pipeline through Beam's portable runner, as Flink runs it.

Beam's local job service (the same Job API a Flink job server serves) receives the pipeline from
PortableRunner, and runs its Python stages in an EXTERNAL environment: a worker pool process, which
is what runs beside each Flink task manager. The job is submitted with the options
`dataflow/launch.py flink --job-endpoint ... --environment-type EXTERNAL` builds, and must give the
same pairs as the in-process runner. Each test runs inside a private network namespace (only
loopback: tests/gcs_emulator.py), so neither service can reach anything but this machine.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from gcs_emulator import rerun_in_private_network
from magiclens.cli import main

ROOT = Path(__file__).resolve().parent.parent


def load_launcher():
    spec = importlib.util.spec_from_file_location("dataflow_launch", ROOT / "dataflow" / "launch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start (exit code {process.poll()})") from None
            time.sleep(0.2)


INPUTS = ["--no-fetch", "--min-side", "40"]


@pytest.fixture(scope="module")
def portable_run(shared_data, tmp_path_factory) -> Path:
    """Output folder of `mine` submitted to a local job service that runs it on an EXTERNAL worker pool."""
    folder = tmp_path_factory.mktemp("portable")
    # The pool starts each SDK worker as `python -c ...`: this virtualenv's python must come first.
    environment = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    pool_port, job_port = free_port(), free_port()
    logs = [open(folder / name, "w") for name in ("worker_pool.log", "job_service.log")]
    pool = subprocess.Popen(
        [sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main", f"--service_port={pool_port}"],
        env=environment, stdout=logs[0], stderr=subprocess.STDOUT, cwd=ROOT,
    )
    service = subprocess.Popen(
        [sys.executable, "-m", "apache_beam.runners.portability.local_job_service_main", f"--port={job_port}",
         f"--staging_dir={folder / 'staging'}"],
        env=environment, stdout=logs[1], stderr=subprocess.STDOUT, cwd=ROOT,
    )
    try:
        wait_for_port(pool_port, pool, "the worker pool")
        wait_for_port(job_port, service, "the job service")
        worker_pool = f"localhost:{pool_port}"
        command, _ = load_launcher().build_command([
            "flink", "--job-endpoint", f"localhost:{job_port}", "--environment-type", "EXTERNAL",
            "--environment-config", worker_pool,
            "mine", "--input", str(shared_data / "warc/webarchive/ukwa_*.warc.gz"), *INPUTS,
            "--output", str(folder / "out"),
        ])
        assert "--runner=PortableRunner" in command and f"--environment_config={worker_pool}" in command
        assert main(command[3:]) == 0
    finally:
        for process in (service, pool):
            process.terminate()
            process.wait(timeout=30)
        for log in logs:
            log.close()
    return folder


def pair_ids(folder: Path) -> list[str]:
    return sorted(pq.read_table(folder / "pairs", columns=["pair_id"]).column(0).to_pylist())


def test_mine_runs_through_the_portable_runner_with_an_external_worker_pool(request):
    if rerun_in_private_network(__file__, "test_mine_runs_through_the_portable_runner_with_an_external_worker_pool"):
        return
    portable_run = request.getfixturevalue("portable_run")
    stats = json.loads((portable_run / "out" / "stats.json").read_text())
    for name, entry in stats["stages"].items():
        assert entry.get("balanced", True), name
    assert stats["stages"]["warc_files"]["in"] == 4
    assert stats["stages"]["records"]["in"] > 0
    assert len(pair_ids(portable_run / "out")) == stats["stages"]["outputs"]["pairs"] > 0
    # the DoFns ran in an SDK worker that the pool started, not in this process
    assert "Starting worker with command" in (portable_run / "worker_pool.log").read_text()
    assert "with state DONE" in (portable_run / "job_service.log").read_text()


@pytest.mark.slow
def test_portable_runner_gives_the_same_result_as_the_in_process_runner(request, shared_data, tmp_path):
    if rerun_in_private_network(__file__, "test_portable_runner_gives_the_same_result_as_the_in_process_runner"):
        return
    portable_run = request.getfixturevalue("portable_run")
    assert main(["mine", "--input", str(shared_data / "warc/webarchive/ukwa_*.warc.gz"), *INPUTS,
                 "--output", str(tmp_path)]) == 0
    portable = json.loads((portable_run / "out" / "stats.json").read_text())
    local = json.loads((tmp_path / "stats.json").read_text())
    assert portable["stages"] == local["stages"]
    assert pair_ids(portable_run / "out") == pair_ids(tmp_path)
