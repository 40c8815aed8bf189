"""Checks that tell the user why a run would write nothing (before it starts) or why it wrote nothing
(from its stats.json), so that an empty output is never a silent success."""

from __future__ import annotations

import logging
import sys
import urllib.error
import urllib.request

from magiclens.pipeline.accounting import unbalanced_stages

ENDPOINT_CHECK_TIMEOUT_S = 5.0

# What to do about each reason for which a whole input file was rejected (pipeline/warc.py).
FILE_REASON_HINTS = {
    "not_a_warc": "not a WARC file (no WARC record could be read): give WARC files (.warc.gz or .warc)",
    "wat_or_wet_file": "a WAT or WET file (metadata or extracted text, no pages or images): give the crawl's "
                       "WARC files (the .warc.gz paths, not .warc.wat.gz / .warc.wet.gz)",
    "empty_file": "empty",
    "unreadable_file": "unreadable (see the rejects for the error)",
}


def check_endpoint_reachable(endpoint: str, flag: str = "--endpoint", timeout_s: float = ENDPOINT_CHECK_TIMEOUT_S) -> None:
    """One short GET of ENDPOINT/models: any HTTP answer (even 401 or 404) means a server is there;
    no answer raises SystemExit with what to do, before a pipeline spends minutes failing every request."""
    if not endpoint.startswith(("http://", "https://")):
        raise SystemExit(f"{flag} {endpoint!r} must be an http:// or https:// URL, e.g. http://127.0.0.1:8000/v1")
    url = endpoint.rstrip("/") + "/models"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="GET"), timeout=timeout_s):
            return
    except urllib.error.HTTPError:
        return  # the server answered
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        raise SystemExit(
            f"{flag} {endpoint}: no answer from {url} within {timeout_s:g} s ({reason}); start the server "
            "(e.g. `vllm serve MODEL`) or correct the URL"
        ) from None


def _reasons(entry: dict) -> str:
    return ", ".join(f"{reason} {count}" for reason, count in sorted(entry.get("rejected", {}).items()))


def explain_empty_output(stages: dict, what: str) -> str:
    """Why a run whose stats.json `stages` are given wrote no `what` (pairs, triplets)."""
    files = stages.get("warc_files", {})
    if files.get("in", 0) and not files.get("out", 0):
        problems = [f"{count} {'is' if count == 1 else 'are'} {FILE_REASON_HINTS.get(reason, reason)}"
                    for reason, count in sorted(files.get("rejected", {}).items())]
        return f"none of the {files['in']} input file(s) could be read: " + "; ".join(problems)
    emptied = [name for name, entry in stages.items() if entry.get("in", 0) and not entry.get("out", 0)]
    if emptied:
        return "; ".join(f"all {stages[name]['in']} elements reaching stage {name} were rejected ({_reasons(stages[name])})"
                         for name in emptied)
    starved = [name for name, entry in stages.items() if "in" in entry and not entry["in"]]
    if starved:
        return f"nothing reached stage(s) {', '.join(starved)}"
    return f"no {what} came out; see stats.json and rejects/ for each stage's counts"


def run_exit_status(command: str, stages: dict, what: str) -> int:
    """The exit status of a finished `mine` or `instruct` run: 1, with the reason, when a stage does
    not balance or nothing (`what`: pairs, triplets) was written; else 0."""
    broken = unbalanced_stages(stages)
    if broken:
        logging.getLogger(f"magiclens.{command}").error(
            "stages whose counts do not balance (in != out + rejected): %s", ", ".join(broken))
        return 1
    if not stages.get("outputs", {}).get(what):
        print(f"magiclens {command}: no {what} written: {explain_empty_output(stages, what)}", file=sys.stderr)
        return 1
    return 0
