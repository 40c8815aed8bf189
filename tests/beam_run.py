"""Run a small Beam pipeline in a test and collect what it outputs."""

from __future__ import annotations

import pickle
from pathlib import Path

import apache_beam as beam

from magiclens.pipeline.accounting import counters_from_result, stats_from_counters


def run_collect(build, folder: Path) -> tuple[dict[str, list], dict]:
    """Run a pipeline on the FnApiRunner; return the elements of the named outputs and the stats.

    `build(pipeline)` returns {name: PCollection}; each is written to a pickle in `folder` (the
    runner's workers may be other processes) and read back.
    """
    pipeline = beam.Pipeline(runner="FnApiRunner")
    outputs = build(pipeline)
    for name, pcoll in outputs.items():
        (pcoll
         | f"Collect{name}" >> beam.combiners.ToList()
         | f"Save{name}" >> beam.Map(lambda items, path: Path(path).write_bytes(pickle.dumps(items)),
                                     str(folder / f"{name}.pkl")))
    result = pipeline.run()
    result.wait_until_finish()
    collected = {name: pickle.loads((folder / f"{name}.pkl").read_bytes()) for name in outputs}
    return collected, stats_from_counters(counters_from_result(result))
