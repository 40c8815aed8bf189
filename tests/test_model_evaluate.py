"""recall@k and mAP@k, worked out by hand on a small ranking."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from magiclens.model.evaluate import EmbeddedSet, retrieval_metrics


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
