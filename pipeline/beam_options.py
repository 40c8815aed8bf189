"""Beam pipeline options shared by the `mine` and `instruct` commands."""

from __future__ import annotations

import logging

from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions, _BeamArgumentParser

# The in-process runner, pinned: Beam's default DirectRunner may try Prism, which downloads a binary.
DEFAULT_RUNNER = "FnApiRunner"


def unknown_pipeline_options(beam_args: list[str]) -> list[str]:
    """The arguments that no Beam pipeline option declares (Beam itself only logs a warning for them
    and runs on), matched exactly: no prefix matching."""
    # Beam's own parser class (it adds value-provider arguments); the options of every registered
    # PipelineOptions class, as PipelineOptions.get_all_options collects them.
    parser = _BeamArgumentParser(allow_abbrev=False)
    classes: dict[str, type] = {}
    for cls in PipelineOptions.__subclasses__():
        classes.setdefault(str(cls), cls)
    for cls in classes.values():
        cls._add_argparse_args(parser)  # noqa: SLF001 - the only way to list Beam's options
    _, unknown = parser.parse_known_args(beam_args)
    return unknown


def pipeline_options(beam_args: list[str]) -> PipelineOptions:
    """Options from the arguments our parser did not declare, with the local runner pinned."""
    unknown = unknown_pipeline_options(beam_args)
    if unknown:
        raise SystemExit(f"unrecognized argument(s) {' '.join(unknown)}: neither an option of this command nor a "
                         "Beam pipeline option (Beam options are spelled with underscores, e.g. --direct_num_workers=2)")
    options = PipelineOptions(beam_args)
    standard = options.view_as(StandardOptions)
    if not standard.runner:
        standard.runner = DEFAULT_RUNNER
    return options


def configure_logging() -> None:
    """Our progress at INFO (unless `magiclens --log-level` chose a level); Beam's own INFO chatter
    (type hints, stages) only at WARNING."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    ours = logging.getLogger("magiclens")
    if ours.level == logging.NOTSET:
        ours.setLevel(logging.INFO)
