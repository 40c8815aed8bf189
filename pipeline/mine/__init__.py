"""`magiclens mine`: WARC files -> same-page image pairs (pairs/*.parquet), rejects/, stats.json, report.html.

Each stage module owns its Beam code; this package only configures (`config`) and composes
(`compose`) them:

  WARC files (warc) -> pages -> image refs (extract, filters) --canonical URL key--> images (images)
           \-> image records ------------------------------------------------/     \-> fetch (fetch)
  -> post-decode checks (postdecode) -> corpus clusters, per-page dedupe, pairs (dedupe, pairs)
  -> optional NSFW and CLIP scores (scores) -> pairs/*.parquet

Every stage counts what it received, kept and rejected (pipeline/accounting.py).
"""

from magiclens.pipeline.mine.config import FilterConfig, MineConfig, add_arguments, config_from_args


def __getattr__(name: str) -> object:
    # The pipeline (Beam) loads when a run starts: `magiclens mine --help` reads only config.py.
    if name in ("build_pipeline", "run"):
        from magiclens.pipeline.mine import compose

        return getattr(compose, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["FilterConfig", "MineConfig", "add_arguments", "build_pipeline", "config_from_args", "run"]
