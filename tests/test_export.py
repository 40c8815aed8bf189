"""`magiclens export --format webdataset` on triplets from a real `mine` + `instruct --writer template`
run on a shared WARC, both run through the Python API (magiclens.api)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset
from PIL import Image

from magiclens import api
from magiclens.cli import main

WARC = "warc/webarchive/ukwa_sopa-wikipedia-homepage.warc.gz"


@pytest.fixture(scope="module")
def instructed(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    root = tmp_path_factory.mktemp("api")
    mined = api.mine(inputs=[str(shared_data / WARC)], output=str(root / "mined"), no_fetch=True, min_side=64,
                     beam_options=["--runner=FnApiRunner"])
    # the mine output directory, not its pairs/ folder: instruct finds the pairs in it
    stats = api.instruct(pairs=str(root / "mined"), output=str(root / "instructed"), writer="template")
    return root / "instructed", mined, stats


def read_triplets(folder: Path) -> list[dict]:
    return pq.ParquetDataset(sorted(str(p) for p in (folder / "triplets").glob("*.parquet"))).read().to_pylist()


def test_the_api_runs_mine_then_instruct_and_returns_their_stats(instructed) -> None:
    folder, mined, stats = instructed
    assert mined["command"] == "mine" and mined["stages"]["outputs"]["pairs"] >= 2
    assert stats["command"] == "instruct"
    assert stats["stages"]["instruct"]["in"] == mined["stages"]["outputs"]["pairs"]
    assert stats["stages"]["outputs"]["triplets"] == len(read_triplets(folder)) >= 2


def test_the_api_refuses_a_mistyped_option_before_running(tmp_path: Path) -> None:
    with pytest.raises(api.CommandError, match="--no-fecth") as refused:
        api.mine(inputs=["x.warc.gz"], output=str(tmp_path / "out"), no_fecth=True)
    assert refused.value.exit_code == 2
    assert not (tmp_path / "out").exists()


def test_webdataset_shards_round_trip(instructed, tmp_path: Path) -> None:
    folder, _, _ = instructed
    triplets = {row["triplet_id"]: row for row in read_triplets(folder)}
    shards = tmp_path / "shards"
    argv = ["export", "--format", "webdataset", "--shard-size", "2", "--input", str(folder), "--output", str(shards)]
    assert main(argv) == 0
    summary = json.loads((shards / "export.json").read_text())
    assert summary["in"] == summary["out"] == len(triplets) and summary["rejected"] == {}
    tars = sorted(shards.glob("*.tar"))
    assert [path.name for path in tars] == summary["shards"] and len(tars) == -(-len(triplets) // 2)

    samples = list(webdataset.WebDataset([str(path) for path in tars], shardshuffle=False).decode("pil"))
    assert sorted(sample["__key__"] for sample in samples) == sorted(triplets)
    for sample in samples:
        row = triplets[sample["__key__"]]
        assert sample["txt"] == row["instruction"]
        for side in ("query", "target"):
            image = sample[f"{side}.jpg"]
            assert isinstance(image, Image.Image)
            stored = Image.open(io.BytesIO(row[f"{side}_image"]["bytes"]))
            assert image.size == stored.size and image.mode == "RGB"
        meta = sample["json"]
        assert meta["triplet_id"] == row["triplet_id"] and meta["pair_id"] == row["pair_id"]
        assert meta["query_url"] == row["query_url"] and "query_image" not in meta and "instruction" not in meta
    # the stored JPEG bytes go into the tar untouched
    raw = next(iter(webdataset.WebDataset([str(tars[0])], shardshuffle=False)))
    assert raw["query.jpg"] == triplets[raw["__key__"]]["query_image"]["bytes"]


def test_export_says_why_when_nothing_can_be_written(instructed, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit, match="no triplet Parquet files") as stopped:
        main(["export", "--input", str(tmp_path / "nothing"), "--output", str(tmp_path / "out")])
    assert stopped.value.code == 2
    with pytest.raises(SystemExit, match="--shard-size must be at least 1"):
        main(["export", "--input", str(instructed[0]), "--output", str(tmp_path / "out"), "--shard-size", "0"])
