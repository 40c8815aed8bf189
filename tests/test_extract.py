"""pipeline/extract/ on the 70 real pages in ../shared/data/html, real Common Crawl pages in other
charsets, and hostile input (deep nesting, 20,000 images, empty and binary documents)."""

from __future__ import annotations

import dataclasses
import gzip
import json
import pickle
from pathlib import Path

import pytest
from fastwarc.warc import ArchiveIterator, WarcRecordType

from magiclens.pipeline.extract import lexbor as extract_lexbor
from magiclens.pipeline.extract import refs as extract_refs
from magiclens.pipeline.extract import urls as extract_urls
from magiclens.pipeline.extract.decoding import MAX_NESTING, _may_nest_deeper, flatten_deep_nesting
from magiclens.pipeline.extract.regions import densest_block, split_class_words
from magiclens.pipeline.extract.urls import canonical_url_key
from magiclens.pipeline.extract import (
    DEFAULT_MAX_REFS,
    DUPLICATE_URL,
    EMPTY_URL,
    INVALID_URL,
    NESTING_TOO_DEEP,
    NON_HTTP_URL,
    TOO_MANY_IMAGES,
    ExtractError,
    extract_images,
)
from magiclens.pipeline.records import ImageRef

HTML_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "html"
REAL_PAGES = sorted(path.relative_to(HTML_DIR).as_posix() for path in HTML_DIR.rglob("*.html.gz"))
UNKNOWN_PAGE_URL = "https://example.org/dir/page.html"  # for pages whose address is not recorded
CC_WARC = "warc/commoncrawl/resiliparse_warcfile.warc.gz"


def page_bytes(shared_data: Path, name: str) -> bytes:
    return gzip.decompress((shared_data / "html" / name).read_bytes())


@pytest.fixture(scope="session")
def page_urls(shared_data: Path) -> dict[str, str]:
    """Relative page path -> its URL, for the article-extraction-benchmark pages."""
    folder = "article-extraction-benchmark"
    truth = json.loads((shared_data / "html" / folder / "ground-truth-subset.json").read_text())
    return {f"{folder}/{page_hash}.html.gz": entry["url"] for page_hash, entry in truth.items()}


def by_url(found) -> dict:
    return {ref.url: ref for ref in found.refs}


def assert_same_images(expected, actual, label: str) -> None:
    """Field by field, so that a failure names the field that differs."""
    assert (actual.title, actual.lang, actual.site_name) == (expected.title, expected.lang, expected.site_name), label
    for meta in ("meta_robots", "meta_magiclens", "meta_tdm_reservation"):
        assert getattr(actual, meta) == getattr(expected, meta), (label, meta)
    assert actual.skipped == expected.skipped, label
    assert len(actual.refs) == len(expected.refs), label
    for mine, theirs in zip(expected.refs, actual.refs):
        for field in dataclasses.fields(mine):
            assert getattr(theirs, field.name) == getattr(mine, field.name), (label, mine.position, field.name)


# ---- the two parsers -------------------------------------------------------------------------


def test_all_70_real_pages_are_here(shared_data: Path):
    found = sorted(path.relative_to(shared_data / "html").as_posix() for path in (shared_data / "html").rglob("*.html.gz"))
    assert len(found) == 70
    assert found == REAL_PAGES


@pytest.mark.parametrize("name", REAL_PAGES, ids=[name.removesuffix(".html.gz")[:48] for name in REAL_PAGES])
def test_lexbor_and_bs4_find_the_same_references(shared_data: Path, page_urls: dict, name: str):
    html = page_bytes(shared_data, name)
    url = page_urls.get(name, UNKNOWN_PAGE_URL)
    lexbor = extract_images(html, url)
    bs4 = extract_images(html, url, parser="bs4")
    assert_same_images(lexbor, bs4, name)
    # every one of these pages shows at least 12 photos with alt text (MANIFEST.md)
    assert len(lexbor.refs) >= 5
    assert sum(1 for ref in lexbor.refs if ref.alt) >= 1
    assert [ref.position for ref in lexbor.refs] == list(range(len(lexbor.refs)))
    assert all(ref.url.startswith(("http://", "https://")) and "#" not in ref.url for ref in lexbor.refs)
    assert len({ref.url for ref in lexbor.refs}) == len(lexbor.refs)


def test_unknown_parser_is_an_error():
    with pytest.raises(ValueError, match="unknown HTML parser"):
        extract_images(b"<img src=a.jpg>", UNKNOWN_PAGE_URL, parser="lxml")


def test_a_parser_failure_is_one_documented_error(monkeypatch):
    def broken_parser(document, **options):
        raise RuntimeError("lexbor status 7")

    monkeypatch.setattr(extract_lexbor, "LexborHTMLParser", broken_parser)
    with pytest.raises(ExtractError, match="lexbor could not parse the page: RuntimeError: lexbor status 7"):
        extract_images(b"<img src=a.jpg>", UNKNOWN_PAGE_URL)


# ---- which URL -------------------------------------------------------------------------------


def test_srcset_gives_its_largest_candidate_on_a_real_page(shared_data: Path, page_urls: dict):
    # <img src=1-300x300.jpg srcset="1-300x300.jpg 300w, 1-150x150.jpg 150w, 1.jpg 500w">
    name = "article-extraction-benchmark/20b2b64916b00b25203c9f1bf14248922f4d522f18328e9f876cce116df0083e.html.gz"
    refs = by_url(extract_images(page_bytes(shared_data, name), page_urls[name]))
    ref = refs["http://www.remember8090.it/wp-content/uploads/2017/11/1.jpg"]
    assert (ref.source, ref.width, ref.height) == ("srcset", 300, 300)
    assert "http://www.remember8090.it/wp-content/uploads/2017/11/1-300x300.jpg" not in refs
    assert refs["http://www.remember8090.it/wp-content/uploads/2017/11/11.jpg"].source == "srcset"  # 1000w


def test_picture_sources_count_as_srcset_candidates_on_a_real_page(shared_data: Path, page_urls: dict):
    # express.co.uk: <picture><source type=image/webp srcset=...webp><img src=preloader.gif data-src=...jpg>
    name = "article-extraction-benchmark/624fcd903d56fc7055fa7097b330629450c095ad6937318deb027be7803bbf35.html.gz"
    found = extract_images(page_bytes(shared_data, name), page_urls[name])
    refs = by_url(found)
    ref = refs["https://cdn.images.express.co.uk/img/dynamic/78/590x/HongKongnews-1206313.webp?r=1574161542926"]
    assert (ref.source, ref.alt) == ("source srcset", "Hong Kong protester")
    assert not any("preloaderbig.gif" in url for url in refs)


@pytest.mark.parametrize("parser", ["lexbor", "bs4"])
def test_srcset_rules(parser: str):
    html = """<body>
    <img src="s.jpg" srcset="m.jpg 600w, l.jpg 1200w, xs.jpg 300w">
    <img src="one.jpg" srcset="one.jpg 1x, two.jpg 2x, onehalf.jpg 1.5x">
    <img srcset="https://cdn.example.org/w_300,h_200/a.jpg 300w,https://cdn.example.org/w_900,h_600/a.jpg 900w">
    <img srcset="data:image/gif;base64,R0lGODlhAQABAAAAACw= 4000w, real.jpg 800w">
    <img src="fallback.jpg" srcset="">
    <picture><source srcset="p.webp 800w, p2.webp 1600w" type="image/webp"><img src="p.jpg" srcset="p.jpg 1000w"></picture>
    <img src="lazy.gif" data-srcset="d1.jpg 640w, d2.jpg 1280w" data-src="d.jpg">
    """
    refs = extract_images(html, "https://example.org/a/page.html", parser=parser).refs
    assert [(ref.url.rsplit("/", 2)[-1] if "cdn" not in ref.url else ref.url, ref.source) for ref in refs] == [
        ("l.jpg", "srcset"),
        ("two.jpg", "srcset"),
        ("https://cdn.example.org/w_900,h_600/a.jpg", "srcset"),
        ("real.jpg", "srcset"),  # the larger candidate is not an http(s) URL
        ("fallback.jpg", "src"),
        ("p2.webp", "source srcset"),
        ("d2.jpg", "data-srcset"),
    ]


def test_fast_url_resolution_agrees_with_urljoin(shared_data: Path, page_urls: dict):
    """Most URLs are resolved by string concatenation; every image URL on the real pages must
    come out as urljoin (with checking and escaping) makes it."""
    compared = 0
    for name in REAL_PAGES:
        raw = extract_lexbor.gather_lexbor(page_bytes(shared_data, name), DEFAULT_MAX_REFS, 0)
        resolver = extract_urls.UrlResolver(page_urls.get(name, UNKNOWN_PAGE_URL), raw.base_href)
        for attrs, sources in raw.images:
            urls = [attrs[key] for key in ("src", *extract_urls.LAZY_SRC_ATTRIBUTES) if attrs.get(key)]
            for candidates in [attrs, *sources]:
                for key in extract_urls.SRCSET_ATTRIBUTES:
                    urls += [url for url, _, _ in extract_urls.srcset_candidates(candidates.get(key) or "", key)]
            for url in urls:
                assert resolver.resolve(url) == extract_urls.absolute_url(url, resolver.base), (name, url)
                compared += 1
    assert compared > 5000


def test_lazy_data_src_on_real_pages(shared_data: Path, page_urls: dict):
    # sfgate: <img data-src=... alt=...> with no src at all
    name = "article-extraction-benchmark/5caf91b8a4423735f866b089d2611ea14503584cf3b6f487c6d26eb7b9521fca.html.gz"
    refs = by_url(extract_images(page_bytes(shared_data, name), page_urls[name]))
    ref = refs["https://s.hdnux.com/photos/73/33/05/15577468/3/landscape_32.jpg"]
    assert (ref.source, ref.alt) == ("data-src", "Contact SFGATE Customer Support - Photo")
    # knowtechie (a3-lazy-load): src is a placeholder gif, the image is in data-src / data-srcset
    found = extract_images(page_bytes(shared_data, "trafilatura/knowtechie.com.rally.html.gz"), UNKNOWN_PAGE_URL)
    assert not any("lazy_placeholder.gif" in ref.url for ref in found.refs)
    hero = [ref for ref in found.refs if ref.alt == "rocket league new car"]
    assert hero and hero[0].source == "data-srcset" and "rocket-league-rocket-pass-4" in hero[0].url


def test_lazy_image_page_keeps_the_full_size_images(shared_data: Path):
    # Medium: a blurred 60 px placeholder in src, an empty <img> that script fills in, and the full
    # image in <noscript><img src=...>
    found = extract_images(page_bytes(shared_data, "readability/lazy-image-1.html.gz"), UNKNOWN_PAGE_URL)
    urls = {ref.url for ref in found.refs}
    assert "https://miro.medium.com/max/3788/1*5o3M5niyi911waUrKWVZ0Q.png" in urls
    assert "https://miro.medium.com/max/1994/1*8uOdeOfnUzTaFIY1r7oAMg.png" in urls
    reasons = [reason for reason, _ in found.skipped]
    assert reasons.count(EMPTY_URL) >= 8  # the empty <img>s
    assert DUPLICATE_URL in reasons  # the author's avatar twice


@pytest.mark.parametrize("parser", ["lexbor", "bs4"])
def test_lazy_attributes_win_over_a_placeholder_src(parser: str):
    html = """<img src="data:image/gif;base64,R0lGODlhAQABAAAAACw=" data-src="/real.jpg">
    <img src="/spacer.gif" data-lazy-src="lazy.jpg">
    <img src="/x.gif" data-original="//cdn.example.org/orig.jpg">
    <img src="only.jpg">"""
    refs = extract_images(html, "https://example.org/a/page.html", parser=parser).refs
    assert [(ref.url, ref.source) for ref in refs] == [
        ("https://example.org/real.jpg", "data-src"),
        ("https://example.org/a/lazy.jpg", "data-lazy-src"),
        ("https://cdn.example.org/orig.jpg", "data-original"),
        ("https://example.org/a/only.jpg", "src"),
    ]


def test_base_href_on_real_pages(shared_data: Path):
    # pixnet: <base href="http://stevenhgm.pixnet.net/blog/post/39926056">; scheme-relative srcs
    # (//front.pixfs.net/...) take the scheme of the base, not of the page URL given here
    found = extract_images(page_bytes(shared_data, "readability/pixnet.html.gz"), "https://example.org/page.html")
    assert "http://front.pixfs.net/comment/images/info-website.gif" in by_url(found)
    assert not any(ref.url.startswith("https://front.pixfs.net") for ref in found.refs)
    # befifty: <base href=""> is ignored, relative URLs resolve against the page
    page = "https://www.befifty.de/blog/montauk"
    found = extract_images(page_bytes(shared_data, "trafilatura/befifty.montauk.html.gz"), page)
    assert found.refs and all(ref.url.startswith("https://") for ref in found.refs)


@pytest.mark.parametrize("parser", ["lexbor", "bs4"])
def test_base_href_relative_to_the_page(parser: str):
    html = """<html><head><base href="/static/v2/"></head><body>
    <img src="img/a.jpg"><img src="../b.jpg"><img src="/root.jpg"><img src="https://cdn.example.net/c.jpg#frag">
    <base href="https://ignored.example.com/">"""
    refs = extract_images(html, "https://example.org/dir/page.html", parser=parser).refs
    assert [ref.url for ref in refs] == [
        "https://example.org/static/v2/img/a.jpg",
        "https://example.org/static/b.jpg",
        "https://example.org/root.jpg",
        "https://cdn.example.net/c.jpg",
    ]


# ---- what the page says about an image -------------------------------------------------------


def test_figcaption_is_the_context_on_real_pages(shared_data: Path):
    # bbc-1: <figure><img src=... datasrc=...><figcaption><span> The president said ...
    found = extract_images(page_bytes(shared_data, "readability/bbc-1.html.gz"), "http://www.bbc.com/news/world-us-canada-33646704")
    ref = by_url(found)["http://ichef.bbci.co.uk/news/976/cpsprodpb/462D/production/_84456971_gettyimages-167501087.jpg"]
    assert ref.source == "datasrc"
    assert ref.context == "The president said he would continue fighting for greater gun control laws"
    assert ref.alt == "Gun control campaigners protest in McPhearson Square in Washington DC - 25 April 2013"
    assert (ref.width, ref.height) == (976, 549)
    # nytimes-5: 37 figcaptions holding the photo credit
    found = extract_images(page_bytes(shared_data, "readability/nytimes-5.html.gz"), "https://www.nytimes.com/es/")
    ref = by_url(found)["https://static01.nyt.com/images/2022/01/13/world/00xi-olympics-30-esp-1/00xi-olympics-30-videoLarge.jpg"]
    assert ref.context == "Credit Kevin Frayer/Getty Images"
    assert found.lang == "es"


@pytest.mark.parametrize("parser", ["lexbor", "bs4"])
def test_context_rules(parser: str):
    html = """<body>
    <figure><div><a href="/x"><img src="f.jpg" alt="  a   photo\n of\tit "></a></div>
      <figcaption> The <b>caption</b>,
        in two lines </figcaption></figure>
    <figure><img src="empty-caption.jpg"><figcaption>  </figcaption><p>Text beside it</p></figure>
    <figure><figcaption>Outer caption</figcaption><img src="outer.jpg">
      <figure><img src="inner.jpg"><figcaption>Inner caption</figcaption></figure>
      <figure><img src="uncaptioned.jpg"></figure></figure>
    <ul><li><a href="/y"><img src="card.jpg"></a><h3>Card title</h3><p>Card text</p></li></ul>
    <div><p>First</p><div><div><a><img src="deep.jpg"></a></div></div></div>
    <p>Tom &amp; Jerry<script>var x = "code, not text";</script><img src="script.jpg"></p>
    <img src="top.jpg">
    """
    refs = {ref.url.rsplit("/", 1)[-1]: ref for ref in extract_images(html, UNKNOWN_PAGE_URL, parser=parser).refs}
    assert refs["f.jpg"].context == "The caption , in two lines"
    assert refs["f.jpg"].alt == "a photo of it"
    assert refs["empty-caption.jpg"].context == "Text beside it"  # an empty figcaption: nearby text
    assert refs["outer.jpg"].context == "Outer caption"
    assert refs["inner.jpg"].context == "Inner caption"  # the closest figure's caption
    assert refs["uncaptioned.jpg"].context.startswith("Outer caption Inner caption")  # nearby: the grandparent
    assert refs["card.jpg"].context == "Card title Card text"  # the grandparent <li>
    assert refs["deep.jpg"].context == ""  # text three levels up is not "nearby"
    assert refs["script.jpg"].context == "Tom & Jerry"  # script code is not text
    assert refs["top.jpg"].context == ""  # <body> is not an ancestor to take text from


def test_context_is_capped(shared_data: Path):
    html = page_bytes(shared_data, "readability/telegraph.html.gz")
    default = extract_images(html, UNKNOWN_PAGE_URL)
    short = extract_images(html, UNKNOWN_PAGE_URL, context_chars=40)
    assert max(len(ref.context) for ref in default.refs) == 300
    assert max(len(ref.context) for ref in short.refs) <= 40
    assert all(ref.context == "" for ref in extract_images(html, UNKNOWN_PAGE_URL, context_chars=0).refs)


@pytest.mark.parametrize("parser", ["lexbor", "bs4"])
def test_declared_sizes_title_and_language(parser: str):
    html = """<!doctype html><html lang=" de-AT "><head><title>
      Ein   Titel </title></head><body>
    <img src="1.jpg" width="300" height="200px"><img src="2.jpg" width=" 300.5 " height="50%">
    <img src="3.jpg" width="auto" height="12345678901"><img src="4.jpg" width="" height="0">"""
    found = extract_images(html, UNKNOWN_PAGE_URL, parser=parser)
    assert [(ref.width, ref.height) for ref in found.refs] == [(300, 200), (300, None), (None, None), (None, 0)]
    assert (found.title, found.lang) == ("Ein Titel", "de-AT")
    other = "<html><head><meta http-equiv='Content-Language' content='fr, en'></head><body><img src=a.jpg>"
    assert extract_images(other, UNKNOWN_PAGE_URL, parser=parser).lang == "fr"
    assert extract_images("<img src=a.jpg>", UNKNOWN_PAGE_URL, parser=parser).lang == ""


def test_image_refs_are_built_as_the_constructor_builds_them():
    # extraction builds ImageRefs without the frozen dataclass's __init__, five times slower
    values = ("https://example.org/a.jpg", "alt", "title", "context", 640, None, 3, "srcset",
              ("https://example.org/a.jpg", "https://example.org/a-small.jpg"), ("nav",), ("site", "logo"), False,
              "example.org")
    fast, slow = extract_refs.image_ref(*values), ImageRef(*values)
    assert fast == slow and hash(fast) == hash(slow) and repr(fast) == repr(slow)
    assert vars(fast) == vars(slow) and list(vars(fast)) == [field.name for field in dataclasses.fields(ImageRef)]
    assert pickle.loads(pickle.dumps(fast)) == slow
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.url = "https://example.org/b.jpg"


# ---- page-level opt-outs ---------------------------------------------------------------------


def test_opt_out_metas_on_real_pages(shared_data: Path, page_urls: dict):
    # three <meta name="robots"> on one page, joined in page order
    name = "article-extraction-benchmark/b37be3535e1fb61e5a238b7fa1ead1ad98b651cb09f138efadac3d54a122fb21.html.gz"
    found = extract_images(page_bytes(shared_data, name), page_urls[name])
    assert found.meta_robots == "noarchive,noodp, index,follow,noodp, ACAP allow-index"
    assert (found.meta_magiclens, found.meta_tdm_reservation) == ("", "")
    # the content as written: <meta name="robots" content="NOODP,NOYDIR"/>
    assert extract_images(page_bytes(shared_data, "readability/bbc-1.html.gz"), UNKNOWN_PAGE_URL).meta_robots == "NOODP,NOYDIR"
    chip = extract_images(page_bytes(shared_data, "trafilatura/chip.de.tests.html.gz"), UNKNOWN_PAGE_URL)
    assert chip.meta_robots == "noindex, follow"
    # a page without any: telegraph
    found = extract_images(page_bytes(shared_data, "readability/telegraph.html.gz"), UNKNOWN_PAGE_URL)
    assert (found.meta_robots, found.meta_magiclens, found.meta_tdm_reservation) == ("", "", "")


@pytest.mark.parametrize("parser", ["lexbor", "bs4"])
def test_opt_out_meta_rules(parser: str):
    html = """<html><head>
    <meta name="ROBOTS" content="noai">
    <meta NAME=" robots " CONTENT="noimageai">
    <meta name="robots"><meta name="robots" content="">
    <meta name="googlebot" content="noindex"><meta http-equiv="robots" content="noarchive">
    <meta name="MagicLens" content="  noai  ">
    <template><meta name="tdm-reservation" content="0"></template>
    </head><body><img src="a.jpg">
    <p>a meta out of place still counts <meta name="tdm-reservation" content="1"></p>"""
    found = extract_images(html, UNKNOWN_PAGE_URL, parser=parser)
    assert found.meta_robots == "noai, noimageai"  # names without regard to case or spaces around
    assert found.meta_magiclens == "  noai  "  # the raw content
    assert found.meta_tdm_reservation == "1"  # a <template>'s content is not part of the page
    assert [ref.url for ref in found.refs] == ["https://example.org/dir/a.jpg"]
    bare = extract_images("<img src=a.jpg>", UNKNOWN_PAGE_URL, parser=parser)
    assert (bare.meta_robots, bare.meta_magiclens, bare.meta_tdm_reservation) == ("", "", "")


# ---- skipped references ----------------------------------------------------------------------


@pytest.mark.parametrize("parser", ["lexbor", "bs4"])
def test_unusable_urls_are_skipped_with_a_reason(parser: str):
    html = """
    <img src="data:image/png;base64,iVBORw0KGgo="><img src="javascript:alert(1)"><img src="blob:https://example.org/1">
    <img src="mailto:a@example.org"><img src="ftp://example.org/a.jpg"><img src="about:blank">
    <img><img src=""><img src="   "><img src="http://"><img src="http://example.org:99999/a.jpg">
    <img src="http://exa mple.org/a.jpg"><img src="a.jpg"><img src="./a.jpg"><img src="ok%20file.jpg">"""
    found = extract_images(html, "https://example.org/", parser=parser)
    assert [ref.url for ref in found.refs] == ["https://example.org/a.jpg", "https://example.org/ok%20file.jpg"]
    assert found.skipped == [
        (NON_HTTP_URL, "data:image/png;base64,iVBORw0KGgo="),
        (NON_HTTP_URL, "javascript:alert(1)"),
        (NON_HTTP_URL, "blob:https://example.org/1"),
        (NON_HTTP_URL, "mailto:a@example.org"),
        (NON_HTTP_URL, "ftp://example.org/a.jpg"),
        (NON_HTTP_URL, "about:blank"),
        (EMPTY_URL, "no URL in src, srcset or lazy-loading attributes"),
        (EMPTY_URL, "no URL in src, srcset or lazy-loading attributes"),
        (EMPTY_URL, ""),
        (INVALID_URL, "http://"),
        (INVALID_URL, "http://example.org:99999/a.jpg"),
        (INVALID_URL, "http://exa mple.org/a.jpg"),
        (DUPLICATE_URL, "https://example.org/a.jpg"),
    ]


def test_data_uris_on_real_pages_are_skipped(shared_data: Path):
    skipped = []
    for name in REAL_PAGES:
        skipped += extract_images(page_bytes(shared_data, name), UNKNOWN_PAGE_URL).skipped
    data_uris = [detail for reason, detail in skipped if reason == NON_HTTP_URL]
    assert len(data_uris) >= 10 and all(detail.startswith("data:") for detail in data_uris)
    assert all(len(detail) <= 200 for _, detail in skipped)


# ---- encodings -------------------------------------------------------------------------------


def cc_pages(shared_data: Path) -> dict[str, tuple[bytes, str | None]]:
    """URL -> (HTML body, charset of the HTTP Content-Type or None) of the Common Crawl excerpt."""
    pages = {}
    with open(shared_data / CC_WARC, "rb") as stream:
        for record in ArchiveIterator(stream, record_types=WarcRecordType.response):
            content_type = record.http_headers.get("Content-Type") or ""
            charset = content_type.partition("charset=")[2].strip() or None
            pages[record.headers.get("WARC-Target-URI")] = (record.reader.read(), charset)
    return pages


def has_cjk(text: str) -> bool:
    return any("\u4e00" <= char <= "\u9fff" for char in text)


def test_gbk_pages_from_common_crawl(shared_data: Path):
    pages = cc_pages(shared_data)
    # charset=gb2312 in the HTTP header and in a <meta>; the bytes are not UTF-8
    html, charset = pages["http://0760.jxtdw.com/area/sanxiang/"]
    assert charset == "gb2312"
    with pytest.raises(UnicodeDecodeError):
        html.decode("utf-8")
    url = "http://0760.jxtdw.com/area/sanxiang/"
    found = extract_images(html, url, charset=charset)
    assert found.title == "三乡招聘|三乡人才市场|中山英才网(0760.jxtdw.com)"  # written as &#19977;...
    assert "中山英才网" in {ref.alt for ref in found.refs}
    assert sum(1 for ref in found.refs if has_cjk(ref.context)) >= 5
    assert not any("\ufffd" in ref.alt + ref.context for ref in found.refs)
    assert extract_images(html, url) == found  # the same charset, from the <meta>
    assert_same_images(found, extract_images(html, url, charset=charset, parser="bs4"), "gbk")
    wrong = extract_images(html, url, charset="utf-8")  # a wrong charset: replacement characters, no crash
    assert any("\ufffd" in ref.alt for ref in wrong.refs)
    assert [ref.url for ref in wrong.refs] == [ref.url for ref in found.refs]
    # only <meta charset=gbk>, no charset in the header
    html, charset = pages["http://041696.com/15477/list_6_4.html"]
    assert charset is None
    assert has_cjk(extract_images(html, "http://041696.com/15477/list_6_4.html").title)


def test_windows_1251_page_from_common_crawl(shared_data: Path):
    html, charset = cc_pages(shared_data)["http://01spb.ru/company/"]
    assert charset == "windows-1251"
    found = extract_images(html, "http://01spb.ru/company/", charset=charset)
    assert found.title.startswith("О компании")
    assert_same_images(found, extract_images(html, "http://01spb.ru/company/", parser="bs4"), "cp1251")


def test_a_real_page_encoded_as_windows_1252_extracts_the_same(shared_data: Path):
    original = page_bytes(shared_data, "readability/heise.html.gz")
    expected = extract_images(original, UNKNOWN_PAGE_URL)
    assert any(char in "äöüß" for ref in expected.refs for char in ref.alt + ref.context)
    # characters outside windows-1252 become character references, which parse to the same text
    cp1252 = original.decode("utf-8").encode("windows-1252", "xmlcharrefreplace")
    assert extract_images(cp1252, UNKNOWN_PAGE_URL, charset="windows-1252") == expected
    assert extract_images(original.decode("utf-8"), UNKNOWN_PAGE_URL) == expected  # str in


@pytest.mark.parametrize("parser", ["lexbor", "bs4"])
def test_undeclared_non_utf8_falls_back_to_windows_1252(parser: str):
    html = "<title>Café Müller</title><img src='a.jpg' alt='Grüße aus Köln'>".encode("windows-1252")
    found = extract_images(html, UNKNOWN_PAGE_URL, parser=parser)
    assert (found.title, found.refs[0].alt) == ("Café Müller", "Grüße aus Köln")
    utf16 = "\ufeff<title>Ünïcode</title><img src='b.jpg'>".encode("utf-16-le")
    assert extract_images(utf16, UNKNOWN_PAGE_URL, parser=parser).title == "Ünïcode"
    bogus = extract_images(html, UNKNOWN_PAGE_URL, parser=parser, charset="no-such-charset")
    assert bogus.title == "Café Müller"


# ---- hostile input ---------------------------------------------------------------------------


@pytest.mark.parametrize("parser", ["lexbor", "bs4"])
def test_nesting_100000_deep(parser: str):
    html = b"<html><body>" + b"<div>" * 100_000 + b"<img src=deep.jpg alt=deep>" + b"</div>" * 100_000
    html += b"<p>after <img src=after.jpg></p>"
    found = extract_images(html, UNKNOWN_PAGE_URL, parser=parser)
    assert [ref.alt for ref in found.refs] == ["deep", ""]
    assert found.refs[1].context == "after"
    assert found.skipped == [(NESTING_TOO_DEEP, "98978 elements nested deeper than 1024 were flattened")]


@pytest.mark.parametrize("parser", ["lexbor", "bs4"])
def test_unclosed_nesting_among_closed_tags(parser: str):
    # an unclosed <div> per item, as a broken template loop writes it: depth grows by one each time
    html = b"<body>" + b"<div class=item><a href=/x><b>item</b></a>" * 30_000 + b"<img src=end.jpg>"
    found = extract_images(html, UNKNOWN_PAGE_URL, parser=parser)
    assert [ref.url for ref in found.refs] == ["https://example.org/dir/end.jpg"]
    assert [reason for reason, _ in found.skipped] == [NESTING_TOO_DEEP]


def test_void_elements_do_not_count_as_nesting():
    # a real page with 1,729 <br>s among 25,000 tags once made every extraction scan it tag by tag
    shallow = b"<body><p>" + b"line<br>more<BR/>an <img src=a.jpg> and <Input type=text></br>" * 3000 + b"</p>"
    assert not _may_nest_deeper(shallow, MAX_NESTING)
    assert _may_nest_deeper(b"<body>" + b"<brx>" * 5000, MAX_NESTING)  # not void: nests
    deep = b"<body>" + b"<div><br><img src=a.jpg>" * 1100 + b"</div>" * 1100
    assert _may_nest_deeper(deep, MAX_NESTING)
    assert flatten_deep_nesting(deep, MAX_NESTING)[1] == 1 + 1100 - MAX_NESTING  # <body> is one level


@pytest.mark.parametrize("parser", ["lexbor", "bs4"])
def test_20000_images_are_capped(parser: str):
    html = "<body>" + "".join(f'<img src="/i/{i}.jpg" alt="image {i}">' for i in range(20_000))
    found = extract_images(html, UNKNOWN_PAGE_URL, parser=parser)
    assert len(found.refs) == 1000
    assert (found.refs[-1].url, found.refs[-1].position) == ("https://example.org/i/999.jpg", 999)
    assert found.skipped == [(TOO_MANY_IMAGES, "19000 of 20000 <img> elements not examined (max_refs=1000)")]


def test_max_refs_counts_examined_images():
    html = "<body>" + '<img src="data:,">' * 5 + "".join(f'<img src="/i/{i}.jpg">' for i in range(20))
    found = extract_images(html, UNKNOWN_PAGE_URL, max_refs=10)
    assert [ref.url for ref in found.refs] == [f"https://example.org/i/{i}.jpg" for i in range(5)]
    assert [reason for reason, _ in found.skipped] == [NON_HTTP_URL] * 5 + [TOO_MANY_IMAGES]
    assert found.skipped[-1][1] == "15 of 25 <img> elements not examined (max_refs=10)"


@pytest.mark.parametrize("parser", ["lexbor", "bs4"])
def test_empty_and_binary_documents(shared_data: Path, parser: str):
    for document in (b"", "", b" \n\t ", b"\x00" * 100, b"<", b"<html", b"<img", b"<!--"):
        found = extract_images(document, UNKNOWN_PAGE_URL, parser=parser)
        assert (found.refs, found.title) == ([], "")
    # real binary files handed over as HTML: a JPEG, a PNG, and a page still gzip'd
    for path in ("images/photos/matplotlib/grace_hopper.jpg", "images/edgecases/pillow_hopper.png", "html/readability/bbc-1.html.gz"):
        found = extract_images((shared_data / path).read_bytes(), UNKNOWN_PAGE_URL, parser=parser)
        assert all(ref.url.startswith("https://example.org/") for ref in found.refs)


# ---- what the page says about each image: furniture or content ----------------------------


def refs_ending(found, *endings: str) -> dict:
    """URL ending -> the one reference whose URL ends with it."""
    refs = {}
    for ending in endings:
        matching = [ref for ref in found.refs if ref.url.endswith(ending)]
        assert len(matching) == 1, (ending, [ref.url for ref in matching])
        refs[ending] = matching[0]
    return refs


@pytest.mark.parametrize("parser", ["lexbor", "bs4"])
def test_header_icons_logo_and_article_photo_on_a_real_page(shared_data: Path, page_urls: dict, parser: str):
    # remember8090.it (WordPress): social icons and the logo in <header role=banner>, photos in <article>
    name = "article-extraction-benchmark/20b2b64916b00b25203c9f1bf14248922f4d522f18328e9f876cce116df0083e.html.gz"
    found = extract_images(page_bytes(shared_data, name), page_urls[name], parser=parser)
    assert found.site_name == "Remember 80/90 - Memorabilia anni 80/90"  # <meta property="og:site_name">
    refs = refs_ending(found, "/images/youtube.png", "/images/logo.png", "/uploads/2017/11/1.jpg")
    youtube = refs["/images/youtube.png"]
    assert (youtube.landmarks, youtube.in_main, youtube.link_host) == (("header", "banner"), False, "www.youtube.com")
    assert {"social", "icon", "header"} <= set(youtube.class_tokens)
    logo = refs["/images/logo.png"]
    assert (logo.landmarks, logo.in_main, logo.link_host) == (("header", "banner"), False, "www.remember8090.it")
    assert logo.class_tokens[:2] == ("logo", "img")  # the <img>'s own class comes first
    photo = refs["/uploads/2017/11/1.jpg"]
    assert (photo.landmarks, photo.in_main, photo.source) == ((), True, "srcset")
    # srcset "1-300x300.jpg 300w, 1-150x150.jpg 150w, 1.jpg 500w", src 1-300x300.jpg: largest first, each once
    assert photo.candidates == tuple(
        f"http://www.remember8090.it/wp-content/uploads/2017/11/{file}" for file in ("1.jpg", "1-300x300.jpg", "1-150x150.jpg")
    )


@pytest.mark.parametrize("parser", ["lexbor", "bs4"])
def test_author_avatar_and_comment_avatars_on_a_real_page(shared_data: Path, parser: str):
    # bigbrandsystem.com: an author box avatar, comment avatars in each comment's <footer>
    name = "article-extraction-benchmark/c582d3b772578e8feaa3cfd8f5ae8100bb6f0bc66048204a9a398395841c1164.html.gz"
    found = extract_images(page_bytes(shared_data, name), "https://www.bigbrandsystem.com/business-focus/", parser=parser)
    assert found.site_name == "BIG Brand System"
    refs = refs_ending(found, "/avatar/590e30e504482430b47bb7c71cbe063c?s=300&d=mm&r=g", "/2017/12/bbs-logo.png",
                       "/avatar/31de74cb9267f44e879c2e3d9a0b21d8?s=100&d=mm&r=g")
    author = refs["/avatar/590e30e504482430b47bb7c71cbe063c?s=300&d=mm&r=g"]
    assert {"author", "box", "avatar"} <= set(author.class_tokens) and author.link_host == ""
    logo = refs["/2017/12/bbs-logo.png"]
    assert {"bbs", "logo"} <= set(logo.class_tokens) and logo.link_host == "www.bigbrandsystem.com"
    assert logo.candidates == ("https://www.bigbrandsystem.com/wp-content/uploads/2017/12/bbs-logo.png",
                               "https://www.bigbrandsystem.com/wp-content/uploads/2017/12/bbs-logo-small.png")
    comment = refs["/avatar/31de74cb9267f44e879c2e3d9a0b21d8?s=100&d=mm&r=g"]
    assert comment.landmarks == ("footer",) and comment.class_tokens[:3] == ("avatar", "photo", "comment")


@pytest.mark.parametrize("parser", ["lexbor", "bs4"])
def test_densest_text_block_is_main_on_a_page_without_article_or_main(shared_data: Path, page_urls: dict, parser: str):
    # inexhibit.com has no <article>, <main> or role=main: the block of the article's paragraphs is main
    name = "article-extraction-benchmark/33fe2471fd553c6570f93997f208b4f39bf30be5947c3cfa620ee8eff3355ab9.html.gz"
    html = page_bytes(shared_data, name)
    assert b"<article" not in html and b"<main" not in html
    found = extract_images(html, page_urls[name], parser=parser)
    assert found.site_name == "Inexhibit"
    refs = refs_ending(found, "/img/inexhibit_logo_2018.jpg", "Light-a-Wish_OGE-Group.jpg", "/2015/10/facebook-inexhibit.png",
                       "Nokia-Morph-flexible-smartphone-concept-300x150.jpg")
    logo = refs["/img/inexhibit_logo_2018.jpg"]
    assert (logo.landmarks, logo.in_main, logo.link_host) == (("header",), False, "www.inexhibit.com")
    assert "logo" in logo.class_tokens
    photo = refs["Light-a-Wish_OGE-Group.jpg"]
    assert (photo.landmarks, photo.in_main) == ((), True) and len(photo.candidates) == 5
    follow = refs["/2015/10/facebook-inexhibit.png"]
    assert (follow.landmarks, follow.in_main, follow.link_host) == (("aside", "complementary"), False, "www.facebook.com")
    teaser = refs["Nokia-Morph-flexible-smartphone-concept-300x150.jpg"]
    assert (teaser.landmarks, teaser.in_main) == (("aside", "complementary"), False)
    assert sum(ref.in_main for ref in found.refs) == 4


def test_wikipedia_page_from_a_common_crawl_warc(shared_data: Path):
    with open(shared_data / "warc/commoncrawl/cc-whirlwind_whirlwind.warc.gz", "rb") as stream:
        pages = [(record.headers.get("WARC-Target-URI"), record.reader.read())
                 for record in ArchiveIterator(stream, record_types=WarcRecordType.response)]
    assert len(pages) == 1
    url, html = pages[0]
    lexbor, bs4 = extract_images(html, url), extract_images(html, url, parser="bs4")
    assert_same_images(lexbor, bs4, url)
    refs = refs_ending(lexbor, "/static/images/icons/wikipedia.png", "_Escopete_%28Guadalajara%29.jpg",
                       "/static/images/footer/wikimedia-button-2x.png")
    logo = refs["/static/images/icons/wikipedia.png"]
    assert (logo.landmarks, logo.in_main, logo.class_tokens[:3]) == (("header",), False, ("mw", "logo", "icon"))
    photo = refs["_Escopete_%28Guadalajara%29.jpg"]  # in <main id="content">
    assert (photo.landmarks, photo.in_main, photo.link_host) == ((), True, "an.wikipedia.org")
    button = refs["/static/images/footer/wikimedia-button-2x.png"]
    assert (button.landmarks, button.in_main, button.link_host) == (("footer", "contentinfo"), False, "wikimediafoundation.org")
    assert all(ref.candidates[0] == ref.url for ref in lexbor.refs)


@pytest.mark.parametrize("parser", ["lexbor", "bs4"])
def test_page_region_rules(parser: str):
    html = """<html><head><meta name="og:site_name" content=" Example  News "></head><body>
    <div id="TopBar"><a href="https://Social.Example.NET:8443/share"><img class="shareIcon" src="s.png"></a></div>
    <div role="search banner"><form><img src="f.png"></form></div>
    <div class="a"><div class="b"><div class="c"><div class="d"><div class="e"><img src="deep.png"></div></div></div></div></div>
    <div role="main"><p>text</p>
      <blockquote class="twitter-tweet"><a href="javascript:void(0)"><img src="t.jpg"></a></blockquote>
      <a href="/local/page"><picture><source srcset="p.webp 800w, p2.webp 1600w"><img src="p.jpg" data-src="p.jpg"
         srcset="p.jpg 1000w"></picture></a>
      <a href><img src="e.png"></a>
    </div>
    <aside class="sidebar"><nav><img src="n.png"></nav></aside></body></html>"""
    found = extract_images(html, "https://example.org/dir/page.html", parser=parser)
    assert found.site_name == "Example News"
    refs = refs_ending(found, "/s.png", "/f.png", "/deep.png", "/t.jpg", "/p2.webp", "/e.png", "/n.png")
    share = refs["/s.png"]
    assert (share.class_tokens, share.link_host, share.landmarks, share.in_main) == (
        ("share", "icon", "top", "bar"), "social.example.net", (), False)
    assert refs["/f.png"].landmarks == ("form", "search", "banner")
    assert refs["/deep.png"].class_tokens == ("e", "d", "c", "b")  # the <img> and 4 ancestors
    tweet = refs["/t.jpg"]
    assert (tweet.landmarks, tweet.class_tokens[:2], tweet.in_main, tweet.link_host) == (
        ("embed",), ("twitter", "tweet"), True, "")
    picture = refs["/p2.webp"]
    assert picture.link_host == "example.org" and picture.source == "source srcset"
    assert [url.rsplit("/", 1)[1] for url in picture.candidates] == ["p2.webp", "p.jpg", "p.webp"]
    assert refs["/e.png"].link_host == ""  # <a href> without a value
    assert refs["/n.png"].landmarks == ("nav", "aside") and refs["/n.png"].class_tokens == ("sidebar",)


@pytest.mark.parametrize("parser", ["lexbor", "bs4"])
def test_without_main_elements_the_densest_paragraph_block_is_main(parser: str):
    article = "<p>" + "word " * 30 + "</p>"
    html = f"""<body><div id="teasers"><p>short</p><img src="teaser.jpg"></div>
    <div id="story">{article * 3}<img src="photo.jpg"><span><img src="inner.jpg"></span></div>
    <div id="other">{article}<img src="other.jpg"></div></body>"""
    refs = {ref.url.rsplit("/", 1)[1]: ref.in_main for ref in extract_images(html, UNKNOWN_PAGE_URL, parser=parser).refs}
    assert refs == {"teaser.jpg": False, "photo.jpg": True, "inner.jpg": True, "other.jpg": False}
    # too little text anywhere: nothing is main
    refs = extract_images("<div><p>hello</p><img src=a.jpg><img src=b.jpg></div>", UNKNOWN_PAGE_URL, parser=parser).refs
    assert [ref.in_main for ref in refs] == [False, False]


@pytest.mark.parametrize("parser", ["lexbor", "bs4"])
def test_rel_and_role_tokens_split_on_ascii_whitespace_in_any_case(parser: str):
    html = """<head><link rel="LICENSE" href="/a"><link rel="licenses" href="/no"></head><body>
    <a rel="nofollow\tLicense" href="/b">b</a><a rel="license\u00a0x" href="/no">n</a><a rel="license">none</a>
    <div role="region MAIN"><img src="m.jpg"></div><div role="main\u00a0x"><img src="n.jpg"></div></body>"""
    found = extract_images(html, UNKNOWN_PAGE_URL, parser=parser)
    assert found.license_declared == ("rel=license https://example.org/a", "rel=license https://example.org/b")
    assert [(ref.url.rsplit("/", 1)[1], ref.in_main) for ref in found.refs] == [("m.jpg", True), ("n.jpg", False)]


def test_class_words_and_densest_block():
    assert split_class_words("LOCLogoSmall") == ("loc", "logo", "small")
    assert split_class_words("wp-image-1234 size_full  avatar-96 photoURL2x") == (
        "wp", "image", "size", "full", "avatar", "photo", "url", "x")
    assert split_class_words("") == () and split_class_words("--") == ()
    assert densest_block([("a", "x" * 150), ("b", "y" * 199), ("a", " x" * 60)]) == "a"  # 210 characters, spaces aside
    assert densest_block([("a", "x" * 100)]) is None
    assert densest_block([("a", "x" * 300), ("b", "y" * 300)]) == "a"  # the first of equals


@pytest.mark.parametrize(("one", "other"), [
    ("http://Example.COM:80/a%2cb.jpg#frag", "https://example.com/a,b.jpg"),
    ("https://example.com:443", "http://example.com/"),
    ("http://example.com/%7euser/%41.jpg", "http://example.com/~user/A.jpg"),
    ("http://example.com/caf%c3%a9%20b.jpg", "http://example.com/café b.jpg"),
    ("http://example.com/a.jpg?w=300%2C200&x=%7E", "http://example.com/a.jpg?w=300,200&x=~"),
    ("http://user:secret@example.com/a.jpg", "http://example.com/a.jpg"),
    ("http://bücher.de/a.jpg", "http://xn--bcher-kva.de/a.jpg"),
    ("http://example.com/100%", "http://example.com/100%25"),
])
def test_canonical_url_key_matches_spellings_of_one_url(one: str, other: str):
    assert canonical_url_key(one) == canonical_url_key(other)


@pytest.mark.parametrize(("one", "other"), [
    ("http://example.com/a%2Fb.jpg", "http://example.com/a/b.jpg"),  # an encoded "/" is not a path separator
    ("http://example.com/a.jpg?q=1%26b=2", "http://example.com/a.jpg?q=1&b=2"),  # nor "&" in a query
    ("http://example.com/a.jpg?q=a%2Bb", "http://example.com/a.jpg?q=a+b"),
    ("http://example.com:8080/a.jpg", "http://example.com/a.jpg"),
    ("http://example.com/A.jpg", "http://example.com/a.jpg"),
])
def test_canonical_url_key_keeps_different_urls_apart(one: str, other: str):
    assert canonical_url_key(one) != canonical_url_key(other)


def test_canonical_url_key_form_and_errors():
    assert canonical_url_key("HTTPS://Example.org:8443/a%2cb%3f.jpg?x=%2f#top") == "example.org:8443/a,b%3F.jpg?x=/"
    assert canonical_url_key("http://[::1]:80/a") == "[::1]/a"
    for bad in ("ftp://example.org/a.jpg", "/relative/a.jpg", "http:///a.jpg", "http://example.org:99999/"):
        with pytest.raises(ValueError):
            canonical_url_key(bad)
