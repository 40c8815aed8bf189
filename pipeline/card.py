"""The dataset card: the README.md that `magiclens mine` and `magiclens instruct` write beside their
data, with the YAML front matter the Hugging Face Hub reads (configs and data files, licence, task
categories, tags), then what the data is, the funnel of stats.json, the configuration, the prompt,
the licence and opt-out notes, the columns and how to load it.

`card_text` is a plain function of the run summary (the content of stats.json); `write_card` writes
it through Beam's FileSystems, so the output may be local, gs:// or s3://.
"""

from __future__ import annotations

import json

import pyarrow as pa
import yaml
from apache_beam.io.filesystems import FileSystems

from magiclens.pipeline import schemas

CARD_NAME = "README.md"

# What each command writes: the image dataset's folder, its schema, and how it is described.
_KINDS = {
    "mine": ("pairs", schemas.PAIRS, schemas.PAIRS_SCHEMA_VERSION,
             "Ordered (query image, target image) pairs of images found on the same web page, mined from "
             "web archives (WARC files) by `magiclens mine`: the input of `magiclens instruct`, which writes "
             "an instruction for each pair."),
    "instruct": ("triplets", schemas.TRIPLETS, schemas.TRIPLETS_SCHEMA_VERSION,
                 "(query image, instruction, target image) triplets for training an instruction-conditioned "
                 "image retriever (MagicLens), written by `magiclens instruct` from pairs mined by `magiclens "
                 "mine`. Each row also carries the pair's provenance and texts."),
}


def _size_category(rows: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                        (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M")):
        if rows < limit:
            return name
    return "100M<n<1B"


def front_matter(folder: str, rows: int) -> dict:
    """The Hub's metadata: the data files of each config, licence, task categories and tags."""
    return {
        "license": "other",
        "license_name": "per-row-web-content",
        "pretty_name": f"MagicLens {folder} mined from the web",
        "task_categories": ["image-to-image", "image-feature-extraction"],
        "tags": ["magiclens", "composed-image-retrieval", "web-mined", "warc", "provenance"],
        "size_categories": [_size_category(rows)],
        "configs": [
            {"config_name": "default", "default": True,
             "data_files": [{"split": "train", "path": f"{folder}/*.parquet"}]},
            {"config_name": "rejects", "data_files": [{"split": "train", "path": "rejects/*.parquet"}]},
        ],
    }


def _funnel(stages: dict) -> list[str]:
    lines = ["| stage | in | out | rejected | reasons |", "|---|---:|---:|---:|---|"]
    for name, entry in stages.items():
        if "in" not in entry:
            continue
        reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(entry.get("rejected", {}).items()))
        lines.append(f"| {name} | {entry['in']} | {entry['out']} | {entry.get('rejected_total', 0)} | {reasons} |")
    return lines


def _columns(schema: pa.Schema) -> list[str]:
    return [f"- `{field.name}`: {'image' if field.type == schemas.IMAGE else field.type}" for field in schema]


def _loading(folder: str) -> list[str]:
    return [
        "## Loading",
        "",
        "With Hugging Face `datasets` (the images come back as PIL images: the Parquet files carry the "
        "`huggingface` features metadata):",
        "",
        "```python",
        "from datasets import load_dataset",
        "",
        f'data = load_dataset("parquet", data_files="{folder}/*.parquet", split="train")',
        'data[0]["query_image"]  # a PIL.Image.Image',
        "```",
        "",
        "With pyarrow (images are `struct<bytes, path>`, JPEG bytes):",
        "",
        "```python",
        "import io",
        "import pyarrow.dataset as ds",
        "from PIL import Image",
        "",
        f'table = ds.dataset("{folder}", format="parquet").to_table()',
        'row = table.slice(0, 1).to_pylist()[0]',
        'image = Image.open(io.BytesIO(row["query_image"]["bytes"]))',
        "```",
        "",
        "As WebDataset tar shards (`magiclens export --format webdataset`, or by hand):",
        "",
        "```python",
        "import json",
        "import pyarrow.dataset as ds",
        "import webdataset as wds",
        "",
        'with wds.TarWriter("shard-000000.tar") as sink:',
        f'    for row in ds.dataset("{folder}", format="parquet").to_table().to_pylist():',
        '        meta = {k: v for k, v in row.items() if not k.endswith("_image")}',
        '        key = row.get("triplet_id") or row["pair_id"]',
        '        sink.write({"__key__": key, "query.jpg": row["query_image"]["bytes"],',
        '                    "target.jpg": row["target_image"]["bytes"], "json": json.dumps(meta).encode()})',
        "```",
        "",
        "Training (`magiclens train`) reads the triplet columns directly from the Parquet files.",
    ]


_RIGHTS = [
    "## Licence and opt-outs",
    "",
    "The images and texts belong to their authors and publishers; no licence is granted over them by "
    "this dataset (hence `license: other`). Each row records what its page declared: `page_license` "
    "holds the licences recognised (Creative Commons as e.g. `cc-by-sa-3.0`, GFDL), "
    "`page_license_declared` every declaration as the page made it (`<a rel=\"license\">`, "
    "`<link rel=\"license\">`, `<meta name=\"license\">`, `dc.rights`, `dcterms.license`, ...). A page's "
    "licence usually covers its text; an image may be licensed differently. Check the rights of each "
    "row for your use, and honour removal requests.",
    "",
    "Provenance: every row names the WARC file, the WARC record id and the capture date (WARC-Date) of "
    "its page and of each image (`page_*`, `query_*`, `target_*`); an image fetched over HTTP has the "
    "record id `fetched` and the time of the fetch.",
    "",
    "Opt-outs: `opt_out_checks` lists the checks made before a row was kept. Pages that opt out with "
    "`X-Robots-Tag`, `<meta name=\"robots\">` or `<meta name=\"magiclens\">` (noai, noimageai) or "
    "`<meta name=\"tdm-reservation\">` were dropped; images fetched over HTTP were also checked against "
    "robots.txt, TDMRep (`/.well-known/tdmrep.json`, the `tdm-reservation` header) and their own "
    "`X-Robots-Tag`. Archives captured before a site opted out cannot show it: check again before reuse.",
]


def card_text(summary: dict) -> str:
    """The card of a run, from its summary (the content of stats.json)."""
    command = summary.get("command")
    if command not in _KINDS:
        raise ValueError(f"no dataset card for command {command!r}: expected one of {', '.join(_KINDS)}")
    folder, schema, version, description = _KINDS[command]
    stages = summary.get("stages", {})
    rows = stages.get("outputs", {}).get(folder, 0)
    settings = summary.get("config") or {
        key: value for key, value in summary.items() if key not in ("command", "stages", "seconds")
    }
    lines = [
        "---",
        yaml.safe_dump(front_matter(folder, rows), sort_keys=False, allow_unicode=True).rstrip(),
        "---",
        "",
        f"# MagicLens {folder}",
        "",
        description,
        "",
        f"- rows: {rows} in `{folder}/*.parquet` (schema `{folder}` version {version}); "
        "rejected elements with their reasons in `rejects/*.parquet`",
        f"- written by `magiclens {command}` in {summary.get('seconds', 0)} s; counts in `stats.json`",
    ]
    if command == "instruct":
        lines += [
            f"- prompt: `{summary.get('prompt_id')}`; writer: `{summary.get('writer')}`"
            f" (model `{summary.get('model')}`); captioner: `{summary.get('captioner')}`",
        ]
    lines += [
        "",
        "## Funnel",
        "",
        "Every element that entered a stage left it as output or as a reject with a reason (`in = out + rejected`).",
        "",
        *_funnel(stages),
        "",
        "## Configuration",
        "",
        "```json",
        json.dumps(settings, indent=1, sort_keys=True, default=str),
        "```",
        "",
        *_RIGHTS,
        "",
        *_loading(folder),
        "",
        "## Columns",
        "",
        *_columns(schema),
        "",
    ]
    return "\n".join(lines)


def write_card(output: str, summary: dict) -> str:
    """Write OUTPUT/README.md for a run's summary; returns its path."""
    path = FileSystems.join(output, CARD_NAME)
    with FileSystems.create(path, mime_type="text/markdown") as handle:
        handle.write(card_text(summary).encode("utf-8"))
    return path
