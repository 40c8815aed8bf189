"""`magiclens search`: the indexed images nearest to a query image and an instruction.

The query (image + instruction) is embedded with the checkpoint that built the index, then scored
against every indexed embedding: an exact search by chunked matrix products (float16 shards read
chunk by chunk, scored in float32, a running top k kept), so memory stays bounded for any corpus.
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

from magiclens.model.checkpoint import CheckpointError, load_checkpoint
from magiclens.model.index import (
    FAISS_FILE,
    FAISS_RECORD,
    ImageReader,
    ImageReadError,
    ImageRef,
    LoadedIndex,
    SearchIndexError,
    checkpoint_fingerprint,
    embed_decoded,
    import_faiss,
    load_index,
)
from magiclens.model.magiclens import MagicLens
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
    pixels, max_value = decode_image(image, preprocess.image_size)
    return embed_decoded(model, preprocess, pixels[None], torch.tensor([max_value]), [instruction], device)[0]


def exact_top_k(index: LoadedIndex, query: torch.Tensor, k: int, chunk_rows: int = 65536, device: torch.device | None = None) -> list[Hit]:
    """The k best items by inner product, scanning `chunk_rows` embeddings at a time."""
    device = device or query.device
    query = query.to(device, torch.float32)
    best_scores = torch.empty(0, device=device)
    best_places = torch.empty(0, 2, dtype=torch.long, device=device)  # (shard, row)
    for shard, vectors in enumerate(index.vectors):
        for start in range(0, vectors.shape[0], chunk_rows):
            chunk = torch.from_numpy(np.asarray(vectors[start : start + chunk_rows], dtype=np.float32)).to(device)
            scores = chunk @ query
            top = scores.topk(min(k, scores.shape[0]))
            places = torch.stack([torch.full_like(top.indices, shard), top.indices + start], dim=1)
            best_scores = torch.cat([best_scores, top.values])
            best_places = torch.cat([best_places, places])
            keep = best_scores.topk(min(k, best_scores.shape[0])).indices
            best_scores, best_places = best_scores[keep], best_places[keep]
    order = best_scores.argsort(descending=True)
    return [
        Hit(rank + 1, float(best_scores[i]), index.items[int(best_places[i, 0])][int(best_places[i, 1])])
        for rank, i in enumerate(order.tolist())
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
    hits = []
    for score, position in zip(scores[0].tolist(), found[0].tolist()):
        if position < 0:  # an approximate index may return fewer than k
            continue
        shard = int(np.searchsorted(starts, position, side="right")) - 1
        hits.append(Hit(len(hits) + 1, float(score), index.items[shard][position - starts[shard]]))
    return hits


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
            image, failure = reader.read(ImageRef.from_dict(hit.item)), ""
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", required=True, help="an index folder written by `magiclens index`")
    parser.add_argument("--checkpoint", required=True, help="the checkpoint that built the index (checked against the index)")
    parser.add_argument("--image", required=True, help="the query image file")
    parser.add_argument("--instruction", default="", help='what to find, relative to the query image (default: "", i.e. similar images)')
    parser.add_argument("-k", type=int, default=10, help="how many results (default: 10)")
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object with the query and the ranked results")
    parser.add_argument("--html", metavar="OUT", help="also write a self-contained HTML page with the query and result thumbnails")
    parser.add_argument(
        "--faiss",
        action="store_true",
        help="search the faiss index that `magiclens index --faiss FACTORY` built (exact or approximate, as built); needs faiss",
    )
    parser.add_argument(
        "--faiss-params", default="", help='faiss search parameters, e.g. "efSearch=128" (HNSW) or "nprobe=32" (IVF)'
    )
    parser.add_argument("--chunk-rows", type=int, default=65536, help="embeddings scored per matrix product (default: 65536)")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")


def run(args: argparse.Namespace, extra: list[str]) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        if args.k < 1 or args.chunk_rows < 1:
            raise SearchIndexError("-k and --chunk-rows must be at least 1")
        index = load_index(args.index)
        if index.size == 0:
            raise SearchIndexError(f"{args.index} holds no embeddings yet")
        if checkpoint_fingerprint(args.checkpoint) != index.meta["fingerprint"]:
            raise SearchIndexError(
                f"{args.index} was built with other weights ({index.meta['checkpoint']}); search it with that checkpoint"
            )
        try:
            query_image = Path(args.image).read_bytes()
        except OSError as error:
            raise SearchIndexError(f"cannot read the query image {args.image}: {error.strerror or error}") from error
        model, _, preprocess = load_checkpoint(args.checkpoint, device)
        try:
            query = embed_query(model, preprocess, query_image, args.instruction, device)
        except ImageDecodeError as error:
            raise SearchIndexError(f"the query image {args.image} does not decode: {error}") from error
        if args.faiss:
            hits = faiss_top_k(index, query, args.k, args.faiss_params)
        else:
            hits = exact_top_k(index, query, args.k, args.chunk_rows, device)
        if args.html:
            page = render_html(query_image, args.instruction, hits, index)
            Path(args.html).write_text(page, encoding="utf-8")
    except (SearchIndexError, CheckpointError) as error:
        print(f"magiclens search: {error}", file=sys.stderr)
        return 2
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
