"""The cap on pairs per image cluster, over the whole output (stage `pair_cap`).

An image that is on a few pages only can still join many pairs (a product shot reused across a
shop's pages). Each cluster accepts its first --max-pairs-per-image pairs by pair_id (stable and
unbiased), and a pair is kept when both its clusters accept it, so no cluster is in more than that
many kept pairs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import apache_beam as beam

from magiclens.pipeline.accounting import REJECTS_TAG, CheckStage, Problem


@dataclass(frozen=True)
class ClusteredPair:
    """A pair row with the clusters of its two sides, for the per-cluster cap."""

    row: dict
    query_cluster: str
    target_cluster: str


def pairs_to_keep(pair_ids: Iterable[str], max_pairs: int) -> set[str]:
    """The pairs of one cluster it accepts: the first `max_pairs` by pair_id (stable, unbiased)."""
    return set(sorted(set(pair_ids))[:max_pairs])


def _cluster_votes(element, max_pairs: int):
    cluster_id, pair_ids = element
    pair_ids = list(pair_ids)
    accepted = pairs_to_keep(pair_ids, max_pairs)
    for pair_id in set(pair_ids):
        yield pair_id, (cluster_id, pair_id in accepted, len(set(pair_ids)))


class _ApplyCap(CheckStage):
    """(pair id, {pair, votes}) -> the pair row, unless a cluster of its two sides refused it."""

    stage = "pair_cap"

    def __init__(self, max_pairs: int):
        self.max_pairs = max_pairs

    def problem(self, element) -> Problem:
        refused = [(cluster_id, count) for cluster_id, accepted, count in element[1] if not accepted]
        if refused:
            cluster_id, count = refused[0]
            return "cluster_pair_cap", f"cluster {cluster_id} is in {count} pairs (cap {self.max_pairs})"
        return None

    def element_id(self, element) -> str:
        return element[0].row["pair_id"]

    def output(self, element) -> dict:
        return element[0].row


def _pair_with_votes(element):
    """(pair id, {pair, votes}) -> (ClusteredPair, votes) for the one pair under that id."""
    _, grouped = element
    votes = list(grouped["votes"])
    for pair in grouped["pair"]:
        yield pair, votes


class CapPairsPerCluster(beam.PTransform):
    """ClusteredPair -> pair rows; a pair is kept when both its clusters accept it (stage `pair_cap`).

    Each cluster accepts its first `max_pairs` pairs by pair_id, so no cluster is in more than
    `max_pairs` kept pairs. A cluster's pair ids fit in memory: a cluster on more pages than
    --max-pages-per-image was already dropped, so it has at most that many times --pairs-per-page.
    Returns {"pairs": rows, REJECTS_TAG: rejects}.
    """

    def __init__(self, max_pairs: int):
        super().__init__()
        self.max_pairs = max_pairs

    def expand(self, pairs):
        keyed = pairs | "ByPairId" >> beam.Map(lambda pair: (pair.row["pair_id"], pair))
        votes = (
            pairs
            | "ClusterOfEachSide" >> beam.FlatMap(
                lambda pair: [(pair.query_cluster, pair.row["pair_id"]), (pair.target_cluster, pair.row["pair_id"])]
            )
            | "ByCluster" >> beam.GroupByKey()
            | "Votes" >> beam.FlatMap(_cluster_votes, self.max_pairs)
        )
        capped = (
            {"pair": keyed, "votes": votes}
            | "JoinVotes" >> beam.CoGroupByKey()
            | "PairWithVotes" >> beam.FlatMap(_pair_with_votes)
            | "Cap" >> beam.ParDo(_ApplyCap(self.max_pairs)).with_outputs(REJECTS_TAG, main="pairs")
        )
        return {"pairs": capped.pairs, REJECTS_TAG: capped[REJECTS_TAG]}
