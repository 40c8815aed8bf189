"""What sites say about being crawled and mined: robots.txt, AI opt-out tags and TDMRep.

Plain functions over text; the fetch stage (pipeline/fetch/) downloads the files and applies the
answers. The project's robots.txt product token is `magiclens`.

- robots.txt follows RFC 9309: the groups naming our token (else the `*` groups) apply, their rules
  combined; the longest matching rule wins and Allow wins a tie; `*` and a final `$` are wildcards.
  `Crawl-delay` (not in the RFC, but widely used) is read from the same groups.
- `X-Robots-Tag` headers and `<meta name="robots">` tags opt out of AI use with `noai` or
  `noimageai`. A header value may start with a user agent (`otherbot: noai`), which limits it to
  that agent.
- TDMRep (W3C community group report): `tdm-reservation: 1` as a header or meta tag, or a rule in
  `/.well-known/tdmrep.json` whose `location` pattern matches the path (the first matching rule
  applies; patterns use the robots.txt syntax).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

USER_AGENT_TOKEN = "magiclens"
# RFC 9309: crawlers must parse at least the first 500 KiB; what follows is ignored.
MAX_ROBOTS_BYTES = 500 * 1024
AI_OPT_OUT_TOKENS = ("noai", "noimageai")
# X-Robots-Tag directives that carry a value after a colon; any other word before a colon is a
# user agent that the rest of the header value is addressed to.
_DIRECTIVES_WITH_VALUES = frozenset(
    {"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"}
)
_PERCENT_ESCAPE = re.compile(r"%[0-9a-fA-F]{2}")
_PRODUCT_TOKEN = re.compile(r"[a-z_-]+")


@dataclass(frozen=True)
class PathRule:
    """One Allow or Disallow line; `pattern` is percent-normalised, '*' and a final '$' are wildcards."""

    allow: bool
    pattern: str


@dataclass(frozen=True)
class RobotsPolicy:
    """The rules of one origin's robots.txt that apply to our user agent."""

    rules: tuple[PathRule, ...] = ()
    crawl_delay: float | None = None

    def allows(self, path: str) -> bool:
        """Whether `path` (the URL's path and query, as sent on the wire) may be fetched."""
        if path == "/robots.txt":
            return True
        path = normalize_path(path)
        best: PathRule | None = None
        for rule in self.rules:
            if not path_matches(rule.pattern, path):
                continue
            if (
                best is None
                or len(rule.pattern) > len(best.pattern)
                or (len(rule.pattern) == len(best.pattern) and rule.allow)
            ):
                best = rule
        return best is None or best.allow


class _Group:
    def __init__(self) -> None:
        self.agents: list[str] = []
        self.rules: list[PathRule] = []
        self.crawl_delay: float | None = None


def parse_robots(text: str, token: str = USER_AGENT_TOKEN) -> RobotsPolicy:
    """The policy for `token` in a robots.txt body (only its first MAX_ROBOTS_BYTES are read)."""
    text = text.encode("utf-8", "replace")[:MAX_ROBOTS_BYTES].decode("utf-8", "ignore")
    groups: list[_Group] = []
    current: _Group | None = None
    in_agent_lines = False
    for raw_line in text.splitlines():
        line = raw_line.split("#", 1)[0].strip()
        field, colon, value = line.partition(":")
        if not colon:
            continue
        field = field.strip().lower()
        value = value.strip()
        if field == "user-agent":
            if current is None or not in_agent_lines:
                current = _Group()
                groups.append(current)
            current.agents.append(_agent_token(value))
            in_agent_lines = True
        elif field in ("allow", "disallow", "crawl-delay"):
            in_agent_lines = False
            if current is None:  # rules before any User-agent line belong to no group
                continue
            if field == "crawl-delay":
                delay = _parse_delay(value)
                if delay is not None and current.crawl_delay is None:
                    current.crawl_delay = delay
            elif value:  # an empty Disallow allows everything: no rule
                current.rules.append(PathRule(field == "allow", normalize_path(value)))
    chosen = [group for group in groups if token.lower() in group.agents]
    if not chosen:
        chosen = [group for group in groups if "*" in group.agents]
    delays = [group.crawl_delay for group in chosen if group.crawl_delay is not None]
    return RobotsPolicy(
        rules=tuple(rule for group in chosen for rule in group.rules),
        crawl_delay=max(delays) if delays else None,
    )


def _agent_token(value: str) -> str:
    """`Googlebot/2.1 (+http://...)` -> `googlebot`; `*` stays `*`."""
    value = value.strip().lower()
    if value.startswith("*"):
        return "*"
    match = _PRODUCT_TOKEN.match(value)
    return match.group(0) if match else value


def _parse_delay(value: str) -> float | None:
    try:
        delay = float(value)
    except ValueError:
        return None
    return delay if math.isfinite(delay) and delay >= 0 else None


def normalize_path(path: str) -> str:
    """Percent-encode non-ASCII characters and upper-case escapes, so that patterns and URLs compare."""
    encoded = "".join(
        char if ord(char) < 128 else "".join(f"%{byte:02X}" for byte in char.encode("utf-8"))
        for char in path
    )
    return _PERCENT_ESCAPE.sub(lambda escape: escape.group(0).upper(), encoded)


def path_matches(pattern: str, path: str) -> bool:
    """robots.txt pattern matching: a prefix match, `*` any run of characters, a final `$` the end.

    A two-pointer wildcard match, linear in practice and without the exponential backtracking a
    regular expression would show on hostile patterns such as `/a*a*a*a*a*a*b`.
    """
    if pattern.endswith("$"):
        pattern = pattern[:-1]
    else:
        pattern += "*"
    p = s = 0
    star = -1
    star_s = 0
    while s < len(path):
        if p < len(pattern) and pattern[p] == "*":
            star, star_s = p, s
            p += 1
        elif p < len(pattern) and pattern[p] == path[s]:
            p += 1
            s += 1
        elif star >= 0:
            p = star + 1
            star_s += 1
            s = star_s
        else:
            return False
    while p < len(pattern) and pattern[p] == "*":
        p += 1
    return p == len(pattern)


def x_robots_opt_out(values: Iterable[str], token: str = USER_AGENT_TOKEN) -> str | None:
    """The AI opt-out (`noai` or `noimageai`) that `X-Robots-Tag` header values set for us, if any."""
    for value in values:
        agent: str | None = None
        for part in value.split(","):
            directive = part.strip().lower()
            head, colon, rest = directive.partition(":")
            if colon and head.strip() not in _DIRECTIVES_WITH_VALUES:
                agent = head.strip()
                directive = rest.strip()
            if agent not in (None, token.lower()):
                continue
            for word in directive.split():
                if word in AI_OPT_OUT_TOKENS:
                    return word
    return None


def robots_meta_opt_out(content: str) -> str | None:
    """The AI opt-out in the content of a `<meta name="robots">` (or `name="magiclens"`) tag, if any."""
    for word in re.split(r"[\s,]+", content.lower()):
        if word in AI_OPT_OUT_TOKENS:
            return word
    return None


def tdm_reserved(value: str | None) -> bool:
    """Whether a `tdm-reservation` header or meta tag value reserves text and data mining."""
    return value is not None and value.strip() == "1"


@dataclass(frozen=True)
class TdmRule:
    """One entry of `/.well-known/tdmrep.json`."""

    location: str  # a path pattern, robots.txt syntax
    reserved: bool
    policy: str = ""  # the tdm-policy URL, if given


def parse_tdmrep(text: str) -> tuple[TdmRule, ...]:
    """The rules of a tdmrep.json body; raises ValueError when it is not a JSON array of rules.

    Entries without a usable location or reservation are skipped.
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"tdmrep.json is not JSON: {error}") from None
    if not isinstance(data, list):
        raise ValueError(f"tdmrep.json must be a JSON array of rules, got {type(data).__name__}")
    rules = []
    for entry in data:
        if not isinstance(entry, dict):
            continue
        location = entry.get("location")
        reservation = entry.get("tdm-reservation")
        if not isinstance(location, str) or reservation not in (0, 1, "0", "1"):
            continue
        if not location.startswith("/"):
            location = "/" + location
        policy = entry.get("tdm-policy")
        rules.append(
            TdmRule(
                location=normalize_path(location),
                reserved=reservation in (1, "1"),
                policy=policy if isinstance(policy, str) else "",
            )
        )
    return tuple(rules)


def tdm_rule_for(rules: Iterable[TdmRule], path: str) -> TdmRule | None:
    """The first rule whose location matches `path`, if any."""
    path = normalize_path(path)
    for rule in rules:
        if path_matches(rule.location, path):
            return rule
    return None
