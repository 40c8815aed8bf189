"""Training data loader: triplets/s per CPU core, against decoding and resizing the same images raw.

The triplets are made of the real photos and near-duplicate sets in ../shared/data/images, stored
as the mining pipeline stores them (pipeline.images.normalize_image: JPEG, longer side at most
512 px), written to a Parquet file in row groups. The loader (model.data.TripletBatches in one
DataLoader worker, as `magiclens train` runs it) reads the rows, mixes them in its shuffle buffer,
decodes and preprocesses both images of each triplet to 224 px, hashes them, tokenizes the
instruction and ships batches to the main process.

The baseline does only the core work on the same image bytes, in a plain loop: Pillow decode, RGB,
bilinear resize to 224x224. Both sides are measured in CPU seconds (the worker's and the main
process's for the loader), so other processes on a shared machine do not skew either side.
"""

from __future__ import annotations

import io
import random
import resource
import tempfile
import time
from pathlib import Path

from PIL import Image
from torch.utils.data import DataLoader

from magiclens.model.data import TripletBatches, plan_row_groups, write_triplets
from magiclens.model.tokenizer import bundled_clip_tokenizer
from magiclens.pipeline.images import ImageRejected, normalize_image

IMAGES = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "images"
TRIPLETS = 960
BATCH_SIZE = 32
IMAGE_SIZE = 224
GOAL = ">= 150 triplets/s per core"


def run() -> list[dict]:
    stored = _stored_photos()
    rng = random.Random(0)
    triplets = [
        {
            "triplet_id": f"t{i}",
            "query_image": rng.choice(stored),
            "instruction": f"the same scene seen from another side, number {i}",
            "target_image": rng.choice(stored),
        }
        for i in range(TRIPLETS)
    ]
    baseline = _raw_triplets_per_cpu_second(triplets)
    with tempfile.TemporaryDirectory() as directory:
        path = f"{directory}/triplets.parquet"
        write_triplets(path, triplets, row_group_size=256)
        rows = []
        for fast_jpeg, name in ((True, "loader_train"), (False, "loader_evaluate_exact_decode")):
            value = _loader_triplets_per_cpu_second(path, fast_jpeg)
            rows.append(
                {
                    "name": f"{name}_triplets_per_core_s",
                    "value": value,
                    "unit": "triplets/s/core",
                    "baseline": baseline,
                    "ratio": value / baseline,
                    "goal": GOAL,
                }
            )
    return rows


def _stored_photos() -> list[bytes]:
    stored = []
    for path in sorted(p for folder in ("photos", "neardup") for p in (IMAGES / folder).rglob("*")):
        if not path.is_file():
            continue
        try:
            stored.append(normalize_image(path.read_bytes(), min_side=1, max_aspect=100.0).jpeg)
        except ImageRejected:  # the corrupt JPEG and the pickle among the near-duplicate sets
            continue
    if not stored:
        raise SystemExit(f"no images found under {IMAGES}: clone the project beside ../shared")
    return stored


def _raw_triplets_per_cpu_second(triplets: list[dict]) -> float:
    started = time.process_time()
    for triplet in triplets:
        for side in ("query_image", "target_image"):
            with Image.open(io.BytesIO(triplet[side])) as image:
                image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    return len(triplets) / (time.process_time() - started)


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _loader_triplets_per_cpu_second(path: str, fast_jpeg: bool) -> float:
    dataset = TripletBatches(
        plan_row_groups(path),
        bundled_clip_tokenizer(),
        IMAGE_SIZE,
        BATCH_SIZE,
        num_workers=1,
        buffer_size=256,
        fast_jpeg=fast_jpeg,
    )
    children_before, main_before = _children_cpu_seconds(), time.process_time()
    loader = iter(DataLoader(dataset, batch_size=None, num_workers=1, prefetch_factor=4))
    count = sum(len(next(loader)["triplet_id"]) for _ in range(TRIPLETS // BATCH_SIZE))
    main_seconds = time.process_time() - main_before
    del loader  # joins the worker, whose CPU time then counts among this process's children
    return count / (main_seconds + _children_cpu_seconds() - children_before)
