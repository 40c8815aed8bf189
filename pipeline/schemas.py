"""The Parquet schemas that are the contract between stages (see DESIGN.md, Schemas).

Images are stored inline as struct<bytes: binary, path: string>, the encoding of Hugging Face
`datasets`' Image feature, and each schema carries the `huggingface` features metadata (the JSON of
`datasets.Features.to_dict()`, built here without importing `datasets`), so that
`load_dataset("parquet", ...)` gives PIL images, not {bytes, path} dicts. Change a schema only
together with its version.
"""

from __future__ import annotations

import json

import pyarrow as pa

# 2: {query,target}_photo_score and _colour
# 3: provenance and rights: page language, declared licence, opt-out checks made, and the WARC file,
#    record id and capture date of the page and of each image; `huggingface` features metadata
PAIRS_SCHEMA_VERSION = "3"
# 2: the pair's columns (provenance, alt text, hashes, sizes, scores) copied into every triplet
TRIPLETS_SCHEMA_VERSION = "2"

IMAGE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])

# Filled by optional scorers (CLIP); null when not computed.
SCORES = pa.struct(
    [
        pa.field("query_text", pa.float32()),
        pa.field("target_text", pa.float32()),
        pa.field("pair_similarity", pa.float32()),
    ]
)

# The Hugging Face `Value` dtype of each Arrow type used here.
_HF_DTYPES = {
    pa.string(): "string",
    pa.binary(): "binary",
    pa.float32(): "float32",
    pa.float64(): "float64",
    pa.int32(): "int32",
    pa.int64(): "int64",
    pa.bool_(): "bool",
}


def _hf_feature(kind: pa.DataType) -> dict:
    if pa.types.is_struct(kind):
        return {kind.field(i).name: _hf_feature(kind.field(i).type) for i in range(kind.num_fields)}
    if kind not in _HF_DTYPES:
        raise TypeError(f"no Hugging Face feature for Arrow type {kind}: add it to _HF_DTYPES")
    return {"dtype": _HF_DTYPES[kind], "_type": "Value"}


def huggingface_features(fields: list[pa.Field], image_columns: tuple[str, ...]) -> dict:
    """The `datasets.Features(...).to_dict()` of these columns, with Image() for `image_columns`."""
    return {
        field.name: {"_type": "Image"} if field.name in image_columns else _hf_feature(field.type) for field in fields
    }


def _schema(name: str, version: str, fields: list[pa.Field], image_columns: tuple[str, ...]) -> pa.Schema:
    features = huggingface_features(fields, image_columns)
    return pa.schema(
        fields,
        metadata={
            "magiclens.schema": name,
            "magiclens.schema_version": version,
            "huggingface": json.dumps({"info": {"features": features}}),
        },
    )


def _side(prefix: str) -> list[pa.Field]:
    return [
        pa.field(f"{prefix}_url", pa.string()),  # as the page wrote it (its preferred candidate), resolved
        pa.field(f"{prefix}_image_url", pa.string()),  # the candidate whose bytes are stored (srcset, src, ...)
        pa.field(f"{prefix}_content_score", pa.float32()),  # pipeline/furniture.py: 0 furniture .. 1 content
        pa.field(f"{prefix}_alt", pa.string()),
        pa.field(f"{prefix}_context", pa.string()),
        pa.field(f"{prefix}_image", IMAGE),
        pa.field(f"{prefix}_width", pa.int32()),
        pa.field(f"{prefix}_height", pa.int32()),
        pa.field(f"{prefix}_sha256", pa.string()),
        pa.field(f"{prefix}_phash", pa.string()),
        # pipeline/pixels.py: 0 = graphic .. 1 = photo, and the colour signature (hue histogram)
        pa.field(f"{prefix}_photo_score", pa.float32()),
        pa.field(f"{prefix}_colour", pa.string()),
        # Where the image bytes came from: the WARC file and record (its WARC-Record-ID) and the
        # capture date (WARC-Date); for a fetched image: "" for the file, "fetched" for the record,
        # and the time it was fetched (or taken from the fetch cache), ISO 8601 UTC.
        pa.field(f"{prefix}_warc_file", pa.string()),
        pa.field(f"{prefix}_record_id", pa.string()),
        pa.field(f"{prefix}_date", pa.string()),
    ]


PAIR_FIELDS = [
    pa.field("pair_id", pa.string()),
    pa.field("page_url", pa.string()),
    pa.field("page_title", pa.string()),
    pa.field("crawl", pa.string()),  # Common Crawl id (warcinfo isPartOf), else the WARC file name
    pa.field("page_lang", pa.string()),  # guessed from the page's text, else its declared lang, else "und"
    # Licences identified from what the page declares, e.g. "cc-by-sa-3.0", comma-separated; "" for none
    pa.field("page_license", pa.string()),
    # Every declaration as the page made it, one a line: "rel=license URL" or "meta NAME: CONTENT"
    pa.field("page_license_declared", pa.string()),
    pa.field("page_warc_file", pa.string()),  # the file name of a local WARC, else its full URI
    pa.field("page_record_id", pa.string()),  # WARC-Record-ID (of the revisit record for a revisit)
    pa.field("page_date", pa.string()),  # WARC-Date: when the page was captured
    # The opt-outs checked before this pair was kept, comma-separated (pipeline/pairs.py)
    pa.field("opt_out_checks", pa.string()),
    *_side("query"),
    *_side("target"),
    pa.field("scores", SCORES),
]
PAIRS = _schema("pairs", PAIRS_SCHEMA_VERSION, PAIR_FIELDS, ("query_image", "target_image"))

TRIPLETS_REQUIRED = ("triplet_id", "query_image", "instruction", "target_image")

_TRIPLET_OWN_FIELDS = [
    pa.field("triplet_id", pa.string()),
    pa.field("query_image", IMAGE),
    pa.field("instruction", pa.string()),
    pa.field("target_image", IMAGE),
    pa.field("pair_id", pa.string()),
    pa.field("page_url", pa.string()),
    pa.field("query_url", pa.string()),
    pa.field("target_url", pa.string()),
    pa.field("query_caption", pa.string()),
    pa.field("target_caption", pa.string()),
    pa.field("prompt_id", pa.string()),
    pa.field("writer", pa.string()),
]
# The pair's columns that a triplet carries besides its own: provenance, alt text, hashes, sizes, scores.
PAIR_COLUMNS_IN_TRIPLETS = tuple(
    field.name for field in PAIR_FIELDS if field.name not in {own.name for own in _TRIPLET_OWN_FIELDS}
)
TRIPLETS = _schema(
    "triplets",
    TRIPLETS_SCHEMA_VERSION,
    _TRIPLET_OWN_FIELDS + [field for field in PAIR_FIELDS if field.name in PAIR_COLUMNS_IN_TRIPLETS],
    ("query_image", "target_image"),
)

REJECTS = pa.schema(
    [
        pa.field("element_id", pa.string()),
        pa.field("stage", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("detail", pa.string()),
    ]
)
