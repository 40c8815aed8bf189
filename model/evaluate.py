"""`magiclens evaluate`: retrieval metrics of a checkpoint on a triplet dataset.

Queries are the distinct (query image, instruction) pairs of the dataset; a query's relevant images
are the targets of every triplet with that pair. The gallery is the set of distinct target images
(by content hash), embedded with the empty instruction. As in CIRR, a query's own image is left out
of its ranking unless it is one of its targets.

recall@k: the fraction of queries with a relevant image among the first k.
mAP@k: the mean over queries of average precision at k, normalised by min(k, number relevant)
(as in CIRCO).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from magiclens.model import benchmarks
from magiclens.model.checkpoint import CheckpointError, load_checkpoint
from magiclens.model.data import DatasetError, DataPosition, RowGroup, TripletBatches, plan_row_groups
from magiclens.model.magiclens import MagicLens
from magiclens.model.preprocess import PreprocessConfig, to_model_input

RECALL_AT = (1, 5, 10, 50)
MAP_AT = (5, 10, 25, 50)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a checkpoint directory, or a `magiclens train --output` directory")
    parser.add_argument("--data", help="Parquet triplet shards: a file or a glob, local or gs:// (or use --benchmark)")
    parser.add_argument("--batch-size", type=int, default=64, help="triplets embedded per batch")
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes that decode images")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--json", action="store_true", help="print exactly one JSON object (metrics as fractions in [0, 1]) on stdout"
    )
    benchmarks.add_benchmark_arguments(parser.add_argument_group("standard benchmarks (instead of --data)"))


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


@torch.inference_mode()
def embed_dataset(
    model: MagicLens,
    preprocess: PreprocessConfig,
    plan: list[RowGroup],
    batch_size: int,
    num_workers: int,
    device: torch.device,
) -> EmbeddedSet:
    """One pass over the data: each distinct query and each distinct target image embedded once."""
    dataset = TripletBatches(
        plan, model.tokenizer, preprocess.image_size, batch_size, num_workers=num_workers, shuffle=False, repeat=False
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    position = DataPosition()
    query_index: dict[tuple[int, str], int] = {}  # (query image hash, instruction) -> query number
    relevant: list[set[int]] = []
    gallery_index: dict[int, int] = {}  # target image hash -> gallery number
    query_parts, gallery_parts = [], []
    triplets = 0
    for batch in DataLoader(dataset, batch_size=None, num_workers=num_workers):
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
        with autocast:
            if new_queries:
                pixels = to_model_input(
                    batch["query_pixels"][new_queries].to(device), batch["query_max"][new_queries].to(device), preprocess
                )
                query_parts.append(model(pixels, batch["input_ids"][new_queries].to(device)).cpu())
            if new_targets:
                pixels = to_model_input(
                    batch["target_pixels"][new_targets].to(device), batch["target_max"][new_targets].to(device), preprocess
                )
                empty = model.empty_instruction_ids.expand(len(new_targets), -1)
                gallery_parts.append(model(pixels, empty).cpu())
    if not query_index:
        raise DatasetError(f"no usable triplet in the data (rejected rows: {position.rejects()})")
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
    """recall@k and mAP@k over all queries."""
    gallery_size = embedded.gallery_hashes.shape[0]
    depth = min(max(RECALL_AT + MAP_AT), gallery_size)
    position_of = {h: i for i, h in enumerate(embedded.gallery_hashes.tolist())}
    recall = {k: 0.0 for k in RECALL_AT}
    average_precision = {k: 0.0 for k in MAP_AT}
    ranks = torch.arange(1, depth + 1, dtype=torch.float32)
    for start in range(0, embedded.query_vectors.shape[0], chunk):
        vectors = embedded.query_vectors[start : start + chunk]
        is_relevant = torch.zeros(vectors.shape[0], gallery_size, dtype=torch.bool)
        for row, targets in enumerate(embedded.relevant[start : start + chunk]):
            is_relevant[row, [position_of[h] for h in targets]] = True
        scores = vectors.float() @ embedded.gallery_vectors.float().T
        own_image = embedded.query_image_hashes[start : start + chunk, None] == embedded.gallery_hashes[None, :]
        scores = scores.masked_fill(own_image & ~is_relevant, float("-inf"))
        hits = is_relevant.gather(1, scores.topk(depth, dim=1).indices).float()  # (chunk, depth)
        for k in RECALL_AT:
            recall[k] += hits[:, :k].amax(dim=1).sum().item()
        precision_at_rank = hits.cumsum(dim=1) / ranks
        relevant_count = is_relevant.sum(dim=1).float()
        for k in MAP_AT:
            top = (precision_at_rank[:, :k] * hits[:, :k]).sum(dim=1)
            average_precision[k] += (top / relevant_count.clamp(max=k)).sum().item()
    queries = embedded.query_vectors.shape[0]
    metrics = {f"recall@{k}": v / queries for k, v in recall.items()}
    metrics.update({f"mAP@{k}": v / queries for k, v in average_precision.items()})
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
        embedded = embed_dataset(model, preprocess, plan_row_groups(args.data), args.batch_size, args.num_workers, device)
    except (DatasetError, CheckpointError) as error:
        print(f"magiclens evaluate: {error}", file=sys.stderr)
        return 2
    report: dict[str, object] = dict(retrieval_metrics(embedded))
    report.update(
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
