"""`magiclens search`: the indexed images nearest to a query image and an instruction.

The query (image + instruction) is embedded with the checkpoint that built the index, then scored
against every indexed embedding: an exact search by chunked matrix products (float16 shards read
chunk by chunk, scored in float32, a running top k kept), so memory stays bounded for any corpus; exact ties
in the order the index holds the images.
With --faiss the search runs in the faiss index that `magiclens index --faiss FACTORY` built
(exact with "Flat", approximate and much faster on large corpora with "HNSW32" or IVF indexes). Results go to the terminal, to stdout as one JSON object (--json), or to a
self-contained HTML page with thumbnails (--html).
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from magiclens.model.arguments import add_search_arguments as add_arguments  # noqa: F401 - re-exported
from magiclens.model.checkpoint import CheckpointError, load_checkpoint
from magiclens.model.embed import ImageLocation, ImageReader, ImageReadError, embed_decoded
from magiclens.model.index import FAISS_FILE, FAISS_RECORD, LoadedIndex, SearchIndexError, checkpoint_fingerprint, import_faiss, load_index
from magiclens.model.magiclens import MagicLens
from magiclens.model.metrics import inner_products, merge_top_k, sort_best_first
from magiclens.model.preprocess import ImageDecodeError, PreprocessConfig, decode_image

THUMBNAIL_SIZE = 256


@dataclass(frozen=True)
class Hit:
    rank: int
    score: float
    item: dict[str, Any]  # id, source, row, column, sha256 as the index stores them

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "score": self.score, **self.item}


def embed_query(
    model: MagicLens, preprocess: PreprocessConfig, image: bytes, instruction: str, device: torch.device
) -> torch.Tensor:
    """The (D,) float32 embedding of an encoded image with its instruction."""
    pixels, max_value = decode_image(image, preprocess.image_size, float_resize=True)  # as index: upright, float resize
    return embed_decoded(model, preprocess, pixels[None], torch.tensor([max_value]), [instruction], device)[0]


def _item_at(index: LoadedIndex, starts: np.ndarray, position: int) -> dict[str, Any]:
    shard = int(np.searchsorted(starts, position, side="right")) - 1
    return index.items[shard][position - int(starts[shard])]


def exact_top_k(index: LoadedIndex, query: torch.Tensor, k: int, chunk_rows: int = 65536, device: torch.device | None = None) -> list[Hit]:
    """The k best items by inner product, scanning `chunk_rows` embeddings at a time; exact ties
    in the order the index holds the items."""
    device = device or query.device
    query = query.to(device, torch.float32)
    best_scores = torch.empty(0, device=device)
    best_positions = torch.empty(0, dtype=torch.long, device=device)  # in the index, all shards in order
    offset = 0
    for vectors in index.vectors:
        for start in range(0, vectors.shape[0], chunk_rows):
            chunk = torch.from_numpy(np.asarray(vectors[start : start + chunk_rows], dtype=np.float32)).to(device)
            scores = inner_products(query[None], chunk)[0]
            top = sort_best_first(scores)[:k]
            best_scores, best_positions = merge_top_k(best_scores, best_positions, scores[top], top + offset + start, k)
        offset += vectors.shape[0]
    starts = np.cumsum([0] + [len(items) for items in index.items])
    return [
        Hit(rank, float(score), _item_at(index, starts, position))
        for rank, (score, position) in enumerate(zip(best_scores.tolist(), best_positions.tolist()), start=1)
    ]


def faiss_top_k(index: LoadedIndex, query: torch.Tensor, k: int, parameters: str = "") -> list[Hit]:
    """The k best items from the faiss index that `magiclens index --faiss` built; `parameters`
    are faiss search parameters such as "efSearch=128" (HNSW) or "nprobe=32" (IVF)."""
    faiss = import_faiss()
    record_file = index.path / FAISS_RECORD
    if not record_file.is_file():
        raise SearchIndexError(f"{index.path} has no faiss index: build one with `magiclens index ... --faiss Flat`")
    record = json.loads(record_file.read_text())
    if (record["count"], record["shards"]) != (index.size, index.shards):
        raise SearchIndexError(
            f"the faiss index of {index.path} was built before the index last changed ({record['count']} "
            f"embeddings then, {index.size} now): run `magiclens index` again with --faiss {record['factory']!r}"
        )
    # map the stored vectors rather than read them: a one-off search then costs what it touches
    searchable = faiss.read_index(str(index.path / FAISS_FILE), getattr(faiss, "IO_FLAG_MMAP_IFC", faiss.IO_FLAG_MMAP))
    if parameters:
        try:
            faiss.ParameterSpace().set_index_parameters(searchable, parameters)
        except RuntimeError as error:
            raise SearchIndexError(f"faiss does not take {parameters!r} for a {record['factory']} index: {error}") from error
    scores, found = searchable.search(query.cpu().numpy()[None].astype(np.float32), min(k, index.size))
    starts = np.cumsum([0] + [len(items) for items in index.items])
    # an approximate index may return fewer than k (position -1); exact ties in index order, as
    # the exact search orders them (which of several tied items at the k-th place faiss returns
    # is faiss's choice)
    results = sorted((-score, position) for score, position in zip(scores[0].tolist(), found[0].tolist()) if position >= 0)
    return [Hit(rank, -negative, _item_at(index, starts, position)) for rank, (negative, position) in enumerate(results, start=1)]


def thumbnail_data_uri(image: bytes, size: int = THUMBNAIL_SIZE) -> str:
    """A JPEG thumbnail (at most size x size, upright) as a data: URI; raises ImageDecodeError."""
    try:
        with Image.open(io.BytesIO(image)) as opened:
            picture = ImageOps.exif_transpose(opened).convert("RGB")
        picture.thumbnail((size, size))
        encoded = io.BytesIO()
        picture.save(encoded, format="JPEG", quality=85)
    except Exception as error:  # noqa: BLE001 - untrusted bytes: any Pillow error means "cannot show"
        raise ImageDecodeError(f"{type(error).__name__}: {error}") from error
    return "data:image/jpeg;base64," + base64.b64encode(encoded.getvalue()).decode()


def _figure(image: bytes | None, caption: str, css_class: str, failure: str = "") -> str:
    picture = ""
    if image is not None:
        try:
            picture = f'<img src="{thumbnail_data_uri(image)}" alt="{html.escape(caption, quote=True)}">'
        except ImageDecodeError as error:
            failure = f"cannot show this image: {error}"
    if not picture:
        picture = f'<div class="missing">{html.escape(failure)}</div>'
    return f'<figure class="{css_class}">{picture}<figcaption>{caption}</figcaption></figure>'


def render_html(query_image: bytes, instruction: str, hits: list[Hit], index: LoadedIndex) -> str:
    """A self-contained page (thumbnails inline as data: URIs) with the query and its results."""
    reader = ImageReader()
    results = []
    for hit in hits:
        try:
            image, failure = reader.read(ImageLocation.from_dict(hit.item)), ""
        except ImageReadError as error:
            image, failure = None, f"cannot show this image: {error}"
        caption = f'<span class="rank">#{hit.rank}</span> <span class="score">{hit.score:.4f}</span><br>{html.escape(hit.item["id"])}'
        results.append(f"<li>{_figure(image, caption, 'result', failure)}</li>")
    instruction_text = html.escape(instruction) if instruction else "<i>(no instruction)</i>"
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>MagicLens search: {html.escape(instruction)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; background: #fafafa; color: #222; }}
figure {{ margin: 0; display: inline-block; width: {THUMBNAIL_SIZE}px; vertical-align: top; }}
figure img {{ max-width: {THUMBNAIL_SIZE}px; max-height: {THUMBNAIL_SIZE}px; display: block; }}
figcaption {{ font-size: 12px; word-break: break-all; margin-top: 4px; }}
.query {{ padding: 8px; background: #fff; border: 1px solid #ccc; }}
ol.results {{ list-style: none; padding: 0; display: flex; flex-wrap: wrap; gap: 16px; }}
.rank {{ font-weight: bold; }}
.missing {{ width: {THUMBNAIL_SIZE}px; height: 64px; background: #eee; font-size: 12px; }}
</style>
</head>
<body>
<h1>Query</h1>
{_figure(query_image, instruction_text, "query")}
<h2>Top {len(hits)} of {index.size} images in {html.escape(str(index.path))}</h2>
<ol class="results">
{chr(10).join(results)}
</ol>
</body>
</html>
"""


@dataclass
class Searcher:
    """An index and the checkpoint that built it, loaded once for any number of queries."""

    index: LoadedIndex
    model: MagicLens
    preprocess: PreprocessConfig
    device: torch.device
    chunk_rows: int = 65536
    faiss_params: str | None = None  # None: exact search; a string (maybe ""): the faiss index

    @classmethod
    def open(cls, index_dir: str | Path, checkpoint: str | Path, device: str | None = None, chunk_rows: int = 65536,
             faiss_params: str | None = None) -> Searcher:
        """Load and check the index and the model; SearchIndexError or CheckpointError says what is wrong."""
        if chunk_rows < 1:
            raise SearchIndexError("--chunk-rows must be at least 1")
        index = load_index(index_dir)
        if index.size == 0:
            raise SearchIndexError(f"{index_dir} holds no embeddings yet")
        if checkpoint_fingerprint(checkpoint) != index.meta["fingerprint"]:
            raise SearchIndexError(
                f"{index_dir} was built with other weights ({index.meta['checkpoint']}); search it with that checkpoint"
            )
        torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, _, preprocess = load_checkpoint(checkpoint, torch_device)
        return cls(index, model, preprocess, torch_device, chunk_rows, faiss_params)

    def search(self, image: bytes, instruction: str, k: int, source: str = "the query image") -> list[Hit]:
        """The k best images for an encoded query image and its instruction; SearchIndexError when
        the image does not decode."""
        if k < 1:
            raise SearchIndexError("-k must be at least 1")
        try:
            query = embed_query(self.model, self.preprocess, image, instruction, self.device)
        except ImageDecodeError as error:
            raise SearchIndexError(f"{source} does not decode: {error}") from error
        if self.faiss_params is not None:
            return faiss_top_k(self.index, query, k, self.faiss_params)
        return exact_top_k(self.index, query, k, self.chunk_rows, self.device)

    def search_file(self, path: str | Path, instruction: str, k: int) -> list[Hit]:
        return self.search(read_query_image(path), instruction, k, f"the query image {path}")


def read_query_image(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise SearchIndexError(f"cannot read the query image {path}: {error.strerror or error}") from error


def read_queries(path: str | Path) -> list[dict[str, Any]]:
    """A JSON Lines file of {"image": path, "instruction": text} -> the queries; image paths are
    relative to the file's folder. A line that is not such an object is an error naming the line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise SearchIndexError(f"cannot read --queries {path}: {error.strerror or error}") from error
    queries = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            query = json.loads(line)
        except json.JSONDecodeError as error:
            raise SearchIndexError(f"{path}:{number}: not JSON ({error.msg})") from None
        if not isinstance(query, dict) or not isinstance(query.get("image"), str):
            raise SearchIndexError(f'{path}:{number}: each line must be an object {{"image": PATH, "instruction": TEXT}}')
        instruction = query.get("instruction", "")
        if not isinstance(instruction, str):
            raise SearchIndexError(f"{path}:{number}: instruction must be a string")
        image = Path(query["image"])
        queries.append({"image": str(image if image.is_absolute() else path.parent / image), "instruction": instruction})
    if not queries:
        raise SearchIndexError(f"--queries {path} holds no query")
    return queries


def search_many(searcher: Searcher, queries: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """One result list per query, in order; a query whose image cannot be read or decoded gets an
    "error" instead of results, and the others still run."""
    answers = []
    for query in queries:
        answer: dict[str, Any] = {"query": query}
        try:
            answer["results"] = [hit.to_dict() for hit in searcher.search_file(query["image"], query["instruction"], k)]
        except SearchIndexError as error:
            answer["error"] = str(error)
        answers.append(answer)
    return answers


def _run_queries(searcher: Searcher, args: argparse.Namespace) -> int:
    answers = search_many(searcher, read_queries(args.queries), args.k)
    for answer in answers:
        print(json.dumps(answer))
    failed = sum("error" in answer for answer in answers)
    if failed:
        print(f"magiclens search: {failed} of {len(answers)} queries failed (see their \"error\")", file=sys.stderr)
    return 1 if failed else 0


def run(args: argparse.Namespace, extra: list[str]) -> int:
    try:
        if args.k < 1:
            raise SearchIndexError("-k must be at least 1")
        if args.queries and args.html:
            raise SearchIndexError("--html shows one query: leave it out with --queries")
        query_image = read_query_image(args.image) if args.image else b""
        searcher = Searcher.open(args.index, args.checkpoint, args.device, args.chunk_rows, args.faiss_params if args.faiss else None)
        if args.queries:
            return _run_queries(searcher, args)
        hits = searcher.search(query_image, args.instruction, args.k, f"the query image {args.image}")
        if args.html:
            page = render_html(query_image, args.instruction, hits, searcher.index)
            Path(args.html).write_text(page, encoding="utf-8")
    except (SearchIndexError, CheckpointError) as error:
        print(f"magiclens search: {error}", file=sys.stderr)
        return 2
    index = searcher.index
    if args.json:
        report = {
            "query": {"image": str(Path(args.image).resolve()), "instruction": args.instruction},
            "index": str(index.path.resolve()),
            "index_size": index.size,
            "results": [hit.to_dict() for hit in hits],
        }
        print(json.dumps(report))
    else:
        for hit in hits:
            print(f"{hit.rank:>4}  {hit.score:.4f}  {hit.item['id']}")
        if args.html:
            print(f"wrote {args.html}")
    return 0
