"""`magiclens report`'s options, apart from report.py (which imports Beam, pyarrow and PIL):
`magiclens report --help` and option errors read only this module."""

from __future__ import annotations

import argparse

DEFAULT_SAMPLES = 24


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Rebuild DIR/report.html for a `magiclens mine` or `magiclens instruct` run: the funnel from "
        "DIR/stats.json with reject reasons, histograms of image sizes and scores (or instruction "
        "lengths), and a grid of sample pairs or triplets with thumbnails. One self-contained file."
    )
    parser.add_argument("run_dir", metavar="DIR", help="output directory of a mine or instruct run (local, gs://, s3://)")
    parser.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, metavar="N",
                        help=f"show the first N pairs or triplets in the grid (default {DEFAULT_SAMPLES})")
