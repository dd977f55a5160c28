"""The dashboard over real HTTP: columns, sorting, filters, totals per currency, chart, pagination at
1,000+ campaigns, and the "Sync now" status (page, JSON endpoint, poller script).

Data is written straight to the store (two platforms: the in-process fake one and the unconfigured
"offline" one, whose kept data still shows), so every expected figure is computed here from the
seeded documents.
"""
from __future__ import annotations

import datetime as dt
import html
import re
import time
from resources.money import format_amount
from decimal import Decimal

import pytest
from bson import Decimal128

from portal_helpers import find_form
from test_portal import PASSWORD, connect_fake, make_portal, portal, seed_campaigns  # noqa: F401 — fixtures
from resources.repositories import CampaignRepository, UserRepository

TODAY = dt.datetime.now(dt.timezone.utc).date()


def day(offset: int) -> str:
    return (TODAY - dt.timedelta(days=offset)).isoformat()


def seed(db, user_id):
    """Four campaigns on two platforms, EUR and JPY, with known daily numbers (some outside the range)."""
    fake = CampaignRepository(db, "fake")
    fake.upsert_campaigns(user_id, [
        {"account_id": "1001", "campaign_id": "e1", "name": "Alpha brand", "status": "ENABLED", "currency": "EUR",
         "budget": Decimal("50.00"), "budget_period": "DAILY"},
        {"account_id": "1001", "campaign_id": "e2", "name": "beta search", "status": "PAUSED", "currency": "EUR",
         "budget": Decimal("20.00"), "budget_period": "DAILY"},
        {"account_id": "1002", "campaign_id": "j1", "name": "Gamma Tokyo", "status": "ENABLED", "currency": "JPY",
         "budget": Decimal("3000"), "budget_period": "DAILY"},
    ])
    fake.upsert_metrics(user_id, [
        {"account_id": "1001", "campaign_id": "e1", "date": day(0), "impressions": 1000, "clicks": 50,
         "spend": Decimal("12.34"), "currency": "EUR"},
        {"account_id": "1001", "campaign_id": "e1", "date": day(1), "impressions": 1000, "clicks": 30,
         "spend": Decimal("7.66"), "currency": "EUR"},
        {"account_id": "1001", "campaign_id": "e1", "date": day(40), "impressions": 9999, "clicks": 999,
         "spend": Decimal("999.99"), "currency": "EUR"},  # outside the default 30-day range
        {"account_id": "1001", "campaign_id": "e2", "date": day(2), "impressions": 400, "clicks": 4,
         "spend": Decimal("1.01"), "currency": "EUR"},
        {"account_id": "1002", "campaign_id": "j1", "date": day(3), "impressions": 5000, "clicks": 25,
         "spend": Decimal("2500"), "currency": "JPY"},
    ])
    offline = CampaignRepository(db, "offline")  # a platform disconnected with its data kept
    offline.upsert_campaigns(user_id, [
        {"account_id": "77", "campaign_id": "o1", "name": "Delta kept", "status": "ACTIVE", "currency": "EUR",
         "budget": None, "budget_period": None}])
    offline.upsert_metrics(user_id, [
        {"account_id": "77", "campaign_id": "o1", "date": day(5), "impressions": 200, "clicks": 0,
         "spend": Decimal("3.00"), "currency": "EUR"}])


def campaign_names(page: str) -> list[str]:
    return [html.unescape(n) for n in re.findall(r'<td><a href="[^"]*" title="Chart[^"]*">([^<]+)</a></td>', page)]


def totals_of(page: str) -> dict[str, tuple[str, str, str]]:
    """{currency: (spend, clicks, impressions)} from the totals table."""
    return {m[0]: (m[1], m[2], m[3]) for m in re.findall(
        r'data-currency="(\w+)"><td>\w+</td><td class="num">([\d.,]+)</td>\s*<td class="num">([\d,]+)</td>'
        r'<td class="num">([\d,]+)</td>', page)}


def test_columns_totals_sorting_and_filters(portal, db):
    portal.signup("ann@example.com")
    connect_fake(portal)
    user_id = db.users.find_one({})["_id"]
    seed(db, user_id)
    other = UserRepository(db).create("zed@example.com", "x")
    seed_campaigns(db, other["_id"], n=2, currency="USD", prefix="z")

    page = portal.get("/dashboard").text
    assert "4 campaigns" in page and "Campaign z000" not in page and "USD" not in page
    # default: spend, largest first — by currency first (EUR, then JPY), so 2,500 JPY is not above 20 EUR
    assert campaign_names(page) == ["Alpha brand", "Delta kept", "beta search", "Gamma Tokyo"]
    assert "Sorted by currency (A–Z), then by spend within each currency, largest first" in page
    row = re.search(r'<tr data-campaign="e1".*?</tr>', page, re.S)[0]
    assert "Fake Shop EU" in row and "Fake Ads" in row and "ENABLED" in row
    assert "50.00" in row and "daily" in row  # budget
    assert "20.00 <span class=\"cur\">EUR</span>" in row  # spend in range: 12.34 + 7.66 (day 40 excluded)
    assert ">80<" in row and ">2,000<" in row  # clicks, impressions
    assert "4.00%" in row  # CTR 80 / 2000
    assert "0.25 <span class=\"cur\">EUR</span>" in row  # CPC 20.00 / 80, account currency
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", row)  # last synced
    kept = re.search(r'<tr data-campaign="o1".*?</tr>', page, re.S)[0]
    assert "Offline Ads" in kept and kept.count("—") >= 2  # no budget, CPC undefined without clicks
    # totals per currency over every matching campaign; EUR and JPY never added together
    assert totals_of(page) == {"EUR": ("24.01", "84", "2,600"), "JPY": ("2,500", "25", "5,000")}

    by_name = portal.get("/dashboard?sort=name&dir=asc").text
    assert campaign_names(by_name) == ["Alpha brand", "beta search", "Delta kept", "Gamma Tokyo"]  # case-insensitive
    assert 'aria-sort="ascending"' in by_name
    by_ctr = portal.get("/dashboard?sort=ctr&dir=desc").text
    assert campaign_names(by_ctr) == ["Alpha brand", "beta search", "Gamma Tokyo", "Delta kept"]  # 4%, 1%, 0.5%, 0%
    by_cpc = portal.get("/dashboard?sort=cpc&dir=asc").text
    assert campaign_names(by_cpc)[-1] == "Delta kept"  # no clicks: no CPC, last in either direction
    assert campaign_names(portal.get("/dashboard?sort=cpc&dir=desc").text)[-1] == "Delta kept"
    by_platform = portal.get("/dashboard?sort=platform&dir=desc").text
    assert campaign_names(by_platform)[0] == "Delta kept"

    paused = portal.get("/dashboard?status=PAUSED").text
    assert campaign_names(paused) == ["beta search"] and "1 campaign" in paused
    assert totals_of(paused) == {"EUR": ("1.01", "4", "400")}
    only_offline = portal.get("/dashboard?platform=offline").text
    assert campaign_names(only_offline) == ["Delta kept"] and totals_of(only_offline) == {"EUR": ("3.00", "0", "200")}
    wide = portal.get(f"/dashboard?start={day(60)}&end={day(0)}").text
    assert totals_of(wide)["EUR"] == ("1,024.00", "1,083", "12,599")
    narrow = portal.get(f"/dashboard?start={day(2)}&end={day(2)}").text
    assert totals_of(narrow) == {"EUR": ("1.01", "4", "400"), "JPY": ("0", "0", "0")}

    for bad in ("sort=password_hash", "dir=sideways", "page=-x", "start=2026-13-01", "sort=name&sort=spend"):
        assert portal.get(f"/dashboard?{bad}").status_code == 400, bad
    twice = portal.get("/dashboard?dir=asc&dir=desc")
    assert twice.status_code == 400 and "“dir” is given 2 times" in twice.text
    assert "<script>" not in page and " style=" not in page  # the CSP allows neither


def test_money_columns_sort_by_currency_then_amount(make_portal, db):
    """1,000 JPY is not "more" than 500 USD: money columns group by currency, then order the amounts;
    the order holds across pages and the page says what it means."""
    portal = make_portal({"DASHBOARD_PAGE_SIZE": 3})
    portal.signup("ann@example.com")
    connect_fake(portal)
    user_id = db.users.find_one({})["_id"]
    fake = CampaignRepository(db, "fake")
    spec = [  # (campaign id, name, currency, budget, spend on one day in range, clicks)
        ("u1", "USD big", "USD", Decimal("900.00"), Decimal("500.00"), 100),
        ("u2", "USD small", "USD", None, Decimal("20.00"), 4),
        ("j1", "JPY big", "JPY", Decimal("50000"), Decimal("1000"), 10),
        ("j2", "JPY small", "JPY", Decimal("300"), Decimal("30"), 0),
        ("e1", "EUR mid", "EUR", Decimal("70.00"), Decimal("60.00"), 30),
    ]
    account = {"USD": "1001", "JPY": "1002", "EUR": "1003"}
    fake.upsert_campaigns(user_id, [
        {"account_id": account[cur], "campaign_id": cid, "name": name, "status": "ENABLED", "currency": cur,
         "budget": budget, "budget_period": "DAILY" if budget is not None else None}
        for cid, name, cur, budget, _, _ in spec])
    fake.upsert_metrics(user_id, [
        {"account_id": account[cur], "campaign_id": cid, "date": day(1), "impressions": 1000, "clicks": clicks,
         "spend": spend, "currency": cur} for cid, _, cur, _, spend, clicks in spec])

    def order(query: str) -> list[str]:
        names = []
        for number in (1, 2):
            names += campaign_names(portal.get(f"/dashboard?{query}&page={number}").text)
        return names

    # the raw numbers would give JPY big (1000), USD big (500), EUR mid (60), JPY small (30), USD small (20)
    assert order("sort=spend&dir=desc") == ["EUR mid", "JPY big", "JPY small", "USD big", "USD small"]
    assert order("sort=spend&dir=asc") == ["EUR mid", "JPY small", "JPY big", "USD small", "USD big"]
    assert order("sort=budget&dir=desc") == ["EUR mid", "JPY big", "JPY small", "USD big", "USD small"]  # no budget: last
    assert order("sort=budget&dir=asc") == ["EUR mid", "JPY small", "JPY big", "USD big", "USD small"]
    # CPC: EUR 2.00; JPY 100 (JPY small has no clicks: last); USD 5.00 and 5.00 (tie: account, name)
    assert order("sort=cpc&dir=desc") == ["EUR mid", "JPY big", "USD big", "USD small", "JPY small"]
    # columns without money still compare across currencies
    assert order("sort=clicks&dir=desc") == ["USD big", "EUR mid", "JPY big", "USD small", "JPY small"]

    first = portal.get("/dashboard?sort=spend&dir=desc").text
    assert 'id="sort-note"' in first
    assert ("Sorted by currency (A–Z), then by spend within each currency, largest first: "
            "amounts in different currencies are not compared.") in first
    # each currency's first row (after the first) is marked, so the groups are visible
    assert re.findall(r'<tr data-campaign="(\w+)"[^>]*class="currency-start"', first) == ["j1"]
    asc_budget = portal.get("/dashboard?sort=budget&dir=asc").text
    assert "then by budget within each currency, smallest first" in asc_budget
    assert "Campaigns without a budget come last." in asc_budget
    assert "Campaigns without a CPC come last." in portal.get("/dashboard?sort=cpc&dir=desc").text
    assert 'id="sort-note"' not in portal.get("/dashboard?sort=clicks&dir=desc").text


def test_chart_of_one_campaign(portal, db):
    portal.signup("ann@example.com")
    connect_fake(portal)
    user_id = db.users.find_one({})["_id"]
    seed(db, user_id)
    page = portal.get("/dashboard").text
    link = html.unescape(re.search(r'<a href="([^"]*chart_campaign=e1[^"]*)"', page)[1])
    chart = portal.get(link)
    assert chart.status_code == 200
    text = chart.text
    svg = re.search(r"<svg class=\"chart\".*?</svg>", text, re.S)[0]
    assert len(re.findall(r'<g class="day"', svg)) == 30  # one per day of the default range
    assert f"{day(0)}: spend 12.34 EUR, 50 clicks, 1,000 impressions" in svg
    assert f"{day(1)}: spend 7.66 EUR, 30 clicks" in svg
    assert f"{day(2)}: spend 0.00 EUR, 0 clicks" in svg  # days without data are zero, not missing
    assert "Spend (EUR)" in svg and "<polyline" in svg and 'role="img"' in svg
    assert "<strong>20.00</strong> EUR spend" in text and "<strong>80</strong> clicks" in text
    assert " style=" not in svg and "<script" not in svg
    csp = chart.headers["Content-Security-Policy"]
    assert "unsafe-inline" not in csp and "script-src 'self'" in csp

    long = portal.get(f"/dashboard?start={day(364)}&chart_platform=fake&chart_account=1001&chart_campaign=e1").text
    assert "shown per week" in long and len(re.findall(r'<g class="day"', long)) in (53, 54)
    assert portal.get("/dashboard?chart_platform=fake&chart_account=1001&chart_campaign=nope").status_code == 404
    assert portal.get("/dashboard?chart_platform=nope&chart_account=1&chart_campaign=2").status_code == 400
    # another user's campaign is never charted
    other = UserRepository(db).create("zed@example.com", "x")
    seed_campaigns(db, other["_id"], n=1, prefix="z")
    assert portal.get("/dashboard?chart_platform=fake&chart_account=1001&chart_campaign=z000").status_code == 404


def _bulk_seed(db, user_id, campaigns: int, days: int) -> None:
    """Insert campaigns and daily rows directly (fast), spread over three currencies."""
    currencies = ["EUR", "USD", "JPY"]
    docs, rows = [], []
    for i in range(campaigns):
        account = f"acc{i % 3}"
        docs.append({"user_id": user_id, "account_id": account, "campaign_id": f"c{i:05d}", "name": f"Bulk {i:05d}",
                     "status": ["ENABLED", "PAUSED", "REMOVED"][i % 3], "currency": currencies[i % 3],
                     "budget": Decimal128("10"), "budget_period": "DAILY",
                     "last_synced": dt.datetime.now(dt.timezone.utc)})
        for d in range(days):
            rows.append({"user_id": user_id, "account_id": account, "campaign_id": f"c{i:05d}", "date": day(d),
                         "impressions": 100 + i, "clicks": 1 + i % 7, "spend": Decimal128(f"{(i % 50) + 1}.25"),
                         "currency": currencies[i % 3]})
    db.fake_campaigns.insert_many(docs)
    for start in range(0, len(rows), 5000):
        db.fake_campaign_metrics.insert_many(rows[start:start + 5000])


def test_pagination_stays_fast_at_1200_campaigns(make_portal, db, capsys):
    portal = make_portal({"DASHBOARD_PAGE_SIZE": 50})
    portal.signup("ann@example.com")
    user_id = db.users.find_one({})["_id"]
    n, days = 1200, 7
    _bulk_seed(db, user_id, n, days)

    started = time.perf_counter()
    first = portal.get("/dashboard")
    cold = time.perf_counter() - started
    assert first.status_code == 200
    assert f"{n:,} campaigns" in first.text and "Page 1 of 24" in first.text
    assert len(campaign_names(first.text)) == 50
    # spend desc: campaigns with i % 50 == 49 spend the most (50.25 a day); ties by account, then name
    assert campaign_names(first.text)[:2] == ["Bulk 00099", "Bulk 00249"]  # acc0 (i % 3 == 0) first

    timings = []
    seen = []
    for number in (2, 12, 24):
        started = time.perf_counter()
        response = portal.get(f"/dashboard?page={number}&sort=name&dir=asc")
        timings.append(time.perf_counter() - started)
        assert response.status_code == 200
        names = campaign_names(response.text)
        seen.append(names)
    assert seen[0][0] == "Bulk 00050" and seen[2][-1] == "Bulk 01199"
    started = time.perf_counter()
    filtered = portal.get("/dashboard?status=PAUSED&sort=clicks")
    timings.append(time.perf_counter() - started)
    assert "400 campaigns" in filtered.text
    expected = {c: Decimal(0) for c in ("EUR", "USD", "JPY")}
    for i in range(n):
        expected[["EUR", "USD", "JPY"][i % 3]] += Decimal(f"{(i % 50) + 1}.25") * days
    totals = totals_of(first.text)
    assert {c: totals[c][0] for c in totals} == {c: format_amount(v, c) for c, v in expected.items()}
    with capsys.disabled():
        print(f"\n[dashboard] {n} campaigns x {days} days: first page {cold * 1000:.0f} ms (sums computed in the "
              f"store), then {', '.join(f'{t * 1000:.0f}' for t in timings)} ms (pages 2/12/24 by name, "
              f"PAUSED by clicks; sums cached)")
    assert cold < 20 and max(timings) < 5  # generous: CI machines are slow; the figures are printed above


# ---- "Sync now" status ---------------------------------------------------------------------------
def test_sync_status_page_and_json(portal, db):
    portal.signup("ann@example.com")
    connect_fake(portal)
    user_id = db.users.find_one({})["_id"]
    assert portal.get("/sync/status").json() == {"pending": False, "platforms": {}}
    page = portal.get("/connections").text
    assert 'data-pending="no"' in page and "http-equiv" not in page

    portal.submit("/connections", "/sync/fake")
    status = portal.get("/sync/status", headers={"Accept": "application/json"}).json()
    assert status["pending"] is True
    assert status["platforms"]["fake"]["state"] == "requested"
    assert status["platforms"]["fake"]["label"] == "Waiting to start"
    for path in ("/connections", "/dashboard"):
        page = portal.get(path).text
        assert 'src="/static/sync-status.js"' in page and 'data-pending="yes"' in page
        assert 'data-sync-platform="fake" data-state="requested"' in page
        assert '<noscript><meta http-equiv="refresh"' in page  # only while pending, and only without JS
    assert portal.get("/static/sync-status.js").headers["Content-Type"].startswith(("text/javascript",
                                                                                  "application/javascript"))

    request_id = db.sync_requests.find_one({})["_id"]
    db.sync_requests.update_one({"_id": request_id}, {"$set": {"status": "running"}})
    assert portal.get("/sync/status").json()["platforms"]["fake"]["label"] == "Running"
    # a second press while one is running does not add another request
    portal.submit("/connections", "/sync/fake")
    assert db.sync_requests.count_documents({}) == 1

    db.sync_requests.update_one({"_id": request_id}, {"$set": {
        "status": "failed", "error": 'Execution of run for "fake_sync" failed. Steps failed: [\'fake_campaigns\'].'}})
    UserRepository(db).record_sync(user_id, "fake", status="failed",
                                   error="the accounts service answered HTTP 503 three times")
    failed = portal.get("/sync/status").json()
    assert failed["pending"] is False
    assert failed["platforms"]["fake"]["state"] == "failed"
    assert failed["platforms"]["fake"]["message"] == "Fake Ads sync failed: the accounts service answered HTTP 503 three times"
    page = portal.get("/connections").text
    assert "HTTP 503 three times" in page and 'data-pending="no"' in page and "http-equiv" not in page

    db.sync_requests.update_one({"_id": request_id}, {"$set": {"status": "failed", "error": "not connected"}})
    assert "no longer connected" in portal.get("/sync/status").json()["platforms"]["fake"]["message"]

    db.sync_requests.update_one({"_id": request_id}, {"$set": {"status": "success"}})
    UserRepository(db).record_sync(user_id, "fake", status="success", rows={"campaigns": 3, "metric_rows": 270},
                                   success=True)
    done = portal.get("/sync/status").json()["platforms"]["fake"]
    assert done["label"] == "Done" and "3 campaigns, 270 metric rows" in done["message"]

    # a request that never reported back (e.g. no daemon evaluated the run-status sensors) stops blocking
    # after an hour
    db.sync_requests.update_one({"_id": request_id}, {"$set": {
        "status": "queued", "queued_at": dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=2)}})
    stale = portal.get("/sync/status").json()
    assert stale["pending"] is False and stale["platforms"]["fake"]["state"] == "stale"
    portal.submit("/connections", "/sync/fake")
    assert db.sync_requests.count_documents({"status": "requested"}) == 1


def test_sync_status_requires_login_and_is_per_user(portal, db):
    response = portal.get("/sync/status", allow_redirects=False)
    assert response.status_code == 302 and "/login" in response.headers["Location"]
    other = UserRepository(db).create("zed@example.com", "x")
    db.sync_requests.insert_one({"user_id": other["_id"], "platform": "fake", "status": "requested",
                                 "requested_at": dt.datetime.now(dt.timezone.utc)})
    portal.signup("ann@example.com")
    assert portal.get("/sync/status").json() == {"pending": False, "platforms": {}}


def test_connections_page_states(portal, db):
    portal.signup("ann@example.com")
    page = portal.get("/connections").text
    assert re.search(r'data-platform="fake" data-status="not_connected" data-configured="yes"', page)
    connect_fake(portal)
    page = portal.get("/connections").text
    assert "Connected</span>" in page and "2 accounts" in page
    user_id = db.users.find_one({})["_id"]
    soon = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=9, hours=2)
    db.users.update_one({"_id": user_id}, {"$set": {"oauth.fake.expires_at": soon}})
    page = portal.get("/connections").text
    assert "Token expires in 9 days" in page and "9 days left" in page
    UserRepository(db).record_sync(user_id, "fake", status="success", rows={"campaigns": 4}, success=True)
    page = portal.get("/connections").text
    assert re.search(r"success at <time[^>]*>\d{4}-\d\d-\d\d \d\d:\d\d UTC</time>", page)
    find_form(page, "/connections/fake/disconnect")
    find_form(page, "/sync/fake")
    assert "Reconnect Fake Ads" in page
