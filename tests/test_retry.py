"""Backoff and Retry-After arithmetic."""

from __future__ import annotations

import email.utils

import pytest

from lehnz_async._retry import backoff_delay, parse_retry_after


def test_full_jitter_spans_zero_to_the_capped_exponential() -> None:
    assert backoff_delay(1, 0.5, 10.0, rand=lambda: 0.0) == 0.0
    assert backoff_delay(1, 0.5, 10.0, rand=lambda: 1.0) == 0.5
    assert backoff_delay(3, 0.5, 10.0, rand=lambda: 1.0) == 2.0
    assert backoff_delay(10, 0.5, 10.0, rand=lambda: 1.0) == 10.0
    assert backoff_delay(10_000, 0.5, 10.0, rand=lambda: 1.0) == 10.0


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("1", 1.0),
        (" 120 ", 120.0),
        ("0", 0.0),
        ("1.5", 1.5),
        (None, None),
        ("soon", None),
        ("-3", None),
        ("inf", None),
        ("nan", None),
    ],
)
def test_retry_after_seconds(header: str | None, seconds: float | None) -> None:
    assert parse_retry_after(header, now=1_000_000.0) == seconds


def test_retry_after_http_date() -> None:
    now = 1_700_000_000.0
    header = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after(header, now) == pytest.approx(30.0)
    past = email.utils.formatdate(now - 30, usegmt=True)
    assert parse_retry_after(past, now) == 0.0
