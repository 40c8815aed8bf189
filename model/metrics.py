"""Ranking and retrieval metrics, shared by `evaluate`, the benchmarks and `search`.

Ties. Wherever a ranking is taken, images with exactly the same score are ordered by their
position in the gallery (first one first), so a ranking, and every metric on it, is the same from
run to run and on every device. A stable descending sort gives exactly that order.

Metrics work on rankings of ids (any hashable: gallery positions, image names):

    recall@k   the fraction of queries with a relevant image among the first k
    mAP@k      the mean over queries of AP@k: the sum over the first k ranks of precision@rank at
               each relevant image, divided by min(k, number of relevant images) (as CIRCO defines it)
    soft recall@k  CIRR's validation variant: a query scores the largest weight of its soft targets
               found among the first k (1 for the hard target, less for partial matches), 0 if none
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Mapping, Sequence

import torch

RankedIds = Sequence[Hashable]


def inner_products(queries: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """(Q, G) float32 scores. Computed in float64 and rounded once: a float32 matrix product can give
    two identical gallery vectors different last bits by their column (vectorised blocks and their
    remainder), which would break exact ties."""
    return (queries.double() @ gallery.double().T).float()


def sort_best_first(scores: torch.Tensor) -> torch.Tensor:
    """Column indices of each row of `scores`, best first; exact ties by column (lower first)."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices


def rank_gallery(
    query_vectors: torch.Tensor,
    gallery_vectors: torch.Tensor,
    depth: int,
    excluded: Sequence[Collection[int]] | None = None,
    chunk: int = 1024,
) -> list[list[int]]:
    """Per query, the gallery positions of its `depth` best images by inner product (float32),
    best first, ties by gallery position, leaving out the positions in `excluded[q]`."""
    rankings: list[list[int]] = []
    for start in range(0, query_vectors.shape[0], chunk):
        scores = inner_products(query_vectors[start : start + chunk], gallery_vectors)
        left_out = excluded[start : start + chunk] if excluded is not None else [()] * scores.shape[0]
        for row, positions in enumerate(left_out):
            if positions:
                scores[row, list(positions)] = float("-inf")
        widest = max((len(p) for p in left_out), default=0)
        top = sort_best_first(scores)[:, : depth + widest].tolist()
        rankings += [[i for i in row if i not in positions][:depth] for row, positions in zip(top, left_out)]
    return rankings


def rank_subsets(query_vectors: torch.Tensor, gallery_vectors: torch.Tensor, subsets: Sequence[Sequence[int]]) -> list[list[int]]:
    """Per query, the gallery positions of its subset ordered by score, best first, ties by
    gallery position."""
    rankings = []
    for vector, subset in zip(query_vectors, subsets):
        members = sorted(subset)
        if not members:
            rankings.append([])
            continue
        scores = inner_products(vector[None], gallery_vectors[members])[0]
        rankings.append([members[i] for i in sort_best_first(scores).tolist()])
    return rankings


def merge_top_k(
    best_scores: torch.Tensor, best_positions: torch.Tensor, scores: torch.Tensor, positions: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of a running top k and a new chunk, ties by position. Both inputs must already be
    ordered best first with ties by position, and every new position must come after every
    position already kept (chunks scanned in gallery order): a stable sort then keeps that order."""
    merged_scores = torch.cat([best_scores, scores])
    merged_positions = torch.cat([best_positions, positions])
    keep = sort_best_first(merged_scores)[:k]
    return merged_scores[keep], merged_positions[keep]


def recall_at(rankings: Sequence[RankedIds], relevant: Sequence[Collection[Hashable]], ks: Sequence[int], name: str = "recall") -> dict[str, float]:
    """{f"{name}@{k}": the fraction of queries with a relevant id among their first k}."""
    return {
        f"{name}@{k}": sum(any(i in rel for i in ranking[:k]) for ranking, rel in zip(rankings, relevant)) / len(rankings)
        for k in ks
    }


def soft_recall_at(
    rankings: Sequence[RankedIds], soft_targets: Sequence[Mapping[Hashable, float]], ks: Sequence[int], name: str
) -> dict[str, float]:
    """{f"{name}@{k}": the mean over queries of the largest soft-target weight among the first k
    (0 when none is there, so negative weights never count)}."""
    metrics = {}
    for k in ks:
        total = 0.0
        for ranking, weights in zip(rankings, soft_targets):
            total += max([0.0] + [weights[i] for i in ranking[:k] if i in weights])
        metrics[f"{name}@{k}"] = total / len(rankings)
    return metrics


def average_precision_at(ranking: RankedIds, relevant: Collection[Hashable], k: int) -> float:
    """AP@k as CIRCO defines it (see the module docstring); 0 for a query with nothing relevant."""
    if not relevant:
        return 0.0
    hits, total = 0, 0.0
    for rank, image in enumerate(ranking[:k], start=1):
        if image in relevant:
            hits += 1
            total += hits / rank
    return total / min(k, len(relevant))


def mean_average_precision(rankings: Sequence[RankedIds], relevant: Sequence[Collection[Hashable]], ks: Sequence[int]) -> dict[str, float]:
    return {f"mAP@{k}": sum(average_precision_at(r, rel, k) for r, rel in zip(rankings, relevant)) / len(rankings) for k in ks}
