"""`magiclens mine` resumes and grows by WARC file (pipeline/mine/work.py): a rerun after kill -9
reads only the unfinished files, adding files reads only the new ones, and the pairs and stage
counts equal those of one clean run over the same files. Local paths and gs:// (emulator)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from gcs_emulator import download, gcs_emulator, listing, rerun_in_private_network, upload
from magiclens.cli import main
from magiclens.pipeline.output import OutputError, check_writable

READ_LINE = re.compile(r"\bread (\S+): \d+ records")
FIRST = "warc/webarchive/ukwa_*.warc.gz"
ADDED = ("warc/webarchive/servo_Sina.warc.gz", "warc/webarchive/pywb_iana.warc.gz")
OVER_HTTP = "warc/webarchive/servo_Reddit.warc.gz"


def pair_ids(folder) -> list[str]:
    return sorted(pq.read_table(folder, columns=["pair_id"]).column("pair_id").to_pylist())


def stages(output: Path) -> dict:
    return json.loads((output / "stats.json").read_text())["stages"]


def files_read(log: str) -> set[str]:
    return set(READ_LINE.findall(log))


class GatedWarc:
    """Serves one WARC file on 127.0.0.1; while closed, a request waits until `release()`."""

    def __init__(self, path: Path):
        self.asked = threading.Event()
        self.open = threading.Event()
        gate, body = self, path.read_bytes()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                gate.asked.set()
                gate.open.wait()
                try:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the killed run's connection
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/{path.name}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.open.set()
        self.server.shutdown()


def test_a_rerun_after_kill_9_reads_only_unfinished_files_and_gives_the_pairs_of_one_clean_run(shared_data, tmp_path):
    served = GatedWarc(shared_data / OVER_HTTP)
    try:
        local = sorted(str(path) for path in (shared_data / "warc/webarchive").glob("ukwa_*.warc.gz"))
        command = [sys.executable, "-m", "magiclens", "mine", "--input", str(shared_data / FIRST), "--input", served.url,
                   "--no-fetch", "--min-side", "40"]
        out = tmp_path / "out"
        with open(tmp_path / "killed.log", "w") as log:
            killed = subprocess.Popen([*command, "--output", str(out)], stderr=log, stdout=log)
            assert served.asked.wait(300), "the run never asked for the WARC served over http"
            killed.kill()  # SIGKILL while the http WARC is being read: no cleanup runs
            killed.wait()
        done = {json.loads(path.read_text())["path"] for path in out.glob("_work/*/*/_DONE")}
        assert served.url not in done and not (out / "_SUCCESS").exists()
        served.open.set()

        resumed = subprocess.run([*command, "--output", str(out)], capture_output=True, text=True)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert files_read(resumed.stderr) == set(local + [served.url]) - done
        clean = subprocess.run([*command, "--output", str(tmp_path / "clean")], capture_output=True, text=True)
        assert clean.returncode == 0, clean.stderr[-3000:]
    finally:
        served.close()
    assert pair_ids(out / "pairs") == pair_ids(tmp_path / "clean" / "pairs")
    assert len(pair_ids(out / "pairs")) > 0
    assert stages(out) == stages(tmp_path / "clean")
    assert all(entry.get("balanced", True) for entry in stages(out).values())
    assert not list(out.glob("_RUNNING.*")) and not any((out / "_temporary").iterdir())


def test_adding_files_reads_only_the_new_ones_and_gives_the_pairs_of_one_clean_run(shared_data, tmp_path, caplog):
    caplog.set_level("INFO", logger="magiclens.warc")
    first = ["--input", str(shared_data / FIRST)]
    added = [argument for path in ADDED for argument in ("--input", str(shared_data / path))]
    common = ["--no-fetch", "--min-side", "40"]
    out = tmp_path / "out"
    assert main(["mine", *first, "--output", str(out), *common]) == 0
    caplog.clear()
    assert main(["mine", *first, *added, "--output", str(out), "--overwrite", *common]) == 0
    assert files_read(caplog.text) == {str(shared_data / path) for path in ADDED}
    assert json.loads((out / "stats.json").read_text())["warc_files"] == {"total": 6, "read_now": 2, "reused": 4}
    assert main(["mine", *first, *added, "--output", str(tmp_path / "clean"), *common]) == 0
    assert pair_ids(out / "pairs") == pair_ids(tmp_path / "clean" / "pairs")
    assert stages(out) == stages(tmp_path / "clean")
    # changed per-file settings never reuse old work
    caplog.clear()
    assert main(["mine", *first, "--output", str(out), "--overwrite", "--no-fetch", "--min-side", "41"]) == 0
    assert len(files_read(caplog.text)) == 4


def test_gcs_output_grows_by_file_and_an_unreachable_store_fails_fast(shared_data, tmp_path, caplog):
    if rerun_in_private_network(__file__, "test_gcs_output_grows_by_file_and_an_unreachable_store_fails_fast"):
        return
    # no emulator yet, no network: the probe write gives up after its timeout instead of retrying for minutes
    with pytest.raises(OutputError, match="gs://magiclens-unreachable/out"):
        check_writable("gs://magiclens-unreachable/out", timeout_s=5)
    caplog.set_level("INFO", logger="magiclens.warc")
    warcs = sorted((shared_data / "warc/webarchive").glob("ukwa_*.warc.gz"))[:3]
    with gcs_emulator(tmp_path) as bucket:
        for warc in warcs:
            upload(warc, f"{bucket}/warcs/{warc.name}")
        out = f"{bucket}/out"
        common = ["--output", out, "--no-fetch", "--min-side", "40"]
        assert main(["mine", "--input", f"{bucket}/warcs/{warcs[0].name}", "--input",
                     f"{bucket}/warcs/{warcs[1].name}", *common]) == 0
        caplog.clear()
        assert main(["mine", "--input", f"{bucket}/warcs/*.warc.gz", "--overwrite", *common]) == 0
        assert files_read(caplog.text) == {f"{bucket}/warcs/{warcs[2].name}"}
        stats = json.loads(download(f"{out}/stats.json"))
        assert stats["warc_files"] == {"total": 3, "read_now": 1, "reused": 2}
        assert stats["stages"]["warc_files"]["in"] == 3
        assert all(entry.get("balanced", True) for entry in stats["stages"].values())
        assert download(f"{out}/_SUCCESS")
        assert listing(f"{out}/_temporary/**") == [] and listing(f"{out}/_RUNNING.*") == []
