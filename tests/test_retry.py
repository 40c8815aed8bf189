"""The one retry policy (pipeline/retry.py) that the image fetcher and the OpenAI writer share."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from magiclens.pipeline.retry import RETRYABLE_STATUSES, RetryPolicy, is_retryable_status, parse_retry_after

# Wed, 21 Oct 2015 07:28:00 GMT
DATE = 1445412480.0


def test_retryable_statuses_are_the_transient_ones():
    assert all(is_retryable_status(status) for status in (408, 409, 425, 429, 500, 502, 503, 504, 520, 529, 599))
    never = (200, 204, 301, 304, 400, 401, 403, 404, 410, 413, 422, 501, 505, 511)
    assert not any(is_retryable_status(status) for status in never)
    assert is_retryable_status(503) == (503 in RETRYABLE_STATUSES)


@pytest.mark.parametrize(
    "value, seconds",
    [
        ("120", 120.0),
        (" 7 ", 7.0),
        ("0", 0.0),
        ("1.5", 1.5),  # not RFC 9110 delta-seconds, but sent by some servers: read it rather than ignore it
        ("Wed, 21 Oct 2015 07:28:10 GMT", 10.0),  # IMF-fixdate
        ("Wednesday, 21-Oct-15 07:28:10 GMT", 10.0),  # RFC 850
        ("Wed Oct 21 07:28:10 2015", 10.0),  # asctime: no zone, which in HTTP means GMT
        ("Wed, 21 Oct 2015 07:27:00 GMT", 0.0),  # in the past: now
    ],
)
def test_retry_after_seconds_and_http_dates(value, seconds):
    assert parse_retry_after(value, now=DATE) == seconds


@pytest.mark.parametrize("value", [None, "", "   ", "soon", "-5", "1e999", "nan", "12 seconds", "Wed, 99 Foo 2015"])
def test_unreadable_retry_after_is_none(value):
    assert parse_retry_after(value, now=DATE) is None


def test_retry_after_date_counts_from_the_clock_by_default():
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # long past


def test_backoff_doubles_with_equal_jitter_up_to_the_cap():
    policy = RetryPolicy(retries=8, backoff=0.5, max_backoff=3.0, max_retry_after=30.0)
    rng = random.Random(7)
    for attempt, ceiling in enumerate([0.5, 1.0, 2.0, 3.0, 3.0, 3.0]):
        delays = [policy.delay(attempt, rng=rng) for _ in range(200)]
        assert all(ceiling / 2 <= delay <= ceiling for delay in delays), attempt
        assert max(delays) - min(delays) > ceiling / 4  # really spread, not one value
    assert RetryPolicy(retries=20_000, max_backoff=3.0).delay(10_000, rng=rng) <= 3.0  # no overflow


def test_retry_after_is_obeyed_exactly_or_the_retry_given_up():
    policy = RetryPolicy(retries=3, backoff=1.0, max_backoff=60.0, max_retry_after=30.0)
    assert policy.delay(0, retry_after=7.0) == 7.0
    assert policy.delay(0, retry_after=0.0) == 0.0
    assert policy.delay(0, retry_after=30.0) == 30.0
    assert policy.delay(0, retry_after=3600.0) is None  # never sooner than asked: give up instead


def test_no_delay_once_the_retries_are_spent():
    policy = RetryPolicy(retries=2)
    assert policy.delay(0) is not None and policy.delay(1) is not None
    assert policy.delay(2) is None and policy.delay(2, retry_after=1.0) is None
    assert RetryPolicy(retries=0).delay(0) is None


@pytest.mark.parametrize("settings", [{"retries": -1}, {"backoff": -0.1}, {"max_backoff": float("nan")},
                                      {"max_retry_after": -1.0}])
def test_bad_settings_are_refused(settings):
    with pytest.raises(ValueError, match="must not be negative"):
        RetryPolicy(**settings)


def test_the_policy_imports_nothing_outside_the_standard_library():
    code = (
        "import sys; before = set(sys.modules); import magiclens.pipeline.retry; "
        "new = {m.split('.')[0] for m in set(sys.modules) - before} - {'magiclens'}; "
        "assert new <= set(sys.stdlib_module_names), new"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
