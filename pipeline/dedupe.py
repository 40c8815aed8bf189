"""Near duplicates across the whole run, and what they decide about pairs.

Every image carries a 64-bit pHash and a colour signature (pipeline/pixels.py). Two images are
near duplicates when their hashes differ in at most t bits (`--corpus-duplicate-distance`) AND their
colours agree: pHash sees gray levels only, and the same product in another colour is a relation
to pair, not a duplicate. Finding them without comparing every image with every
other uses multi-index hashing: the hash is cut into t+1 bands, and two hashes within distance t
agree exactly on at least one band (t differing bits cannot touch all t+1 bands). So images are
grouped by (band, band value), only hashes in one bucket are compared, and each verified pair is
emitted once, from the first band on which the two agree; the colours are checked on those pairs.

The verified pairs are edges of a graph over nodes, a node being a distinct (pHash, colour
signature), written "PHASH:COLOUR"; each connected component is a cluster, and its id is the
smallest node in it, so the same input always gives the same ids.
Components are labelled in Beam by `rounds` rounds of min-label propagation, each followed by a
pointer jump (a node takes its label's label), which covers paths of about 2**rounds edges. The
edges whose two ends still carry different labels afterwards are counted in
`clusters.unresolved_edges`: 0 means every component got a single id. Memory stays bounded: no
step holds more than one bucket, or the neighbours of one node, at a time.

Clusters then decide, per page (`select_page_images`) and over the output (`CapPairsPerCluster`):
  site_furniture          the image's cluster is on more than --max-pages-per-image distinct pages
                          (logos, banners, sidebars): dropped everywhere
  near_duplicate_cluster  a second image of a cluster already on the page (the two sides of a pair
                          are never one cluster)
  cluster_pair_cap        a cluster takes part in at most --max-pairs-per-image pairs of the output
                          (pipeline/pair_cap.py)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import apache_beam as beam
import numpy as np

from magiclens.pipeline.accounting import NAMESPACE, REJECTS_TAG, StageCounters
from magiclens.pipeline.pair_cap import CapPairsPerCluster, ClusteredPair
from magiclens.pipeline.pairs import PageImage, PairingConfig, choose_pairs, drop_duplicates, pair_row
from magiclens.pipeline.pixels import colours_agree, measured
from magiclens.pipeline.stage_config import DedupeConfig

HASH_BITS = 64
# Cells of the distance matrix computed at once when verifying one bucket (bounds memory).
_VERIFY_CELLS = 1 << 22


@dataclass(frozen=True)
class ImageKey:
    """The light part of a page image that the cluster search shuffles (no pixels)."""

    page_url: str
    sha256: str
    phash: str
    colour: str | None = None  # colour signature; None when unknown (then the pHash alone decides)

    @property
    def node(self) -> str:
        """The graph node of the image: its pHash, and its colour signature when known."""
        return self.phash if self.colour is None else f"{self.phash}:{self.colour}"


def _node_parts(node: str) -> tuple[int, str | None]:
    phash, _, colour = node.partition(":")
    return int(phash, 16), colour or None


@dataclass(frozen=True)
class ImageCluster:
    sha256: str
    cluster_id: str  # the smallest node ("PHASH:COLOUR") of the image's cluster
    pages: int  # distinct pages on which the cluster appears


def band_layout(max_distance: int) -> list[tuple[int, int]]:
    """(shift, width) of the max_distance + 1 bands that together cover the 64 bits."""
    count = max_distance + 1
    if not 1 <= count <= HASH_BITS:
        raise ValueError(f"max_distance must be between 0 and {HASH_BITS - 1}, got {max_distance}")
    base, wider = divmod(HASH_BITS, count)
    layout, shift = [], 0
    for index in range(count):
        width = base + (1 if index < wider else 0)
        layout.append((shift, width))
        shift += width
    return layout


def band_values(phash: int, layout: list[tuple[int, int]]) -> list[int]:
    return [(phash >> shift) & ((1 << width) - 1) for shift, width in layout]


def first_shared_band(a: int, b: int, layout: list[tuple[int, int]]) -> int | None:
    for index, (shift, width) in enumerate(layout):
        mask = (1 << width) - 1
        if (a >> shift) & mask == (b >> shift) & mask:
            return index
    return None


def near_pairs_in_bucket(
    nodes: Iterable[str], band: int, layout: list[tuple[int, int]], max_distance: int
) -> Iterator[tuple[str, str]]:
    """Pairs (smaller, larger) of distinct nodes of one bucket within `max_distance` pHash bits
    whose colours agree.

    A pair is yielded only by the bucket of the first band its hashes share, so each edge of the
    whole run is yielded exactly once.
    """
    nodes = sorted(set(nodes))
    if len(nodes) < 2:
        return
    parts = [_node_parts(node) for node in nodes]
    values = np.array([value for value, _ in parts], dtype=np.uint64)
    rows_at_once = max(1, _VERIFY_CELLS // len(values))
    for start in range(0, len(values), rows_at_once):
        block = values[start : start + rows_at_once]
        distances = np.bitwise_count(block[:, None] ^ values[None, :])
        for i, j in zip(*np.nonzero(distances <= max_distance)):
            i = int(i) + start
            j = int(j)
            if (j > i and first_shared_band(int(values[i]), int(values[j]), layout) == band
                    and colours_agree(parts[i][1], parts[j][1])):
                yield nodes[i], nodes[j]


def component_labels(edges: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Every node of `edges` -> the smallest node of its connected component (union-find).

    The exact reference for the Beam labelling, used by tests and the benchmark on small sets.
    """
    parent: dict[str, str] = {}

    def root(node: str) -> str:
        parent.setdefault(node, node)
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for a, b in edges:
        ra, rb = root(a), root(b)
        if ra != rb:
            low, high = min(ra, rb), max(ra, rb)
            parent[high] = low
    return {node: root(node) for node in list(parent)}


def select_page_images(
    images: list[PageImage], clusters: dict[str, ImageCluster], near_duplicate_distance: int, max_pages_per_image: int
) -> tuple[list[PageImage], list[tuple[PageImage, str, str]]]:
    """The images of one page that may be paired, in page order, and the others with a reason."""
    dropped: list[tuple[PageImage, str, str]] = []
    candidates = []
    for item in sorted(images, key=lambda image: (image.ref.position, image.ref.url)):
        cluster = clusters[item.image.sha256]
        if cluster.pages > max_pages_per_image:
            dropped.append((item, "site_furniture",
                            f"cluster {cluster.cluster_id} on {cluster.pages} pages (over {max_pages_per_image})"))
        else:
            candidates.append(item)
    distinct, duplicates = drop_duplicates(candidates, near_duplicate_distance)
    dropped.extend(duplicates)
    kept: list[PageImage] = []
    first_of_cluster: dict[str, PageImage] = {}
    for item in distinct:
        cluster_id = clusters[item.image.sha256].cluster_id
        earlier = first_of_cluster.get(cluster_id)
        if earlier is None:
            first_of_cluster[cluster_id] = item
            kept.append(item)
        else:
            dropped.append((item, "near_duplicate_cluster", f"cluster {cluster_id}, as {earlier.ref.url}"))
    return kept, dropped


# ---- Beam ---------------------------------------------------------------------------------------


def _bucket_entries(node: str, layout: list[tuple[int, int]]):
    for band, value in enumerate(band_values(_node_parts(node)[0], layout)):
        yield (band, value), node


class _VerifyBucket(beam.DoFn):
    def __init__(self, config: DedupeConfig):
        self.config = config

    def setup(self):
        self.layout = band_layout(self.config.max_distance)
        self.edges = beam.metrics.Metrics.counter(NAMESPACE, "clusters.edges")

    def process(self, element):
        (band, _), hashes = element
        for edge in near_pairs_in_bucket(hashes, band, self.layout, self.config.max_distance):
            self.edges.inc()
            yield edge


def _propose_labels(element):
    """A node passes its label to itself and to every neighbour."""
    node, grouped = element
    label = min(grouped["label"])
    yield node, label
    for neighbour in grouped["neighbours"]:
        yield neighbour, label


def _jump_labels(element):
    """Nodes labelled L take L's own label (pointer jumping)."""
    label, grouped = element
    own = list(grouped["label"])
    better = min(own) if own else label
    for member in grouped["members"]:
        yield member, min(label, better)


class _CountUnresolved(beam.DoFn):
    def setup(self):
        self.unresolved = beam.metrics.Metrics.counter(NAMESPACE, "clusters.unresolved_edges")

    def process(self, element):
        _, grouped = element
        labels = set(grouped["label"])
        for other in grouped["other_end"]:
            if other not in labels:
                self.unresolved.inc()
        return []


def _assign_cluster(element):
    node, grouped = element
    labels = list(grouped["label"])
    cluster_id = labels[0] if labels else node  # a node with no near duplicate is its own cluster
    for page_url, sha256 in grouped["images"]:
        yield cluster_id, (page_url, sha256)


class _AnnotateImages(beam.DoFn):
    def __init__(self, max_pages: int):
        self.max_pages = max_pages

    def setup(self):
        self.furniture = beam.metrics.Metrics.counter(NAMESPACE, "clusters.over_page_limit")

    def process(self, element):
        cluster_id, grouped = element
        pages = sum(grouped["pages"])
        if pages > self.max_pages:
            self.furniture.inc()
        for page_url, sha256 in grouped["members"]:
            yield page_url, ImageCluster(sha256, cluster_id, pages)


class ClusterImages(beam.PTransform):
    """ImageKey -> (page URL, ImageCluster) for each; see the module docstring for the method."""

    def __init__(self, config: DedupeConfig):
        super().__init__()
        self.config = config

    def expand(self, keys):
        layout = band_layout(self.config.max_distance)
        nodes = keys | "Nodes" >> beam.Map(lambda key: key.node) | "DistinctNodes" >> beam.Distinct()
        edges = (
            nodes
            | "Bands" >> beam.FlatMap(_bucket_entries, layout)
            | "ByBand" >> beam.GroupByKey()
            | "Verify" >> beam.ParDo(_VerifyBucket(self.config))
        )
        neighbours = edges | "BothWays" >> beam.FlatMap(lambda edge: [edge, (edge[1], edge[0])])
        labels = neighbours | "Linked" >> beam.Keys() | "DistinctLinked" >> beam.Distinct() | "Self" >> beam.Map(lambda n: (n, n))
        for round_ in range(self.config.rounds):
            proposed = (
                {"label": labels, "neighbours": neighbours}
                | f"Propose{round_}" >> beam.CoGroupByKey()
                | f"Proposals{round_}" >> beam.FlatMap(_propose_labels)
                | f"Smallest{round_}" >> beam.CombinePerKey(min)
            )
            labels = (
                {"label": proposed, "members": proposed | f"ByLabel{round_}" >> beam.KvSwap()}
                | f"Jump{round_}" >> beam.CoGroupByKey()
                | f"Jumped{round_}" >> beam.FlatMap(_jump_labels)
            )
        other_ends = (
            {"label": labels, "neighbours": neighbours}
            | "LabelAtOneEnd" >> beam.CoGroupByKey()
            | "ToOtherEnd" >> beam.FlatMap(
                lambda element: [(n, label) for label in element[1]["label"] for n in element[1]["neighbours"]]
            )
        )
        (
            {"label": labels, "other_end": other_ends}
            | "CompareEnds" >> beam.CoGroupByKey()
            | "CountUnresolved" >> beam.ParDo(_CountUnresolved())
        )
        members = (
            {"images": keys | "ByNode" >> beam.Map(lambda key: (key.node, (key.page_url, key.sha256))),
             "label": labels}
            | "JoinLabels" >> beam.CoGroupByKey()
            | "AssignCluster" >> beam.FlatMap(_assign_cluster)
        )
        pages = (
            members
            | "ClusterPage" >> beam.Map(lambda member: (member[0], member[1][0]))
            | "DistinctClusterPages" >> beam.Distinct()
            | "OnePerPage" >> beam.Map(lambda cluster_page: (cluster_page[0], 1))
            | "PagesPerCluster" >> beam.CombinePerKey(sum)
        )
        return (
            {"members": members, "pages": pages}
            | "JoinPages" >> beam.CoGroupByKey()
            | "Annotate" >> beam.ParDo(_AnnotateImages(self.config.max_pages_per_image))
        )


class BuildClusteredPairs(beam.DoFn):
    """(page URL, {images, clusters}) -> ClusteredPair for each chosen pair; rejects as tagged output.

    Stages `page_images` (image in, kept or rejected by reason) and `pair_pages` (pages with fewer
    than two images left are rejected).
    """

    def __init__(self, pairing: PairingConfig, config: DedupeConfig):
        self.pairing = pairing
        self.config = config

    def setup(self):
        self.page_images = StageCounters("page_images")
        self.pair_pages = StageCounters("pair_pages")

    def process(self, element):
        page_url, grouped = element
        images = list(grouped["images"])
        clusters = {cluster.sha256: cluster for cluster in grouped["clusters"]}
        self.page_images.received(len(images))
        self.pair_pages.received()
        kept, dropped = select_page_images(
            images, clusters, self.pairing.near_duplicate_distance, self.config.max_pages_per_image
        )
        self.page_images.kept(len(kept))
        for item, reason, detail in dropped:
            yield self.page_images.reject(f"{page_url} {item.ref.url}", reason, detail)
        if len(kept) < 2:
            yield self.pair_pages.reject(page_url, "fewer_than_2_images", f"{len(kept)} image(s) left")
            return
        self.pair_pages.kept()
        for query, target in choose_pairs(kept, self.pairing):
            yield ClusteredPair(
                pair_row(query, target),
                clusters[query.image.sha256].cluster_id,
                clusters[target.image.sha256].cluster_id,
            )


def _image_key(element: tuple[str, PageImage]) -> ImageKey:
    page_url, item = element
    image = measured(item.image)  # already measured by the post-decode check in `mine`
    return ImageKey(page_url, image.sha256, image.phash, image.colour)


class DedupeAndPair(beam.PTransform):
    """(page URL, PageImage) -> {"pairs": pair rows, REJECTS_TAG: Reject}.

    Clusters every image of the run, drops site furniture and same-cluster images per page,
    chooses each page's pairs, and caps the pairs per cluster.
    """

    def __init__(self, pairing: PairingConfig, config: DedupeConfig):
        super().__init__()
        self.pairing = pairing
        self.config = config

    def expand(self, page_images):
        keys = page_images | "ImageKeys" >> beam.Map(_image_key)
        clusters = keys | "Cluster" >> ClusterImages(self.config)
        paired = (
            {"images": page_images, "clusters": clusters}
            | "ByPage" >> beam.CoGroupByKey()
            | "Pairs" >> beam.ParDo(BuildClusteredPairs(self.pairing, self.config)).with_outputs(
                REJECTS_TAG, main="pairs"
            )
        )
        capped = paired.pairs | "CapPerCluster" >> CapPairsPerCluster(self.config.max_pairs_per_image)
        rejects = (paired[REJECTS_TAG], capped[REJECTS_TAG]) | "DedupeRejects" >> beam.Flatten()
        return {"pairs": capped["pairs"], REJECTS_TAG: rejects}
