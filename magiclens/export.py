"""`magiclens export`: triplet Parquet -> WebDataset tar shards.

One sample per triplet, keyed by `triplet_id`: `query.jpg` and `target.jpg` (the stored JPEG bytes,
untouched; an image stored in another format is re-encoded to JPEG), `txt` (the instruction) and
`json` (every other column that is not an image). `webdataset.WebDataset(urls).decode("pil")`
reads them back as PIL images, a string and a dict. A row without both images or without an
instruction is not written and is counted with its reason in OUTPUT/export.json (in = out + rejected).
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import sys
from collections import Counter
from collections.abc import Iterator
from typing import Any

IMAGE_FIELDS = {"query_image": "query.jpg", "target_image": "target.jpg"}
SHARD_PATTERN = "triplets-%06d.tar"
SUMMARY_FILE = "export.json"
JPEG_MAGIC = b"\xff\xd8\xff"
READ_BATCH_ROWS = 256


class ExportError(ValueError):
    """An input that cannot be exported; the message says what to give instead."""


def triplet_files(source: str) -> list[str]:
    """A `magiclens instruct` output directory, its triplets/ folder, a Parquet file or a glob -> the files."""
    if any(ch in source for ch in "*?["):
        files = sorted(glob.glob(source))
    elif os.path.isdir(os.path.join(source, "triplets")):
        files = sorted(glob.glob(os.path.join(source, "triplets", "*.parquet")))
    elif os.path.isdir(source):
        files = sorted(glob.glob(os.path.join(source, "*.parquet")))
    else:
        files = [source] if os.path.isfile(source) else []
    if not files:
        raise ExportError(f"--input {source!r}: no triplet Parquet files there; give a `magiclens instruct` "
                          "output directory, its triplets/ folder, a Parquet file or a glob")
    return files


def _jpeg(image: Any) -> tuple[bytes | None, str | None]:
    """The JPEG bytes of a stored image struct, or (None, reason)."""
    data = (image or {}).get("bytes") if isinstance(image, dict) else None
    if not data:
        return None, "missing_image"
    if data.startswith(JPEG_MAGIC):
        return data, None
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as opened:
            out = io.BytesIO()
            opened.convert("RGB").save(out, "JPEG", quality=95)
            return out.getvalue(), None
    except (UnidentifiedImageError, OSError, ValueError):
        return None, "undecodable_image"


def _json_value(value: Any) -> Any:
    if isinstance(value, bytes):
        return None  # binary columns other than the images carry nothing a reader of the JSON can use
    if isinstance(value, dict):
        return {key: _json_value(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_value(item) for item in value]
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def sample_from_row(row: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """A triplet row -> a WebDataset sample, or (None, the reason it cannot be one)."""
    key = str(row.get("triplet_id") or "")
    if not key:
        return None, "missing_triplet_id"
    instruction = row.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        return None, "missing_instruction"
    sample: dict[str, Any] = {"__key__": key.replace(".", "_"), "txt": instruction}
    for column, field in IMAGE_FIELDS.items():
        data, reason = _jpeg(row.get(column))
        if data is None:
            return None, f"{reason}:{column}"
        sample[field] = data
    others = {name: _json_value(value) for name, value in row.items() if name not in IMAGE_FIELDS and name != "instruction"}
    sample["json"] = json.dumps(others, ensure_ascii=False, sort_keys=True).encode("utf-8")
    return sample, None


def iter_rows(files: list[str]) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    for path in files:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=READ_BATCH_ROWS):
            yield from batch.to_pylist()


def export_webdataset(files: list[str], output: str, shard_size: int) -> dict[str, Any]:
    """Write the triplets of `files` as WebDataset shards of at most `shard_size` samples under
    `output`; returns (and writes to OUTPUT/export.json) the counts and the shard paths."""
    import webdataset

    if shard_size < 1:
        raise ExportError(f"--shard-size must be at least 1, got {shard_size}")
    os.makedirs(output, exist_ok=True)
    rejected: Counter[str] = Counter()
    received = written = 0
    shards: list[str] = []
    pattern = os.path.join(output, SHARD_PATTERN)
    with webdataset.ShardWriter(pattern, maxcount=shard_size, verbose=0, post=shards.append) as sink:
        for row in iter_rows(files):
            received += 1
            sample, reason = sample_from_row(row)
            if sample is None:
                rejected[reason] += 1
                continue
            sink.write(sample)
            written += 1
    summary = {
        "inputs": files,
        "format": "webdataset",
        "shard_size": shard_size,
        "in": received,
        "out": written,
        "rejected": dict(sorted(rejected.items())),
        "shards": [os.path.basename(path) for path in shards],
    }
    with open(os.path.join(output, SUMMARY_FILE), "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2)
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Export triplets (Parquet written by `magiclens instruct`, or any Parquet with the triplet columns) "
        "to WebDataset tar shards: per sample query.jpg, target.jpg, txt (the instruction) and json (the other "
        "columns). Writes OUTPUT/triplets-NNNNNN.tar and OUTPUT/export.json (counts, rejects by reason)."
    )
    parser.add_argument("--input", required=True, metavar="DIR_OR_GLOB",
                        help="a `magiclens instruct` output directory, its triplets/ folder, a Parquet file or a glob")
    parser.add_argument("--output", required=True, metavar="DIR", help="the directory of the shards (local)")
    parser.add_argument("--format", choices=["webdataset"], default="webdataset", help="output format")
    parser.add_argument("--shard-size", type=int, default=10000, metavar="N", help="samples per tar shard")


def run(args: argparse.Namespace, extra: list[str]) -> int:
    try:
        summary = export_webdataset(triplet_files(args.input), args.output, args.shard_size)
    except ExportError as error:
        raise SystemExit(str(error)) from None
    except ImportError:
        raise SystemExit("the WebDataset export needs the webdataset package: pip install 'magiclens[webdataset]'") from None
    print(f"samples written: {summary['out']} of {summary['in']} triplets in {len(summary['shards'])} shard(s) -> {args.output}")
    if summary["rejected"]:
        print(f"  not written: {summary['rejected']}")
    if summary["out"] == 0:
        print("magiclens export: no sample was written (see the reasons above)", file=sys.stderr)
        return 1
    return 0
