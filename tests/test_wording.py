"""Counts in messages read by people agree in number ("1 account reachable", "in 1 hour")."""
from __future__ import annotations

import datetime as dt

from oauth_portal.connections import _humanize_delta
from resources.wording import count_of


def test_count_of():
    assert count_of(1, "account") == "1 account"
    assert count_of(0, "account") == "0 accounts"
    assert count_of(2, "metric row") == "2 metric rows"
    assert count_of(12_345, "metric row") == "12,345 metric rows"
    assert count_of(1, "entry", "entries") == "1 entry" and count_of(3, "entry", "entries") == "3 entries"


def test_relative_times_agree_in_number():
    now = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.timezone.utc)
    assert _humanize_delta(now + dt.timedelta(seconds=1), now) == "in 1 second"
    assert _humanize_delta(now - dt.timedelta(minutes=1, seconds=40), now) == "1 minute ago"
    assert _humanize_delta(now + dt.timedelta(minutes=100), now) == "in 1 hour"
    assert _humanize_delta(now - dt.timedelta(hours=3), now) == "3 hours ago"
    assert _humanize_delta(now + dt.timedelta(hours=40), now) == "in 1 day"
    assert _humanize_delta(now - dt.timedelta(days=9), now) == "9 days ago"
