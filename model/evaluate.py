"""`magiclens evaluate`: retrieval metrics of a checkpoint on a triplet dataset.

Queries are the distinct (query image, instruction) pairs of the dataset; a query's relevant images
are the targets of every triplet with that pair. The gallery is the set of distinct target images
(by content hash), embedded with the empty instruction. As in CIRR, a query's own image is left out
of its ranking unless it is one of its targets.

recall@k and mAP@k as model/metrics.py defines them (mAP@k as CIRCO does); exact ties rank by
gallery position (the order in which target images first appear in the data). Embeddings are
float32 unless --precision bf16.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from magiclens.model.arguments import add_evaluate_arguments as add_arguments  # noqa: F401 - re-exported
from magiclens.model import benchmarks
from magiclens.model.checkpoint import CheckpointError, load_checkpoint
from magiclens.model.data import DatasetError, DataPosition, RowGroup, TripletBatches, consumer_rows, decode_row, plan_row_groups
from magiclens.model.embed import embed_decoded
from magiclens.model.magiclens import MagicLens
from magiclens.model.metrics import mean_average_precision, rank_gallery, recall_at
from magiclens.model.preprocess import PreprocessConfig
from magiclens.model.progress import counted

RECALL_AT = (1, 5, 10, 50)
MAP_AT = (5, 10, 25, 50)


@dataclass
class EmbeddedSet:
    """Distinct queries and distinct gallery images of a dataset, embedded."""

    query_vectors: torch.Tensor  # (Q, D)
    query_image_hashes: torch.Tensor  # (Q,)
    relevant: list[set[int]]  # per query: the hashes of its target images
    gallery_vectors: torch.Tensor  # (G, D)
    gallery_hashes: torch.Tensor  # (G,)
    triplets: int
    rejected: dict[str, int]


def count_rejects(plan: list[RowGroup], image_size: int) -> dict[str, int]:
    """Every row's reason for being unusable, by reason (a second pass, for data with no usable row)."""
    reasons: Counter[str] = Counter()
    for row in consumer_rows(plan, 0, 1, shuffle=False, seed=0, repeat=False, buffer_size=0):
        decoded = decode_row(row, image_size)
        if isinstance(decoded, str):
            reasons[decoded] += 1
    return dict(reasons)


@torch.inference_mode()
def embed_dataset(
    model: MagicLens,
    preprocess: PreprocessConfig,
    plan: list[RowGroup],
    batch_size: int,
    num_workers: int,
    device: torch.device,
    precision: str = "fp32",
) -> EmbeddedSet:
    """One pass over the data: each distinct query and each distinct target image embedded once."""
    dataset = TripletBatches(
        plan, model.tokenizer, preprocess.image_size, batch_size, num_workers=num_workers, shuffle=False, repeat=False
    )
    position = DataPosition()
    query_index: dict[tuple[int, str], int] = {}  # (query image hash, instruction) -> query number
    relevant: list[set[int]] = []
    gallery_index: dict[int, int] = {}  # target image hash -> gallery number
    query_parts, gallery_parts = [], []
    triplets = 0
    batches = DataLoader(dataset, batch_size=None, num_workers=num_workers)
    total = sum(group.num_rows for group in plan)
    for batch in counted(batches, total, "evaluating", "triplets", lambda batch: len(batch["triplet_id"])):
        position.advance(batch)
        triplets += len(batch["triplet_id"])
        new_queries, new_targets = [], []
        rows = zip(batch["query_hash"].tolist(), batch["instruction"], batch["target_hash"].tolist())
        for row, (query_hash, instruction, target_hash) in enumerate(rows):
            key = (query_hash, instruction)
            if key not in query_index:
                query_index[key] = len(query_index)
                relevant.append(set())
                new_queries.append(row)
            relevant[query_index[key]].add(target_hash)
            if target_hash not in gallery_index:
                gallery_index[target_hash] = len(gallery_index)
                new_targets.append(row)
        texts = [batch["instruction"][row] for row in new_queries]
        query_parts.append(
            embed_decoded(model, preprocess, batch["query_pixels"][new_queries], batch["query_max"][new_queries], texts, device, precision)
        )
        empty = [""] * len(new_targets)
        gallery_parts.append(
            embed_decoded(model, preprocess, batch["target_pixels"][new_targets], batch["target_max"][new_targets], empty, device, precision)
        )
    if not query_index:
        rejects = count_rejects(plan, preprocess.image_size)
        counts = ", ".join(f"{reason}: {count}" for reason, count in sorted(rejects.items())) or "the data has no rows"
        raise DatasetError(f"no usable triplet in the data (rejected rows by reason: {counts})")
    return EmbeddedSet(
        query_vectors=torch.cat(query_parts),
        query_image_hashes=torch.tensor([key[0] for key in query_index]),
        relevant=relevant,
        gallery_vectors=torch.cat(gallery_parts),
        gallery_hashes=torch.tensor(list(gallery_index)),
        triplets=triplets,
        rejected=position.rejects(),
    )


def retrieval_metrics(embedded: EmbeddedSet, chunk: int = 1024) -> dict[str, float]:
    """recall@k and mAP@k over all queries; a query's own image is left out of its ranking unless
    it is one of its targets."""
    position_of = {h: i for i, h in enumerate(embedded.gallery_hashes.tolist())}
    relevant = [{position_of[h] for h in targets} for targets in embedded.relevant]
    excluded = []
    for query_hash, targets in zip(embedded.query_image_hashes.tolist(), relevant):
        own = position_of.get(query_hash)
        excluded.append((own,) if own is not None and own not in targets else ())
    depth = max(RECALL_AT + MAP_AT)
    rankings = rank_gallery(embedded.query_vectors, embedded.gallery_vectors, depth, excluded, chunk)
    metrics = recall_at(rankings, relevant, RECALL_AT)
    metrics.update(mean_average_precision(rankings, relevant, MAP_AT))
    return metrics


def run(args: argparse.Namespace, extra: list[str]) -> int:
    if args.batch_size < 1 or args.num_workers < 0:
        raise SystemExit("--batch-size must be at least 1 and --num-workers 0 or more")
    if args.benchmark:
        return benchmarks.run(args, extra)
    if not args.data:
        print("magiclens evaluate: give --data GLOB, or --benchmark NAME --data-dir DIR", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        model, _, preprocess = load_checkpoint(args.checkpoint, device)
        plan = plan_row_groups(args.data)
        embedded = embed_dataset(model, preprocess, plan, args.batch_size, args.num_workers, device, args.precision)
    except (DatasetError, CheckpointError) as error:
        print(f"magiclens evaluate: {error}", file=sys.stderr)
        return 2
    report: dict[str, object] = dict(retrieval_metrics(embedded))
    gallery = embedded.gallery_hashes.shape[0]
    trivial = sorted(k for k in set(RECALL_AT + MAP_AT) if k >= gallery)
    if trivial:
        print(f"magiclens evaluate: warning: the gallery holds only {gallery} images, so the metrics at k = "
              f"{', '.join(map(str, trivial))} rank the whole gallery (recall@k is 1 by construction); "
              "evaluate on more triplets for them to mean anything", file=sys.stderr)
    report.update(
        precision=args.precision,
        queries=embedded.query_vectors.shape[0],
        gallery=embedded.gallery_hashes.shape[0],
        triplets=embedded.triplets,
        rejected=embedded.rejected,
    )
    if args.json:
        print(json.dumps(report))
    else:
        for name, value in report.items():
            print(f"{name:<12} {value:.4f}" if isinstance(value, float) else f"{name:<12} {value}")
    return 0
