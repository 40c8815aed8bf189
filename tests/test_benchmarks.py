"""CIRCO, CIRR and FashionIQ: the metric code against hand-computed values, the loaders on small
layouts built here in each benchmark's published file layout (with real photos), and whole runs
with a tiny model checked against a brute-force ranking."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from magiclens.model import benchmarks
from magiclens.model.benchmark_data import BenchmarkDataError, Query, Task, load_benchmark, load_circo, load_cirr, load_fashioniq
from magiclens.model.benchmarks import circo_metrics, cirr_metrics, evaluate_benchmark, fashioniq_metrics
from magiclens.model.metrics import average_precision_at, rank_gallery, rank_subsets
from magiclens.model.checkpoint import build_model, load_checkpoint, save_checkpoint
from magiclens.model.magiclens import MagicLens
from magiclens.model.preprocess import PreprocessConfig, images_to_model_input

PHOTOS = [
    "skimage/coffee.png",
    "skimage/astronaut.png",
    "skimage/chelsea.png",
    "skimage/rocket.jpg",
    "skimage/motorcycle_left.png",
    "matplotlib/grace_hopper.jpg",
    "skimage/hubble_deep_field.jpg",
    "skimage/retina.jpg",
]


def write_photo(shared_data: Path, number: int, path: Path) -> None:
    """A small copy of a real photo, in the format the file name asks for."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(shared_data / "images" / "photos" / PHOTOS[number % len(PHOTOS)]) as image:
        image = image.convert("RGB")
        image.thumbnail((96, 96))
        image.save(path)


def write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


# --- layouts -------------------------------------------------------------------------------------

CIRCO_GALLERY = [11, 22, 33, 44, 55, 66]
CIRCO_VAL = [
    {
        "reference_img_id": 11,
        "target_img_id": 22,
        "relative_caption": "is on a wooden table",
        "shared_concept": "a cup of coffee",
        "gt_img_ids": [22, 33],
        "id": 0,
        "semantic_aspects": ["spatial_relations_background"],
    },
    {
        "reference_img_id": 44,
        "target_img_id": 55,
        "relative_caption": "is red",
        "shared_concept": "a motorbike",
        "gt_img_ids": [55],
        "id": 1,
        "semantic_aspects": ["direct_addressing"],
    },
]
CIRCO_TEST = [
    {"reference_img_id": 66, "relative_caption": "is in space", "shared_concept": "a rocket", "id": 0},
    {"reference_img_id": 33, "relative_caption": "has two cats", "shared_concept": "a cat", "id": 1},
]


@pytest.fixture(scope="module")
def circo_dir(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    root = tmp_path_factory.mktemp("CIRCO")
    write_json(root / "annotations" / "val.json", CIRCO_VAL)
    write_json(root / "annotations" / "test.json", CIRCO_TEST)
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 96, "height": 64} for i in CIRCO_GALLERY]
    write_json(root / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json", {"images": images})
    for number, image_id in enumerate(CIRCO_GALLERY):
        write_photo(shared_data, number, root / "COCO2017_unlabeled" / "unlabeled2017" / f"{image_id:012d}.jpg")
    return root


def _cirr_split(split: str, prefix: str) -> tuple[dict[str, str], list[dict]]:
    names = [f"{prefix}-{n}-0-img{n % 2}" for n in range(6)]
    relative_paths = {name: f"./{prefix}/{name}.png" for name in names}
    captions = []
    for pair, (reference, target) in enumerate([(0, 3), (4, 1)]):
        entry = {
            "pairid": 100 + pair,
            "reference": names[reference],
            "caption": ["has two dogs instead", "show it from the side"][pair],
            "img_set": {"id": pair, "members": names[:6], "reference_rank": 0, "target_rank": 1},
        }
        if split == "val":
            entry["target_hard"] = names[target]
            entry["target_soft"] = {names[target]: 1.0, names[2]: 0.5, names[5]: -1.0}
        captions.append(entry)
    return relative_paths, captions


@pytest.fixture(scope="module")
def cirr_dir(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    root = tmp_path_factory.mktemp("cirr")
    for split, prefix in (("val", "dev"), ("test1", "test1")):
        relative_paths, captions = _cirr_split("val" if split == "val" else "test", prefix)
        write_json(root / "captions" / f"cap.rc2.{split}.json", captions)
        write_json(root / "image_splits" / f"split.rc2.{split}.json", relative_paths)
        for number, relative in enumerate(relative_paths.values()):
            write_photo(shared_data, number + 1, root / "img_raw" / relative)
    return root


FIQ_IMAGES = {
    "dress": ["B001", "B002", "B003", "B004"],
    "shirt": ["B011", "B012", "B013", "B014"],
    "toptee": ["B021", "B022", "B023", "B024"],
}


@pytest.fixture(scope="module")
def fashioniq_dir(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    root = tmp_path_factory.mktemp("fiq")
    for c, (category, names) in enumerate(FIQ_IMAGES.items()):
        captions = [
            {"target": names[1], "candidate": names[0], "captions": ["is longer", "has no sleeves"]},
            {"target": names[3], "candidate": names[2], "captions": ["is darker", "is plain"]},
        ]
        write_json(root / "captions" / f"cap.{category}.val.json", captions)
        write_json(root / "image_splits" / f"split.{category}.val.json", names)
        extension = "jpg" if category == "shirt" else "png"  # both kinds are distributed
        for number, name in enumerate(names):
            write_photo(shared_data, number + c, root / "images" / f"{name}.{extension}")
    return root


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model, preprocess = build_model("tiny")
    path = tmp_path_factory.mktemp("tiny") / "checkpoint"
    save_checkpoint(path, model, preprocess, step=0)
    return path


# --- metrics against hand-computed values --------------------------------------------------------


def test_average_precision_at_k_as_circo_defines_it() -> None:
    ranking = ["a", "x", "b", "y", "c"]
    # hits at ranks 1, 3, 5: precisions 1/1, 2/3, 3/5; 4 relevant images, so divide by min(k, 4)
    assert average_precision_at(ranking, {"a", "b", "c", "d"}, 5) == pytest.approx((1 + 2 / 3 + 3 / 5) / 4)
    assert average_precision_at(ranking, {"a", "b", "c", "d"}, 2) == pytest.approx(1 / 2)
    assert average_precision_at(list("abcdefg"), set("abcdefgh"), 5) == pytest.approx(1.0)
    assert average_precision_at(list("abcdefg"), set("abcdefgh"), 10) == pytest.approx(7 / 8)
    assert average_precision_at(["x", "y"], {"a"}, 5) == 0.0


def test_circo_metrics() -> None:
    task = Task("circo", "val", [], [])
    task.queries = [
        Query("0", Path("q0"), "", target="22", relevant=("22", "33")),
        Query("1", Path("q1"), "", target="44", relevant=("44",)),
    ]
    rankings = [["22", "11", "33", "44", "55", "66"], ["66", "55", "33", "22", "11", "44"]]
    metrics = circo_metrics(task, rankings)
    # query 0: hits at 1 and 3 -> (1 + 2/3) / 2 = 5/6 at every k; query 1: a hit at rank 6 -> 0 at
    # k = 5, 1/6 from k = 10
    assert metrics["mAP@5"] == pytest.approx((5 / 6 + 0) / 2)
    assert metrics["mAP@10"] == pytest.approx((5 / 6 + 1 / 6) / 2)
    assert metrics["mAP@50"] == pytest.approx((5 / 6 + 1 / 6) / 2)
    assert metrics["recall@5"] == pytest.approx(1 / 2)
    assert metrics["recall@10"] == pytest.approx(1.0)


def test_cirr_metrics() -> None:
    task = Task("cirr", "val", [], [])
    task.queries = [Query("100", Path("q"), "", target="c"), Query("101", Path("q"), "", target="t")]
    rankings = [["b", "c", "a"], ["x1", "x2", "x3", "x4", "x5", "x6", "t"]]
    subset_rankings = [["c", "d", "e"], ["u", "v", "t"]]
    metrics = cirr_metrics(task, rankings, subset_rankings)
    assert metrics["recall@1"] == 0.0
    assert metrics["recall@5"] == pytest.approx(1 / 2)
    assert metrics["recall@10"] == pytest.approx(1.0)
    assert metrics["recall@50"] == pytest.approx(1.0)
    assert metrics["recall_subset@1"] == pytest.approx(1 / 2)
    assert metrics["recall_subset@2"] == pytest.approx(1 / 2)
    assert metrics["recall_subset@3"] == pytest.approx(1.0)
    assert metrics["mean(recall@5,recall_subset@1)"] == pytest.approx(1 / 2)


def test_fashioniq_metrics() -> None:
    def task_with(targets: list[str]) -> Task:
        task = Task("fashioniq", "val", [], [])
        task.queries = [Query(str(i), Path("q"), "", target=t, relevant=(t,)) for i, t in enumerate(targets)]
        return task

    filler = [f"n{i}" for i in range(60)]
    dress = (task_with(["d0", "d1"]), [filler[:2] + ["d0"] + filler[2:], filler[:19] + ["d1"] + filler[19:]])
    shirt = (task_with(["s0"]), [filler])
    toptee = (task_with(["t0"]), [["t0"] + filler])
    metrics = fashioniq_metrics({"dress": dress, "shirt": shirt, "toptee": toptee})
    assert metrics["dress/recall@10"] == pytest.approx(1 / 2)
    assert metrics["dress/recall@50"] == pytest.approx(1.0)
    assert metrics["shirt/recall@10"] == metrics["shirt/recall@50"] == 0.0
    assert metrics["toptee/recall@10"] == metrics["toptee/recall@50"] == 1.0
    assert metrics["mean/recall@10"] == pytest.approx((1 / 2 + 0 + 1) / 3)
    assert metrics["mean/recall@50"] == pytest.approx((1 + 0 + 1) / 3)
    assert metrics["mean"] == pytest.approx(((1 / 2 + 0 + 1) / 3 + (1 + 0 + 1) / 3) / 2)


def test_ranking_leaves_out_the_reference_and_ranks_subsets() -> None:
    gallery = torch.eye(4)
    queries = torch.tensor([[0.9, 0.5, 0.1, 0.3], [0.2, 0.1, 0.8, 0.4]])
    assert rank_gallery(queries, gallery, depth=50) == [[0, 1, 3, 2], [2, 3, 0, 1]]
    assert rank_gallery(queries, gallery, depth=50, excluded=[(0,), (3,)]) == [[1, 3, 2], [2, 0, 1]]
    assert rank_gallery(queries, gallery, depth=2, excluded=[(0,), ()]) == [[1, 3], [2, 3]]
    assert rank_gallery(queries, gallery, depth=2, excluded=[(0,), ()], chunk=1) == [[1, 3], [2, 3]]
    assert rank_subsets(queries, gallery, [[2, 0, 3], [1, 0]]) == [[0, 3, 2], [0, 1]]


# --- loaders -------------------------------------------------------------------------------------


def test_circo_loader(circo_dir: Path) -> None:
    val = load_circo(circo_dir, "val")
    assert val.gallery_ids == ["11", "22", "33", "44", "55", "66"]
    assert val.gallery_paths[1] == circo_dir / "COCO2017_unlabeled" / "unlabeled2017" / "000000000022.jpg"
    first = val.queries[0]
    assert first.text == "find a cup of coffee but is on a wooden table"
    assert (first.id, first.target, first.relevant) == ("0", "22", ("22", "33"))
    assert first.image == circo_dir / "COCO2017_unlabeled" / "unlabeled2017" / "000000000011.jpg"
    assert first.reference is None  # CIRCO, as MagicLens evaluates it, keeps the reference in the gallery
    test = load_circo(circo_dir, "test")
    assert [(q.id, q.text, q.target, q.relevant) for q in test.queries] == [
        ("0", "find a rocket but is in space", None, ()),
        ("1", "find a cat but has two cats", None, ()),
    ]


def test_cirr_loader(cirr_dir: Path) -> None:
    val = load_cirr(cirr_dir, "val")
    assert val.gallery_ids == [f"dev-{n}-0-img{n % 2}" for n in range(6)]
    assert val.gallery_paths[0] == cirr_dir / "img_raw" / "dev" / "dev-0-0-img0.png"
    first = val.queries[0]
    assert (first.id, first.text, first.target, first.reference) == ("100", "has two dogs instead", "dev-3-0-img1", "dev-0-0-img0")
    assert first.subset == tuple(f"dev-{n}-0-img{n % 2}" for n in range(1, 6))  # the reference left out
    test = load_cirr(cirr_dir, "test")
    assert test.gallery_ids[0] == "test1-0-0-img0" and test.queries[1].target is None


def test_cirr_names_outside_the_split_are_errors(tmp_path: Path) -> None:
    relative_paths, captions = _cirr_split("val", "dev")
    captions[1]["img_set"]["members"][2] = "dev-999-0-img0"
    write_json(tmp_path / "captions" / "cap.rc2.val.json", captions)
    write_json(tmp_path / "image_splits" / "split.rc2.val.json", relative_paths)
    with pytest.raises(BenchmarkDataError, match="entry 1 names dev-999-0-img0, which is not in the image split"):
        load_cirr(tmp_path, "val")


def test_fashioniq_loader(fashioniq_dir: Path) -> None:
    dress = load_fashioniq(fashioniq_dir, "val", "dress")
    assert dress.name == "fashioniq/dress" and dress.gallery_ids == FIQ_IMAGES["dress"]
    assert dress.queries[0].text == "is longer and has no sleeves"
    assert (dress.queries[0].target, dress.queries[0].image.name) == ("B002", "B001.png")
    shirt = load_fashioniq(fashioniq_dir, "val", "shirt")
    assert shirt.gallery_paths[0].name == "B011.jpg"
    # no test files in this folder: the error names the files it looked for
    with pytest.raises(BenchmarkDataError, match=r"in no FashionIQ layout .*captions/cap.dress.test.json or .*data/captions/cap.dress.test.json"):
        load_fashioniq(fashioniq_dir, "test", "dress")


def test_missing_files_are_clear_errors(circo_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(BenchmarkDataError, match=r"annotations/val.json not found: CIRCO's annotations"):
        load_benchmark("circo", tmp_path, "val")
    broken = tmp_path / "CIRCO"
    for path in circo_dir.rglob("*"):
        if path.is_file() and path.name != "000000000033.jpg":
            (broken / path.relative_to(circo_dir)).parent.mkdir(parents=True, exist_ok=True)
            (broken / path.relative_to(circo_dir)).write_bytes(path.read_bytes())
    with pytest.raises(BenchmarkDataError, match=r"1 image file\(s\) missing, e.g. .*000000000033.jpg"):
        load_benchmark("circo", broken, "val")


# --- whole runs ----------------------------------------------------------------------------------


def brute_force_scores(model: MagicLens, preprocess: PreprocessConfig, task: Task) -> torch.Tensor:
    """(queries, gallery) scores embedded image by image, outside the benchmark code."""
    gallery = torch.cat([model.embed(images_to_model_input([p.read_bytes()], preprocess, exif_transpose=False, float_resize=True), [""]) for p in task.gallery_paths])
    queries = torch.cat([model.embed(images_to_model_input([q.image.read_bytes()], preprocess, exif_transpose=False, float_resize=True), [q.text]) for q in task.queries])
    return queries @ gallery.T


def ranked_ids(scores: torch.Tensor, ids: list[str], leave_out: list[str | None]) -> list[list[str]]:
    rankings = []
    for row, left_out in zip(scores.tolist(), leave_out):
        order = sorted(range(len(ids)), key=lambda i: -row[i])
        rankings.append([ids[i] for i in order if ids[i] != left_out])
    return rankings


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    benchmarks.add_arguments(parser)
    return benchmarks.run(parser.parse_args(argv), [])


def test_circo_val_and_test_submission(circo_dir: Path, tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["--checkpoint", str(tiny_checkpoint), "--benchmark", "circo", "--data-dir", str(circo_dir), "--num-workers", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    model, _, preprocess = load_checkpoint(tiny_checkpoint)
    task = load_circo(circo_dir, "val")
    rankings = ranked_ids(brute_force_scores(model, preprocess, task), task.gallery_ids, [None] * 2)
    for k in (5, 10, 25, 50):
        expected = []
        for ranking, query in zip(rankings, task.queries):
            hits, total = 0, 0.0
            for rank, image in enumerate(ranking[:k], start=1):
                if image in query.relevant:
                    hits += 1
                    total += hits / rank
            expected.append(total / min(k, len(query.relevant)))
        assert report[f"mAP@{k}"] == pytest.approx(sum(expected) / 2, abs=1e-6)
    assert (report["queries"], report["gallery"], report["split"]) == (2, 6, "val")

    report = evaluate_benchmark(model, preprocess, "circo", circo_dir, "test", tmp_path / "submission", num_workers=0)
    submission = json.loads((tmp_path / "submission" / "circo_test_submission.json").read_text())
    assert report["submission_files"] == [str(tmp_path / "submission" / "circo_test_submission.json")]
    assert set(submission) == {"0", "1"}
    test = load_circo(circo_dir, "test")
    expected = ranked_ids(brute_force_scores(model, preprocess, test), test.gallery_ids, [None] * 2)
    assert submission == {q.id: [int(i) for i in r] for q, r in zip(test.queries, expected)}


def test_cirr_val_and_test_submissions(cirr_dir: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    model, _, preprocess = load_checkpoint(tiny_checkpoint)
    report = evaluate_benchmark(model, preprocess, "cirr", cirr_dir, "val", None, batch_size=4, num_workers=0)
    task = load_cirr(cirr_dir, "val")
    scores = brute_force_scores(model, preprocess, task)
    rankings = ranked_ids(scores, task.gallery_ids, [q.reference for q in task.queries])
    assert all(len(r) == 5 for r in rankings)  # the reference is never ranked
    for k in (1, 5, 10, 50):
        assert report[f"recall@{k}"] == pytest.approx(sum(q.target in r[:k] for q, r in zip(task.queries, rankings)) / 2)
    subset_rankings = [[i for i in r if i in q.subset] for q, r in zip(task.queries, rankings)]
    for k in (1, 2, 3):
        assert report[f"recall_subset@{k}"] == pytest.approx(
            sum(q.target in r[:k] for q, r in zip(task.queries, subset_rankings)) / 2
        )
    # the soft-target variant: the best target_soft weight among the first k, at least 0
    soft = [{"dev-3-0-img1": 1.0, "dev-2-0-img0": 0.5, "dev-5-0-img1": -1.0}, {"dev-1-0-img1": 1.0, "dev-2-0-img0": 0.5, "dev-5-0-img1": -1.0}]
    assert [dict(q.soft_targets) for q in task.queries] == soft
    for k in (1, 5, 10, 50):
        expected = sum(max([0.0] + [w[i] for i in r[:k] if i in w]) for w, r in zip(soft, rankings)) / 2
        assert report[f"soft_recall@{k}"] == pytest.approx(expected)
    for k in (1, 2, 3):
        expected = sum(max([0.0] + [w[i] for i in r[:k] if i in w]) for w, r in zip(soft, subset_rankings)) / 2
        assert report[f"soft_recall_subset@{k}"] == pytest.approx(expected)
    assert report["soft_recall@50"] == pytest.approx(1.0)

    evaluate_benchmark(model, preprocess, "cirr", cirr_dir, "test", tmp_path, num_workers=0)
    recall_file = json.loads((tmp_path / "cirr_test1_recall.json").read_text())
    subset_file = json.loads((tmp_path / "cirr_test1_recall_subset.json").read_text())
    assert (recall_file.pop("version"), recall_file.pop("metric")) == ("rc2", "recall")
    assert (subset_file.pop("version"), subset_file.pop("metric")) == ("rc2", "recall_subset")
    test = load_cirr(cirr_dir, "test")
    expected = ranked_ids(brute_force_scores(model, preprocess, test), test.gallery_ids, [q.reference for q in test.queries])
    assert recall_file == {q.id: r for q, r in zip(test.queries, expected)}
    assert subset_file == {q.id: [i for i in r if i in q.subset][:3] for q, r in zip(test.queries, expected)}


def test_fashioniq_val(fashioniq_dir: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["--checkpoint", str(tiny_checkpoint), "--benchmark", "fashioniq", "--data-dir", str(fashioniq_dir), "--num-workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert "dress/recall@10" in printed and "mean/recall@50" in printed
    model, _, preprocess = load_checkpoint(tiny_checkpoint)
    report = evaluate_benchmark(model, preprocess, "fashioniq", fashioniq_dir, "val", None, num_workers=0)
    for category in FIQ_IMAGES:
        task = load_fashioniq(fashioniq_dir, "val", category)
        rankings = ranked_ids(brute_force_scores(model, preprocess, task), task.gallery_ids, [None] * 2)
        # a gallery of 4 holds every target within 10
        assert report[f"{category}/recall@10"] == pytest.approx(sum(q.target in r[:10] for q, r in zip(task.queries, rankings)) / 2)
        assert report[f"{category}/recall@10"] == 1.0
    assert report["mean"] == pytest.approx(1.0)
    assert (report["queries"], report["gallery"]) == (6, 12)


def test_command_errors(circo_dir: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["--checkpoint", str(tiny_checkpoint), "--benchmark", "circo", "--data-dir", str(circo_dir), "--split", "test"]) == 2
    assert "give --output DIR" in capsys.readouterr().err
    assert run_cli(["--checkpoint", str(tiny_checkpoint), "--benchmark", "cirr"]) == 2
    assert "--data-dir" in capsys.readouterr().err


def test_an_undecodable_gallery_image_is_an_error(circo_dir: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    broken = tmp_path / "CIRCO"
    for path in circo_dir.rglob("*"):
        if path.is_file():
            (broken / path.relative_to(circo_dir)).parent.mkdir(parents=True, exist_ok=True)
            (broken / path.relative_to(circo_dir)).write_bytes(path.read_bytes())
    corrupt = broken / "COCO2017_unlabeled" / "unlabeled2017" / "000000000055.jpg"
    corrupt.write_bytes(corrupt.read_bytes()[:200])
    model, _, preprocess = load_checkpoint(tiny_checkpoint)
    with pytest.raises(BenchmarkDataError, match=r"1 circo gallery image\(s\) could not be read, e.g. .*000000000055.jpg"):
        evaluate_benchmark(model, preprocess, "circo", broken, "val", None, num_workers=0)


# --- other layouts, submissions, ties ------------------------------------------------------------


def copy_tree(source: Path, destination: Path, rename: dict[str, str]) -> None:
    """Copy every file, the first matching prefix of its relative path replaced."""
    for path in source.rglob("*"):
        if path.is_file():
            relative = path.relative_to(source).as_posix()
            for old, new in rename.items():
                if relative.startswith(old):
                    relative = new + relative[len(old) :]
                    break
            (destination / relative).parent.mkdir(parents=True, exist_ok=True)
            (destination / relative).write_bytes(path.read_bytes())


def test_cirr_in_the_clip4cir_and_searle_layout(cirr_dir: Path, tmp_path: Path) -> None:
    # <root>/cirr/{captions,image_splits}, the images at <root>/dev/... and <root>/test1/...
    root = tmp_path / "cirr_dataset"
    copy_tree(cirr_dir, root, {"captions/": "cirr/captions/", "image_splits/": "cirr/image_splits/", "img_raw/": ""})
    readme_layout, other = load_cirr(cirr_dir, "val"), load_cirr(root, "val")
    assert other.gallery_paths[0] == root / "dev" / "dev-0-0-img0.png"
    assert [(q.id, q.text, q.target, q.reference) for q in other.queries] == [(q.id, q.text, q.target, q.reference) for q in readme_layout.queries]
    assert len(load_benchmark("cirr", root, "test")[0].queries) == 2
    with pytest.raises(BenchmarkDataError, match=r"in no CIRR layout .*captions/cap.rc2.val.json or .*cirr/captions/cap.rc2.val.json"):
        load_cirr(tmp_path / "empty", "val")


@pytest.fixture(scope="module")
def fashioniq_starter_kit(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    """The official starter kit's layout (data/captions, data/image_splits,
    data/resized_images/{category}/NAME.jpg), with a test split (no targets)."""
    root = tmp_path_factory.mktemp("start_kit")
    data = root / "data"
    for c, (category, names) in enumerate(FIQ_IMAGES.items()):
        for split in ("val", "test"):
            captions = [
                {"candidate": names[0], "captions": ["is longer", "has no sleeves"]},
                {"candidate": names[2], "captions": ["is darker", "is plain"]},
            ]
            if split == "val":
                captions[0]["target"], captions[1]["target"] = names[1], names[3]
            write_json(data / "captions" / f"cap.{category}.{split}.json", captions)
            write_json(data / "image_splits" / f"split.{category}.{split}.json", names)
        for number, name in enumerate(names):
            write_photo(shared_data, number + c, data / "resized_images" / category / f"{name}.jpg")
    return root


def test_fashioniq_test_split_writes_the_starter_kit_submission(fashioniq_starter_kit: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    model, _, preprocess = load_checkpoint(tiny_checkpoint)
    report = evaluate_benchmark(model, preprocess, "fashioniq", fashioniq_starter_kit, "test", tmp_path, num_workers=0)
    assert report["submission_files"] == [str(tmp_path / f"{c}.test.pred.json") for c in FIQ_IMAGES]
    for category, names in FIQ_IMAGES.items():
        task = load_fashioniq(fashioniq_starter_kit, "test", category)
        assert task.gallery_paths[0] == fashioniq_starter_kit / "data" / "resized_images" / category / f"{names[0]}.jpg"
        expected = ranked_ids(brute_force_scores(model, preprocess, task), task.gallery_ids, [None] * 2)
        submission = json.loads((tmp_path / f"{category}.test.pred.json").read_text())
        # the caption entries as the starter kit's eval.py writes them: each with its "ranking"
        assert submission == [
            {"candidate": names[0], "captions": ["is longer", "has no sleeves"], "ranking": expected[0]},
            {"candidate": names[2], "captions": ["is darker", "is plain"], "ranking": expected[1]},
        ]
    # the data folder itself works as --data-dir too
    assert load_fashioniq(fashioniq_starter_kit / "data", "val", "dress").queries[0].target == "B002"


def test_dump_rankings_of_a_validation_split(fashioniq_starter_kit: Path, tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dump = tmp_path / "rankings.json"
    argv = ["--checkpoint", str(tiny_checkpoint), "--benchmark", "fashioniq", "--data-dir", str(fashioniq_starter_kit), "--num-workers", "0"]
    assert run_cli(argv + ["--dump-rankings", str(dump), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rankings_file"] == str(dump) and report["precision"] == "fp32"
    rankings = json.loads(dump.read_text())
    assert set(rankings) == {f"{c}/{n}" for c in FIQ_IMAGES for n in (0, 1)}
    model, _, preprocess = load_checkpoint(tiny_checkpoint)
    task = load_fashioniq(fashioniq_starter_kit, "val", "shirt")
    expected = ranked_ids(brute_force_scores(model, preprocess, task), task.gallery_ids, [None] * 2)
    assert [rankings["shirt/0"], rankings["shirt/1"]] == expected
    assert run_cli(argv + ["--dump-rankings", str(dump), "--split", "test", "--output", str(tmp_path)]) == 2
    assert "--dump-rankings is for --split val" in capsys.readouterr().err


def test_tied_gallery_ranks_in_gallery_order(circo_dir: Path, shared_data: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    # every gallery image is the same photo, each embedded alone (rows of one batch can differ in
    # the last bits): all scores tie exactly, so every ranking is the gallery order
    tied = tmp_path / "CIRCO"
    copy_tree(circo_dir, tied, {})
    for image_id in CIRCO_GALLERY:
        write_photo(shared_data, 0, tied / "COCO2017_unlabeled" / "unlabeled2017" / f"{image_id:012d}.jpg")
    model, _, preprocess = load_checkpoint(tiny_checkpoint)
    evaluate_benchmark(model, preprocess, "circo", tied, "test", tmp_path / "out", num_workers=0, batch_size=1)
    submission = json.loads((tmp_path / "out" / "circo_test_submission.json").read_text())
    assert submission == {"0": CIRCO_GALLERY, "1": CIRCO_GALLERY}
    report = evaluate_benchmark(model, preprocess, "circo", tied, "val", None, num_workers=0, batch_size=1)
    # query 0: relevant 22 and 33 at ranks 2 and 3; query 1: relevant 55 at rank 5
    assert report["mAP@5"] == pytest.approx(((1 / 2 + 2 / 3) / 2 + 1 / 5) / 2)
    assert report["recall@5"] == 1.0  # targets 22 and 55 at ranks 2 and 5


def test_bf16_precision_is_an_option(circo_dir: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--checkpoint", str(tiny_checkpoint), "--benchmark", "circo", "--data-dir", str(circo_dir), "--num-workers", "0", "--json"]
    assert run_cli(argv) == 0
    fp32 = json.loads(capsys.readouterr().out)
    assert run_cli(argv + ["--precision", "bf16"]) == 0
    bf16 = json.loads(capsys.readouterr().out)
    assert (fp32["precision"], bf16["precision"]) == ("fp32", "bf16")
    assert set(fp32) == set(bf16)
