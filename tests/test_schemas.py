"""The pairs and triplets Parquet files as Hugging Face `datasets` and the trainer read them, and the
dataset card written beside them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from magiclens.cli import main
from magiclens.model.data import DataPosition, TripletBatches, plan_row_groups
from magiclens.model.tokenizer import bundled_clip_tokenizer
from magiclens.pipeline import schemas
from magiclens.pipeline.card import card_text

os.environ["HF_DATASETS_OFFLINE"] = "1"  # before `datasets` is imported: never the network
datasets = pytest.importorskip("datasets")

# A shared WARC that holds its pages' images (UKWA, Wikipedia 2012), and one with many small pages.
WARCS = ("warc/webarchive/ukwa_*wikipedia*.warc.gz", "warc/webarchive/aut_example.warc.gz")


@pytest.fixture(scope="module")
def run(shared_data, tmp_path_factory) -> Path:
    """A real `magiclens mine` + `magiclens instruct --writer template` run."""
    output = tmp_path_factory.mktemp("hf")
    args = ["mine", "--output", str(output / "mined"), "--no-fetch", "--min-side", "64", "--runner=FnApiRunner"]
    for pattern in WARCS:
        args += ["--input", str(shared_data / pattern)]
    assert main(args) == 0
    assert main(["instruct", "--pairs", str(output / "mined" / "pairs"), "--output", str(output / "instructed"),
                 "--writer", "template", "--runner=FnApiRunner"]) == 0
    return output


def _features(schema: pa.Schema) -> dict:
    """What `datasets` itself makes of the schema, with Image() for the image columns."""
    features = datasets.Features.from_arrow_schema(schema.remove_metadata())
    for column in ("query_image", "target_image"):
        features[column] = datasets.Image()
    return features.to_dict()


@pytest.mark.parametrize("schema", [schemas.PAIRS, schemas.TRIPLETS], ids=["pairs", "triplets"])
def test_schemas_carry_the_huggingface_features_datasets_would_write(schema):
    metadata = json.loads(schema.metadata[b"huggingface"])
    assert metadata == {"info": {"features": _features(schema)}}
    features = datasets.Features.from_arrow_schema(schema)
    assert isinstance(features["query_image"], datasets.Image) and isinstance(features["target_image"], datasets.Image)
    assert features.arrow_schema.remove_metadata() == schema.remove_metadata()


def test_schema_versions_were_bumped_for_provenance():
    assert (schemas.PAIRS_SCHEMA_VERSION, schemas.TRIPLETS_SCHEMA_VERSION) == ("3", "2")
    assert schemas.PAIRS.metadata[b"magiclens.schema_version"] == b"3"
    assert schemas.TRIPLETS.metadata[b"magiclens.schema_version"] == b"2"


@pytest.mark.parametrize("folder", ["mined/pairs", "instructed/triplets"])
def test_load_dataset_reads_the_images_of_a_real_run_as_pil_images(run, folder, tmp_path):
    files = sorted(str(f) for f in (run / folder).glob("*.parquet"))
    data = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path))
    assert data.num_rows == pq.ParquetDataset(files).read().num_rows >= 3
    for row in data.select(range(3)):
        for side in ("query", "target"):
            image = row[f"{side}_image"]
            assert isinstance(image, Image.Image) and image.mode == "RGB"
            assert image.size == (row[f"{side}_width"], row[f"{side}_height"])
        assert row["page_record_id"].startswith("<urn:uuid:") and row["page_date"]


def _train_batches(pattern: str) -> tuple[list[str], dict]:
    """The triplet ids the trainer's loader yields, and what it skipped by reason."""
    batches = TripletBatches(plan_row_groups(pattern), bundled_clip_tokenizer(), 8, 16, num_workers=0,
                             shuffle=False, repeat=False)
    position = DataPosition()
    ids = []
    for batch in batches:
        position.advance(batch)
        ids += batch["triplet_id"]
    return ids, position.rejects()


def test_the_trainer_reads_the_triplets_of_a_real_run(run):
    pattern = str(run / "instructed" / "triplets" / "*.parquet")
    ids, rejects = _train_batches(pattern)
    assert sorted(ids) == sorted(pq.ParquetDataset(pattern.removesuffix("/*.parquet")).read()["triplet_id"].to_pylist())
    assert rejects == {}


def test_the_trainer_reads_images_stored_as_plain_binary(shared_data, tmp_path):
    """As img2dataset and many other tools write them: binary columns, not struct<bytes, path>."""
    photos = [(shared_data / "images/photos/skimage/chelsea.png").read_bytes(),
              (shared_data / "images/photos/matplotlib/grace_hopper.jpg").read_bytes()]
    path = tmp_path / "binary.parquet"
    pq.write_table(pa.table({
        "triplet_id": ["a", "b", "c"],
        "query_image": pa.array([photos[0], photos[1], b""], pa.binary()),
        "instruction": ["the cat", "the woman", "nothing"],
        "target_image": pa.array([photos[1], photos[0], photos[0]], pa.binary()),
    }), path)
    assert _train_batches(str(path)) == (["a", "b"], {"query_image_missing": 1})


@pytest.mark.parametrize("kind", ["mined", "instructed"])
def test_each_run_writes_a_dataset_card_the_hub_and_markdown_read(run, kind):
    card = (run / kind / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    folder = "pairs" if kind == "mined" else "triplets"
    assert meta["license"] == "other"
    assert meta["configs"][0]["data_files"] == [{"split": "train", "path": f"{folder}/*.parquet"}]
    assert "image-to-image" in meta["task_categories"] and "magiclens" in meta["tags"]
    stats = json.loads((run / kind / "stats.json").read_text())
    rows = stats["stages"]["outputs"][folder]
    assert f"- rows: {rows} in `{folder}/*.parquet`" in body
    markdown = pytest.importorskip("markdown")
    html = markdown.markdown(body, extensions=["tables", "fenced_code"])
    for heading in ("Funnel", "Configuration", "Licence and opt-outs", "Loading", "Columns"):
        assert f">{heading}</h2>" in html
    assert "<table>" in html and "load_dataset" in html
    if kind == "instructed":
        assert f"prompt: `{stats['prompt_id']}`" in body


def test_a_card_for_an_unknown_command_is_refused():
    with pytest.raises(ValueError, match="no dataset card"):
        card_text({"command": "train", "stages": {}})
