"""Near-duplicate precision and recall on ../shared/data/images/neardup, and the filter funnel of
the shared WARCs.

Quality: every image of the labelled sets is normalised as `mine` does (so its pHash is the one the
pipeline sees), and every pair of images is a positive when both belong to one duplicate group:

  - the PDQ bridge photo and its 11 edits (blur, contrast, saturation, sharpen, shrink, squash);
  - UKBench: images with the same UKBench id (the base image, its copy in mixed_images, its
    resize, hflip and rotation, and the grayscale copy). ground_truth.pkl labels groups the same
    way, by id, but for ids whose files are not in the shared copy, so the groups are taken from
    the file names;

and a negative otherwise (LabelMe distractors, the shared photos, the other UKBench scenes, the
imagehash test images). The rule measured is the cluster rule `mine` uses: two images are
duplicates when they fall in one connected component of the graph whose edges join hashes at
Hamming distance <= t. Baseline: exact byte matching (sha256) on the same pairs.

The threshold is chosen on one part and reported on the other (a fixed split by source, so that
no duplicate group is in both parts):

  - tune: the PDQ bridge edits, and every other negative of the non-UKBench sets (LabelMe
    distractors, imagehash tests, shared photos, alternately by sorted path, even positions);
  - held out: every UKBench image (its two duplicate groups and its other scenes), and the
    remaining negatives (odd positions).

t is the one with the best F1 of the cluster rule on the tune part (0 <= t <= MAX_T; the smallest
on a tie). Rows: the chosen t; precision and recall on both parts at that t; and on the held-out
part at `mine`'s default t (`--corpus-duplicate-distance`), which was itself chosen on all of
these sets.

Funnel: the references extracted from the shared WARCs, put through `filter_page_refs` with the
default settings; one row per reason with the count removed (`extract:` rows are references that
extraction itself skipped, such as data: URLs). From a `mine` run, the same numbers are
stats.json's `refs` stage.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from pathlib import Path

from magiclens.pipeline.dedupe import DedupeConfig, component_labels
from magiclens.pipeline.hashing import hamming
from magiclens.pipeline.extract import extract_images
from magiclens.pipeline.filters import RefFilterConfig, filter_page_refs
from magiclens.pipeline.images import ImageRejected, normalize_image
from magiclens.pipeline.records import Page
from magiclens.pipeline.warc import read_warc

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
NEARDUP = SHARED / "images" / "neardup"
_UKBENCH_ID = re.compile(r"(ukbench\d+)")


MAX_T = 16
TUNE, HELD_OUT = "tune", "held-out"


def labelled_images() -> dict[str, tuple[str, str, str]]:
    """name -> (group or "", sha256, pHash) for every decodable image of the labelled sets."""
    sources = [
        *(("bridge", p) for p in sorted((NEARDUP / "pdq-bridge-mods").glob("*.jpg"))),
        *((None, p) for p in sorted((NEARDUP / "imagededup-ukbench").rglob("*.jpg"))),
        *(("", p) for p in sorted((NEARDUP / "pdq-labelme-distractors").glob("*"))),
        *(("", p) for p in sorted((NEARDUP / "imagehash-tests").glob("*.png"))),
        *(("", p) for p in sorted((SHARED / "images" / "photos").rglob("*.*"))),
    ]
    images = {}
    for group, path in sources:
        if group is None:
            group = _UKBENCH_ID.search(path.name).group(1)
        try:
            image = normalize_image(path.read_bytes(), min_side=1, max_aspect=10)
        except ImageRejected:  # the deliberately corrupt UKBench copy
            continue
        images[str(path.relative_to(SHARED))] = (group, image.sha256, image.phash)
    return images


def split_parts(images: dict[str, tuple[str, str, str]]) -> dict[str, dict[str, tuple[str, str, str]]]:
    """The fixed tune / held-out split described at the top."""
    parts: dict[str, dict[str, tuple[str, str, str]]] = {TUNE: {}, HELD_OUT: {}}
    other_negatives = 0
    for name in sorted(images):
        if "imagededup-ukbench" in name:
            part = HELD_OUT
        elif images[name][0]:  # the bridge edits
            part = TUNE
        else:
            part = TUNE if other_negatives % 2 == 0 else HELD_OUT
            other_negatives += 1
        parts[part][name] = images[name]
    return parts


def precision_recall(images: dict[str, tuple[str, str, str]], same) -> tuple[float, float, int, int]:
    true_positive = false_positive = false_negative = 0
    for a, b in itertools.combinations(sorted(images), 2):
        positive = bool(images[a][0]) and images[a][0] == images[b][0]
        predicted = same(a, b)
        true_positive += positive and predicted
        false_positive += predicted and not positive
        false_negative += positive and not predicted
    precision = true_positive / (true_positive + false_positive) if true_positive + false_positive else 1.0
    recall = true_positive / (true_positive + false_negative)
    return precision, recall, true_positive + false_negative, false_positive


def cluster_rule(images: dict[str, tuple[str, str, str]], t: int):
    value = {name: int(phash, 16) for name, (_, _, phash) in images.items()}
    edges = [(a, b) for a, b in itertools.combinations(sorted(images), 2) if hamming(value[a], value[b]) <= t]
    labels = component_labels(edges)
    return lambda a, b: labels.get(a, a) == labels.get(b, b)


def f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def choose_threshold(images: dict[str, tuple[str, str, str]]) -> int:
    scores = [(f1(*precision_recall(images, cluster_rule(images, t))[:2]), -t) for t in range(MAX_T + 1)]
    return -max(scores)[1]


def quality_rows() -> list[dict]:
    parts = split_parts(labelled_images())
    chosen = choose_threshold(parts[TUNE])
    rows = [{"name": "neardup t chosen on the tune part", "value": chosen, "unit": "bits",
             "baseline": None, "ratio": None, "goal": f"best F1 of the cluster rule, t in 0..{MAX_T}"}]
    measured = [(TUNE, chosen), (HELD_OUT, chosen)]
    if DedupeConfig.max_distance != chosen:
        measured.append((HELD_OUT, DedupeConfig.max_distance))
    for part, t in measured:
        images = parts[part]
        exact_precision, exact_recall, _, _ = precision_recall(images, lambda a, b: images[a][1] == images[b][1])
        precision, recall, positives, false_positives = precision_recall(images, cluster_rule(images, t))
        label = "chosen" if t == chosen else "mine default"
        for metric, value, baseline in (("precision", precision, exact_precision), ("recall", recall, exact_recall)):
            rows.append({
                "name": f"neardup {part} t={t} ({label}) {metric}",
                "value": round(value, 4),
                "unit": f"of {positives} pos" if metric == "recall" else f"{false_positives} FP",
                "baseline": round(baseline, 4),
                "ratio": round(value / baseline, 3) if baseline else None,
                "goal": f"{len(images)} images; baseline = exact sha256 match; higher is better",
            })
    return rows


def funnel_rows() -> list[dict]:
    reasons: Counter[str] = Counter()
    refs_in = pages = 0
    for path in sorted((SHARED / "warc").rglob("*.warc*")):
        if ".wat" in path.name or ".wet" in path.name:
            continue
        for item in read_warc(str(path)):
            if not isinstance(item, Page):
                continue
            found = extract_images(item.html, item.url, charset=item.charset)
            result = filter_page_refs(found, item.url, RefFilterConfig())
            pages += 1
            refs_in += len(found.refs) + len(found.skipped)
            reasons.update(f"extract:{reason}" for reason, _ in found.skipped)
            reasons.update(dropped.reason for dropped in result.dropped)
            reasons["kept"] += len(result.refs)
    rows = [{"name": f"funnel refs in ({pages} pages)", "value": refs_in, "unit": "refs",
             "baseline": None, "ratio": None, "goal": "shared WARCs, default filters"}]
    for reason, count in sorted(reasons.items(), key=lambda item: -item[1]):
        rows.append({"name": f"funnel {reason}", "value": count, "unit": "refs", "baseline": refs_in,
                     "ratio": round(count / refs_in, 3), "goal": "share of the refs in"})
    return rows


def run() -> list[dict]:
    return quality_rows() + funnel_rows()


if __name__ == "__main__":
    for row in run():
        print(row)
