"""The standard composed-image-retrieval benchmarks, with their official protocols:
`magiclens evaluate --benchmark circo|cirr|fashioniq --data-dir DIR --checkpoint C [--split val|test]`.

Each loader reads the benchmark's published file layout from the folder the user downloaded:

    CIRCO      annotations/{val,test}.json (github.com/miccunifi/CIRCO), and the COCO 2017 unlabeled
               set: COCO2017_unlabeled/annotations/image_info_unlabeled2017.json plus
               COCO2017_unlabeled/unlabeled2017/000000xxxxxx.jpg. Gallery: every image listed in
               image_info_unlabeled2017.json (123,403).
    CIRR       captions/cap.rc2.{val,test1}.json, image_splits/split.rc2.{val,test1}.json (image name
               -> "./dev/..." relative path) and img_raw/ holding those paths (the NLVR2 images).
               Gallery: every image of the split.
    FashionIQ  captions/cap.{dress,shirt,toptee}.val.json, image_splits/split.{...}.val.json and
               images/NAME.png (or .jpg). Gallery: the category's val images.

Queries are built as the released MagicLens code builds them: CIRCO "find {shared_concept} but
{relative_caption}", FashionIQ the two captions joined with " and ", CIRR the caption as written.
Gallery images are embedded with the empty instruction, with the released preprocessing.

Protocols. CIRCO: mAP@k over all ground truths (gt_img_ids), AP normalised by min(k, #ground
truths), as the CIRCO evaluation server computes it; recall@k of the one target image too. CIRR:
the reference image is removed from the ranking; Recall@K over the whole split, Recall_subset@K
over the query's image set (img_set.members without the reference). FashionIQ: Recall@10 and @50
per category and their means; as in the released MagicLens evaluation, the gallery keeps the query
image. Test splits have no public answers: they produce the files that the CIRCO and CIRR
evaluation servers accept (top 50 image ids per query; CIRR also the top 3 of each image set).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from magiclens.model.checkpoint import CheckpointError, load_checkpoint
from magiclens.model.index import ImageRef, decoded_batches, embed_decoded
from magiclens.model.magiclens import MagicLens
from magiclens.model.preprocess import PreprocessConfig

BENCHMARKS = ("circo", "cirr", "fashioniq")
FASHIONIQ_CATEGORIES = ("dress", "shirt", "toptee")
CIRCO_MAP_AT = (5, 10, 25, 50)
CIRR_RECALL_AT = (1, 5, 10, 50)
CIRR_SUBSET_RECALL_AT = (1, 2, 3)
FASHIONIQ_RECALL_AT = (10, 50)
SUBMISSION_DEPTH = 50  # what the CIRCO and CIRR servers take per query
CIRR_SUBSET_SUBMISSION_DEPTH = 3


class BenchmarkDataError(ValueError):
    """The benchmark's files are missing or not in the published layout."""


@dataclass(frozen=True)
class Query:
    id: str  # CIRCO query id, CIRR pair id, "category/number" for FashionIQ
    image: Path
    text: str
    target: str | None = None  # the image the caption was written for; None on a test split
    relevant: tuple[str, ...] = ()  # every correct gallery id (CIRCO: gt_img_ids; else the target)
    reference: str | None = None  # gallery id removed from this query's ranking (CIRR)
    subset: tuple[str, ...] = ()  # CIRR: the image set ranked for Recall_subset (without the reference)


@dataclass
class Task:
    """One retrieval task: a gallery and the queries ranked against it."""

    name: str
    split: str
    gallery_ids: list[str]
    gallery_paths: list[Path]
    queries: list[Query] = field(default_factory=list)


# --- loaders ------------------------------------------------------------------------------------


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise BenchmarkDataError(f"{path} not found: {what}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BenchmarkDataError(f"{path} is not valid JSON: {error}") from error


def _field(entry: dict[str, Any], key: str, source: Path, number: int) -> Any:
    if key not in entry:
        raise BenchmarkDataError(f"{source}: entry {number} has no {key!r} (keys: {', '.join(entry)})")
    return entry[key]


def load_circo(data_dir: Path, split: str) -> Task:
    annotations_file = data_dir / "annotations" / f"{split}.json"
    annotations = _read_json(annotations_file, "CIRCO's annotations come from github.com/miccunifi/CIRCO (annotations/)")
    coco = data_dir / "COCO2017_unlabeled"
    info = _read_json(
        coco / "annotations" / "image_info_unlabeled2017.json",
        "unzip COCO's image_info_unlabeled2017.zip into COCO2017_unlabeled/",
    )
    images = coco / "unlabeled2017"

    def path_of(image_id: int | str) -> Path:
        return images / f"{int(image_id):012d}.jpg"

    gallery_ids = [str(image["id"]) for image in info["images"]]
    task = Task("circo", split, gallery_ids, [path_of(i) for i in gallery_ids])
    for number, entry in enumerate(annotations):

        def get(key: str) -> Any:
            return _field(entry, key, annotations_file, number)

        target, relevant = (str(get("target_img_id")), tuple(str(i) for i in get("gt_img_ids"))) if split == "val" else (None, ())
        text = f"find {get('shared_concept')} but {get('relative_caption')}"
        task.queries.append(Query(str(get("id")), path_of(get("reference_img_id")), text, target, relevant))
    return task


def load_cirr(data_dir: Path, split: str) -> Task:
    name = {"val": "val", "test": "test1"}[split]
    captions_file = data_dir / "captions" / f"cap.rc2.{name}.json"
    captions = _read_json(captions_file, "CIRR's annotations come from github.com/Cuberick-Orion/CIRR (captions/)")
    relative_paths = _read_json(
        data_dir / "image_splits" / f"split.rc2.{name}.json", "CIRR's image lists come with its annotations (image_splits/)"
    )
    images = data_dir / "img_raw"
    task = Task("cirr", split, list(relative_paths), [images / path for path in relative_paths.values()])
    for number, entry in enumerate(captions):
        reference = _field(entry, "reference", captions_file, number)
        members = _field(_field(entry, "img_set", captions_file, number), "members", captions_file, number)
        target = _field(entry, "target_hard", captions_file, number) if split == "val" else None
        strangers = [name for name in [reference, *members, *([target] if target else [])] if name not in relative_paths]
        if strangers:
            raise BenchmarkDataError(f"{captions_file}: entry {number} names {strangers[0]}, which is not in the image split")
        task.queries.append(
            Query(
                id=str(_field(entry, "pairid", captions_file, number)),
                image=images / relative_paths[reference],
                text=_field(entry, "caption", captions_file, number),
                target=target,
                relevant=(target,) if target else (),
                reference=reference,
                subset=tuple(m for m in members if m != reference),
            )
        )
    return task


def _fashioniq_image(images: Path, name: str) -> Path:
    png = images / f"{name}.png"
    return png if png.is_file() or not (images / f"{name}.jpg").is_file() else images / f"{name}.jpg"


def load_fashioniq(data_dir: Path, split: str, category: str) -> Task:
    if split != "val":
        raise BenchmarkDataError("FashionIQ has no public test server: evaluate it with --split val")
    captions_file = data_dir / "captions" / f"cap.{category}.val.json"
    captions = _read_json(captions_file, "FashionIQ's captions come from github.com/XiaoxiaoGuo/fashion-iq (captions/)")
    names = _read_json(data_dir / "image_splits" / f"split.{category}.val.json", "FashionIQ's image_splits/ folder")
    images = data_dir / "images"
    task = Task(f"fashioniq/{category}", split, list(names), [_fashioniq_image(images, n) for n in names])
    for number, entry in enumerate(captions):
        target = _field(entry, "target", captions_file, number)
        task.queries.append(
            Query(
                id=f"{category}/{number}",
                image=_fashioniq_image(images, _field(entry, "candidate", captions_file, number)),
                text=" and ".join(_field(entry, "captions", captions_file, number)),
                target=target,
                relevant=(target,),
            )
        )
    return task


def load_benchmark(name: str, data_dir: Path, split: str) -> list[Task]:
    """The tasks of a benchmark (FashionIQ: one per category), after checking every image exists."""
    if name == "circo":
        tasks = [load_circo(data_dir, split)]
    elif name == "cirr":
        tasks = [load_cirr(data_dir, split)]
    elif name == "fashioniq":
        tasks = [load_fashioniq(data_dir, split, category) for category in FASHIONIQ_CATEGORIES]
    else:
        raise BenchmarkDataError(f"unknown benchmark {name!r}; choose one of: {', '.join(BENCHMARKS)}")
    for task in tasks:
        if not task.queries or not task.gallery_ids:
            raise BenchmarkDataError(f"{task.name} {split}: {len(task.queries)} queries and {len(task.gallery_ids)} gallery images")
        missing = sorted({str(p) for p in task.gallery_paths + [q.image for q in task.queries] if not p.is_file()})
        if missing:
            raise BenchmarkDataError(
                f"{task.name} {split}: {len(missing)} image file(s) missing, e.g. {', '.join(missing[:3])}; "
                "see docs/use.md for the folder layout"
            )
    return tasks


# --- metrics (on ranked gallery ids) ------------------------------------------------------------


def average_precision_at(ranking: Sequence[str], relevant: Collection[str], k: int) -> float:
    """AP@k as CIRCO defines it: the sum over the first k ranks of precision@rank at each relevant
    image, divided by min(k, number of relevant images)."""
    hits, total = 0, 0.0
    for rank, image in enumerate(ranking[:k], start=1):
        if image in relevant:
            hits += 1
            total += hits / rank
    return total / min(k, len(relevant))


def mean_average_precision(rankings: Sequence[Sequence[str]], relevants: Sequence[Collection[str]], ks: Sequence[int]) -> dict[str, float]:
    return {f"mAP@{k}": sum(average_precision_at(r, rel, k) for r, rel in zip(rankings, relevants)) / len(rankings) for k in ks}


def recall(rankings: Sequence[Sequence[str]], targets: Sequence[str], ks: Sequence[int], prefix: str = "recall") -> dict[str, float]:
    """The fraction of queries whose target is among the first k."""
    return {f"{prefix}@{k}": sum(t in r[:k] for r, t in zip(rankings, targets)) / len(rankings) for k in ks}


def circo_metrics(task: Task, rankings: list[list[str]]) -> dict[str, float]:
    metrics = mean_average_precision(rankings, [q.relevant for q in task.queries], CIRCO_MAP_AT)
    metrics.update(recall(rankings, [q.target for q in task.queries], CIRCO_MAP_AT))
    return metrics


def cirr_metrics(task: Task, rankings: list[list[str]], subset_rankings: list[list[str]]) -> dict[str, float]:
    targets = [q.target for q in task.queries]
    metrics = recall(rankings, targets, CIRR_RECALL_AT)
    metrics.update(recall(subset_rankings, targets, CIRR_SUBSET_RECALL_AT, prefix="recall_subset"))
    # the figure CIRR papers rank by
    metrics["mean(recall@5,recall_subset@1)"] = (metrics["recall@5"] + metrics["recall_subset@1"]) / 2
    return metrics


def fashioniq_metrics(per_category: dict[str, tuple[Task, list[list[str]]]]) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for category, (task, rankings) in per_category.items():
        for name, value in recall(rankings, [q.target for q in task.queries], FASHIONIQ_RECALL_AT).items():
            metrics[f"{category}/{name}"] = value
    for k in FASHIONIQ_RECALL_AT:
        metrics[f"mean/recall@{k}"] = sum(metrics[f"{c}/recall@{k}"] for c in per_category) / len(per_category)
    metrics["mean"] = sum(metrics[f"mean/recall@{k}"] for k in FASHIONIQ_RECALL_AT) / len(FASHIONIQ_RECALL_AT)
    return metrics


# --- ranking ------------------------------------------------------------------------------------


def rank_gallery(
    query_vectors: torch.Tensor,
    gallery_vectors: torch.Tensor,
    depth: int,
    excluded: Sequence[int | None],
    chunk: int = 1024,
) -> list[list[int]]:
    """Per query, the gallery positions of its `depth` best images by inner product, best first,
    leaving out the position `excluded[q]` (None: nothing left out)."""
    rankings = []
    for start in range(0, query_vectors.shape[0], chunk):
        scores = query_vectors[start : start + chunk].float() @ gallery_vectors.float().T
        left_out = excluded[start : start + chunk]
        for row, position in enumerate(left_out):
            if position is not None:
                scores[row, position] = float("-inf")
        top = scores.topk(min(depth, gallery_vectors.shape[0]), dim=1).indices.tolist()
        # a left-out image can only reach the top when the gallery is no larger than `depth`
        rankings += [[i for i in row if i != position] for row, position in zip(top, left_out)]
    return rankings


def rank_subsets(query_vectors: torch.Tensor, gallery_vectors: torch.Tensor, subsets: Sequence[Sequence[int]]) -> list[list[int]]:
    """Per query, its subset's gallery positions ordered by score, best first."""
    rankings = []
    for vector, subset in zip(query_vectors, subsets):
        scores = gallery_vectors[list(subset)].float() @ vector.float()
        rankings.append([subset[i] for i in scores.argsort(descending=True).tolist()])
    return rankings


# --- embedding ----------------------------------------------------------------------------------


def embed_images(
    model: MagicLens,
    preprocess: PreprocessConfig,
    paths: list[Path],
    instructions: list[str],
    batch_size: int,
    num_workers: int,
    device: torch.device,
    what: str,
) -> torch.Tensor:
    """(n, D) float32 embeddings of image files, each with its instruction; every image must decode."""
    refs = [ImageRef(str(path)) for path in paths]
    parts, failures = [], []
    with tqdm(total=len(refs), desc=what, unit="img", disable=None, file=sys.stderr) as progress:
        for batch in decoded_batches(refs, preprocess.image_size, batch_size, num_workers):
            failures += [f"{refs[i].source} ({detail})" for i, _, detail in batch.rejected]
            texts = [instructions[i] for i in batch.indices]
            parts.append(embed_decoded(model, preprocess, batch.pixels, batch.max_values, texts, device))
            progress.update(len(batch.indices) + len(batch.rejected))
    if failures:
        raise BenchmarkDataError(f"{len(failures)} {what} image(s) could not be read, e.g. {'; '.join(failures[:3])}")
    return torch.cat(parts)


def rank_task(
    model: MagicLens, preprocess: PreprocessConfig, task: Task, batch_size: int, num_workers: int, device: torch.device
) -> tuple[list[list[str]], list[list[str]]]:
    """Top-50 rankings of gallery ids per query (reference removed where the protocol says so),
    and the subset rankings (empty lists where a query has no subset)."""
    gallery = embed_images(
        model, preprocess, task.gallery_paths, [""] * len(task.gallery_paths), batch_size, num_workers, device, f"{task.name} gallery"
    )
    queries = embed_images(
        model, preprocess, [q.image for q in task.queries], [q.text for q in task.queries], batch_size, num_workers, device, f"{task.name} queries"
    )
    position = {image_id: number for number, image_id in enumerate(task.gallery_ids)}
    excluded = [position[q.reference] if q.reference is not None else None for q in task.queries]
    ranked = rank_gallery(queries, gallery, SUBMISSION_DEPTH, excluded)
    subsets = [[position[m] for m in q.subset] for q in task.queries]
    ranked_subsets = rank_subsets(queries, gallery, subsets)
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


def _write_json(path: Path, data: Any) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return str(path)


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
) -> dict[str, Any]:
    """The report of one benchmark: its metrics (val) or the submission files it wrote (test)."""
    if split == "test" and output is None:
        raise BenchmarkDataError("--split test writes the evaluation server's submission file(s): give --output DIR")
    tasks = load_benchmark(name, data_dir, split)
    ranked = {task.name: (task, *rank_task(model, preprocess, task, batch_size, num_workers, device)) for task in tasks}
    report: dict[str, Any] = {
        "benchmark": name,
        "split": split,
        "queries": sum(len(t.queries) for t in tasks),
        "gallery": sum(len(t.gallery_ids) for t in tasks),
    }
    if split == "test":
        task, rankings, subset_rankings = ranked[tasks[0].name]
        assert output is not None
        if name == "circo":
            files = [_write_json(output / "circo_test_submission.json", circo_submission(task, rankings))]
        else:
            recall_file, subset_file = cirr_submissions(task, rankings, subset_rankings)
            files = [
                _write_json(output / "cirr_test1_recall.json", recall_file),
                _write_json(output / "cirr_test1_recall_subset.json", subset_file),
            ]
        report["submission_files"] = files
        return report
    if name == "circo":
        task, rankings, _ = ranked["circo"]
        report.update(circo_metrics(task, rankings))
    elif name == "cirr":
        task, rankings, subset_rankings = ranked["cirr"]
        report.update(cirr_metrics(task, rankings, subset_rankings))
    else:
        report.update(fashioniq_metrics({t.name.split("/")[1]: (t, r) for t, r, _ in ranked.values()}))
    return report


# --- the command --------------------------------------------------------------------------------


def add_benchmark_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that select a standard benchmark (shared with `magiclens evaluate`; an argument
    group works as well as a parser)."""
    parser.add_argument("--benchmark", choices=BENCHMARKS, help="evaluate on a standard benchmark instead of --data")
    parser.add_argument("--data-dir", help="the benchmark's folder, in its published layout (see docs/use.md)")
    parser.add_argument(
        "--split",
        choices=("val", "test"),
        default="val",
        help="val: compute the metrics; test (CIRCO, CIRR): write the evaluation server's submission file(s) to --output",
    )
    parser.add_argument("--output", help="folder for the test-split submission file(s)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a checkpoint directory, or a `magiclens train --output` directory")
    add_benchmark_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=64, help="images embedded per batch (default: 64)")
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes that decode images (default: 2)")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
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
