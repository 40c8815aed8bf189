"""gs:// in tests: the gcp-storage-emulator server on 127.0.0.1, inside a private network namespace.

Beam's GCS filesystem builds a google-cloud-storage client, which sends every request to
STORAGE_EMULATOR_HOST when that is set. Beam first looks for Google credentials (and, finding none,
retries for about 30 s before going anonymous), so the tests give it an offline token that never
needs refreshing: the emulator ignores it, and nothing else is reachable anyway.

A test that touches gs:// runs again inside `unshare -rn` (a new user and network namespace where
only loopback exists), so a mistake can never reach Google: `rerun_in_private_network`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

ROOT = Path(__file__).resolve().parent.parent
IN_PRIVATE_NETWORK = os.environ.get("MAGICLENS_TEST_PRIVATE_NETWORK") == "1"
BUCKET = "magiclens-test"
PROJECT = "magiclens-test"


def rerun_in_private_network(test_file: str, test_name: str) -> bool:
    """Outside a namespace: run the test again inside a new one, assert it passed, and return True.

    Inside (the rerun), check that only loopback exists and return False: the caller runs its body.
    """
    if IN_PRIVATE_NETWORK:
        assert [name for _, name in socket.if_nameindex()] == ["lo"], "not in a private network namespace"
        return False
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode:
        pytest.fail("gs:// tests need `unshare -rn` (user and network namespaces) so that no packet can leave")
    command = [
        "unshare", "-rn", "sh", "-c", 'ip link set lo up && exec "$0" -m pytest -q -p no:cacheprovider "$1"',
        sys.executable, f"{test_file}::{test_name}",
    ]
    environment = {**os.environ, "MAGICLENS_TEST_PRIVATE_NETWORK": "1"}
    finished = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert finished.returncode == 0, finished.stdout[-8000:] + finished.stderr[-4000:]
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
