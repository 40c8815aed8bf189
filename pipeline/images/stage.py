"""The image stage of `magiclens mine`: every kept image reference gets its picture from the image
records of the input, or goes to the fetch stage.

One image has several names. The page may say https:// where the crawler stored http://, write
`%2C` where the archive has `,`, or offer a srcset whose largest candidate was never archived while
its src was. So references and records meet on a canonical URL key (`canonical_url_key`), and each
reference probes every candidate URL of its element (srcset, <picture> sources, src, lazy
attributes), largest first:

  references --one probe per candidate--+
                                        +--by canonical key--> DecodeArchived (decode once per image)
  image records --by canonical key------+                          |
                                         by reference <------------+
  -> ChooseCandidate: the first candidate whose record decoded -> PageImage (the candidate used is
     recorded); else the first decode failure -> reject; else (nothing archived) -> fetch request

The reference keeps the URL the page wrote; `PageImage.image_url` is the candidate whose bytes were used.
Stages: `image_records` (records: kept, unreferenced, duplicate_capture) and `images` (references).
`DecodeArchived` and `ChooseCandidate` run per WARC file (pipeline/mine/work.py: a page's images are
looked up among its own file's records); `AttachFetched` joins the corpus-wide fetch stage's results
back to the references.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import apache_beam as beam

from magiclens.pipeline.accounting import StageCounters
from magiclens.pipeline.extract.stage import PageRef
from magiclens.pipeline.extract.urls import canonical_url_key
from magiclens.pipeline.images.normalize import ImageConfig, ImageRejected, normalize_with
from magiclens.pipeline.pairs import FETCHED, ImageCapture, PageImage
from magiclens.pipeline.records import ImageRecord, NormalizedImage

TO_FETCH_TAG = "to_fetch"


def reference_key(page_ref: PageRef) -> str:
    """Names one reference between the steps (two captures of one page URL may share it: each is
    resolved on its own)."""
    return f"{page_ref.page.url}\x1f{page_ref.ref.position}"


def candidates_of(page_ref: PageRef) -> tuple[str, ...]:
    return page_ref.ref.candidates or (page_ref.ref.url,)


def candidate_probes(page_ref: PageRef):
    """(canonical key, (reference key, candidate URL)) for each candidate of the reference."""
    key = reference_key(page_ref)
    for url in dict.fromkeys(candidates_of(page_ref)):
        yield canonical_url_key(url), (key, url)


@dataclass(frozen=True)
class Archived:
    """What became of the archived image under one canonical key, for one probing reference."""

    url: str  # the candidate URL that probed it
    image: NormalizedImage | None  # None: the record did not decode
    reason: str = ""
    detail: str = ""
    capture: ImageCapture = ImageCapture()  # the record the image was decoded from


class DecodeArchived(beam.DoFn):
    """(canonical key, {probes, records}) -> (reference key, Archived) for each probe of an archived
    image; the image is decoded once, however many pages show it. Records no reference probed are
    rejected as `unreferenced`, later captures of one image as `duplicate_capture`."""

    def __init__(self, config: ImageConfig):
        self.config = config

    def setup(self):
        self.records = StageCounters("image_records")

    def process(self, element):
        key, grouped = element
        # A key's probes can be many (a logo shown on every page): iterate them, never hold them as a list.
        probes = grouped["probes"]
        records: list[ImageRecord] = sorted(grouped["records"], key=lambda record: record.record_id)
        if not records:
            return
        self.records.received(len(records))
        probed = any(True for _ in probes)
        for position, record in enumerate(records):
            if not probed:
                yield self.records.reject(record.record_id, "unreferenced", record.url)
            elif position == 0:
                self.records.kept()
            else:
                yield self.records.reject(record.record_id, "duplicate_capture", record.url)
        if not probed:
            return
        try:
            image, reason, detail = normalize_with(records[0].data, self.config), "", ""
        except ImageRejected as rejected:
            image, reason, detail = None, rejected.reason, rejected.detail
        first = records[0]
        capture = ImageCapture(first.warc_file, first.record_id, first.date)
        for reference, url in probes:
            yield reference, Archived(url, image, reason, detail, capture)


class ChooseCandidate(beam.DoFn):
    """(reference key, {refs, archived}) -> (page URL, PageImage), a reject, or a fetch request
    (TO_FETCH_TAG: (candidates, PageRef)); stage `images`."""

    def __init__(self, fetch: bool):
        self.fetch = fetch

    def setup(self):
        self.images = StageCounters("images")

    def process(self, element):
        _, grouped = element
        archived = {found.url: found for found in grouped["archived"]}
        for page_ref in grouped["refs"]:
            self.images.received()
            candidates = candidates_of(page_ref)
            found = [archived[url] for url in candidates if url in archived]
            decoded = next((item for item in found if item.image is not None), None)
            element_id = f"{page_ref.page.url} {page_ref.ref.url}"
            if decoded is not None:
                self.images.kept()
                yield page_ref.page.url, PageImage(page_ref.page, page_ref.ref, decoded.image, decoded.url, decoded.capture)
            elif found:
                yield self.images.reject(element_id, found[0].reason, found[0].detail)
            elif self.fetch:
                yield beam.pvalue.TaggedOutput(TO_FETCH_TAG, (candidates, page_ref))
            else:
                detail = "--no-fetch; not archived under " + (" or ".join(candidates))[:300]
                yield self.images.reject(element_id, "not_in_input", detail)


class AttachFetched(beam.DoFn):
    """(first candidate, {refs, fetched, failed}) -> (page URL, PageImage) per reference, or a reject
    per reference (stage `images`)."""

    def setup(self):
        self.images = StageCounters("images")

    def process(self, element):
        _, grouped = element
        fetched = list(grouped["fetched"])
        failed = list(grouped["failed"])
        # The fetch stage keeps no time: this is when its result arrived (just fetched, or from its cache).
        capture = ImageCapture("", FETCHED, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        for page_ref in grouped["refs"]:
            element_id = f"{page_ref.page.url} {page_ref.ref.url}"
            if fetched:
                url, image = fetched[0]
                self.images.kept()
                yield page_ref.page.url, PageImage(page_ref.page, page_ref.ref, image, url, capture)
            elif failed:
                yield self.images.reject(element_id, failed[0].reason, failed[0].detail)
            else:
                yield self.images.reject(element_id, "fetch_lost", "the fetch stage returned nothing")
