"""A run's output is all or nothing (pipeline/output.py): written aside, committed with _SUCCESS
last, claimed against a second run, refused without --overwrite, and checked before any work."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from magiclens.cli import USAGE_ERROR, main
from magiclens.pipeline import output as output_module
from magiclens.pipeline.output import (
    MANIFEST,
    SUCCESS,
    begin_run,
    check_writable,
    claim_is_stale,
    require_committed_dataset,
)

WARCS = "warc/webarchive/ukwa_*.warc.gz"


def write(path: str, text: str = "x") -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)


def files_under(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())


def refused(capsys, args: list[str], message: str) -> None:
    """The command exits with a usage error whose message holds `message`."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == USAGE_ERROR
    assert message in capsys.readouterr().err


def mine_args(shared_data: Path, output: Path, *extra: str) -> list[str]:
    return ["mine", "--input", str(shared_data / WARCS), "--output", str(output), "--no-fetch", "--min-side", "40", *extra]


def mine(shared_data: Path, output: Path, *extra: str) -> int:
    return main(["mine", "--input", str(shared_data / WARCS), "--output", str(output), "--no-fetch",
                 "--min-side", "40", *extra])


# --- commit ---------------------------------------------------------------------------------------


def test_a_commit_replaces_the_folders_of_the_last_run_whole(tmp_path):
    out = tmp_path / "out"
    first = begin_run(str(out), "test", overwrite=False)
    for shard in range(3):
        write(f"{first.temp}/pairs/part-{shard}-of-3.parquet")
    write(f"{first.temp}/stats.json", "{}")
    assert not (out / SUCCESS).exists() and not (out / "pairs").exists()  # nothing visible before the commit
    first.commit()
    assert (out / SUCCESS).read_text().strip() == first.run_id
    second = begin_run(str(out), "test", overwrite=True)
    write(f"{second.temp}/pairs/part-0-of-1.parquet")
    write(f"{second.temp}/stats.json", '{"second": 1}')
    manifest = second.commit()
    # the three shards of the first run are gone: a reader of pairs/ sees only the second run's file
    assert sorted(os.listdir(out / "pairs")) == ["part-0-of-1.parquet"]
    assert [entry["path"] for entry in manifest["files"]] == ["pairs/part-0-of-1.parquet", "stats.json"]
    assert json.loads((out / MANIFEST).read_text())["run_id"] == second.run_id
    assert not list((out / "_temporary").iterdir()) and not list(out.glob("_RUNNING.*"))


def test_mine_into_a_committed_output_refuses_without_overwrite_and_drops_stale_shards_with_it(shared_data, tmp_path,
                                                                                                capsys):
    out = tmp_path / "out"
    assert mine(shared_data, out) == 0
    stale = out / "pairs" / "part-00001-of-00002.parquet"  # a file an earlier run with two shards left
    stale.write_bytes((out / "pairs" / "part-00000-of-00001.parquet").read_bytes())
    refused(capsys, mine_args(shared_data, out), "pass --overwrite")
    assert stale.exists()  # refused before touching anything
    assert mine(shared_data, out, "--overwrite") == 0
    assert os.listdir(out / "pairs") == ["part-00000-of-00001.parquet"]
    stats = json.loads((out / "stats.json").read_text())
    assert pq.read_table(out / "pairs").num_rows == stats["stages"]["outputs"]["pairs"] > 0
    assert stats["warc_files"] == {"total": 4, "read_now": 0, "reused": 4}


def test_instruct_refuses_a_committed_output_without_overwrite(shared_data, tmp_path, capsys):
    assert mine(shared_data, tmp_path / "mined") == 0
    args = ["instruct", "--pairs", str(tmp_path / "mined" / "pairs"), "--writer", "template", "--output", str(tmp_path / "i")]
    assert main(args) == 0
    refused(capsys, args, "pass --overwrite")
    assert main([*args, "--overwrite"]) == 0
    assert (tmp_path / "i" / SUCCESS).exists() and (tmp_path / "i" / "report.html").exists()


# --- readers take only committed output ---------------------------------------------------------


def test_readers_refuse_output_whose_run_did_not_finish(shared_data, tmp_path, capsys):
    out = tmp_path / "mined"
    assert mine(shared_data, out) == 0
    (out / SUCCESS).unlink()  # as if the run were killed while committing
    refused(capsys, ["instruct", "--pairs", str(out / "pairs"), "--writer", "template", "--output", str(tmp_path / "i")],
            "_SUCCESS is missing")
    refused(capsys, ["report", str(out)], "_SUCCESS is missing")
    from magiclens.model.data import DatasetError, expand_glob

    with pytest.raises(DatasetError, match="_SUCCESS is missing"):
        expand_glob(str(out / "pairs" / "*.parquet"))
    # a folder that no run wrote is any Parquet dataset, taken as it is
    plain = tmp_path / "plain"
    plain.mkdir()
    require_committed_dataset(str(plain), "--pairs", "mine")


# --- one run at a time --------------------------------------------------------------------------


def test_a_second_run_into_a_held_output_refuses_with_the_holder(tmp_path):
    out = str(tmp_path / "out")
    holder = begin_run(out, "mine", overwrite=False)
    with pytest.raises(SystemExit, match=f"being written by another run: mine run {holder.run_id}"):
        begin_run(out, "instruct", overwrite=False)
    assert [path.name for path in Path(out).glob("_RUNNING.*")] == [f"_RUNNING.{holder.run_id}.json"]
    holder.abandon()
    begin_run(out, "mine", overwrite=False).abandon()


def test_the_claim_of_a_run_killed_with_sigkill_is_cleaned_by_the_next_run(tmp_path):
    out = str(tmp_path / "out")
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from magiclens.pipeline.output import begin_run\n"
        f"run = begin_run({out!r}, 'mine', overwrite=False)\n"
        "Path(run.temp, 'pairs').mkdir(parents=True)\n"
        "Path(run.temp, 'pairs', 'beam-temp-x').write_text('half written')\n"
        "print(run.run_id, flush=True)\n"
        "time.sleep(600)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    killed_id = child.stdout.readline().strip()
    child.kill()  # SIGKILL: no cleanup runs
    child.wait()
    assert Path(out, f"_RUNNING.{killed_id}.json").exists() and Path(out, "_temporary", killed_id).exists()
    run = begin_run(out, "mine", overwrite=False)
    assert not Path(out, f"_RUNNING.{killed_id}.json").exists()
    assert os.listdir(Path(out, "_temporary")) == [] or os.listdir(Path(out, "_temporary")) == [run.run_id]
    run.abandon()


def test_claims_from_other_hosts_are_stale_only_without_a_heartbeat(tmp_path):
    now = time.time()
    fresh = {"run_id": "r", "host": "elsewhere", "pid": 1, "started": now - 7200, "heartbeat": now - 30}
    assert not claim_is_stale(fresh, now)
    assert claim_is_stale({**fresh, "heartbeat": now - output_module.STALE_AFTER_S - 1}, now)
    dead_here = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert claim_is_stale({**fresh, "host": socket.gethostname(), "pid": int(dead_here.stdout)}, now)
    out = tmp_path / "out"
    out.mkdir()
    (out / "_RUNNING.old.json").write_text(json.dumps({**fresh, "run_id": "old", "heartbeat": now - 3600}))
    begin_run(str(out), "mine", overwrite=False).abandon()
    assert not (out / "_RUNNING.old.json").exists()
    (out / "_RUNNING.live.json").write_text(json.dumps({**fresh, "run_id": "live"}))
    with pytest.raises(SystemExit, match="run live on elsewhere"):
        begin_run(str(out), "mine", overwrite=False)


def test_a_killed_overwrite_leaves_the_last_committed_output_whole(shared_data, tmp_path):
    out = tmp_path / "out"
    assert mine(shared_data, out) == 0
    before = {name: (out / name).read_bytes() for name in files_under(out) if not name.startswith("_")}
    interrupted = begin_run(str(out), "mine", overwrite=True)
    write(f"{interrupted.temp}/stats.json", '{"half": true}')
    # the process dies here (no commit); readers still see the last committed run, untouched
    assert (out / SUCCESS).exists()
    assert {name: (out / name).read_bytes() for name in before} == before
    interrupted._stop.set()
    Path(interrupted.claim_path).write_text(json.dumps({**interrupted.claim(), "host": "gone", "heartbeat": 0}))
    assert mine(shared_data, out, "--overwrite") == 0
    assert not (out / "_temporary" / interrupted.run_id).exists()


# --- fail early -------------------------------------------------------------------------------


def test_a_file_in_the_way_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match="is a file, not a folder"):
        check_writable(str(tmp_path / "file" / "out"))
    refused(capsys, ["mine", "--input", str(tmp_path / "file"), "--output", str(tmp_path / "file" / "out"), "--no-fetch"],
            "is a file, not a folder")


def test_a_name_too_long_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="longer than 255 bytes"):
        check_writable(str(tmp_path / ("n" * 300)))


def test_dot_dot_through_a_missing_folder_is_a_clear_error_and_leaves_nothing(tmp_path):
    with pytest.raises(SystemExit, match="cannot go through it"):
        check_writable(str(tmp_path / "missing" / ".." / "out"))
    assert list(tmp_path.iterdir()) == []


def test_a_missing_parent_is_created(tmp_path):
    check_writable(str(tmp_path / "a" / "b" / "out"))
    assert (tmp_path / "a" / "b" / "out").is_dir()


def test_a_read_only_folder_is_a_clear_error(tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    # root writes through permission bits: as root the folder is made immutable instead
    locked = subprocess.run(["chattr", "+i", str(folder)], capture_output=True) if os.geteuid() == 0 else None
    if locked is not None and locked.returncode != 0:
        pytest.skip("running as root where chattr +i is not available: no folder root cannot write")
    if locked is None:
        folder.chmod(0o555)
    try:
        with pytest.raises(SystemExit, match="cannot be written: (permission denied|operation not permitted)"):
            check_writable(str(folder / "out"))
    finally:
        subprocess.run(["chattr", "-i", str(folder)]) if locked is not None else folder.chmod(0o755)


def test_s3_without_boto3_is_a_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(output_module, "find_spec", lambda name: None)
    with pytest.raises(SystemExit, match=r"pip install 'magiclens\[s3\]'"):
        check_writable("s3://bucket/out")
    refused(capsys, ["mine", "--input", "s3://bucket/x.warc.gz", "--output", str(tmp_path / "o"), "--no-fetch"],
            "pip install 'magiclens[s3]'")


def test_gcs_data_for_train_without_gcsfs_is_a_clear_error(monkeypatch):
    import fsspec

    from magiclens.model.data import DatasetError, expand_glob

    def no_gcsfs(*args, **kwargs):
        raise ImportError("Install gcsfs to access Google Storage")

    monkeypatch.setattr(fsspec.core, "url_to_fs", no_gcsfs)
    with pytest.raises(DatasetError, match=r"pip install 'magiclens\[gcp\]'"):
        expand_glob("gs://bucket/triplets/*.parquet")


def test_file_urls_work_for_input_and_output(shared_data, tmp_path):
    assert main(["mine", "--input", f"file://{shared_data / WARCS}", "--output", f"file://{tmp_path / 'out'}",
                 "--no-fetch", "--min-side", "40"]) == 0
    assert (tmp_path / "out" / SUCCESS).exists()
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["stages"]["warc_files"]["in"] == 4
