"""`magiclens mine`'s configuration: one frozen MineConfig built from the command line, checked
before anything runs. The flags of every stage are declared here, in argument groups.

This module imports no Beam (the stages' settings come from Beam-free modules), so that
`magiclens mine --help` and a bad flag answer at once."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, replace

from magiclens.pipeline.commoncrawl import add_crawl_arguments
from magiclens.pipeline.extract import DEFAULT_CONTEXT_CHARS
from magiclens.pipeline.fetch.config import FetchConfig, add_fetch_arguments
from magiclens.pipeline.filters import RefFilterConfig, known_languages
from magiclens.pipeline.images import DEFAULT_IMAGE, ImageConfig
from magiclens.pipeline.pairs import PairingConfig
from magiclens.pipeline.stage_config import DecodedImageConfig, DedupeConfig, ReadLimits


@dataclass(frozen=True)
class FilterConfig:
    """Settings of every filter stage of `magiclens mine`."""

    refs: RefFilterConfig = field(default_factory=RefFilterConfig)
    decoded: DecodedImageConfig = field(default_factory=DecodedImageConfig)
    dedupe: DedupeConfig = field(default_factory=DedupeConfig)
    clip_model: str | None = None
    min_text_score: float | None = None
    pair_similarity: tuple[float, float] | None = None
    score_batch_size: int = 32
    nsfw_model: str | None = None
    nsfw_threshold: float = 0.5

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> FilterConfig:
        """Validate the flags of `add_filter_arguments`; a bad value exits with what to change."""
        languages = tuple(sorted({code.strip().lower() for code in (args.languages or "").split(",") if code.strip()}))
        unknown = sorted(set(languages) - set(known_languages()))
        if unknown:
            raise SystemExit(
                f"--languages: unknown code(s) {', '.join(unknown)}; use ISO 639-1 codes such as en,de,fr "
                f"(known: {', '.join(known_languages())})"
            )
        for flag, value, low in (
            ("--max-images-per-page", args.max_images_per_page, 1),
            ("--min-declared-side", args.min_declared_side, 0),
            ("--max-pages-per-image", args.max_pages_per_image, 1),
            ("--max-pairs-per-image", args.max_pairs_per_image, 1),
            ("--cluster-rounds", args.cluster_rounds, 1),
            ("--score-batch-size", args.score_batch_size, 1),
        ):
            if value < low:
                raise SystemExit(f"{flag} must be at least {low}, got {value}")
        if not 0 <= args.corpus_duplicate_distance <= 63:
            raise SystemExit(f"--corpus-duplicate-distance must be between 0 and 63, got {args.corpus_duplicate_distance}")
        if not 0 <= args.min_language_confidence <= 1:
            raise SystemExit(f"--min-language-confidence must be between 0 and 1, got {args.min_language_confidence}")
        if not 0 <= args.min_photo_score <= 1:
            raise SystemExit(f"--min-photo-score must be between 0 and 1, got {args.min_photo_score}")
        if not 0 <= args.nsfw_threshold <= 1:
            raise SystemExit(f"--nsfw-threshold must be between 0 and 1, got {args.nsfw_threshold}")
        band = _parse_band(args.pair_similarity) if args.pair_similarity else None
        if (args.min_text_score is not None or band) and not args.clip_model:
            raise SystemExit("--min-text-score and --pair-similarity need CLIP scores: give --clip-model PATH_OR_ID")
        return cls(
            refs=RefFilterConfig(
                max_images_per_page=args.max_images_per_page,
                min_declared_side=args.min_declared_side,
                languages=languages,
                min_language_confidence=args.min_language_confidence,
            ),
            decoded=DecodedImageConfig(min_pixel_std=args.min_pixel_std, min_photo_score=args.min_photo_score),
            dedupe=DedupeConfig(
                max_distance=args.corpus_duplicate_distance,
                max_pages_per_image=args.max_pages_per_image,
                max_pairs_per_image=args.max_pairs_per_image,
                rounds=args.cluster_rounds,
            ),
            clip_model=args.clip_model,
            min_text_score=args.min_text_score,
            pair_similarity=band,
            score_batch_size=args.score_batch_size,
            nsfw_model=args.nsfw_model,
            nsfw_threshold=args.nsfw_threshold,
        )


def _parse_band(text: str) -> tuple[float, float]:
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise SystemExit(f"--pair-similarity takes MIN,MAX (two numbers, e.g. 0.5,0.95), got {text!r}") from None
    if not -1 <= low < high <= 1:
        raise SystemExit(f"--pair-similarity needs -1 <= MIN < MAX <= 1, got {text!r}")
    return low, high


def add_filter_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of every filter stage, in argument groups of their own."""
    cheap = parser.add_argument_group("filters before fetching (image references)")
    cheap.add_argument("--max-images-per-page", type=int, default=30, metavar="N",
                       help="after the filters below, keep the first N image references of a page, in page "
                            "order; the rest are rejected as over_page_cap (default 30)")
    cheap.add_argument("--min-declared-side", type=int, default=100, metavar="PX",
                       help="reject references whose width or height declared in the HTML is under PX "
                            "(tracking pixels, icons). Lower than --min-side because pages often display "
                            "an image at half its file size (default 100; 0 turns it off)")
    cheap.add_argument("--languages", default="", metavar="CODES",
                       help="keep only images whose text (alt, title, context), or else whose page, is in one "
                            "of these ISO 639-1 languages, e.g. en or en,de (default: all languages)")
    cheap.add_argument("--min-language-confidence", type=float, default=0.5, metavar="P",
                       help="a language guess under this probability counts as undetermined (default 0.5)")
    decoded = parser.add_argument_group("filters after decoding")
    decoded.add_argument("--min-pixel-std", type=float, default=DecodedImageConfig.min_pixel_std, metavar="STD",
                         help="reject near-uniform images: standard deviation of the gray levels (0-255) "
                              f"under this (default {DecodedImageConfig.min_pixel_std:g}; real photos measure 9 and up)")
    decoded.add_argument("--min-photo-score", type=float, default=DecodedImageConfig.min_photo_score, metavar="S",
                         help="reject images whose photo-versus-graphic score (0 graphic .. 1 photo: distinct colours, "
                              "entropy, flat area; recorded per image in the pairs) is under S; 0.2 suits colour web "
                              f"photos but also drops grey photos (default {DecodedImageConfig.min_photo_score:g}: off)")
    decoded.add_argument("--nsfw-model", default=None, metavar="PATH_OR_ID",
                         help="optional: a transformers image classifier (local path or hub id) with an 'nsfw' "
                              "label; pairs with an image it scores at or over --nsfw-threshold are dropped "
                              "(default: off; see docs/filters.md for a model and its licence)")
    decoded.add_argument("--nsfw-threshold", type=float, default=0.5, metavar="P",
                         help="probability of the nsfw label at or over which an image is dropped (default 0.5)")
    corpus = parser.add_argument_group("near duplicates across the whole run")
    corpus.add_argument("--corpus-duplicate-distance", type=int, default=DedupeConfig.max_distance, metavar="BITS",
                        help="two images whose pHashes differ in at most BITS bits are one cluster, whatever "
                             f"pages they are on (default {DedupeConfig.max_distance}; the hash is split into "
                             "BITS+1 bands, so larger values make bigger buckets to compare)")
    corpus.add_argument("--max-pages-per-image", type=int, default=DedupeConfig.max_pages_per_image, metavar="N",
                        help="an image whose cluster appears on more than N distinct pages is site furniture "
                             f"(logo, banner, sidebar) and is dropped everywhere (default {DedupeConfig.max_pages_per_image})")
    corpus.add_argument("--max-pairs-per-image", type=int, default=DedupeConfig.max_pairs_per_image, metavar="N",
                        help="an image cluster takes part in at most N pairs of the whole output; the pairs "
                             f"kept are chosen by pair_id, deterministically (default {DedupeConfig.max_pairs_per_image})")
    corpus.add_argument("--cluster-rounds", type=int, default=DedupeConfig.rounds, metavar="N",
                        help="rounds of label propagation that give each cluster its id; stats.json counts "
                             "the edges left unresolved (clusters.unresolved_edges): raise N if it is not 0 "
                             f"(default {DedupeConfig.rounds})")
    scores = parser.add_argument_group("CLIP scores (optional)")
    scores.add_argument("--clip-model", default=None, metavar="PATH_OR_ID",
                        help="a transformers CLIP model (local path or hub id); when given, each pair gets "
                             "scores.query_text and scores.target_text (image against its alt/context) and "
                             "scores.pair_similarity (query image against target image) (default: no scores)")
    scores.add_argument("--min-text-score", type=float, default=None, metavar="COS",
                        help="drop pairs where a side that has text scores under COS against it (cosine; "
                             "for OpenAI CLIP ViT-B, 0.2-0.3 is a starting point to measure; default: no filter)")
    scores.add_argument("--pair-similarity", default=None, metavar="MIN,MAX",
                        help="keep pairs whose image-image cosine is within [MIN, MAX]: under MIN unrelated, "
                             "over MAX near copies. Measure the band for your CLIP (MegaPairs' (0.8, 0.96) "
                             "was for EVA-CLIP); default: no filter")
    scores.add_argument("--score-batch-size", type=int, default=32, metavar="N",
                        help="pairs per CLIP (and NSFW) batch (default 32)")


@dataclass(frozen=True)
class MineConfig:
    inputs: tuple[str, ...]
    output: str
    html_parser: str = "lexbor"
    context_chars: int = DEFAULT_CONTEXT_CHARS
    image: ImageConfig = DEFAULT_IMAGE
    pairing: PairingConfig = field(default_factory=PairingConfig)
    read_limits: ReadLimits = field(default_factory=ReadLimits)
    fetch: FetchConfig | None = None  # None: --no-fetch, only images found in the input
    filters: FilterConfig = field(default_factory=FilterConfig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Mine same-page image pairs from WARC files. Writes OUTPUT/pairs/*.parquet, OUTPUT/rejects/ "
        "(every element dropped, with its reason) and OUTPUT/stats.json (per stage: in, out, rejected). "
        "Arguments not listed here are passed to Beam as pipeline options (e.g. --runner, "
        "--direct_num_workers=2); the default runner is Beam's in-process FnApiRunner."
    )
    io = parser.add_argument_group("input and output")
    io.add_argument("--input", action="append", metavar="GLOB",
                    help="WARC file or glob (local, gs://, s3://) or an http(s) URL; repeatable")
    io.add_argument("--output", required=True, metavar="DIR", help="output directory (local, gs://, s3://)")
    io.add_argument("--overwrite", action="store_true",
                    help="replace the committed output of an earlier run at --output (its per-WARC-file work, "
                         "OUTPUT/_work, is reused for the files and settings it already covers)")
    io.add_argument("--no-fetch", action="store_true",
                    help="use only images found in the input WARCs; images elsewhere are rejected as not_in_input")
    extract = parser.add_argument_group("extraction")
    extract.add_argument("--html-parser", choices=["lexbor", "bs4"], default="lexbor",
                         help="HTML parser: selectolax/Lexbor (fast, default) or BeautifulSoup")
    extract.add_argument("--context-chars", type=int, default=DEFAULT_CONTEXT_CHARS, metavar="N",
                         help=f"cap on the nearby text kept per image (default {DEFAULT_CONTEXT_CHARS})")
    images = parser.add_argument_group("images")
    images.add_argument("--max-side", type=int, default=DEFAULT_IMAGE.max_side,
                        help=f"resize so the longer side is at most this (default {DEFAULT_IMAGE.max_side})")
    images.add_argument("--min-side", type=int, default=DEFAULT_IMAGE.min_side,
                        help=f"reject images whose shorter side is under this (default {DEFAULT_IMAGE.min_side})")
    images.add_argument("--max-aspect", type=float, default=DEFAULT_IMAGE.max_aspect,
                        help=f"reject images with aspect ratio over this (default {DEFAULT_IMAGE.max_aspect:g})")
    images.add_argument("--jpeg-quality", type=int, default=DEFAULT_IMAGE.jpeg_quality,
                        help=f"quality of the stored JPEG (default {DEFAULT_IMAGE.jpeg_quality})")
    images.add_argument("--max-pixels", type=int, default=DEFAULT_IMAGE.max_pixels,
                        help=f"reject images with more pixels than this, from the header (default {DEFAULT_IMAGE.max_pixels})")
    pairing = parser.add_argument_group("pairs")
    pairing.add_argument("--near-duplicate-distance", type=int, default=8, metavar="BITS",
                         help="pHash Hamming distance at or under which two images of a page are duplicates (default 8)")
    pairing.add_argument("--pairs-per-page", type=int, default=4, help="at most this many pairs per page (default 4)")
    pairing.add_argument("--both-directions", action="store_true",
                         help="also write (target, query) for each chosen (query, target)")
    add_crawl_arguments(parser)
    add_filter_arguments(parser)
    add_fetch_arguments(parser)


def config_from_args(args: argparse.Namespace, inputs: list[str]) -> MineConfig:
    positive = {
        "--max-side": args.max_side,
        "--pairs-per-page": args.pairs_per_page,
        "--context-chars": args.context_chars,
    }
    for flag, value in positive.items():
        if value < 1:
            raise SystemExit(f"{flag} must be at least 1, got {value}")
    if args.max_aspect < 1:
        raise SystemExit(f"--max-aspect must be at least 1, got {args.max_aspect}")
    if not 1 <= args.jpeg_quality <= 95:
        raise SystemExit(f"--jpeg-quality must be between 1 and 95, got {args.jpeg_quality}")
    if not 0 <= args.near_duplicate_distance <= 64:
        raise SystemExit(f"--near-duplicate-distance must be between 0 and 64, got {args.near_duplicate_distance}")
    image = ImageConfig(args.max_side, args.min_side, args.max_aspect, args.jpeg_quality, args.max_pixels)
    return MineConfig(
        inputs=tuple(inputs),
        output=args.output,
        html_parser=args.html_parser,
        context_chars=args.context_chars,
        image=image,
        pairing=PairingConfig(args.near_duplicate_distance, args.pairs_per_page, args.both_directions),
        fetch=None if args.no_fetch else _fetch_config(args, image),
        filters=FilterConfig.from_args(args),
    )


def _fetch_config(args: argparse.Namespace, image: ImageConfig) -> FetchConfig:
    """Without --image-cache, fetched images are cached in the output's work folder, so that a rerun
    (after a failure, or with more WARC files) sends no request that succeeded before."""
    from apache_beam.io.filesystems import FileSystems

    config = FetchConfig.from_args(args, image)
    if config.image_cache is None:
        config = replace(config, image_cache=FileSystems.join(args.output, "_work", "image-cache"))
    return config


