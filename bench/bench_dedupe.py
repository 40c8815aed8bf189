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
imagehash test images). Measured for the pair rule (Hamming distance <= t) and the cluster rule
(same connected component, what `mine` uses), at the default t of `--corpus-duplicate-distance`
and at the per-page default 8. Baseline: exact byte matching (sha256) on the same pairs.

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

from magiclens.pipeline.dedupe import DedupeConfig, component_labels, hamming
from magiclens.pipeline.extract import extract_images
from magiclens.pipeline.filters import RefFilterConfig, filter_page_refs
from magiclens.pipeline.images import ImageRejected, normalize_image
from magiclens.pipeline.records import Page
from magiclens.pipeline.warc import read_warc

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
NEARDUP = SHARED / "images" / "neardup"
_UKBENCH_ID = re.compile(r"(ukbench\d+)")


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


def quality_rows() -> list[dict]:
    images = labelled_images()
    value = {name: int(phash, 16) for name, (_, _, phash) in images.items()}
    exact_precision, exact_recall, _, _ = precision_recall(images, lambda a, b: images[a][1] == images[b][1])
    rows = []
    for t in sorted({DedupeConfig.max_distance, 8}):
        pair_rule = lambda a, b: hamming(value[a], value[b]) <= t  # noqa: E731
        edges = [(a, b) for a, b in itertools.combinations(sorted(images), 2) if pair_rule(a, b)]
        labels = component_labels(edges)
        cluster_rule = lambda a, b: labels.get(a, a) == labels.get(b, b)  # noqa: E731
        for rule_name, rule in (("pair", pair_rule), ("cluster", cluster_rule)):
            precision, recall, positives, false_positives = precision_recall(images, rule)
            for metric, measured, baseline in (("precision", precision, exact_precision), ("recall", recall, exact_recall)):
                rows.append({
                    "name": f"neardup {rule_name} t={t} {metric}",
                    "value": round(measured, 4),
                    "unit": f"of {positives} pos" if metric == "recall" else f"{false_positives} FP",
                    "baseline": round(baseline, 4),
                    "ratio": round(measured / baseline, 3) if baseline else None,
                    "goal": "baseline = exact sha256 match; higher is better",
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
            result = filter_page_refs(found.refs, found.lang, found.title, RefFilterConfig())
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
