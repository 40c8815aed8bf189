"""The `magiclens` command line: unknown and mistyped flags, exit codes, runs that write nothing."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from magiclens.cli import main, parse_command
from test_instruct import write_pairs

ROOT = Path(__file__).resolve().parent.parent
WARC = "warc/webarchive/ukwa_sopa-wikipedia-homepage.warc.gz"


def usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run argv, which must fail as a usage error (exit status 2); returns stderr."""
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2  # argparse's errors, and UsageError after parsing
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("mistyped", "meant"),
    [(["--no-fecth"], "--no-fetch"), (["--min-sid", "64"], "--min-side"), (["--fetch-per-hots", "2"], "--fetch-per-host")],
)
def test_a_mistyped_flag_fails_before_any_work(mistyped, meant, shared_data, tmp_path, capsys) -> None:
    output = tmp_path / "mined"
    err = usage_error(["mine", "--input", str(shared_data / WARC), "--output", str(output), *mistyped], capsys)
    assert f"unrecognized arguments: {mistyped[0]}" in err and "Beam pipeline option" in err
    assert f"did you mean {meant}?" in err
    assert not output.exists()  # nothing ran


def test_the_console_command_exits_2_on_a_mistyped_flag(tmp_path) -> None:
    probe = "from magiclens.cli import main; raise SystemExit(main())"
    done = subprocess.run([sys.executable, "-c", probe, "mine", "--output", str(tmp_path / "m"), "--no-fecth"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "--no-fecth" in done.stderr and not (tmp_path / "m").exists()
    done = subprocess.run([sys.executable, "-c", probe, "train", "--data", "d", "--output", str(tmp_path / "t"), "--steps", "0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "--steps must be at least 1" in done.stderr


def test_beam_options_pass_and_unknown_ones_do_not(tmp_path, capsys) -> None:
    base = ["--pairs", str(tmp_path), "--output", str(tmp_path / "out")]
    _, _, extra = parse_command("instruct", base + ["--runner=FnApiRunner", "--direct_num_workers", "2"])
    assert extra == ["--runner=FnApiRunner", "--direct_num_workers", "2"]
    err = usage_error(["instruct", *base, "--direct-num-workers=2"], capsys)
    assert "--direct-num-workers" in err
    # prefixes of Beam options are not Beam options either
    assert "--direct_num" in usage_error(["instruct", *base, "--direct_num=2"], capsys)


def test_commands_without_beam_options_refuse_unknown_flags(capsys) -> None:
    err = usage_error(["search", "--index", "i", "--checkpoint", "c", "--image", "x.jpg", "--instructoin", "red"], capsys)
    assert "--instructoin" in err and "did you mean --instruction?" in err
    usage_error(["search", "--index", "i", "--checkpoint", "c", "--imag", "x.jpg"], capsys)  # no prefix matching


def test_usage_errors_exit_2_in_every_command(shared_data, tmp_path, capsys) -> None:
    warc = str(shared_data / WARC)
    err = usage_error(["mine", "--input", warc, "--output", str(tmp_path / "m"), "--max-side", "0"], capsys)
    assert "magiclens mine: error: --max-side must be at least 1" in err
    usage_error(["mine", "--input", str(tmp_path / "none-*.warc.gz"), "--output", str(tmp_path / "m")], capsys)
    err = usage_error(["instruct", "--pairs", str(tmp_path / "nothing"), "--output", str(tmp_path / "i")], capsys)
    assert "run `magiclens mine` first" in err
    for argv in (["mine"], ["instruct", "--pairs", "p"], ["train", "--data", "d"], ["evaluate"], ["index"], ["serve"],
                 ["export", "--input", "x"], ["report"]):
        usage_error(argv, capsys)
    usage_error(["--log-level", "LOUD", "mine"], capsys)


def test_a_parquet_file_given_as_a_warc_says_so_and_fails(tmp_path, capsys) -> None:
    table = pa.table({"a": [1, 2, 3]})
    pq.write_table(table, tmp_path / "data.parquet")
    assert main(["mine", "--input", str(tmp_path / "data.parquet"), "--output", str(tmp_path / "m"), "--no-fetch"]) == 1
    err = capsys.readouterr().err
    assert "no pairs written: none of the 1 input file(s) could be read" in err and "not a WARC file" in err


def test_a_wat_file_says_so_and_fails(shared_data, tmp_path, capsys) -> None:
    wat = shared_data / "warc/commoncrawl/cc-whirlwind_whirlwind.warc.wat.gz"
    assert main(["mine", "--input", str(wat), "--output", str(tmp_path / "m"), "--no-fetch"]) == 1
    err = capsys.readouterr().err
    assert "is a WAT or WET file" in err and "not .warc.wat.gz" in err


def test_an_unreachable_llm_endpoint_is_refused_before_the_run(shared_data, tmp_path, capsys) -> None:
    pairs = write_pairs(tmp_path / "mined" / "pairs", shared_data, [("p-1", "astronaut", "coffee", "an espresso cup")])
    with socket.socket() as probe:  # a port on 127.0.0.1 that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = ["instruct", "--pairs", str(tmp_path / "mined"), "--output", str(tmp_path / "out"), "--writer", "openai",
            "--model", "m", "--endpoint", f"http://127.0.0.1:{port}/v1"]
    err = usage_error(argv, capsys)
    assert f"--endpoint http://127.0.0.1:{port}/v1: no answer from http://127.0.0.1:{port}/v1/models" in err
    assert not (tmp_path / "out" / "triplets").exists() and pairs.is_dir()


def test_train_help_shows_defaults(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "optimizer steps to train in total (default: 1000)" in text


@pytest.mark.parametrize(
    "command", ["instruct", "export", "train", "evaluate", "index", "search", "serve", "convert-official", "mine", "report"]
)
def test_help_imports_no_heavy_library(command) -> None:
    """`--help` reads only the options: no torch, transformers, nor Beam."""
    probe = (
        "import sys\nfrom magiclens.cli import main\n"
        f"try:\n    main([{command!r}, '--help'])\nexcept SystemExit:\n    pass\n"
        "print(*(name in sys.modules for name in ('torch', 'transformers', 'apache_beam')))"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "False False False"


# Runs `magiclens ARGV...` in a fresh interpreter; prints the exit status, then whether Beam and torch were imported.
IMPORTS_PROBE = """
import sys
from magiclens.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as stop:
    code = stop.code
print(code, "apache_beam" in sys.modules, "torch" in sys.modules)
"""


def run_probe(argv: list[str]) -> tuple[str, str]:
    """(exit status and imports as printed by IMPORTS_PROBE, stderr)."""
    done = subprocess.run([sys.executable, "-c", IMPORTS_PROBE, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.splitlines()[-1], done.stderr


def test_option_errors_of_mine_and_report_import_neither_beam_nor_torch(tmp_path) -> None:
    status, err = run_probe(["mine", "--input", "x.warc.gz", "--max-side", "big", "--output", str(tmp_path / "m")])
    assert status == "2 False False" and "--max-side: invalid int value: 'big'" in err
    status, err = run_probe(["mine", "--input", "x.warc.gz"])
    assert status == "2 False False" and "the following arguments are required: --output" in err
    status, err = run_probe(["report", str(tmp_path), "--samples", "many"])
    assert status == "2 False False" and "--samples: invalid int value: 'many'" in err
    status, err = run_probe(["report", str(tmp_path), "--sample", "3"])
    assert status == "2 False False" and "did you mean --samples?" in err


def test_the_template_writer_runs_without_torch(shared_data, tmp_path) -> None:
    """The rule-based writer needs no model: its run never imports torch (which RunInference does)."""
    pairs = write_pairs(tmp_path / "mined" / "pairs", shared_data, [
        ("p-cup", "astronaut", "coffee", "an espresso cup on a saucer"),
        ("p-none", "chelsea", "rocket", ""),  # no target text: rejected as no_target_text
    ])
    status, err = run_probe(["instruct", "--pairs", str(pairs), "--output", str(tmp_path / "out"), "--writer", "template"])
    assert status == "0 True False", err[-3000:]
    triplets = pq.read_table(tmp_path / "out" / "triplets").to_pylist()
    assert [(row["pair_id"], row["writer"]) for row in triplets] == [("p-cup", "template")]
    assert "espresso cup on a saucer" in triplets[0]["instruction"]
    rejects = pq.read_table(tmp_path / "out" / "rejects").to_pylist()
    assert [(row["element_id"], row["reason"]) for row in rejects] == [("p-none", "no_target_text")]


def test_log_level_is_global_and_per_command(tmp_path, capsys) -> None:
    import logging

    usage_error(["--log-level", "error", "export", "--input", str(tmp_path / "none"), "--output", str(tmp_path / "o")], capsys)
    assert logging.getLogger("magiclens").level == logging.ERROR
    usage_error(["export", "--input", str(tmp_path / "none"), "--output", str(tmp_path / "o"), "--log-level", "DEBUG"], capsys)
    assert logging.getLogger("magiclens").level == logging.DEBUG
    logging.getLogger("magiclens").setLevel(logging.INFO)


def test_progress_off_a_terminal_is_logged(caplog) -> None:
    from magiclens.model.progress import counted

    with caplog.at_level("INFO", logger="magiclens.progress"):
        batches = list(counted(iter([[1, 2], [3]]), 3, "indexing", "img", len))
    assert batches == [[1, 2], [3]]
    lines = [record.getMessage() for record in caplog.records]
    assert lines[0] == "indexing: 3 img to do" and lines[-1].startswith("indexing: 3/3 img in ")
