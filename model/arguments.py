"""The options of the model commands (train, evaluate, index, search, convert-official), apart from
the code that runs them: `magiclens COMMAND --help` and option errors read only this module, never
torch or transformers (cli.py imports a command's run module only to run it)."""

from __future__ import annotations

import argparse
from pathlib import Path

MODEL_NAMES = ("tiny", "base", "large")
PRECISIONS = ("fp32", "bf16")
BENCHMARKS = ("circo", "cirr", "fashioniq")


def add_precision_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="fp32 (default): embeddings in float32, comparable everywhere; bf16: bfloat16 autocast, faster on GPUs, "
        "slightly different figures (see docs/use.md)",
    )


def add_benchmark_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that select a standard benchmark (shared with `magiclens evaluate`; an argument
    group works as well as a parser)."""
    parser.add_argument("--benchmark", choices=BENCHMARKS, help="evaluate on a standard benchmark instead of --data")
    parser.add_argument("--data-dir", help="the benchmark's folder, in its published layout (see docs/use.md)")
    parser.add_argument(
        "--split",
        choices=("val", "test"),
        default="val",
        help="val: compute the metrics; test: write the evaluation server's (FashionIQ: the starter kit's) "
        "submission file(s) to --output",
    )
    parser.add_argument("--output", help="folder for the test-split submission file(s)")
    parser.add_argument("--dump-rankings", metavar="FILE", help="val: also write each query's top 50 gallery ids to FILE (JSON)")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="Parquet triplet shards: a file or a glob, local or gs://")
    parser.add_argument("--model", choices=MODEL_NAMES, default="base", help="model size (tiny is for tests and demos)")
    parser.add_argument(
        "--backbone",
        help="pretrained CLIP weights and tokenizer: a local directory or a hub id such as "
        "openai/clip-vit-base-patch16 (base) or openai/clip-vit-large-patch14 (large); "
        "default: a randomly initialised CLIP",
    )
    parser.add_argument("--output", required=True, type=Path, help="directory for checkpoints and TensorBoard logs")
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps to train in total")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="triplets per micro-batch per process; an optimizer step sees this x processes x --grad-accum",
    )
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (AdamW)")
    parser.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay on matrices")
    parser.add_argument(
        "--warmup-steps", type=int, help="linear warmup steps before the cosine decay (default: 5%% of --steps)"
    )
    parser.add_argument("--clip-grad", type=float, default=1.0, help="clip the gradient norm to this (0: no clipping)")
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.07,
        help="initial softmax temperature of the loss, from 0.01 to 1 (learned unless --fixed-temperature)",
    )
    parser.add_argument("--fixed-temperature", action="store_true", help="keep the temperature fixed")
    parser.add_argument("--freeze-backbone", action="store_true", help="train only the fusion layers and pooler")
    parser.add_argument("--compile", action="store_true", help="torch.compile the training forward pass")
    parser.add_argument("--num-workers", type=int, default=4, help="DataLoader worker processes per process")
    parser.add_argument("--shuffle-buffer", type=int, default=1000, help="rows in each worker's shuffle buffer")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the data order")
    parser.add_argument("--save-every", type=int, default=1000, help="write a checkpoint every N steps (and at the end)")
    parser.add_argument("--keep-checkpoints", type=int, default=2, help="how many recent checkpoints to keep")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint in --output, exactly where it stopped "
        "(same data, --batch-size, --num-workers and number of processes)",
    )
    parser.add_argument("--log-every", type=int, default=10, help="write TensorBoard scalars every N steps")
    parser.add_argument("--device", help="torch device (default: this rank's GPU if there is one, else cpu)")


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a checkpoint directory, or a `magiclens train --output` directory")
    parser.add_argument("--data", help="Parquet triplet shards: a file or a glob, local or gs:// (or use --benchmark)")
    parser.add_argument("--batch-size", type=int, default=64, help="triplets embedded per batch")
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes that decode images")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    add_precision_argument(parser)
    parser.add_argument(
        "--json", action="store_true", help="print exactly one JSON object (metrics as fractions in [0, 1]) on stdout"
    )
    add_benchmark_arguments(parser.add_argument_group("standard benchmarks (instead of --data)"))


def add_index_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a checkpoint directory, or a `magiclens train --output` directory")
    parser.add_argument(
        "--images",
        required=True,
        action="append",
        help="what to index: an image file, a folder (every image file under it), a glob (quote it), "
        "or a Parquet file with an image column; repeat the option for several",
    )
    parser.add_argument("--output", required=True, help="the index folder; if it exists, images it already holds are skipped")
    parser.add_argument(
        "--image-column",
        default="image",
        help="the column of Parquet inputs that holds the images (struct<bytes, path> or binary; default: image)",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images embedded per batch (default: 64)")
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes that read and decode images (default: 2)")
    parser.add_argument(
        "--shard-size", type=int, default=4096, help="images per shard file; an interrupted run loses at most one shard of work (default: 4096)"
    )
    parser.add_argument("--overwrite", action="store_true", help="delete an existing index at --output and build it again")
    parser.add_argument("--append", action="store_true",
                        help="add the images to the finished index at --output (images it holds are skipped); "
                             "an index whose run was interrupted is resumed without it")
    parser.add_argument(
        "--faiss",
        metavar="FACTORY",
        help='also (re)build a faiss index of all the embeddings for `search --faiss`: a faiss index_factory string, '
        'e.g. "Flat" (exact) or "HNSW32" (approximate, for large corpora); needs faiss installed',
    )
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")


def add_search_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", required=True, help="an index folder written by `magiclens index`")
    parser.add_argument("--checkpoint", required=True, help="the checkpoint that built the index (checked against the index)")
    query = parser.add_mutually_exclusive_group(required=True)
    query.add_argument("--image", help="the query image file")
    query.add_argument("--queries", metavar="FILE.jsonl",
                       help='many queries in one call (the model loads once): one JSON object per line, '
                            '{"image": PATH, "instruction": TEXT}; writes one JSON line per query, '
                            '{"query": ..., "results": [...]} or {"query": ..., "error": ...}')
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


def add_convert_official_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="PKL", help="a released MagicLens file: magic_lens_clip_base.pkl or magic_lens_clip_large.pkl")
    parser.add_argument(
        "--size",
        required=True,
        choices=MODEL_NAMES,
        help="the model the file holds: base (CLIP ViT-B/16) or large (ViT-L/14); tiny is this project's test size",
    )
    parser.add_argument("--output", required=True, help="the checkpoint directory to write (replaced if it exists)")
