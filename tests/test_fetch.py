"""The fetch stage: address guard, manners, limits, cache and the Beam transform.

Plain functions are tested directly. The HTTP tests start real servers on loopback (tests/fetch_server.py)
serving the real images of ../shared/data/images. A test that could send a packet anywhere else (redirects
to the metadata server, to 127.0.0.2, names that resolve to forbidden addresses) runs again inside a private
network namespace (`unshare -rn`, then `ip link set lo up`) where only loopback exists, with
127.0.0.1/32 as the only allowed range and a second server on 127.0.0.2 proving that nothing reaches it.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import hashlib
import io
import socket
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from multidict import CIMultiDict, CIMultiDictProxy
from PIL import Image
from yarl import URL

from fetch_server import SiteServer
from gcs_emulator import IN_PRIVATE_NETWORK, assert_passed_inside, private_network_outcomes
from magiclens.pipeline.fetch import (
    FETCHED_TAG,
    FetchConfig,
    FetchImages,
    FetchRefused,
    FetchWorker,
    ImageCache,
    add_fetch_arguments,
    checked_url,
    decode_cache_entry,
    encode_cache_entry,
    host_shard,
    image_header_refusal,
    looks_like_html,
    redirect_target,
)
from magiclens.pipeline.images import ImageConfig, normalize_image
from magiclens.pipeline.netguard import ForbiddenAddress, GuardedResolver, address_refusal, parse_allowed_networks
from magiclens.pipeline.records import Reject
from magiclens.pipeline.retry import RetryPolicy
from magiclens.pipeline.robots import (
    parse_robots,
    parse_tdmrep,
    path_matches,
    robots_meta_opt_out,
    tdm_reserved,
    tdm_rule_for,
    x_robots_opt_out,
)

LOOPBACK_ONLY = ("127.0.0.1/32",)
GOOD_IMAGES = [
    "photos/skimage/rocket.jpg",
    "photos/skimage/coffee.png",
    "photos/skimage/chelsea.png",
    "photos/matplotlib/grace_hopper.jpg",
    *(f"neardup/imagededup-ukbench/base_images/ukbench{n}.jpg"
      for n in ("00120", "01380", "08976", "08996", "09012", "09040")),
]


def short_limits(**overrides) -> FetchConfig:
    """Short limits so that the hostile endpoints end quickly; only 127.0.0.1 allowed."""
    settings = dict(allow_private=LOOPBACK_ONLY, timeout=1.0, deadline=2.0, backoff=0.05, max_bytes=2 * 1024 * 1024)
    settings.update(overrides)
    return FetchConfig(**settings)


# ------------------------------------------------------------------------------------------
# Addresses


@pytest.mark.parametrize(
    "address, kind",
    [
        ("127.0.0.1", "loopback"),
        ("127.0.0.2", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),  # the cloud metadata server
        ("100.64.0.1", "carrier-grade NAT"),
        ("224.0.0.1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("240.0.0.1", "private"),  # reserved, which Python also files as private
        ("255.255.255.255", "private"),
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("fe80::1", "link-local"),
        ("fc00::1", "private"),
        ("ff02::1", "multicast"),
        ("2001:db8::1", "private"),  # documentation range
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped
        ("::ffff:169.254.169.254", "link-local"),
        ("2002:7f00:1::1", "loopback"),  # 6to4 of 127.0.0.1
        ("64:ff9b::a9fe:a9fe", "link-local"),  # NAT64 of 169.254.169.254
        ("fe80::1%eth0", "link-local"),  # with a zone index
    ],
)
def test_non_public_addresses_are_refused(address, kind):
    refusal = address_refusal(address)
    assert refusal is not None and refusal.startswith(kind), refusal


@pytest.mark.parametrize("address", ["8.8.8.8", "93.184.216.34", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_pass(address):
    assert address_refusal(address) is None


def test_allowed_ranges_let_through_only_what_they_name():
    allowed = parse_allowed_networks(["127.0.0.1/32"])
    assert address_refusal("127.0.0.1", allowed) is None
    assert address_refusal("::ffff:127.0.0.1", allowed) is None
    assert address_refusal("127.0.0.2", allowed).startswith("loopback")
    assert address_refusal("::1", allowed).startswith("loopback")
    assert address_refusal("not an address", allowed) is not None
    with pytest.raises(ValueError, match="--fetch-allow-private 'localhost'.*CIDR"):
        parse_allowed_networks(["localhost"])


class StaticResolver:
    """Host names mapped to addresses, as aiohttp's resolvers return them."""

    def __init__(self, names: dict[str, list[str]]):
        self.names = names

    async def resolve(self, host, port=0, family=socket.AF_INET):
        if host not in self.names:
            raise OSError(f"unknown host {host}")
        return [
            {"hostname": host, "host": address, "port": port, "proto": 0, "flags": socket.AI_NUMERICHOST,
             "family": socket.AF_INET6 if ":" in address else socket.AF_INET}
            for address in self.names[host]
        ]

    async def close(self):
        pass


def test_guarded_resolver_keeps_only_allowed_addresses():
    names = {
        "mixed.test": ["10.0.0.7", "127.0.0.1", "169.254.169.254"],
        "metadata.test": ["169.254.169.254", "fd00:ec2::254"],
        "public.test": ["93.184.216.34"],
    }
    resolver = GuardedResolver(StaticResolver(names), parse_allowed_networks(LOOPBACK_ONLY))

    async def resolve(host):
        return [result["host"] for result in await resolver.resolve(host, 80)]

    assert asyncio.run(resolve("mixed.test")) == ["127.0.0.1"]
    assert asyncio.run(resolve("public.test")) == ["93.184.216.34"]
    with pytest.raises(ForbiddenAddress, match="metadata.test resolves to no public address.*link-local"):
        asyncio.run(resolve("metadata.test"))


def test_urls_and_redirect_targets_are_checked():
    allowed = parse_allowed_networks(LOOPBACK_ONLY)
    assert checked_url("http://127.0.0.1:8080/a.jpg#frag", allowed) == URL("http://127.0.0.1:8080/a.jpg")
    refusals = {
        "ftp://example.org/a.jpg": "invalid_url",
        "javascript:alert(1)": "invalid_url",
        "http:///a.jpg": "invalid_url",
        "http://example.org:99999/a.jpg": "invalid_url",
        "http://169.254.169.254/latest/meta-data/": "private_address",
        "http://[::1]/": "private_address",
        "http://[::ffff:127.0.0.2]:80/": "private_address",
        "http://user:secret@127.0.0.1:8080/a.jpg": "credentials_in_url",
        "http://user@example.org/a.jpg": "credentials_in_url",
        "https://:secret@example.org/a.jpg": "credentials_in_url",
    }
    for url, reason in refusals.items():
        with pytest.raises(FetchRefused) as refused:
            checked_url(url, allowed)
        assert refused.value.reason == reason, url
        assert "secret" not in refused.value.detail  # a password never reaches the rejects
    base = URL("http://127.0.0.1:8080/img/a.jpg")
    assert redirect_target(base, "../b.jpg", allowed) == URL("http://127.0.0.1:8080/b.jpg")
    for location, reason in [(None, "bad_redirect"), ("gopher://x/", "bad_redirect"),
                             ("http://10.0.0.1/", "private_address"), ("//169.254.169.254/x", "private_address"),
                             ("http://u:p@127.0.0.1:8080/x.jpg", "credentials_in_url"),
                             ("//admin@127.0.0.1:8080/x.jpg", "credentials_in_url")]:
        with pytest.raises(FetchRefused) as refused:
            redirect_target(base, location, allowed)
        assert refused.value.reason == reason, location


def test_host_shards_keep_a_host_together():
    shards = 64
    assert host_shard("http://Example.org/a.jpg", shards) == host_shard("https://example.org:8443/b/c.png", shards)
    assert len({host_shard(f"http://site{n}.org/x.jpg", shards) for n in range(200)}) > shards // 2
    assert 0 <= host_shard("http://[::1", shards) < shards  # unparsable: still a shard, never an error


# ------------------------------------------------------------------------------------------
# robots.txt, opt-out headers and tags, TDMRep


def test_robots_txt_group_for_our_token_wins_over_star():
    policy = parse_robots(
        "User-agent: *\nDisallow: /\n\n"
        "User-agent: MagicLens/0.1 (+https://example.org)\nDisallow: /private/\nCrawl-delay: 2.5\n"
    )
    assert policy.allows("/img/a.jpg") and not policy.allows("/private/a.jpg")
    assert policy.crawl_delay == 2.5
    star_only = parse_robots("User-agent: otherbot\nDisallow: /\n\nUser-agent: *\nDisallow: /cgi-bin/\n")
    assert star_only.allows("/img/a.jpg") and not star_only.allows("/cgi-bin/x")
    assert parse_robots("").allows("/anything") and parse_robots("User-agent: otherbot\nDisallow: /\n").allows("/x")


def test_robots_txt_rules_longest_match_wildcards_and_grouping():
    policy = parse_robots(
        "Disallow: /before-any-group\n"  # belongs to no group: ignored
        "User-agent: magiclens\nUser-agent: otherbot\n"  # one group, two agents
        "Disallow: /photos/\nAllow: /photos/public/\n"
        "Disallow: /*.gif$\nDisallow: /tmp*/cache\nAllow: /same\nDisallow: /same\nDisallow:\n"
        "\nUser-agent: magiclens\nDisallow: /second-group/\n"  # groups for one agent combine
        "Sitemap: https://example.org/sitemap.xml\n"
    )
    assert policy.allows("/before-any-group")
    assert not policy.allows("/photos/a.jpg") and policy.allows("/photos/public/a.jpg")
    assert not policy.allows("/x/y.gif") and policy.allows("/x/y.gif?size=2")
    assert not policy.allows("/tmp-1/cache/a.png") and policy.allows("/tmp-1/other")
    assert policy.allows("/same")  # an Allow and a Disallow of equal length: Allow wins
    assert not policy.allows("/second-group/a.jpg")
    assert policy.allows("/robots.txt")


def test_robots_txt_percent_encoding_and_non_ascii_compare_alike():
    policy = parse_robots("User-agent: *\nDisallow: /bilder/größe\nDisallow: /a%3cb\n")
    assert not policy.allows("/bilder/gr%C3%B6%C3%9Fe.jpg")
    assert not policy.allows("/a%3Cb")


def test_hostile_robots_pattern_is_matched_without_backtracking_blowup():
    pattern = "/" + "a*" * 40 + "b"
    assert not path_matches(pattern, "/" + "a" * 5000)
    assert path_matches(pattern, "/" + "a" * 5000 + "b")
    assert path_matches("/x$", "/x") and not path_matches("/x$", "/xy")


def test_x_robots_tag_ai_opt_outs_for_us_and_not_for_others():
    assert x_robots_opt_out(["noai"]) == "noai"
    assert x_robots_opt_out(["noindex, NoImageAI"]) == "noimageai"
    assert x_robots_opt_out(["magiclens: noai"]) == "noai"
    assert x_robots_opt_out(["otherbot: noai, noimageai"]) is None
    assert x_robots_opt_out(["noindex, otherbot: noai"]) is None
    assert x_robots_opt_out(["unavailable_after: 25 Jun 2010 15:00:00 PST", "noai"]) == "noai"
    assert x_robots_opt_out(["max-image-preview: large, noarchive"]) is None
    assert x_robots_opt_out([]) is None
    assert robots_meta_opt_out("noindex,noai") == "noai"
    assert robots_meta_opt_out("NOIMAGEAI") == "noimageai"
    assert robots_meta_opt_out("index, follow") is None


def test_tdmrep_rules_and_header_values():
    rules = parse_tdmrep(
        '[{"location": "/photos/*", "tdm-reservation": 1, "tdm-policy": "https://example.org/p.json"},'
        ' {"location": "/photos/free/*", "tdm-reservation": 0},'
        ' {"location": "news/*", "tdm-reservation": "1"},'
        ' {"location": 7, "tdm-reservation": 1}, "junk", {"location": "/x", "tdm-reservation": 2}]'
    )
    assert [rule.location for rule in rules] == ["/photos/*", "/photos/free/*", "/news/*"]
    assert tdm_rule_for(rules, "/photos/free/a.jpg").reserved  # the first matching rule applies
    assert tdm_rule_for(rules, "/photos/a.jpg").policy == "https://example.org/p.json"
    assert tdm_rule_for(rules, "/news/a.jpg").reserved
    assert tdm_rule_for(rules, "/other/a.jpg") is None
    with pytest.raises(ValueError, match="not JSON"):
        parse_tdmrep("<html>")
    with pytest.raises(ValueError, match="array"):
        parse_tdmrep('{"location": "/"}')
    assert tdm_reserved(" 1 ") and not tdm_reserved("0") and not tdm_reserved(None)


# ------------------------------------------------------------------------------------------
# Retries, headers and bodies


def test_fetch_retries_follow_the_shared_policy():
    """The policy itself is tested in test_retry.py; here, that the fetch options become it."""
    policy = FetchConfig(retries=3, backoff=0.5, max_retry_after=20.0).retry_policy()
    assert policy == RetryPolicy(retries=3, backoff=0.5, max_backoff=20.0, max_retry_after=20.0)


def headers(**values) -> CIMultiDictProxy:
    multi = CIMultiDict()
    for name, value in values.items():
        for item in value if isinstance(value, list) else [value]:
            multi.add(name.replace("_", "-"), item)
    return CIMultiDictProxy(multi)


def test_image_header_refusals():
    cap = 1000
    assert image_header_refusal(headers(Content_Type="image/jpeg", Content_Length="999"), cap) is None
    assert image_header_refusal(headers(X_Robots_Tag=["noindex", "noimageai"]), cap)[0] == "noai"
    assert image_header_refusal(headers(X_Robots_Tag="otherbot: noai"), cap) is None
    assert image_header_refusal(headers(tdm_reservation="1", tdm_policy="https://p"), cap) == (
        "tdm", "tdm-reservation: 1 header (tdm-policy https://p)")
    assert image_header_refusal(headers(tdm_reservation="0"), cap) is None
    assert image_header_refusal(headers(Content_Length="1001"), cap)[0] == "too_large"
    assert image_header_refusal(headers(Content_Type="text/html; charset=utf-8"), cap)[0] == "not_image"


def test_html_is_told_from_real_images(shared_data):
    pages = sorted((shared_data / "html").glob("*/*.html.gz"))[:20]
    assert len(pages) == 20
    assert all(looks_like_html(gzip.decompress(page.read_bytes())) for page in pages)
    suffixes = (".jpg", ".png", ".gif", ".webp", ".bmp")
    images = [path for path in (shared_data / "images").rglob("*") if path.suffix.lower() in suffixes]
    assert len(images) > 40
    assert not any(looks_like_html(path.read_bytes()) for path in images)


# ------------------------------------------------------------------------------------------
# Configuration and command line


def test_command_line_options_build_the_config():
    parser = argparse.ArgumentParser()
    add_fetch_arguments(parser)
    args = parser.parse_args([
        "--fetch-per-host", "3", "--fetch-concurrency", "16", "--fetch-timeout", "5", "--fetch-deadline", "30",
        "--fetch-max-bytes", "1000000", "--fetch-retries", "1", "--fetch-allow-private", "127.0.0.1/32",
        "--fetch-allow-private", "10.0.0.0/8", "--image-cache", "gs://bucket/cache",
        "--user-agent", "magiclens/0.1 (+https://example.org/bot; bot@example.org)",
    ])
    config = FetchConfig.from_args(args, ImageConfig(max_side=256))
    assert (config.per_host, config.concurrency, config.timeout, config.deadline) == (3, 16, 5.0, 30.0)
    assert (config.max_bytes, config.retries, config.image.max_side) == (1_000_000, 1, 256)
    assert config.allow_private == ("127.0.0.1/32", "10.0.0.0/8")
    assert config.image_cache == "gs://bucket/cache"
    defaults = FetchConfig.from_args(parser.parse_args([]))
    assert (defaults.per_host, defaults.max_bytes, defaults.max_redirects) == (2, 20 * 1024 * 1024, 5)
    assert defaults.allow_private == () and defaults.image_cache is None
    assert "magiclens" in defaults.user_agent and "https://" in defaults.user_agent
    help_text = parser.format_help()
    for option in ("--fetch-per-host", "--fetch-deadline", "--fetch-allow-private", "--image-cache", "--user-agent"):
        assert option in help_text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--user-agent", "Mozilla/5.0"], "must contain 'magiclens'"),
        (["--fetch-allow-private", "my-laptop"], "is not an address range"),
        (["--fetch-per-host", "0"], "--fetch-per-host must be at least 1"),
        (["--fetch-deadline", "0"], "--fetch-deadline must be more than 0"),
    ],
)
def test_bad_options_are_refused_with_a_message(argv, message):
    parser = argparse.ArgumentParser()
    add_fetch_arguments(parser)
    with pytest.raises(SystemExit, match=message):
        FetchConfig.from_args(parser.parse_args(argv))


# ------------------------------------------------------------------------------------------
# Image cache


def test_cache_entries_round_trip_and_refuse_damage(shared_data, tmp_path):
    image = normalize_image((shared_data / "images/photos/skimage/rocket.jpg").read_bytes())
    url = "http://example.org/rocket.jpg"
    entry = encode_cache_entry(url, image)
    assert decode_cache_entry(entry, url) == image
    assert decode_cache_entry(entry[:-10], url) is None  # cut short by a crash
    assert decode_cache_entry(entry, "http://example.org/other.jpg") is None
    assert decode_cache_entry(b"garbage", url) is None and decode_cache_entry(b"123\nxyz", url) is None
    cache = ImageCache(str(tmp_path / "cache"), "max_side=512")
    assert cache.get(url) is None
    cache.put(url, image)
    assert cache.get(url) == image
    assert ImageCache(str(tmp_path / "cache"), "max_side=256").get(url) is None  # other settings, other entry


# ------------------------------------------------------------------------------------------
# HTTP against real servers


# Outputs of the in-process pipelines, by run: Beam pickles the DoFns, so they append through this module.
COLLECTED: dict[str, list] = {}


def collect_into(element, key: str) -> None:
    COLLECTED[key].append(element)


def run_fetch_pipeline(urls: list, config: FetchConfig) -> tuple[dict, list[Reject], dict]:
    """FetchImages on Beam's in-process runner over URLs or candidate tuples: (outputs by element, rejects, counters)."""
    run = f"run-{len(COLLECTED)}"
    fetched = COLLECTED[f"{run}-fetched"] = []
    rejects = COLLECTED[f"{run}-rejects"] = []
    pipeline = beam.Pipeline(runner=FnApiRunner())
    results = pipeline | beam.Create(urls) | FetchImages(config)
    results[FETCHED_TAG] | "KeepImages" >> beam.Map(collect_into, f"{run}-fetched")
    results["rejects"] | "KeepRejects" >> beam.Map(collect_into, f"{run}-rejects")
    result = pipeline.run()
    result.wait_until_finish()
    counters = {
        counter.key.metric.name: counter.committed
        for counter in result.metrics().query(MetricsFilter().with_namespace("magiclens"))["counters"]
    }
    images = dict(fetched)
    assert len(images) == len(fetched), "one output per URL"
    return images, rejects, counters


def test_fetch_images_in_beam_keeps_good_images_politely(shared_data):
    images_dir = shared_data / "images"
    with SiteServer(images_dir, delay=0.05) as site:
        urls = [f"{site.base}/img/{name}" for name in GOOD_IMAGES]
        images, rejects, counters = run_fetch_pipeline(urls, short_limits(per_host=2, host_interval=0.0))
        assert rejects == []
        assert sorted(images) == sorted(urls)
        for name in GOOD_IMAGES:
            image = images[f"{site.base}/img/{name}"]
            original = (images_dir / name).read_bytes()
            assert image.sha256 == hashlib.sha256(original).hexdigest()
            with Image.open(io.BytesIO(image.jpeg)) as decoded:
                assert decoded.format == "JPEG" and max(decoded.size) <= 512
        assert site.count("/robots.txt") == 1  # read once for the site
        assert site.max_in_flight == 2  # two at once, never more
        assert all("magiclens" in agent for agent in site.user_agents)
        assert counters["fetch.in"] == counters["fetch.out"] == len(urls)


def test_crawl_delay_spaces_the_requests_to_a_host(shared_data):
    robots = "User-agent: magiclens\nCrawl-delay: 0.5\nDisallow: /private/\n"
    with SiteServer(shared_data / "images", delay=0.02, robots_txt=robots) as site:
        worker = FetchWorker(short_limits(per_host=4, host_interval=0.0))
        worker.start()
        try:
            urls = [f"{site.base}/img/{name}" for name in GOOD_IMAGES[:3]]
            outcomes = list(worker.fetch(urls, wait_for_all=True))
        finally:
            worker.stop()
        assert not [outcome for outcome in outcomes if isinstance(outcome, Reject)]
        # 0.5 s between starts, 0.02 s answers: the requests never overlap, despite 4 slots
        assert site.max_in_flight == 1 and site.count("/img/") == 3


def test_image_cache_rerun_sends_no_request_for_cached_images(shared_data, tmp_path):
    config = short_limits(image_cache=str(tmp_path / "image-cache"))
    with SiteServer(shared_data / "images") as site:
        good = [f"{site.base}/img/{name}" for name in GOOD_IMAGES[:5]]
        missing = f"{site.base}/img/no-such-photo.jpg"
        first, first_rejects, _ = run_fetch_pipeline([*good, missing], config)
        assert sorted(first) == sorted(good)
        assert [(reject.element_id, reject.reason) for reject in first_rejects] == [(missing, "http_404")]
        requests_before = site.counts()

        second, second_rejects, counters = run_fetch_pipeline([*good, missing], config)
        new_requests = site.counts() - requests_before
        assert not any(path.startswith("/img/photos") or path.startswith("/img/neardup") for path in new_requests)
        assert new_requests["/img/no-such-photo.jpg"] == 1  # failures are not cached: asked again
        assert second == first
        assert counters["fetch.cache_hits"] == len(good)
        assert [reject.reason for reject in second_rejects] == ["http_404"]


def test_candidate_urls_are_tried_largest_first_until_one_succeeds(shared_data, tmp_path):
    """An element may be a tuple of one image's candidate URLs: the first that downloads is used and named
    in the output; a failure lists every candidate's reason; an opt-out of the image ends the search."""
    config = short_limits(image_cache=str(tmp_path / "image-cache"))
    with SiteServer(shared_data / "images") as site:
        base = f"{site.base}"
        fallback = (f"{base}/img/missing-2x.jpg", f"{base}/private/photos/skimage/coffee.png",
                    f"{base}/img/photos/skimage/rocket.jpg", f"{base}/img/photos/skimage/chelsea.png")
        single = (f"{base}/img/photos/matplotlib/grace_hopper.jpg",)
        opted_out = (f"{base}/noai/photos/skimage/astronaut.png", f"{base}/img/photos/skimage/astronaut.png")
        all_failing = (f"{base}/img/missing-a.jpg", f"{base}/error-500")
        plain = f"{base}/img/photos/skimage/coffee.png"
        elements = [fallback, single, opted_out, all_failing, (), plain]
        images, rejects, counters = run_fetch_pipeline(elements, config)

        assert set(images) == {fallback, single, plain}
        used, image = images[fallback]
        assert used == fallback[2] and image.sha256 == hashlib.sha256(
            (shared_data / "images/photos/skimage/rocket.jpg").read_bytes()).hexdigest()
        assert images[single][0] == single[0]
        assert images[plain].sha256 == hashlib.sha256(
            (shared_data / "images/photos/skimage/coffee.png").read_bytes()).hexdigest()  # a URL: as before
        by_id = {reject.element_id: reject for reject in rejects}
        assert {name: (reject.reason) for name, reject in by_id.items()} == {
            opted_out[0]: "noai", all_failing[0]: "http_500", "": "invalid_url"}
        assert "1 more not tried after the opt-out" in by_id[opted_out[0]].detail
        failing_detail = by_id[all_failing[0]].detail
        assert f"{all_failing[0]}: http_404" in failing_detail and f"{all_failing[1]}: http_500" in failing_detail
        assert site.count("/img/photos/skimage/astronaut.png") == 0  # the opted-out image, under another URL
        assert site.count("/img/photos/skimage/chelsea.png") == 0  # nothing after the first success
        assert site.count("/private/") == 0
        assert counters["fetch.in"] == len(elements) == counters["fetch.out"] + len(rejects)

        before = site.counts()
        again, _, counters = run_fetch_pipeline([fallback], config)
        assert again == {fallback: images[fallback]} and counters["fetch.cache_hits"] == 1
        assert site.counts() == before  # the cached candidate is found before the failing ones are asked


# ------------------------------------------------------------------------------------------
# Inside a private network namespace


PRIVATE_NETWORK_TESTS = "in_private_network"  # the tests whose names hold this run in the namespace


@pytest.fixture(scope="module")
def private_network_failures() -> dict | None:
    """Outside the namespace: this file's private-network tests, run once inside a new network namespace where
    only loopback exists, and how each ended (tests/gcs_emulator.py; no namespace is a failure, never a skip).
    Inside it: None."""
    if IN_PRIVATE_NETWORK:
        assert [name for _, name in socket.if_nameindex()] == ["lo"], "not in a private network namespace"
        return None
    return private_network_outcomes(__file__, "-k", PRIVATE_NETWORK_TESTS)


def ran_inside(outcomes: dict | None, test_name: str) -> bool:
    """Outside the namespace: assert that `test_name` passed inside it (a skip there fails here); True."""
    if outcomes is None:
        return False
    assert_passed_inside(outcomes, test_name)
    return True


HOSTILE_CASES = {
    "/private/photos/skimage/rocket.jpg": "robots",
    "/noai/photos/skimage/rocket.jpg": "noai",
    "/noimageai-for-us/photos/skimage/rocket.jpg": "noai",
    "/tdm-header/photos/skimage/rocket.jpg": "tdm",
    "/tdm-reserved/photos/skimage/rocket.jpg": "tdm",
    "/error-500": "http_500",
    "/no-such-page.jpg": "http_404",
    "/html-as-jpeg": "not_image",
    "/slow-drip": "timeout",
    "/declared-huge": "too_large",
    "/endless": "too_large",
    "/gzip-bomb": "too_large",
    "/pixel-bomb.png": "decompression_bomb",
    "/redirect-loop/0": "too_many_redirects",
    "/img/photos/skimage/microaneurysms.png": "too_small",
    "/img/edgecases/imagededup_ukbench09268_corrupt.jpg": "not_image",
    "/redirect?to=http://169.254.169.254/latest/meta-data/": "private_address",
    "/redirect?to=/private/photos/skimage/coffee.png": "robots",
}


def test_hostile_endpoints_each_rejected_with_their_reason_in_private_network(shared_data, private_network_failures,
                                                                              request):
    if ran_inside(private_network_failures, request.node.name):
        return
    with SiteServer(shared_data / "images") as site, SiteServer(shared_data / "images", host="127.0.0.2") as forbidden:
        base = site.base
        cases = {f"{base}{path}": reason for path, reason in HOSTILE_CASES.items()}
        cases.update({
            f"{base}/redirect?to={forbidden.base}/img/photos/skimage/rocket.jpg": "private_address",
            f"{base}/redirect?to=http://[::ffff:127.0.0.2]:{forbidden.port}/img/photos/skimage/rocket.jpg":
                "private_address",
            f"{forbidden.base}/img/photos/skimage/rocket.jpg": "private_address",
            "http://169.254.169.254/latest/meta-data/iam/security-credentials/": "private_address",
            "http://[fd00:ec2::254]/latest/meta-data/": "private_address",
            "ftp://127.0.0.1/rocket.jpg": "invalid_url",
        })
        good = {
            f"{base}/img/photos/skimage/rocket.jpg",
            f"{base}/flaky/photos/skimage/chelsea.png",  # 429 with Retry-After: 1, then the image
            f"{base}/noai-for-otherbot/photos/skimage/coffee.png",
            f"{base}/redirect?to=/img/photos/matplotlib/grace_hopper.jpg",
        }
        images, rejects, counters = run_fetch_pipeline(sorted({*cases, *good}), short_limits(retries=2))

        assert set(images) == good
        reasons = {reject.element_id: reject.reason for reject in rejects}
        assert len(reasons) == len(rejects) == len(cases)
        wrong = {url: (reasons.get(url), reason) for url, reason in cases.items() if reasons.get(url) != reason}
        assert reasons == cases, wrong
        assert all(reject.stage == "fetch" and reject.detail for reject in rejects)

        assert forbidden.paths == []  # nothing reached 127.0.0.2
        assert not [path for path in site.paths if path.startswith("/private/")]  # nor a disallowed path
        assert site.counts()["/robots.txt"] == 1 and site.counts()["/.well-known/tdmrep.json"] == 1
        assert site.counts()["/flaky/photos/skimage/chelsea.png"] == 2
        assert site.counts()["/error-500"] == 3  # one try and two retries
        assert site.counts()["/no-such-page.jpg"] == 1  # a 404 is not retried
        assert site.max_in_flight <= 2
        assert counters["fetch.in"] == counters["fetch.out"] + sum(
            value for name, value in counters.items() if name.startswith("fetch.rejected."))
        assert counters["fetch.rejected.private_address"] == list(cases.values()).count("private_address")


def test_host_names_connect_only_to_the_checked_address_in_private_network(shared_data, private_network_failures,
                                                                           request):
    if ran_inside(private_network_failures, request.node.name):
        return
    names = StaticResolver({
        "good.test": ["127.0.0.1"],
        "evil.test": ["127.0.0.2"],
        "metadata.test": ["169.254.169.254"],
        "mixed.test": ["127.0.0.2", "10.0.0.1", "127.0.0.1"],
    })
    with SiteServer(shared_data / "images") as site, SiteServer(shared_data / "images", host="127.0.0.2") as forbidden:
        port = site.port
        urls = {
            f"http://good.test:{port}/img/photos/skimage/rocket.jpg": None,
            f"http://mixed.test:{port}/img/photos/skimage/coffee.png": None,
            f"http://evil.test:{forbidden.port}/img/photos/skimage/rocket.jpg": "private_address",
            "http://metadata.test/latest/meta-data/": "private_address",
            f"http://good.test:{port}/redirect?to=http://evil.test:{forbidden.port}/img/photos/skimage/rocket.jpg":
                "private_address",
            f"http://unknown.test:{port}/a.jpg": "dns_error",
        }
        outcomes = fetch_with_worker(list(urls), short_limits(), inner_resolver=names)
        for url, reason in urls.items():
            outcome = outcomes[url]
            assert getattr(outcome, "reason", None) == reason, (url, outcome)
        assert forbidden.paths == []
        assert {"/img/photos/skimage/rocket.jpg", "/img/photos/skimage/coffee.png"} <= set(site.paths)


def fetch_with_worker(urls: list[str], config: FetchConfig, **options) -> dict:
    """Each URL's outcome (Fetched or Reject) from a FetchWorker, by URL."""
    worker = FetchWorker(config, **options)
    worker.start()
    try:
        return {getattr(o, "url", None) or o.element_id: o for o in worker.fetch(urls, wait_for_all=True)}
    finally:
        worker.stop()


def test_urls_with_credentials_are_never_requested_in_private_network(shared_data, private_network_failures,
                                                                      request):
    """A page that names user:password@host (or a redirect to one) must not make us log in anywhere:
    aiohttp would send the credentials as Basic auth."""
    if ran_inside(private_network_failures, request.node.name):
        return
    with SiteServer(shared_data / "images") as site:
        base, authority = site.base, f"127.0.0.1:{site.port}"
        hostile = {
            f"http://user:secret@{authority}/img/photos/skimage/rocket.jpg": "credentials_in_url",
            f"http://admin@{authority}/img/photos/skimage/coffee.png": "credentials_in_url",
            f"{base}/redirect?to=http://user:secret@{authority}/img/photos/skimage/chelsea.png": "credentials_in_url",
            f"{base}/redirect?to=//admin:secret@{authority}/img/photos/skimage/astronaut.png": "credentials_in_url",
        }
        good = f"{base}/img/photos/matplotlib/grace_hopper.jpg"
        outcomes = fetch_with_worker([*hostile, good], short_limits())

        assert {url: getattr(outcomes[url], "reason", None) for url in hostile} == hostile
        assert not any("secret" in outcomes[url].detail for url in hostile)
        assert getattr(outcomes[good], "image", None) is not None  # the site itself is fine
        assert site.authorizations == []
        assert not [path for path in site.paths if path.startswith("/img/photos/skimage/")]  # no hostile image asked
        assert site.count("/redirect") == 2  # the redirects were read; their targets never requested


def test_allowing_every_address_is_warned_about_in_private_network(shared_data, private_network_failures, request,
                                                                   caplog):
    """--fetch-allow-private 0.0.0.0/0 (or ::/0, or ranges that add up to everything) logs a warning: it lets a page
    reach loopback, private networks and the metadata server, as the fetch from 127.0.0.2 below shows."""
    if ran_inside(private_network_failures, request.node.name):
        return
    parser = argparse.ArgumentParser()
    add_fetch_arguments(parser)
    everything = [["0.0.0.0/0"], ["::/0"], ["127.0.0.1/32", "0.0.0.0/1", "128.0.0.0/1"]]
    for ranges in [*everything, ["127.0.0.1/32"], ["10.0.0.0/8", "::1/128"]]:
        caplog.clear()
        argv = [argument for cidr in ranges for argument in ("--fetch-allow-private", cidr)]
        FetchConfig.from_args(parser.parse_args(argv))
        warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
        if ranges in everything:
            assert len(warnings) == 1 and "allows every IPv" in warnings[0] and "169.254.169.254" in warnings[0]
        else:
            assert warnings == [], ranges
    with SiteServer(shared_data / "images", host="127.0.0.2") as internal:
        url = f"{internal.base}/img/photos/skimage/rocket.jpg"
        assert getattr(fetch_with_worker([url], short_limits())[url], "reason", None) == "private_address"
        reached = fetch_with_worker([url], short_limits(allow_private=("0.0.0.0/0",)))[url]
        assert getattr(reached, "image", None) is not None
        assert internal.paths == ["/robots.txt", "/.well-known/tdmrep.json", "/img/photos/skimage/rocket.jpg"]


# ------------------------------------------------------------------------------------------
# `magiclens mine` end to end, its pages pointing at the test server


def _mine_with_fetch(warc: Path, output: Path, *extra: str) -> dict:
    import json

    from magiclens.cli import main

    argv = [
        "mine", "--input", str(warc), "--output", str(output), "--fetch-allow-private", "127.0.0.1/32",
        "--fetch-timeout", "1", "--fetch-deadline", "2", "--fetch-backoff", "0.05", "--fetch-retries", "2",
        "--min-side", "64", *extra,
    ]
    assert main(argv) == 0
    return json.loads((output / "stats.json").read_text())


def test_mine_fetches_page_images_and_rejects_hostile_ones_in_private_network(shared_data, private_network_failures,
                                                                               request, tmp_path):
    if ran_inside(private_network_failures, request.node.name):
        return
    from warcs import write_warc

    with SiteServer(shared_data / "images") as site, SiteServer(shared_data / "images", host="127.0.0.2") as forbidden:
        base = site.base
        good = [f"{base}/img/{path}" for path in GOOD_IMAGES[:4]]
        hostile = {
            f"{base}/private/photos/skimage/astronaut.png": "robots",
            f"{base}/noai/photos/skimage/rocket.jpg": "noai",
            f"{base}/tdm-header/photos/skimage/coffee.png": "tdm",
            f"{base}/slow-drip": "timeout",
            f"{base}/declared-huge": "too_large",
            f"{base}/gzip-bomb": "too_large",  # (the pixel bomb's URL says "pixel": the cheap filters drop it)
            f"{base}/html-as-jpeg": "not_image",
            f"{base}/missing.jpg": "http_404",
            f"{base}/redirect?to={forbidden.base}/img/photos/skimage/rocket.jpg": "private_address",
            "http://169.254.169.254/latest/meta-data/": "private_address",
        }
        tags = "".join(f'<p><img src="{url}" alt="image number {i}"></p>' for i, url in enumerate(good + list(hostile)))
        opted_out = f'<head><meta name="robots" content="noimageai"></head><body><img src="{good[0]}"><img src="{good[1]}">'
        warc = write_warc(tmp_path / "pages.warc.gz", [
            ("http://pages.test/gallery", "text/html; charset=utf-8", f"<html><body>{tags}</body></html>".encode()),
            ("http://pages.test/opted-out", "text/html", opted_out.encode()),
        ])
        cache = tmp_path / "cache"
        stats = _mine_with_fetch(warc, tmp_path / "first", "--image-cache", str(cache))

        stages = stats["stages"]
        for name, entry in stages.items():
            if "balanced" in entry:
                assert entry["balanced"], name
        fetch = stages["fetch"]
        assert fetch["in"] == len(good) + len(hostile)
        assert fetch["out"] == len(good)
        expected = {}
        for reason in hostile.values():
            expected[reason] = expected.get(reason, 0) + 1
        assert fetch["rejected"] == expected
        assert stages["pages"]["rejected"] == {"noimageai": 1}  # the page-level opt-out
        assert stages["outputs"]["pairs"] >= 1
        assert forbidden.paths == []
        assert not [path for path in site.paths if path.startswith("/private/")]
        assert site.counts()["/robots.txt"] == 1
        assert site.max_in_flight <= 2
        image_requests = {path for path in site.paths if path.startswith("/img/")}
        assert len(image_requests) == len(good)

        # A rerun with the cache sends no image request that succeeded before.
        before = len(site.paths)
        rerun = _mine_with_fetch(warc, tmp_path / "second", "--image-cache", str(cache))
        again = site.paths[before:]
        assert not [path for path in again if path.startswith("/img/")]
        assert rerun["stages"]["fetch"]["out"] == len(good)
        assert rerun["stages"]["outputs"]["pairs"] == stages["outputs"]["pairs"]
