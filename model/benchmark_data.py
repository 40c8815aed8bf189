"""The standard composed-image-retrieval benchmarks' files, read from the folder the user downloaded,
in each layout that is in common use:

    CIRCO      annotations/{val,test}.json (github.com/miccunifi/CIRCO), and the COCO 2017 unlabeled
               set: COCO2017_unlabeled/annotations/image_info_unlabeled2017.json plus
               COCO2017_unlabeled/unlabeled2017/000000xxxxxx.jpg. Gallery: every image listed in
               image_info_unlabeled2017.json (123,403).
    CIRR       the CIRR README's layout: captions/cap.rc2.{val,test1}.json,
               image_splits/split.rc2.{val,test1}.json (image name -> "./dev/..." relative path)
               and img_raw/ holding those paths; or the layout of CLIP4Cir and SEARLE: the same two
               folders under cirr/, and the images under the root itself (<root>/dev/...).
               Gallery: every image of the split.
    FashionIQ  captions/cap.{dress,shirt,toptee}.{val,test}.json, image_splits/split.{...}.json, and
               the images either in images/NAME.png or .jpg (CLIP4Cir, SEARLE, MagicLens) or in the
               official starter kit's resized_images/{category}/NAME.jpg; the root may also be the
               starter kit folder that holds data/. Gallery: the category's images of the split.

Queries are built as the released MagicLens code builds them: CIRCO "find {shared_concept} but
{relative_caption}", FashionIQ the two captions joined with " and ", CIRR the caption as written.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from magiclens.model.arguments import BENCHMARKS

FASHIONIQ_CATEGORIES = ("dress", "shirt", "toptee")


class BenchmarkDataError(ValueError):
    """The benchmark's files are missing or not in a known layout."""


@dataclass(frozen=True)
class Query:
    id: str  # CIRCO query id, CIRR pair id, "category/number" for FashionIQ
    image: Path
    text: str
    target: str | None = None  # the image the caption was written for; None on a test split
    relevant: tuple[str, ...] = ()  # every correct gallery id (CIRCO: gt_img_ids; else the target)
    reference: str | None = None  # gallery id removed from this query's ranking (CIRR)
    subset: tuple[str, ...] = ()  # CIRR: the image set ranked for Recall_subset (without the reference)
    soft_targets: Mapping[str, float] = field(default_factory=dict)  # CIRR val: target_soft (image -> weight)


@dataclass
class Task:
    """One retrieval task: a gallery and the queries ranked against it."""

    name: str
    split: str
    gallery_ids: list[str]
    gallery_paths: list[Path]
    queries: list[Query] = field(default_factory=list)
    annotations: list[dict[str, Any]] = field(default_factory=list)  # FashionIQ: the caption entries, per query


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


def _no_layout(benchmark: str, data_dir: Path, expected: list[Path]) -> BenchmarkDataError:
    return BenchmarkDataError(
        f"{data_dir} is in no {benchmark} layout this tool reads: expected "
        + " or ".join(str(p) for p in expected)
        + " (see docs/use.md for the folder layouts)"
    )


def _cirr_layout(data_dir: Path, name: str) -> tuple[Path, Path]:
    """(the folder holding captions/ and image_splits/, the folder the split's relative image
    paths start from)."""
    layouts = [(data_dir, data_dir / "img_raw"), (data_dir / "cirr", data_dir)]  # CIRR README; CLIP4Cir and SEARLE
    for annotations, images in layouts:
        if (annotations / "captions" / f"cap.rc2.{name}.json").is_file():
            return annotations, images
    raise _no_layout("CIRR", data_dir, [a / "captions" / f"cap.rc2.{name}.json" for a, _ in layouts])


def load_cirr(data_dir: Path, split: str) -> Task:
    name = {"val": "val", "test": "test1"}[split]
    annotations, images = _cirr_layout(data_dir, name)
    captions_file = annotations / "captions" / f"cap.rc2.{name}.json"
    captions = _read_json(captions_file, "CIRR's annotations come from github.com/Cuberick-Orion/CIRR (captions/)")
    relative_paths = _read_json(
        annotations / "image_splits" / f"split.rc2.{name}.json", "CIRR's image lists come with its annotations (image_splits/)"
    )
    task = Task("cirr", split, list(relative_paths), [images / path for path in relative_paths.values()])
    for number, entry in enumerate(captions):
        reference = _field(entry, "reference", captions_file, number)
        members = _field(_field(entry, "img_set", captions_file, number), "members", captions_file, number)
        target = _field(entry, "target_hard", captions_file, number) if split == "val" else None
        soft = {str(k): float(v) for k, v in entry.get("target_soft", {}).items()} if target else {}
        strangers = [n for n in [reference, *members, *([target] if target else [])] if n not in relative_paths]
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
                soft_targets=soft or ({target: 1.0} if target else {}),
            )
        )
    return task


def _fashioniq_layout(data_dir: Path, split: str, category: str) -> tuple[Path, Path]:
    """(the folder holding captions/ and image_splits/, the category's image folder)."""
    for base in (data_dir, data_dir / "data"):  # the data folder itself, or the starter kit folder holding data/
        if (base / "captions" / f"cap.{category}.{split}.json").is_file():
            images = base / "images"
            return base, images if images.is_dir() else base / "resized_images" / category
    raise _no_layout(
        "FashionIQ", data_dir, [b / "captions" / f"cap.{category}.{split}.json" for b in (data_dir, data_dir / "data")]
    )


def _fashioniq_image(images: Path, name: str) -> Path:
    png = images / f"{name}.png"
    return png if png.is_file() or not (images / f"{name}.jpg").is_file() else images / f"{name}.jpg"


def load_fashioniq(data_dir: Path, split: str, category: str) -> Task:
    base, images = _fashioniq_layout(data_dir, split, category)
    captions_file = base / "captions" / f"cap.{category}.{split}.json"
    captions = _read_json(captions_file, "FashionIQ's captions come from github.com/XiaoxiaoGuo/fashion-iq (captions/)")
    names = _read_json(base / "image_splits" / f"split.{category}.{split}.json", "FashionIQ's image_splits/ folder")
    task = Task(f"fashioniq/{category}", split, list(names), [_fashioniq_image(images, n) for n in names])
    for number, entry in enumerate(captions):
        target = _field(entry, "target", captions_file, number) if split == "val" else None
        task.queries.append(
            Query(
                id=f"{category}/{number}",
                image=_fashioniq_image(images, _field(entry, "candidate", captions_file, number)),
                text=" and ".join(_field(entry, "captions", captions_file, number)),
                target=target,
                relevant=(target,) if target else (),
            )
        )
        task.annotations.append(entry)
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
                "see docs/use.md for the folder layouts"
            )
    return tasks
