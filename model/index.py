"""`magiclens index`: embed a corpus of images once, so that `magiclens search` can query it.

What can be indexed (`--images`, repeatable): an image file, a folder (every image file under it),
a glob, or a Parquet file whose image column holds encoded images (`struct<bytes, path>` as this
project writes them, or plain binary).

An index is a folder:

    index.json           what made it: the checkpoint, a fingerprint of its weights, the width D
    shards/NNNNNN.npy    float16 embeddings (n, D), L2-normalised in float32 before the cast
    shards/NNNNNN.json   per shard: the images embedded (id, source, row, column, sha256), the
                         images rejected with the reason, and the exact duplicates skipped

A shard's .json is written after its .npy, so a shard without .json is an interrupted write and
is ignored. Running `magiclens index` again on the same output skips every image that a complete
shard already accounts for: an interrupted run continues where it stopped, and new images can be
added to an index later. An image whose bytes are identical to one already indexed is counted as
a duplicate and not embedded twice.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from magiclens.model.arguments import add_index_arguments as add_arguments  # noqa: F401 - re-exported
from magiclens.model.checkpoint import WEIGHTS_FILE, CheckpointError, load_checkpoint, resolve_checkpoint
from magiclens.model.embed import ImageLocation, decoded_batches, embed_decoded
from magiclens.model.magiclens import MagicLens
from magiclens.model.preprocess import PreprocessConfig
from magiclens.model.progress import progress

INDEX_FILE = "index.json"
SHARDS_DIR = "shards"
FAISS_FILE = "faiss.index"
FAISS_RECORD = "faiss.json"
FAISS_TRAINING_SAMPLE = 1 << 18  # vectors a trained faiss index (IVF, PQ) learns from
INDEX_FORMAT = 1
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})


class SearchIndexError(ValueError):
    """Bad input to `index` or `search`: a source that does not exist, an index that does not fit."""


# --- finding the images -------------------------------------------------------------------------


def _images_in_folder(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _parquet_rows(path: Path, image_column: str) -> list[ImageLocation]:
    try:
        metadata = pq.ParquetFile(path).metadata
    except (pa.ArrowInvalid, OSError) as error:
        raise SearchIndexError(f"{path} is not a readable Parquet file: {error}") from error
    names = metadata.schema.to_arrow_schema().names
    if image_column not in names:
        raise SearchIndexError(
            f"{path} has no column {image_column!r} (its columns: {', '.join(names)}); "
            "name the image column with --image-column"
        )
    source = str(path.resolve())
    return [ImageLocation(source, row, image_column) for row in range(metadata.num_rows)]


def expand_sources(patterns: list[str], image_column: str = "image") -> list[ImageLocation]:
    """Every image that the patterns name, in order, each once."""
    found_so_far: dict[str, ImageLocation] = {}
    for pattern in patterns:
        if glob.has_magic(pattern):
            paths = [Path(p) for p in sorted(glob.glob(pattern, recursive=True))]
            if not paths:
                raise SearchIndexError(f"nothing matches {pattern!r}")
        else:
            paths = [Path(pattern)]
            if not paths[0].exists():
                raise SearchIndexError(f"{pattern} does not exist")
        for path in paths:
            if path.is_dir():
                found = [ImageLocation(str(p.resolve())) for p in _images_in_folder(path)]
                if not found and not glob.has_magic(pattern):
                    raise SearchIndexError(f"the folder {path} holds no image file ({', '.join(sorted(IMAGE_EXTENSIONS))})")
            elif path.suffix.lower() == ".parquet":
                found = _parquet_rows(path, image_column)
            else:
                found = [ImageLocation(str(path.resolve()))]
            found_so_far.update((location.id, location) for location in found)
    return list(found_so_far.values())




def checkpoint_fingerprint(checkpoint: str | Path) -> str:
    """sha256 of the checkpoint's weights file: an index only grows with the weights that made it."""
    digest = hashlib.sha256()
    with open(resolve_checkpoint(checkpoint) / WEIGHTS_FILE, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _shard_files(index_dir: Path) -> list[tuple[Path, Path]]:
    """The complete shards, in order: (.npy, .json) pairs."""
    shards = index_dir / SHARDS_DIR
    if not shards.is_dir():
        return []
    return [(j.with_suffix(".npy"), j) for j in sorted(shards.glob("*.json")) if j.with_suffix(".npy").is_file()]


def _replace_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        write(f)
    os.replace(partial, path)


@dataclass
class IndexSummary:
    embedded: int = 0  # in this run
    already_indexed: int = 0  # skipped: a complete shard accounts for them
    duplicates: int = 0  # in this run: bytes identical to an image already indexed
    rejected: Counter[str] = field(default_factory=Counter)  # in this run, by reason: unreadable, undecodable
    total: int = 0  # embeddings in the whole index

    def to_dict(self) -> dict[str, Any]:
        return {
            "embedded": self.embedded,
            "already_indexed": self.already_indexed,
            "duplicates": self.duplicates,
            "rejected": sum(self.rejected.values()),
            "rejected_by_reason": dict(self.rejected),
            "total": self.total,
        }


class _ShardWriter:
    def __init__(self, index_dir: Path, first_number: int, embed_dim: int) -> None:
        self.directory = index_dir / SHARDS_DIR
        self.directory.mkdir(parents=True, exist_ok=True)
        self.number = first_number
        self.embed_dim = embed_dim
        self._clear()

    def _clear(self) -> None:
        self.vectors: list[np.ndarray] = []
        self.items: list[dict[str, Any]] = []
        self.rejected: list[dict[str, Any]] = []
        self.duplicates: list[dict[str, Any]] = []

    @property
    def pending(self) -> int:
        return len(self.items) + len(self.rejected) + len(self.duplicates)

    def flush(self) -> None:
        if not self.pending:
            return
        vectors = np.concatenate(self.vectors) if self.vectors else np.empty((0, self.embed_dim), np.float16)
        stem = self.directory / f"{self.number:06d}"
        _replace_atomically(stem.with_suffix(".npy"), lambda f: np.save(f, vectors))
        record = {"items": self.items, "rejected": self.rejected, "duplicates": self.duplicates}
        _replace_atomically(stem.with_suffix(".json"), lambda f: f.write(json.dumps(record).encode()))
        self.number += 1
        self._clear()


def build_index(
    model: MagicLens,
    preprocess: PreprocessConfig,
    images: list[ImageLocation],
    output: Path,
    description: dict[str, Any],
    *,
    batch_size: int = 64,
    num_workers: int = 2,
    shard_size: int = 4096,
    device: torch.device = torch.device("cpu"),
) -> IndexSummary:
    """Embed every image that the index at `output` does not hold yet (see the module docstring).

    `description` identifies the model (checkpoint, fingerprint, embed_dim); an existing index made
    with another fingerprint is an error, never silently mixed.
    """
    output.mkdir(parents=True, exist_ok=True)
    meta_file = output / INDEX_FILE
    if meta_file.is_file():
        existing = json.loads(meta_file.read_text())
        if existing.get("fingerprint") != description["fingerprint"]:
            raise SearchIndexError(
                f"{output} was built with other weights ({existing.get('checkpoint')}); "
                "give a new --output, or --overwrite to start it again"
            )
    meta = {"format": INDEX_FORMAT, **description, "finished": False}
    _write_meta(meta_file, meta)

    summary = IndexSummary()
    done: set[str] = set()
    hashes: dict[str, str] = {}  # sha256 -> id of the image indexed with those bytes
    shards = _shard_files(output)
    for _, record_file in shards:
        record = json.loads(record_file.read_text())
        for item in record["items"]:
            done.add(item["id"])
            hashes[item["sha256"]] = item["id"]
            summary.total += 1
        done.update(r["id"] for r in record["rejected"] + record["duplicates"])
    pending = [image for image in images if image.id not in done]
    summary.already_indexed = len(images) - len(pending)

    last = int(shards[-1][1].stem) if shards else -1
    writer = _ShardWriter(output, last + 1, description["embed_dim"])
    with progress(len(pending), "indexing") as shown:
        for batch in decoded_batches(pending, preprocess.image_size, batch_size, num_workers, exif_transpose=True):
            for position, reason, detail in batch.rejected:
                writer.rejected.append({**pending[position].to_dict(), "reason": reason, "detail": detail})
                summary.rejected[reason] += 1
            keep = []
            for slot, (position, digest) in enumerate(zip(batch.indices, batch.sha256)):
                if digest in hashes:
                    writer.duplicates.append({**pending[position].to_dict(), "of": hashes[digest]})
                    summary.duplicates += 1
                else:
                    hashes[digest] = pending[position].id
                    keep.append(slot)
            vectors = embed_decoded(
                model, preprocess, batch.pixels[keep], batch.max_values[keep], [""] * len(keep), device
            )
            writer.vectors.append(vectors.numpy().astype(np.float16))
            for slot in keep:
                position = batch.indices[slot]
                writer.items.append({**pending[position].to_dict(), "sha256": batch.sha256[slot]})
            summary.embedded += len(keep)
            shown.update(len(batch.indices) + len(batch.rejected))
            if writer.pending >= shard_size:
                writer.flush()
        writer.flush()
    summary.total += summary.embedded
    _write_meta(meta_file, {**meta, "finished": True})
    return summary


def _write_meta(meta_file: Path, meta: dict[str, Any]) -> None:
    _replace_atomically(meta_file, lambda f: f.write((json.dumps(meta, indent=1) + "\n").encode()))


def finished_index(output: Path) -> bool:
    """An index whose last run finished (an interrupted run's index is resumed without --append)."""
    meta_file = output / INDEX_FILE
    return meta_file.is_file() and json.loads(meta_file.read_text()).get("finished", True)


@dataclass
class LoadedIndex:
    """An index read for searching: embeddings memory-mapped shard by shard, and their items."""

    path: Path
    meta: dict[str, Any]
    shards: list[str]  # shard names, in order
    vectors: list[np.ndarray]  # per shard, (n, D) float16
    items: list[list[dict[str, Any]]]  # per shard, n items

    @property
    def size(self) -> int:
        return sum(len(items) for items in self.items)


def load_index(path: str | Path) -> LoadedIndex:
    path = Path(path)
    if not (path / INDEX_FILE).is_file():
        raise SearchIndexError(f"{path} is not an index: it has no {INDEX_FILE} (build one with `magiclens index`)")
    meta = json.loads((path / INDEX_FILE).read_text())
    if meta.get("format") != INDEX_FORMAT:
        raise SearchIndexError(f"{path}: index format {meta.get('format')} is not {INDEX_FORMAT}; build it again")
    shards, vectors, items = [], [], []
    for vector_file, record_file in _shard_files(path):
        record = json.loads(record_file.read_text())
        array = np.load(vector_file, mmap_mode="r")
        if array.shape != (len(record["items"]), meta["embed_dim"]):
            raise SearchIndexError(f"{vector_file} holds {array.shape}, but its {record_file.name} lists {len(record['items'])} images")
        shards.append(vector_file.stem)
        vectors.append(array)
        items.append(record["items"])
    return LoadedIndex(path, meta, shards, vectors, items)


def import_faiss() -> Any:
    try:
        import faiss
    except ImportError as error:
        raise SearchIndexError("--faiss needs the faiss package: pip install faiss-cpu (or faiss-gpu)") from error
    return faiss


def build_faiss_index(index_dir: Path, factory: str, chunk_rows: int = 65536) -> None:
    """Write faiss.index: every embedding of the index in a faiss index made by `factory` (a faiss
    index_factory string: "Flat" is exact, "HNSW32" or "IVF4096,Flat" approximate and faster on
    large corpora), inner-product metric; and faiss.json, which records what it holds."""
    faiss = import_faiss()
    loaded = load_index(index_dir)
    try:
        searchable = faiss.index_factory(loaded.meta["embed_dim"], factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        raise SearchIndexError(f"faiss cannot make an index from {factory!r}: {error}") from error
    if not searchable.is_trained:  # learn from every step-th embedding, without loading them all
        step = max(1, loaded.size // FAISS_TRAINING_SAMPLE)
        starts = np.cumsum([0] + [len(v) for v in loaded.vectors])
        sample = [np.asarray(v[-start % step :: step], dtype=np.float32) for v, start in zip(loaded.vectors, starts)]
        try:
            searchable.train(np.concatenate(sample) if sample else np.empty((0, loaded.meta["embed_dim"]), np.float32))
        except RuntimeError as error:
            raise SearchIndexError(f"faiss cannot train {factory!r} on {loaded.size} embeddings: {error}") from error
    for vectors in loaded.vectors:
        for start in range(0, len(vectors), chunk_rows):
            searchable.add(np.ascontiguousarray(vectors[start : start + chunk_rows], dtype=np.float32))
    partial = index_dir / (FAISS_FILE + ".partial")
    faiss.write_index(searchable, str(partial))
    os.replace(partial, index_dir / FAISS_FILE)
    record = {"factory": factory, "count": loaded.size, "shards": loaded.shards}
    _replace_atomically(index_dir / FAISS_RECORD, lambda f: f.write(json.dumps(record).encode()))


# --- the command --------------------------------------------------------------------------------


def run(args: argparse.Namespace, extra: list[str]) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    output = Path(args.output)
    try:
        if args.batch_size < 1 or args.shard_size < 1 or args.num_workers < 0:
            raise SearchIndexError("--batch-size and --shard-size must be at least 1, --num-workers at least 0")
        if args.faiss:
            import_faiss()  # fail before the long part
        images = expand_sources(args.images, args.image_column)
        if args.overwrite and args.append:
            raise SearchIndexError("--overwrite and --append contradict each other: give one")
        if finished_index(output) and not (args.overwrite or args.append):
            raise SearchIndexError(
                f"{output} already holds a finished index; pass --append to add images to it, --overwrite to "
                "build it again, or give another --output"
            )
        if args.overwrite and output.exists():
            if not (output / INDEX_FILE).is_file():
                raise SearchIndexError(f"{output} exists but is not an index; --overwrite only replaces an index")
            for vector_file, record_file in _shard_files(output):
                vector_file.unlink()
                record_file.unlink()
            for name in (INDEX_FILE, FAISS_FILE, FAISS_RECORD):
                (output / name).unlink(missing_ok=True)
        model, _, preprocess = load_checkpoint(args.checkpoint, device)
        description = {
            "checkpoint": str(resolve_checkpoint(args.checkpoint).resolve()),
            "fingerprint": checkpoint_fingerprint(args.checkpoint),
            "model": model.config.name,
            "embed_dim": model.config.head.embed_dim,
        }
        summary = build_index(
            model,
            preprocess,
            images,
            output,
            description,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            shard_size=args.shard_size,
            device=device,
        )
        if args.faiss:
            build_faiss_index(output, args.faiss)
    except (SearchIndexError, CheckpointError) as error:
        print(f"magiclens index: {error}", file=sys.stderr)
        return 2
    report = summary.to_dict()
    if args.json:
        print(json.dumps(report))
    else:
        for name, value in report.items():
            print(f"{name:<20} {value}")
    return 0
