"""Every stage accounts for what it received: in = out + rejected, by reason.

Counts are Beam Metrics counters in the `magiclens` namespace named `STAGE.in`, `STAGE.out` and
`STAGE.rejected.REASON`; at the end of a run they are read back from the pipeline result and written
to `stats.json`. Rejected elements also go to `rejects/` (see `Reject`).

A stage that only decides, per element, keep or reject subclasses `CheckStage` and supplies the
decision; the base counts and emits the reject. A composite transform returns a dict: its results
under a name that says what they are ("pairs", "images", ...) and its rejects under REJECTS_TAG.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter

from magiclens.pipeline.records import Reject

NAMESPACE = "magiclens"
REJECTS_TAG = "rejects"


class StageCounters:
    """The counters of one stage, created once per DoFn instance."""

    def __init__(self, stage: str):
        self.stage = stage
        self._in = Metrics.counter(NAMESPACE, f"{stage}.in")
        self._out = Metrics.counter(NAMESPACE, f"{stage}.out")
        self._rejected: dict[str, object] = {}

    def received(self, n: int = 1) -> None:
        self._in.inc(n)

    def kept(self, n: int = 1) -> None:
        self._out.inc(n)

    def reject(self, element_id: str, reason: str, detail: str = "") -> beam.pvalue.TaggedOutput:
        """Count a reject and return it as the tagged output every DoFn yields."""
        counter = self._rejected.get(reason)
        if counter is None:
            counter = self._rejected[reason] = Metrics.counter(NAMESPACE, f"{self.stage}.rejected.{reason}")
        counter.inc()
        return beam.pvalue.TaggedOutput(REJECTS_TAG, Reject(element_id, self.stage, reason, detail))


Problem = tuple[str, str] | None
"""(reason, detail) when an element is rejected; None when it is kept."""


class CheckStage(beam.DoFn):
    """A stage that keeps an element or rejects it with a reason, in the spirit of datatrove's BaseFilter.

    Subclasses set `stage` (the counter prefix) and implement `problem` and `element_id`; `output`
    may turn a kept element into what the stage emits (the element itself by default). A check that
    is the first step of a stage whose last step counts what the stage keeps sets `counts_kept` to
    False. Use it with `beam.ParDo(check).with_outputs(REJECTS_TAG, main=...)`.
    """

    stage: str = ""
    counts_kept: bool = True

    def problem(self, element) -> Problem:
        raise NotImplementedError

    def element_id(self, element) -> str:
        raise NotImplementedError

    def output(self, element):
        return element

    def setup(self):
        self.counters = StageCounters(self.stage)

    def process(self, element):
        self.counters.received()
        found = self.problem(element)
        if found is not None:
            yield self.counters.reject(self.element_id(element), *found)
            return
        if self.counts_kept:
            self.counters.kept()
        yield self.output(element)


def stats_from_counters(counters: Mapping[str, int]) -> dict:
    """Turn {"stage.in": n, "stage.out": n, "stage.rejected.reason": n} into per-stage stats."""
    stages: dict[str, dict] = {}
    for name, value in sorted(counters.items()):
        stage, _, rest = name.partition(".")
        entry = stages.setdefault(stage, {})
        if rest in ("in", "out"):
            entry[rest] = entry.get(rest, 0) + value
        elif rest.startswith("rejected."):
            reasons = entry.setdefault("rejected", {})
            reason = rest.removeprefix("rejected.")
            reasons[reason] = reasons.get(reason, 0) + value
        else:  # a plain count, such as outputs.pairs
            entry[rest] = entry.get(rest, 0) + value
    for entry in stages.values():
        if {"in", "out", "rejected"} & set(entry):
            entry.setdefault("in", 0)
            entry.setdefault("out", 0)
            entry.setdefault("rejected", {})
            entry["rejected_total"] = sum(entry["rejected"].values())
            entry["balanced"] = entry["in"] == entry["out"] + entry["rejected_total"]
    return stages


def counters_from_result(result: beam.runners.runner.PipelineResult) -> dict[str, int]:
    query = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))
    totals: dict[str, int] = {}
    for counter in query["counters"]:
        try:
            value = counter.committed
        except Exception:  # runners that only report attempted values
            value = None
        if value is None:
            value = counter.attempted
        totals[counter.key.metric.name] = totals.get(counter.key.metric.name, 0) + int(value or 0)
    return totals


def write_json(path: str, data: object) -> None:
    """Write JSON through Beam FileSystems, so `path` may be local, gs:// or s3://."""
    with FileSystems.create(path, mime_type="application/json") as handle:
        handle.write((json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str) -> object:
    with FileSystems.open(path) as handle:
        return json.loads(handle.read().decode())


def unbalanced_stages(stats: Mapping[str, Mapping]) -> list[str]:
    return [name for name, entry in stats.items() if "balanced" in entry and not entry["balanced"]]
