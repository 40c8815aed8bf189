"""The Parquet schemas that are the contract between stages (see DESIGN.md, Schemas).

Images are stored inline as struct<bytes: binary, path: string>, the encoding of Hugging Face
`datasets`' Image feature, so `load_dataset("parquet", ...)` reads them as images. Change a schema
only together with its version.
"""

from __future__ import annotations

import pyarrow as pa

PAIRS_SCHEMA_VERSION = "1"
TRIPLETS_SCHEMA_VERSION = "1"

IMAGE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])

# Filled by optional scorers (CLIP); null when not computed.
SCORES = pa.struct(
    [
        pa.field("query_text", pa.float32()),
        pa.field("target_text", pa.float32()),
        pa.field("pair_similarity", pa.float32()),
    ]
)


def _side(prefix: str) -> list[pa.Field]:
    return [
        pa.field(f"{prefix}_url", pa.string()),
        pa.field(f"{prefix}_alt", pa.string()),
        pa.field(f"{prefix}_context", pa.string()),
        pa.field(f"{prefix}_image", IMAGE),
        pa.field(f"{prefix}_width", pa.int32()),
        pa.field(f"{prefix}_height", pa.int32()),
        pa.field(f"{prefix}_sha256", pa.string()),
        pa.field(f"{prefix}_phash", pa.string()),
    ]


PAIRS = pa.schema(
    [
        pa.field("pair_id", pa.string()),
        pa.field("page_url", pa.string()),
        pa.field("page_title", pa.string()),
        pa.field("crawl", pa.string()),
        *_side("query"),
        *_side("target"),
        pa.field("scores", SCORES),
    ],
    metadata={"magiclens.schema": "pairs", "magiclens.schema_version": PAIRS_SCHEMA_VERSION},
)

TRIPLETS_REQUIRED = ("triplet_id", "query_image", "instruction", "target_image")

TRIPLETS = pa.schema(
    [
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
    ],
    metadata={"magiclens.schema": "triplets", "magiclens.schema_version": TRIPLETS_SCHEMA_VERSION},
)

REJECTS = pa.schema(
    [
        pa.field("element_id", pa.string()),
        pa.field("stage", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("detail", pa.string()),
    ]
)
