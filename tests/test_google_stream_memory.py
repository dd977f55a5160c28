"""A SearchStream batch of 10,000 rows takes ~70 MB once parsed, so the Google connector keeps at most
one alive: the SDK's copy of the first batch is dropped, and a batch is released before the next one
is parsed. Checked here with stand-in batches (weak references tell what is still alive)."""
from __future__ import annotations

import datetime as dt
import types
import weakref
from decimal import Decimal

from resources.platforms.base import Account
from resources.platforms.google import GoogleAdsSession, GoogleAdsSettings


class _Batch:
    @classmethod
    def pb(cls, batch):
        return batch

    def __init__(self, rows):
        self.results = rows


def _row(campaign: int, day: int):
    ns = types.SimpleNamespace
    return ns(campaign=ns(id=campaign), segments=ns(date=f"2026-01-{day:02d}"),
              metrics=ns(impressions=10, clicks=1, cost_micros=1_250_000, conversions=0.0))


class _Stream:
    """Like api_core's iterator around the SDK's response wrapper (which caches the first response)."""

    def __init__(self, batches, alive_at_parse):
        self._batches = batches
        self._refs: list[weakref.ref] = []
        self._alive_at_parse = alive_at_parse
        self._wrapped = types.SimpleNamespace(get_cache=lambda: self.cache)
        self.cache = types.SimpleNamespace(initial_response_object=None)

    def __iter__(self):
        for rows in self._batches:
            self._alive_at_parse.append(sum(1 for ref in self._refs if ref() is not None))
            batch = _Batch(rows)
            if self.cache.initial_response_object is None and not self._refs:
                self.cache.initial_response_object = batch
            self._refs.append(weakref.ref(batch))
            yield batch
            del batch


def test_one_batch_alive_at_a_time():
    alive: list[int] = []
    batches = [[_row(c, d) for c in range(5)] for d in range(1, 6)]
    stream = _Stream(batches, alive)
    service = types.SimpleNamespace(search_stream=lambda customer_id, query: stream)
    session = GoogleAdsSession(GoogleAdsSettings(), {"access_token": "x"})
    session._service = lambda login, name: service
    account = Account(id="2", name="c", currency="EUR", time_zone="UTC", manager_id="1")
    docs = []
    for doc in session.fetch_daily_metrics(account, dt.date(2026, 1, 1), dt.date(2026, 1, 5)):
        docs.append(doc)
    assert len(docs) == 25 and docs[0]["spend"] == Decimal("1.25")
    assert alive == [0, 0, 0, 0, 0]  # no earlier batch alive when the next one is parsed
    assert stream.cache.initial_response_object is None
