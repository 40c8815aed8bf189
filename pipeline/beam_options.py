"""Beam pipeline options shared by the `mine` and `instruct` commands."""

from __future__ import annotations

from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

# The in-process runner, pinned: Beam's default DirectRunner may try Prism, which downloads a binary.
DEFAULT_RUNNER = "FnApiRunner"


def pipeline_options(beam_args: list[str]) -> PipelineOptions:
    """Options from the arguments our parser did not declare, with the local runner pinned."""
    unknown_flags = [arg for arg in beam_args if not arg.startswith("--")]
    if unknown_flags:
        raise SystemExit(f"unexpected argument(s) {' '.join(unknown_flags)}: Beam options are passed as --name=value")
    options = PipelineOptions(beam_args)
    standard = options.view_as(StandardOptions)
    if not standard.runner:
        standard.runner = DEFAULT_RUNNER
    return options


def configure_logging() -> None:
    """Our progress at INFO; Beam's own INFO chatter (type hints, stages) only at WARNING."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("magiclens").setLevel(logging.INFO)
