"""gs:// in tests: the gcp-storage-emulator server on 127.0.0.1, inside a private network namespace.

Beam's GCS filesystem builds a google-cloud-storage client, which sends every request to
STORAGE_EMULATOR_HOST when that is set. Beam first looks for Google credentials (and, finding none,
retries for about 30 s before going anonymous), so the tests give it an offline token that never
needs refreshing: the emulator ignores it, and nothing else is reachable anyway.

A test that touches gs:// runs again inside `unshare -rn` (a new user and network namespace where
only loopback exists), so a mistake can never reach Google: `rerun_in_private_network`. It fails,
never skips, where such a namespace cannot be made, and a test that skips inside fails outside: the
outcome of each inner test is read from pytest's JUnit report, not only from its exit code.
`private_network_outcomes` runs several tests of one file in one namespace (`assert_passed_inside`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

import pytest
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

ROOT = Path(__file__).resolve().parent.parent
IN_PRIVATE_NETWORK = os.environ.get("MAGICLENS_TEST_PRIVATE_NETWORK") == "1"
BUCKET = "magiclens-test"
PROJECT = "magiclens-test"


@dataclass(frozen=True)
class InnerOutcome:
    """How one test ended inside the namespace: passed, failed, error or skipped, and pytest's message."""

    outcome: str
    message: str = ""


def _require_private_network() -> None:
    """Fail (never skip) where a private network namespace cannot be made: the test would otherwise not run."""
    missing = [tool for tool in ("unshare", "ip") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"tests that need a private network namespace need {' and '.join(missing)} "
                    "(util-linux and iproute2): install them")
    probe = subprocess.run(["unshare", "-rn", "sh", "-c", "ip link set lo up"], capture_output=True, text=True)
    if probe.returncode:
        pytest.fail("`unshare -rn` (a user and network namespace) is refused here, so these tests cannot run where "
                    f"no packet can leave; allow unprivileged user namespaces: {probe.stderr.strip()[-500:]}")


def _outcomes_from_junit(report: Path) -> dict[str, InnerOutcome]:
    outcomes = {}
    for case in ElementTree.parse(report).iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("skipped", "error", "failure"):  # the last one found wins: a failure outranks a skip
            for element in case.iter(tag):
                outcome = {"failure": "failed"}.get(tag, tag)
                message = "\n".join(filter(None, (element.get("message"), element.text)))
        outcomes[case.get("name")] = InnerOutcome(outcome, message)
    return outcomes


def private_network_outcomes(test_file: str, *selection: str, timeout: int = 900) -> dict[str, InnerOutcome]:
    """Run pytest on `test_file` (narrowed by `selection`, e.g. "-k", "NAME") inside a new user and network
    namespace where only loopback is up; return how each test ended, by name, from pytest's JUnit report.

    Call it only outside the namespace (IN_PRIVATE_NETWORK false); the tests see MAGICLENS_TEST_PRIVATE_NETWORK=1.
    """
    assert not IN_PRIVATE_NETWORK, "already inside the private network namespace"
    _require_private_network()
    with tempfile.TemporaryDirectory(prefix="private-network-") as scratch:
        report = Path(scratch) / "report.xml"
        command = [
            "unshare", "-rn", "sh", "-c", 'ip link set lo up && exec "$0" -m pytest -q -rA -p no:cacheprovider "$@"',
            sys.executable, test_file, *selection, f"--junitxml={report}",
        ]
        environment = {**os.environ, "MAGICLENS_TEST_PRIVATE_NETWORK": "1"}
        finished = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        output = finished.stdout[-8000:] + finished.stderr[-4000:]
        if not report.exists():
            pytest.fail(f"pytest inside the private network namespace wrote no report (exit {finished.returncode}):\n{output}")
        outcomes = _outcomes_from_junit(report)
    if not outcomes:
        pytest.fail(f"no test ran inside the private network namespace ({test_file} {' '.join(selection)}):\n{output}")
    return outcomes


def assert_passed_inside(outcomes: dict[str, InnerOutcome], test_name: str) -> None:
    """The test ran inside the namespace and passed: a skip there is a failure here."""
    assert test_name in outcomes, f"{test_name} did not run in the private network namespace (ran: {sorted(outcomes)})"
    inner = outcomes[test_name]
    assert inner.outcome == "passed", f"{test_name} {inner.outcome} in the private network namespace:\n{inner.message[-6000:]}"


def rerun_in_private_network(test_file: str, test_name: str) -> bool:
    """Outside a namespace: run the test again inside a new one, assert that it passed, and return True.

    Inside (the rerun), check that only loopback exists and return False: the caller runs its body.
    """
    if IN_PRIVATE_NETWORK:
        assert [name for _, name in socket.if_nameindex()] == ["lo"], "not in a private network namespace"
        return False
    outcomes = private_network_outcomes(f"{test_file}::{test_name}")
    assert_passed_inside(outcomes, test_name)
    assert len(outcomes) == 1, f"expected only {test_name} to run inside, ran: {sorted(outcomes)}"
    return True


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def emulator_environment(port: int, credentials: Path) -> dict[str, str]:
    """The variables that point Beam's GCS client (and any child process) at the emulator."""
    credentials.write_text(json.dumps({
        "type": "authorized_user", "client_id": "emulator", "client_secret": "emulator",
        "refresh_token": "emulator", "token": "emulator", "expiry": "2999-01-01T00:00:00Z",
    }))
    return {
        "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}",
        "GOOGLE_APPLICATION_CREDENTIALS": str(credentials),
        "GOOGLE_CLOUD_PROJECT": PROJECT,
    }


@contextlib.contextmanager
def gcs_emulator(workdir: Path) -> Iterator[str]:
    """Start the emulator with an empty bucket, set the environment for it, yield "gs://BUCKET"."""
    assert IN_PRIVATE_NETWORK, "start the GCS emulator only inside rerun_in_private_network"
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "gcp_storage_emulator", "start", "--host=127.0.0.1", f"--port={port}",
         "--in-memory", f"--default-bucket={BUCKET}", "--quiet"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    saved = dict(os.environ)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the GCS emulator did not start (pip install gcp-storage-emulator)") from None
                time.sleep(0.1)
        os.environ.update(emulator_environment(port, workdir / "emulator-credentials.json"))
        yield f"gs://{BUCKET}"
    finally:
        os.environ.clear()
        os.environ.update(saved)
        server.terminate()
        server.wait(timeout=20)


def upload(local: Path, remote: str) -> None:
    """Copy bytes as they are (Beam would otherwise gzip a *.gz name on the way)."""
    with FileSystems.create(remote, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        handle.write(local.read_bytes())


def download(remote: str) -> bytes:
    with FileSystems.open(remote, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        return handle.read()


def listing(pattern: str) -> list[str]:
    return sorted(metadata.path for metadata in FileSystems.match([pattern])[0].metadata_list)
