"""The extraction stage of `magiclens mine`: a page -> its kept image references, keyed by image
URL, or a counted reject (parse error, opt-out, fewer than two usable references).

`page_opt_out` and the reference filters are plain functions; `ExtractImageRefs` is the thin Beam
wrapper that counts what the stage received, kept and rejected.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import apache_beam as beam

from magiclens.pipeline.accounting import StageCounters
from magiclens.pipeline.extract import DEFAULT_CONTEXT_CHARS, extract_images
from magiclens.pipeline.extract.licenses import identify_licenses
from magiclens.pipeline.filters import RefFilterConfig, filter_page_refs
from magiclens.pipeline.pairs import PageInfo
from magiclens.pipeline.records import ImageRef, Page, PageImages
from magiclens.pipeline.robots import robots_meta_opt_out, tdm_reserved, x_robots_opt_out


@dataclass(frozen=True)
class ExtractConfig:
    """What the extraction stage needs of the mining configuration."""

    html_parser: str = "lexbor"
    context_chars: int = DEFAULT_CONTEXT_CHARS
    ref_filters: RefFilterConfig = field(default_factory=RefFilterConfig)


@dataclass(frozen=True)
class PageRef:
    """An image reference with the page it was found on."""

    page: PageInfo
    ref: ImageRef


def page_opt_out(page: Page, found: PageImages) -> tuple[str, str] | None:
    """(reason, detail) when the page opts out of AI use of its images: noai, noimageai or tdm."""
    token = x_robots_opt_out([page.x_robots_tag]) if page.x_robots_tag else None
    if token:
        return token, f"X-Robots-Tag: {page.x_robots_tag}"
    for name, content in (("robots", found.meta_robots), ("magiclens", found.meta_magiclens)):
        token = robots_meta_opt_out(content) if content else None
        if token:
            return token, f'<meta name="{name}" content="{content}">'
    if found.meta_tdm_reservation and tdm_reserved(found.meta_tdm_reservation):
        return "tdm", f'<meta name="tdm-reservation" content="{found.meta_tdm_reservation}">'
    return None


class ExtractImageRefs(beam.DoFn):
    """A page -> a PageRef for each reference kept; pages with under two are rejected."""

    def __init__(self, config: ExtractConfig):
        self.config = config

    def setup(self):
        self.pages = StageCounters("pages")
        self.refs = StageCounters("refs")

    def process(self, page: Page):
        self.pages.received()
        try:
            found = extract_images(
                page.html,
                page.url,
                parser=self.config.html_parser,
                charset=page.charset,
                context_chars=self.config.context_chars,
            )
        except Exception as error:  # a parser failure is a reject, never a crash
            yield self.pages.reject(page.url, "parse_error", f"{type(error).__name__}: {error}")
            return
        opt_out = page_opt_out(page, found)
        if opt_out:
            yield self.pages.reject(page.url, opt_out[0], opt_out[1])
            return
        filtered = filter_page_refs(found, page.url, self.config.ref_filters)
        if len(filtered.refs) < 2:
            yield self.pages.reject(page.url, "fewer_than_2_images",
                                    f"{len(filtered.refs)} usable image reference(s) of {len(found.refs)}")
            return
        self.pages.kept()
        info = PageInfo(url=page.url, title=found.title, lang=filtered.page_lang, crawl=page.crawl,
                        license=identify_licenses(found.license_declared),
                        license_declared="\n".join(found.license_declared),
                        warc_file=page.warc_file, record_id=page.record_id, date=page.date)
        for reason, detail in found.skipped:
            self.refs.received()
            yield self.refs.reject(page.url, reason, detail)
        for dropped in filtered.dropped:
            self.refs.received()
            yield self.refs.reject(f"{page.url} {dropped.ref.url}", dropped.reason, dropped.detail)
        for ref in filtered.refs:
            self.refs.received()
            self.refs.kept()
            yield PageRef(info, ref)
