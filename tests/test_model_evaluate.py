"""recall@k, mAP@k and soft recall worked out by hand; ties; data with no usable row."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from magiclens.model import evaluate
from magiclens.model.checkpoint import build_model, save_checkpoint
from magiclens.model.data import write_triplets
from magiclens.model.evaluate import EmbeddedSet, retrieval_metrics
from magiclens.model.metrics import rank_gallery, rank_subsets, recall_at, soft_recall_at


def test_metrics_on_a_hand_ranked_example() -> None:
    gallery_hashes = torch.tensor([100, 101, 102, 103])
    queries = [
        # (query vector, the query image's hash, relevant target hashes)
        ([0.5, 0.1, 0.9, 0.3], 7, {100}),  # ranking 102, 100, ...: first hit at rank 2
        ([0.1, 0.2, 0.9, 0.8], 102, {103}),  # its own image 102 would rank first: left out
        ([0.9, 0.1, 0.5, 0.0], 8, {100, 101}),  # hits at ranks 1 and 3
        ([1.0, 0.0, 0.0, 0.0], 100, {100}),  # its own image is its target: kept
    ]
    embedded = EmbeddedSet(
        query_vectors=F.normalize(torch.tensor([q for q, _, _ in queries]), dim=-1),
        query_image_hashes=torch.tensor([h for _, h, _ in queries]),
        relevant=[r for _, _, r in queries],
        gallery_vectors=torch.eye(4),
        gallery_hashes=gallery_hashes,
        triplets=5,
        rejected={},
    )
    metrics = retrieval_metrics(embedded, chunk=3)  # two chunks
    assert metrics["recall@1"] == pytest.approx(3 / 4)
    assert metrics["recall@5"] == pytest.approx(1.0)
    average_precisions = [1 / 2, 1.0, (1 / 1 + 2 / 3) / 2, 1.0]
    for k in (5, 10, 25, 50):
        assert metrics[f"mAP@{k}"] == pytest.approx(sum(average_precisions) / 4)


def test_exact_ties_rank_by_gallery_position() -> None:
    # every gallery vector scores the same: the ranking is the gallery order, whatever the chunking
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    gallery = torch.tensor([[0.5, 0.5]] * 7)
    assert rank_gallery(queries, gallery, depth=5) == [[0, 1, 2, 3, 4]] * 3
    assert rank_gallery(queries, gallery, depth=5, excluded=[(0,), (3,), ()], chunk=2) == [[1, 2, 3, 4, 5], [0, 1, 2, 4, 5], [0, 1, 2, 3, 4]]
    # two tied groups: the higher score first, inside a group the gallery order
    gallery = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    assert rank_gallery(queries[:1], gallery, depth=5) == [[1, 3, 0, 2, 4]]
    assert rank_subsets(queries[:1], gallery, [[4, 3, 0, 1]]) == [[1, 3, 0, 4]]
    embedded = EmbeddedSet(
        query_vectors=queries[:1],
        query_image_hashes=torch.tensor([999]),
        relevant=[{13}],  # at gallery position 3: second of the tied best
        gallery_vectors=gallery,
        gallery_hashes=torch.tensor([10, 11, 12, 13, 14]),
        triplets=1,
        rejected={},
    )
    metrics = retrieval_metrics(embedded)
    assert metrics["recall@1"] == 0.0 and metrics["recall@5"] == 1.0 and metrics["mAP@5"] == pytest.approx(1 / 2)


def test_soft_recall_gives_partial_credit() -> None:
    rankings = [["a", "b", "c"], ["x", "y", "z"], ["p", "q", "t"]]
    soft = [{"b": 1.0, "a": 0.5}, {"y": -1.0, "z": 0.5}, {"t": 1.0}]
    metrics = soft_recall_at(rankings, soft, (1, 2, 3), name="soft_recall")
    assert metrics["soft_recall@1"] == pytest.approx((0.5 + 0 + 0) / 3)
    assert metrics["soft_recall@2"] == pytest.approx((1.0 + 0 + 0) / 3)  # a negative weight never counts
    assert metrics["soft_recall@3"] == pytest.approx((1.0 + 0.5 + 1.0) / 3)
    assert recall_at(rankings, [{"b"}, {"y"}, {"t"}], (1, 2))["recall@2"] == pytest.approx(2 / 3)


def write_corrupt_rows(path: Path, shared_data: Path) -> None:
    photo = (shared_data / "images" / "photos" / "skimage" / "coffee.png").read_bytes()
    corrupt = (shared_data / "images" / "edgecases" / "imagededup_ukbench09268_corrupt.jpg").read_bytes()
    rows = [
        {"triplet_id": "a", "query_image": corrupt, "instruction": "at night", "target_image": photo},
        {"triplet_id": "b", "query_image": photo, "instruction": "at night", "target_image": corrupt},
        {"triplet_id": "c", "query_image": photo, "instruction": "   ", "target_image": photo},
        {"triplet_id": "d", "query_image": corrupt, "instruction": "from above", "target_image": photo},
    ]
    write_triplets(str(path), rows, row_group_size=2)


def test_data_with_no_usable_row_names_the_reasons(tmp_path: Path, shared_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    model, preprocess = build_model("tiny")
    save_checkpoint(tmp_path / "checkpoint", model, preprocess, step=0)
    write_corrupt_rows(tmp_path / "corrupt.parquet", shared_data)
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    args = parser.parse_args(["--checkpoint", str(tmp_path / "checkpoint"), "--data", str(tmp_path / "corrupt.parquet"), "--num-workers", "0"])
    assert evaluate.run(args, []) == 2
    error = capsys.readouterr().err
    assert "no usable triplet" in error
    assert "instruction_missing: 1, query_image_undecodable: 2, target_image_undecodable: 1" in error
