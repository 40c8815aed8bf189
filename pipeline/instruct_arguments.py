"""`magiclens instruct`'s options, apart from the pipeline (instruct.py imports Beam, and Beam's
RunInference imports torch): `magiclens instruct --help` and option errors read only this module."""

from __future__ import annotations

import argparse

from magiclens.pipeline.writers import CAPTIONER_BACKENDS, WRITER_BACKENDS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Write instructions for mined pairs. Reads PAIRS (a pairs directory or glob) and the caption cache, "
        "writes OUTPUT/triplets/*.parquet, OUTPUT/rejects/ and OUTPUT/stats.json. To get a new triplet set, "
        "write a new prompt version and run again: nothing is mined, fetched or captioned again. Unlisted "
        "arguments are Beam pipeline options; the default runner is Beam's in-process FnApiRunner."
    )
    parser.add_argument("--pairs", required=True, metavar="DIR_OR_GLOB", help="pairs written by `magiclens mine`: its output DIR, DIR/pairs, or a Parquet glob")
    parser.add_argument("--output", required=True, metavar="DIR", help="output directory (local, gs://, s3://)")
    parser.add_argument("--overwrite", action="store_true", help="replace the committed output of an earlier run at --output")
    parser.add_argument("--writer", default="template", choices=WRITER_BACKENDS,
                        help="instruction writer: template (rule-based, offline; default), openai (an OpenAI-compatible "
                             "endpoint), vllm (vLLM offline engine on this machine's GPUs), transformers (local Hugging Face model)")
    parser.add_argument("--prompt", default="instruct", metavar="NAME_OR_FILE",
                        help="instruction prompt: a shipped prompt name (prompts/NAME.yaml) or a YAML file (default: instruct); "
                             "ignored by the template writer")
    parser.add_argument("--captioner", default="none", choices=CAPTIONER_BACKENDS,
                        help="captioner for the pairs' images: none (alt text and nearby text only; default), openai, vllm, "
                             "transformers (an image-text-to-text model)")
    parser.add_argument("--caption-prompt", default="caption", metavar="NAME_OR_FILE",
                        help="caption prompt: a shipped prompt name or a YAML file (default: caption)")
    parser.add_argument("--captions", metavar="DIR",
                        help="caption cache, a Parquet dataset keyed by image sha256, captioner and caption prompt "
                             "(default: captions/ beside the pairs directory)")
    parser.add_argument("--instructions-per-pair", type=int, default=1, metavar="N",
                        help="write up to N triplets per pair, each with its own instruction (default 1)")
    model = parser.add_argument_group("model backends (openai, vllm, transformers)")
    model.add_argument("--model", metavar="NAME",
                       help="the writer's model: the served model name (openai), or a local path or hub id (vllm, transformers)")
    model.add_argument("--caption-model", metavar="NAME", help="the captioner's model (default: --model)")
    model.add_argument("--endpoint", metavar="URL",
                       help="OpenAI-compatible API base for --writer openai, e.g. http://127.0.0.1:8000/v1")
    model.add_argument("--caption-endpoint", metavar="URL", help="API base for --captioner openai (default: --endpoint)")
    model.add_argument("--api-key-env", default="OPENAI_API_KEY", metavar="VAR",
                       help="environment variable holding the API key, read on the workers (default OPENAI_API_KEY; "
                            "unset means no key, as local servers need)")
    model.add_argument("--concurrency", type=int, default=8, metavar="N",
                       help="openai: requests in flight at once per worker process (default 8)")
    model.add_argument("--max-retries", type=int, default=5, metavar="N",
                       help="openai: retries of a request after 429, 5xx, a timeout or a dropped connection (default 5)")
    model.add_argument("--retry-backoff", type=float, default=1.0, metavar="SECONDS",
                       help="openai: first retry delay, doubled each retry, with jitter; Retry-After wins (default 1.0)")
    model.add_argument("--request-timeout", type=float, default=120.0, metavar="SECONDS",
                       help="openai: time allowed for one attempt of a request (default 120)")
    model.add_argument("--request-deadline", type=float, default=300.0, metavar="SECONDS",
                       help="openai: time allowed for a request, all its attempts and waits included (default 300)")
    model.add_argument("--max-answer-bytes", type=int, default=1_000_000, metavar="BYTES",
                       help="openai: an answer longer than this is rejected as response_too_large (default 1000000)")
    model.add_argument("--batch-size", type=int, default=32, metavar="N",
                       help="elements per RunInference batch (default 32)")
    model.add_argument("--device", default="auto", metavar="DEVICE",
                       help="transformers: torch device, e.g. cpu or cuda:0 (default auto: cuda when available)")
    model.add_argument("--vllm-arg", action="append", metavar="KEY=VALUE",
                       help="vllm: an engine argument of vllm.LLM, repeatable, e.g. tensor_parallel_size=2 or max_model_len=8192")
    model.add_argument("--seed", type=int, default=0,
                       help="seed of the few-shot sampling and of generation; per element, so reruns repeat (default 0)")
