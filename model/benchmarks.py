"""The standard composed-image-retrieval benchmarks, with their official protocols:
`magiclens evaluate --benchmark circo|cirr|fashioniq --data-dir DIR --checkpoint C [--split val|test]`.

The files and their layouts: see model/benchmark_data.py. Gallery images are embedded with the
empty instruction, with the released preprocessing, in float32 unless --precision bf16.

Protocols. CIRCO: mAP@k over all ground truths (gt_img_ids), AP normalised by min(k, #ground
truths), as the CIRCO evaluation server computes it; recall@k of the one target image too. CIRR:
the reference image is removed from the ranking; Recall@K over the whole split, Recall_subset@K
over the query's image set (img_set.members without the reference); beside them the soft-target
variant of CIRR's own validation code (soft_recall@K, soft_recall_subset@K: a query scores the
largest target_soft weight among its first K, so other positives earn partial credit). FashionIQ:
Recall@10 and @50 per category and their means; as in the released MagicLens evaluation and the
official starter kit, the gallery keeps the query image. Exact ties rank by gallery position.

Test splits have no public answers: they produce the files the evaluation servers take (CIRCO,
CIRR: top 50 image ids per query, CIRR also the top 3 of each image set; FashionIQ: the starter
kit's {category}.test.pred.json, the caption entries each with its top-50 "ranking").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from magiclens.model.arguments import add_benchmark_arguments, add_precision_argument
from magiclens.model.benchmark_data import BenchmarkDataError, Task, load_benchmark
from magiclens.model.checkpoint import CheckpointError, load_checkpoint
from magiclens.model.embed import embed_files
from magiclens.model.magiclens import MagicLens
from magiclens.model.metrics import mean_average_precision, rank_gallery, rank_subsets, recall_at, soft_recall_at
from magiclens.model.preprocess import PreprocessConfig

CIRCO_MAP_AT = (5, 10, 25, 50)
CIRR_RECALL_AT = (1, 5, 10, 50)
CIRR_SUBSET_RECALL_AT = (1, 2, 3)
FASHIONIQ_RECALL_AT = (10, 50)
SUBMISSION_DEPTH = 50  # what the CIRCO and CIRR servers (and FashionIQ's starter kit) take per query
CIRR_SUBSET_SUBMISSION_DEPTH = 3


# --- metrics (on ranked gallery ids) ------------------------------------------------------------


def circo_metrics(task: Task, rankings: list[list[str]]) -> dict[str, float]:
    metrics = mean_average_precision(rankings, [q.relevant for q in task.queries], CIRCO_MAP_AT)
    metrics.update(recall_at(rankings, [(q.target,) for q in task.queries], CIRCO_MAP_AT))
    return metrics


def cirr_metrics(task: Task, rankings: list[list[str]], subset_rankings: list[list[str]]) -> dict[str, float]:
    targets = [(q.target,) for q in task.queries]
    metrics = recall_at(rankings, targets, CIRR_RECALL_AT)
    metrics.update(recall_at(subset_rankings, targets, CIRR_SUBSET_RECALL_AT, name="recall_subset"))
    # the figure CIRR papers rank by
    metrics["mean(recall@5,recall_subset@1)"] = (metrics["recall@5"] + metrics["recall_subset@1"]) / 2
    soft = [q.soft_targets or {q.target: 1.0} for q in task.queries]
    metrics.update(soft_recall_at(rankings, soft, CIRR_RECALL_AT, name="soft_recall"))
    metrics.update(soft_recall_at(subset_rankings, soft, CIRR_SUBSET_RECALL_AT, name="soft_recall_subset"))
    return metrics


def fashioniq_metrics(per_category: dict[str, tuple[Task, list[list[str]]]]) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for category, (task, rankings) in per_category.items():
        for name, value in recall_at(rankings, [(q.target,) for q in task.queries], FASHIONIQ_RECALL_AT).items():
            metrics[f"{category}/{name}"] = value
    for k in FASHIONIQ_RECALL_AT:
        metrics[f"mean/recall@{k}"] = sum(metrics[f"{c}/recall@{k}"] for c in per_category) / len(per_category)
    metrics["mean"] = sum(metrics[f"mean/recall@{k}"] for k in FASHIONIQ_RECALL_AT) / len(FASHIONIQ_RECALL_AT)
    return metrics


# --- ranking ------------------------------------------------------------------------------------


def rank_task(
    model: MagicLens,
    preprocess: PreprocessConfig,
    task: Task,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    precision: str = "fp32",
) -> tuple[list[list[str]], list[list[str]]]:
    """Top-50 rankings of gallery ids per query (reference removed where the protocol says so),
    and the subset rankings (empty lists where a query has no subset)."""

    def embed(paths: list[Path], texts: list[str], what: str) -> torch.Tensor:
        vectors, failures = embed_files(
            model, preprocess, paths, texts, batch_size=batch_size, num_workers=num_workers, device=device, precision=precision, what=what
        )
        if failures:
            raise BenchmarkDataError(f"{len(failures)} {what} image(s) could not be read, e.g. {'; '.join(failures[:3])}")
        return vectors

    gallery = embed(task.gallery_paths, [""] * len(task.gallery_paths), f"{task.name} gallery")
    queries = embed([q.image for q in task.queries], [q.text for q in task.queries], f"{task.name} queries")
    position = {image_id: number for number, image_id in enumerate(task.gallery_ids)}
    excluded = [(position[q.reference],) if q.reference is not None else () for q in task.queries]
    ranked = rank_gallery(queries, gallery, SUBMISSION_DEPTH, excluded)
    ranked_subsets = rank_subsets(queries, gallery, [[position[m] for m in q.subset] for q in task.queries])
    ids = task.gallery_ids
    return [[ids[i] for i in row] for row in ranked], [[ids[i] for i in row] for row in ranked_subsets]


# --- submissions --------------------------------------------------------------------------------


def circo_submission(task: Task, rankings: list[list[str]]) -> dict[str, list[int]]:
    """{query id: top 50 COCO image ids}, the CIRCO evaluation server's format."""
    return {q.id: [int(i) for i in r[:SUBMISSION_DEPTH]] for q, r in zip(task.queries, rankings)}


def cirr_submissions(task: Task, rankings: list[list[str]], subset_rankings: list[list[str]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The two files the CIRR server takes: top 50 per pair id (recall) and top 3 of the image set
    (recall_subset), each with its version and metric entries."""
    recall_file: dict[str, Any] = {"version": "rc2", "metric": "recall"}
    subset_file: dict[str, Any] = {"version": "rc2", "metric": "recall_subset"}
    for query, ranking, subset_ranking in zip(task.queries, rankings, subset_rankings):
        recall_file[query.id] = ranking[:SUBMISSION_DEPTH]
        subset_file[query.id] = subset_ranking[:CIRR_SUBSET_SUBMISSION_DEPTH]
    return recall_file, subset_file


def fashioniq_submission(task: Task, rankings: list[list[str]]) -> list[dict[str, Any]]:
    """The official starter kit's prediction file: its caption entries, in order, each with a
    "ranking" of the top 50 image names."""
    return [{**entry, "ranking": ranking[:SUBMISSION_DEPTH]} for entry, ranking in zip(task.annotations, rankings)]


def _write_json(path: Path, data: Any) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return str(path)


def _write_submissions(name: str, ranked: dict[str, tuple[Task, list[list[str]], list[list[str]]]], output: Path) -> list[str]:
    if name == "circo":
        task, rankings, _ = ranked["circo"]
        return [_write_json(output / "circo_test_submission.json", circo_submission(task, rankings))]
    if name == "cirr":
        recall_file, subset_file = cirr_submissions(*ranked["cirr"])
        return [
            _write_json(output / "cirr_test1_recall.json", recall_file),
            _write_json(output / "cirr_test1_recall_subset.json", subset_file),
        ]
    return [
        _write_json(output / f"{task.name.split('/')[1]}.test.pred.json", fashioniq_submission(task, rankings))
        for task, rankings, _ in ranked.values()
    ]


def evaluate_benchmark(
    model: MagicLens,
    preprocess: PreprocessConfig,
    name: str,
    data_dir: Path,
    split: str,
    output: Path | None,
    batch_size: int = 64,
    num_workers: int = 2,
    device: torch.device = torch.device("cpu"),
    precision: str = "fp32",
    dump_rankings: Path | None = None,
) -> dict[str, Any]:
    """The report of one benchmark: its metrics (val) or the submission files it wrote (test).
    `dump_rankings` (val): also write {query id: top-50 gallery ids} there as JSON."""
    if split == "test" and output is None:
        raise BenchmarkDataError("--split test writes the evaluation server's submission file(s): give --output DIR")
    if split == "test" and dump_rankings is not None:
        raise BenchmarkDataError("--dump-rankings is for --split val; --split test writes its rankings to --output")
    tasks = load_benchmark(name, data_dir, split)
    ranked = {task.name: (task, *rank_task(model, preprocess, task, batch_size, num_workers, device, precision)) for task in tasks}
    report: dict[str, Any] = {
        "benchmark": name,
        "split": split,
        "precision": precision,
        "queries": sum(len(t.queries) for t in tasks),
        "gallery": sum(len(t.gallery_ids) for t in tasks),
    }
    if split == "test":
        assert output is not None
        report["submission_files"] = _write_submissions(name, ranked, output)
        return report
    if name == "circo":
        task, rankings, _ = ranked["circo"]
        report.update(circo_metrics(task, rankings))
    elif name == "cirr":
        report.update(cirr_metrics(*ranked["cirr"]))
    else:
        report.update(fashioniq_metrics({t.name.split("/")[1]: (t, r) for t, r, _ in ranked.values()}))
    if dump_rankings is not None:
        dumped = {q.id: r for task, rankings, _ in ranked.values() for q, r in zip(task.queries, rankings)}
        report["rankings_file"] = _write_json(dump_rankings, dumped)
    return report


# --- the command --------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a checkpoint directory, or a `magiclens train --output` directory")
    add_benchmark_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=64, help="images embedded per batch (default: 64)")
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes that decode images (default: 2)")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    add_precision_argument(parser)
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object (metrics as fractions in [0, 1]) on stdout")


def run(args: argparse.Namespace, extra: list[str]) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        if not args.benchmark or not args.data_dir:
            raise BenchmarkDataError("give --benchmark circo|cirr|fashioniq and --data-dir DIR")
        if not Path(args.data_dir).is_dir():
            raise BenchmarkDataError(f"--data-dir {args.data_dir} is not a folder")
        model, _, preprocess = load_checkpoint(args.checkpoint, device)
        report = evaluate_benchmark(
            model,
            preprocess,
            args.benchmark,
            Path(args.data_dir),
            args.split,
            Path(args.output) if args.output else None,
            args.batch_size,
            args.num_workers,
            device,
            args.precision,
            Path(args.dump_rankings) if args.dump_rankings else None,
        )
    except (BenchmarkDataError, CheckpointError) as error:
        print(f"magiclens evaluate: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report))
    else:
        for name, value in report.items():
            if isinstance(value, float):
                print(f"{name:<32} {100 * value:6.2f}")
            else:
                print(f"{name:<32} {value}")
    return 0
