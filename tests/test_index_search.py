"""`magiclens index` then `magiclens search` on the shared photos, with a tiny random model."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from magiclens.model import index, search
from magiclens.model.checkpoint import build_model, load_checkpoint, save_checkpoint
from magiclens.model.index import LoadedIndex, load_index
from magiclens.model.preprocess import images_to_model_input

CHROMIUM = Path("/usr/bin/chromium")


def run_command(module: object, argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)  # type: ignore[attr-defined]
    return module.run(parser.parse_args(argv), [])  # type: ignore[attr-defined]


def run_json(module: object, argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    capsys.readouterr()
    assert run_command(module, argv + ["--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # exactly one JSON object
    return json.loads(out)


@pytest.fixture(scope="module")
def photos(shared_data: Path) -> Path:
    return shared_data / "images" / "photos"


@pytest.fixture(scope="module")
def photo_index(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path, photos: Path) -> Path:
    output = tmp_path_factory.mktemp("index") / "photos"
    argv = ["--checkpoint", str(tiny_checkpoint), "--images", str(photos), "--output", str(output)]
    assert run_command(index, argv + ["--batch-size", "4", "--shard-size", "8", "--num-workers", "1"]) == 0
    return output


def all_scores(checkpoint: Path, index_dir: Path, image: Path, instruction: str) -> list[tuple[float, str]]:
    """Every indexed image's score, computed here from the shard files, best first."""
    model, _, preprocess = load_checkpoint(checkpoint)
    query = model.embed(images_to_model_input([image.read_bytes()], preprocess), [instruction])[0].numpy()
    scored = []
    for vectors_file in sorted((index_dir / "shards").glob("*.npy")):
        items = json.loads(vectors_file.with_suffix(".json").read_text())["items"]
        vectors = np.load(vectors_file).astype(np.float32)
        scored += [(float(v @ query), item["id"]) for v, item in zip(vectors, items)]
    return sorted(scored, reverse=True)


def test_index_then_search_returns_k_ranked_results(
    photo_index: Path, tiny_checkpoint: Path, photos: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    loaded = load_index(photo_index)
    photo_files = sorted(str(p.resolve()) for p in photos.rglob("*") if p.is_file())
    assert sorted(item["id"] for items in loaded.items for item in items) == photo_files
    assert len(loaded.vectors) == 3  # 24 photos in shards of 8
    assert all(v.dtype == np.float16 for v in loaded.vectors)

    coffee = photos / "skimage" / "coffee.png"
    base = ["--index", str(photo_index), "--checkpoint", str(tiny_checkpoint), "--image", str(coffee)]
    report = run_json(search, base + ["-k", "5"], capsys)
    results = report["results"]
    assert [r["rank"] for r in results] == [1, 2, 3, 4, 5]
    # with no instruction the query is embedded exactly as its indexed copy: it comes first
    assert results[0]["id"] == str(coffee.resolve()) and results[0]["score"] == pytest.approx(1.0, abs=2e-3)

    report = run_json(search, base + ["--instruction", "the same cup, seen from above", "-k", "5"], capsys)
    expected = all_scores(tiny_checkpoint, photo_index, coffee, "the same cup, seen from above")
    assert [r["id"] for r in report["results"]] == [image_id for _, image_id in expected[:5]]
    assert [r["score"] for r in report["results"]] == pytest.approx([score for score, _ in expected[:5]], abs=1e-5)
    assert report["query"]["instruction"] == "the same cup, seen from above" and report["index_size"] == 24

    # chunked scoring keeps the same top k; k beyond the corpus returns the whole corpus
    chunked = run_json(search, base + ["--instruction", "the same cup, seen from above", "-k", "5", "--chunk-rows", "3"], capsys)
    assert [r["id"] for r in chunked["results"]] == [r["id"] for r in report["results"]]
    everything = run_json(search, base + ["-k", "100"], capsys)
    assert len(everything["results"]) == 24 and len({r["id"] for r in everything["results"]}) == 24


def test_index_resumes_after_an_interruption(tmp_path: Path, tiny_checkpoint: Path, photos: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "index"
    argv = ["--checkpoint", str(tiny_checkpoint), "--images", str(photos), "--output", str(output), "--batch-size", "4", "--shard-size", "8", "--num-workers", "0"]
    first = run_json(index, argv, capsys)
    assert (first["embedded"], first["total"], first["already_indexed"]) == (24, 24, 0)
    last_record = sorted((output / "shards").glob("*.json"))[-1]
    lost = len(json.loads(last_record.read_text())["items"])
    before = {item["id"]: vector for items, vectors in zip(load_index(output).items, load_index(output).vectors) for item, vector in zip(items, vectors)}
    last_record.unlink()  # as if the run had stopped between writing a shard's .npy and its .json
    meta = json.loads((output / "index.json").read_text())
    (output / "index.json").write_text(json.dumps({**meta, "finished": False}))  # as a stopped run leaves it

    resumed = run_json(index, argv, capsys)
    assert (resumed["embedded"], resumed["already_indexed"], resumed["total"]) == (lost, 24 - lost, 24)
    after = load_index(output)
    ids = [item["id"] for items in after.items for item in items]
    assert len(ids) == len(set(ids)) == 24
    for items, vectors in zip(after.items, after.vectors):
        for item, vector in zip(items, vectors):
            np.testing.assert_array_equal(vector, before[item["id"]])

    capsys.readouterr()
    assert run_command(index, argv) == 2  # a finished index is extended only on request
    assert "pass --append" in capsys.readouterr().err
    again = run_json(index, argv + ["--append"], capsys)
    assert (again["embedded"], again["already_indexed"]) == (0, 24)


def test_index_counts_rejects_and_duplicates(tmp_path: Path, tiny_checkpoint: Path, shared_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copy(shared_data / "images" / "photos" / "skimage" / "coffee.png", corpus / "coffee.png")
    shutil.copy(shared_data / "images" / "photos" / "skimage" / "coffee.png", corpus / "coffee-copy.png")
    shutil.copy(shared_data / "images" / "photos" / "skimage" / "rocket.jpg", corpus / "rocket.jpg")
    for broken in ("pillow_truncated_jpeg.jpg", "imagededup_ukbench09268_corrupt.jpg"):
        shutil.copy(shared_data / "images" / "edgecases" / broken, corpus / broken)
    output = tmp_path / "index"
    report = run_json(index, ["--checkpoint", str(tiny_checkpoint), "--images", str(corpus / "*"), "--output", str(output), "--num-workers", "0"], capsys)
    assert report == {
        "embedded": 2,
        "already_indexed": 0,
        "duplicates": 1,
        "rejected": 2,
        "rejected_by_reason": {"undecodable": 2},
        "total": 2,
    }
    record = json.loads(next((output / "shards").glob("*.json")).read_text())
    assert sorted(Path(r["id"]).name for r in record["rejected"]) == ["imagededup_ukbench09268_corrupt.jpg", "pillow_truncated_jpeg.jpg"]
    assert all(r["detail"] for r in record["rejected"])
    (duplicate,) = record["duplicates"]
    assert {Path(duplicate["id"]).name, Path(duplicate["of"]).name} == {"coffee.png", "coffee-copy.png"}
    # the rejected and the duplicate are accounted for: a second run does not try them again
    again = run_json(index, ["--checkpoint", str(tiny_checkpoint), "--images", str(corpus / "*"), "--output", str(output), "--num-workers", "0", "--append"], capsys)
    assert (again["embedded"], again["already_indexed"], again["rejected"]) == (0, 5, 0)


def test_index_a_parquet_image_column(tmp_path: Path, tiny_checkpoint: Path, photos: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = sorted(p for p in photos.rglob("*") if p.is_file())[:5]
    images = [{"bytes": p.read_bytes(), "path": p.name} for p in files] + [{"bytes": None, "path": "gone.jpg"}]
    table = pa.table({"name": [p.name for p in files] + ["gone"], "target_image": images})
    parquet = tmp_path / "triplets.parquet"
    pq.write_table(table, parquet, row_group_size=2)
    output = tmp_path / "index"
    argv = ["--checkpoint", str(tiny_checkpoint), "--images", str(parquet), "--output", str(output), "--num-workers", "1", "--batch-size", "3"]
    capsys.readouterr()
    assert run_command(index, argv) == 2
    error = capsys.readouterr().err
    assert "no column 'image'" in error and "target_image" in error
    report = run_json(index, argv + ["--image-column", "target_image"], capsys)
    assert (report["embedded"], report["rejected_by_reason"]) == (5, {"unreadable": 1})

    # a row's embedding is that of the same bytes read from a file
    model, _, preprocess = load_checkpoint(tiny_checkpoint)
    loaded = load_index(output)
    for items, vectors in zip(loaded.items, loaded.vectors):
        for item, vector in zip(items, vectors):
            assert item["id"] == f"{parquet.resolve()}#target_image:{item['row']}"
            expected = model.embed(images_to_model_input([files[item["row"]].read_bytes()], preprocess), [""])[0]
            np.testing.assert_allclose(vector.astype(np.float32), expected.numpy(), atol=2e-3)

    page = tmp_path / "page.html"
    query = ["--index", str(output), "--checkpoint", str(tiny_checkpoint), "--image", str(files[0]), "-k", "3", "--html", str(page)]
    assert run_command(search, query) == 0
    assert page.read_text().count("data:image/jpeg;base64,") == 4  # the query and three results


def render(page: Path, profile: Path) -> str:
    """The page's DOM after load in headless Chromium, each <img> annotated with its naturalWidth."""
    probe = page.with_name("probe.html")
    script = (
        '<img id="broken" src="data:image/jpeg;base64,AAAA">'
        '<script>window.addEventListener("load", () => {'
        ' for (const img of document.images) img.setAttribute("data-natural-width", img.naturalWidth);'
        ' document.body.setAttribute("data-loaded", "yes"); });</script></body>'
    )
    probe.write_text(page.read_text().replace("</body>", script))
    command = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--dump-dom", probe.as_uri(),
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout


@pytest.mark.skipif(not CHROMIUM.is_file(), reason="needs Debian's chromium at /usr/bin/chromium")
def test_search_html_renders_in_chromium(photo_index: Path, tiny_checkpoint: Path, photos: Path, tmp_path: Path) -> None:
    page = tmp_path / "results.html"
    argv = [
        "--index", str(photo_index), "--checkpoint", str(tiny_checkpoint),
        "--image", str(photos / "skimage" / "astronaut.png"), "--instruction", "the <same> person & place", "-k", "6", "--html", str(page),
    ]  # fmt: skip
    assert run_command(search, argv) == 0
    html = page.read_text()
    assert "src=\"http" not in html and "file:" not in html  # self-contained
    assert "the &lt;same&gt; person &amp; place" in html
    dom = render(page, tmp_path / "profile")
    assert 'data-loaded="yes"' in dom
    widths = [int(w) for w in re.findall(r'data-natural-width="(\d+)"', dom)]
    assert len(widths) == 1 + 6 + 1  # query, results, and the probe's broken image
    assert widths[-1] == 0  # a broken image is seen as broken ...
    assert all(w > 0 for w in widths[:-1])  # ... and every thumbnail rendered


def test_search_errors(photo_index: Path, tiny_checkpoint: Path, photos: Path, shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other, preprocess = build_model("tiny")
    save_checkpoint(tmp_path / "other", other, preprocess, step=0)
    coffee = str(photos / "skimage" / "coffee.png")
    capsys.readouterr()
    assert run_command(search, ["--index", str(photo_index), "--checkpoint", str(tmp_path / "other"), "--image", coffee]) == 2
    assert "built with other weights" in capsys.readouterr().err
    assert run_command(search, ["--index", str(tmp_path), "--checkpoint", str(tiny_checkpoint), "--image", coffee]) == 2
    assert "is not an index" in capsys.readouterr().err
    broken = str(shared_data / "images" / "edgecases" / "imagededup_ukbench09268_corrupt.jpg")
    assert run_command(search, ["--index", str(photo_index), "--checkpoint", str(tiny_checkpoint), "--image", broken]) == 2
    assert "does not decode" in capsys.readouterr().err
    assert run_command(index, ["--checkpoint", str(tiny_checkpoint), "--images", str(tmp_path / "nothing-*.jpg"), "--output", str(tmp_path / "i")]) == 2
    assert "nothing matches" in capsys.readouterr().err
    # an index only grows with the weights that made it
    assert run_command(index, ["--checkpoint", str(tmp_path / "other"), "--images", coffee, "--output", str(photo_index), "--append"]) == 2
    assert "built with other weights" in capsys.readouterr().err


def test_faiss_index_gives_the_exact_results(tmp_path: Path, tiny_checkpoint: Path, photos: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("faiss")
    output = tmp_path / "index"
    build = ["--checkpoint", str(tiny_checkpoint), "--images", str(photos / "skimage"), "--output", str(output), "--num-workers", "0", "--shard-size", "8"]
    assert run_command(index, build + ["--faiss", "Flat"]) == 0
    query = ["--index", str(output), "--checkpoint", str(tiny_checkpoint), "--image", str(photos / "skimage" / "rocket.jpg"), "--instruction", "at night", "-k", "7"]
    exact = run_json(search, query, capsys)
    with_faiss = run_json(search, query + ["--faiss"], capsys)
    assert [r["id"] for r in with_faiss["results"]] == [r["id"] for r in exact["results"]]
    assert [r["score"] for r in with_faiss["results"]] == pytest.approx([r["score"] for r in exact["results"]], abs=1e-5)

    # images added without --faiss leave the faiss index behind: searching it is refused
    assert run_command(index, build + ["--images", str(photos / "matplotlib"), "--append"]) == 0
    capsys.readouterr()
    assert run_command(search, query + ["--faiss"]) == 2
    assert "23 embeddings then, 24 now" in capsys.readouterr().err
    # an index that faiss trains (IVF), searched in all its 4 lists, is exact again
    assert run_command(index, build + ["--images", str(photos / "matplotlib"), "--faiss", "IVF4,Flat", "--append"]) == 0
    exact = run_json(search, query, capsys)
    clustered = run_json(search, query + ["--faiss", "--faiss-params", "nprobe=4"], capsys)
    assert [r["id"] for r in clustered["results"]] == [r["id"] for r in exact["results"]]


def test_without_a_faiss_index_search_says_how_to_build_one(photo_index: Path, tiny_checkpoint: Path, photos: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("faiss")
    capsys.readouterr()
    argv = ["--index", str(photo_index), "--checkpoint", str(tiny_checkpoint), "--image", str(photos / "skimage" / "rocket.jpg"), "--faiss"]
    assert run_command(search, argv) == 2
    assert "--faiss Flat" in capsys.readouterr().err


def test_exact_search_orders_ties_by_index_position(tmp_path: Path) -> None:
    # three shards of tied vectors: every chunking gives the index order among equal scores
    vectors = [np.array([[1, 0], [0, 1], [1, 0]], np.float16), np.array([[0, 1], [1, 0]], np.float16), np.array([[1, 0]], np.float16)]
    items = [[{"id": f"{shard}/{row}"} for row in range(len(v))] for shard, v in enumerate(vectors)]
    loaded = LoadedIndex(tmp_path, {}, ["0", "1", "2"], vectors, items)
    query = torch.tensor([1.0, 0.0])
    for chunk_rows in (1, 2, 65536):
        hits = search.exact_top_k(loaded, query, 4, chunk_rows)
        assert [h.item["id"] for h in hits] == ["0/0", "0/2", "1/1", "2/0"]
        assert [h.rank for h in hits] == [1, 2, 3, 4]
    assert [h.item["id"] for h in search.exact_top_k(loaded, query, 6, 2)] == ["0/0", "0/2", "1/1", "2/0", "0/1", "1/0"]
