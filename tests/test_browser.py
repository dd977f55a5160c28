"""A real browser (Playwright driving Debian's Chromium, headless) through the whole product:
sign up → connect Google Ads on the sandbox consent page → "Sync now" → Dagster's sensor launches the
sync (run in-process on a test instance) → the page shows the request finish without a reload → the
dashboard shows the sandbox campaigns with the right totals per currency → chart, sort, filter →
disconnect (data kept) → delete the account (everything gone, partition dropped by the sensor).

Screenshots are saved under ``test-artifacts/`` (gitignored). Skipped when ``/usr/bin/chromium`` is
missing (``apt-get install chromium``; ``.ci/run`` installs it on CI).
"""
from __future__ import annotations

import datetime as dt
import os
import re
from collections import defaultdict
from decimal import Decimal
from pathlib import Path

import pytest

from test_portal import _portal
from resources.platforms import registry
from resources.settings import PROJECT_ROOT
from resources.store import campaigns_collection, metrics_collection

CHROMIUM = Path(os.environ.get("UA_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
ARTIFACTS = PROJECT_ROOT / "test-artifacts"
EMAIL, PASSWORD = "browser@example.com", "a long browser passphrase 9"

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason=f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium) "
                                       "to run the browser test")


@pytest.fixture
def browser_page():
    """A fresh Chromium page (1280 px wide) with console errors collected in ``page.errors``."""
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            page = context.new_page()
            page.errors = []
            page.on("console", lambda message: page.errors.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: page.errors.append(str(error)))
            page.set_default_timeout(30_000)
            yield page
        finally:
            browser.close()


def _truth(google, start: dt.date, end: dt.date):
    """Campaign count and {currency: (spend, clicks, impressions)} of the sandbox over the dashboard range
    (account-local dates; a day after the account's local today has no data yet)."""
    campaigns, totals = 0, defaultdict(lambda: [Decimal(0), 0, 0])
    for client in google.data.clients():
        campaigns += len(list(google.expected_campaigns(client.id)))
        last = min(end, google.data.local_today(client.id))
        totals[client.currency]  # every client currency shows, even with no activity
        for row in google.expected_metrics(client.id, start, last):
            entry = totals[row["currency"]]
            entry[0] += row["spend"]
            entry[1] += row["clicks"]
            entry[2] += row["impressions"]
    return campaigns, {c: (f"{v[0]:,.2f}", f"{v[1]:,}", f"{v[2]:,}") for c, v in totals.items()}


def _page_totals(page) -> dict[str, tuple[str, str, str]]:
    out = {}
    for row in page.locator("table.totals tbody tr").all():
        cells = [c.inner_text().strip() for c in row.locator("td").all()]
        out[cells[0]] = (cells[1], cells[2], cells[3])
    return out


def _shot(page, name: str) -> Path:
    """Save what the window shows as ``<name>.png`` and the whole page as ``<name>-full.png``."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path))
    page.screenshot(path=str(ARTIFACTS / f"{name}-full.png"), full_page=True)
    return path


@pytest.mark.skipif("google" not in registry.PLATFORMS, reason="Google Ads is not registered")
def test_marketer_journey_in_a_real_browser(browser_page, sandbox, db, settings, monkeypatch):
    from dagster import instance_for_test

    from pipelines.definitions import build_definitions
    from resources.store.resource import MongoStoreResource
    from test_pipelines import tick

    page = browser_page
    google = sandbox.platform("google")
    google.reset()
    client, stop = _portal(db, monkeypatch, None, {"SYNC_STATUS_POLL_MS": 500})
    url = client.url
    defs, _platforms = build_definitions(MongoStoreResource(database=settings.mongodb_db))
    try:
        with instance_for_test() as instance:
            # ---- sign up
            page.goto(f"{url}/signup")
            page.fill("#email", EMAIL)
            page.fill("#password", PASSWORD)
            page.fill("#password_confirm", PASSWORD)
            page.click("button[type=submit].primary")
            page.wait_for_url(f"{url}/connections")
            assert "Welcome!" in page.inner_text(".flashes")

            # ---- connect Google Ads through the sandbox consent page
            page.click("text=Connect Google Ads")
            page.wait_for_url(re.compile(re.escape(sandbox.base_url) + ".*"))
            assert "wants access to your Google Account" in page.content()
            page.click("#allow")
            page.wait_for_url(f"{url}/connections")
            card = page.locator("#platform-google")
            assert "Connected" in card.locator(".platform-head").inner_text()
            for customer in google.data.clients():
                assert customer.name in card.inner_text()
            user = db.users.find_one({"email": EMAIL})
            user_id = str(user["_id"])
            tick(defs, instance, "google_connections_sensor")
            assert user_id in instance.get_dynamic_partitions("google_connections")

            # ---- Sync now: a request in the store; the sensor launches the run; the page follows it
            for name in ("sync_request_started_sensor", "sync_request_success_sensor", "sync_request_failure_sensor"):
                tick(defs, instance, name)  # run-status sensors start from "now"
            card.locator("button", has_text="Sync now").click()
            page.wait_for_url(f"{url}/connections")
            status = page.locator('#platform-google [data-sync-platform="google"]')
            assert status.get_attribute("data-state") == "requested"
            assert "Waiting to start" in status.inner_text()
            launched = tick(defs, instance, "sync_requests_sensor")
            [request] = launched.run_requests
            assert request.partition_key == user_id and request.tags["trigger"] == "sync_now"
            job = defs.resolve_job_def(request.job_name)
            result = job.execute_in_process(instance=instance, partition_key=request.partition_key,
                                            tags=request.tags, raise_on_error=False)
            assert result.success
            for name in ("sync_request_started_sensor", "sync_request_success_sensor"):
                tick(defs, instance, name)
            assert db.sync_requests.find_one({})["status"] == "success"
            # the poller (static/sync-status.js) picks it up without reloading the page
            # (a locator wait: the CSP refuses the string evaluation wait_for_function would need)
            page.locator('#platform-google [data-sync-platform="google"][data-state="success"]').wait_for()
            assert "Done" in status.inner_text() and "campaigns" in status.inner_text()
            assert page.locator("#platform-google .reload").count() == 1
            _shot(page, "connections")

            # ---- the dashboard: the sandbox campaigns with the right totals per currency
            page.goto(f"{url}/dashboard")
            start = dt.date.fromisoformat(page.input_value("input[name=start]"))
            end = dt.date.fromisoformat(page.input_value("input[name=end]"))
            campaigns, totals = _truth(google, start, end)
            assert f"{campaigns:,} campaigns" in page.inner_text("#campaigns h2")
            assert _page_totals(page) == totals
            assert len(totals) >= 2  # several currencies, each on its own line
            stored = db[campaigns_collection("google")].count_documents({"user_id": user["_id"]})
            assert stored == campaigns
            rows = page.locator("table.campaigns tbody tr")
            assert rows.count() == min(50, campaigns)
            shot = _shot(page, "dashboard")
            assert shot.stat().st_size > 10_000

            # sort by clicks (largest first), then filter to paused campaigns only
            page.click("th a[data-sort=clicks]")
            assert page.locator("th[aria-sort=descending] a[data-sort=clicks]").count() == 1
            clicks = [int(c.replace(",", "")) for c in page.locator("table.campaigns tbody tr td:nth-child(7)").all_inner_texts()]
            assert clicks == sorted(clicks, reverse=True)
            page.select_option("select[name=status]", "PAUSED")
            page.click("form.filters button[type=submit]")
            statuses = set(page.locator("table.campaigns tbody tr td:nth-child(4)").all_inner_texts())
            assert statuses == {"PAUSED"}

            # the per-day chart of the top campaign, drawn on the server as inline SVG
            page.goto(f"{url}/dashboard")
            page.locator("table.campaigns tbody tr").first.locator("td:nth-child(3) a").click()
            chart = page.locator("#chart svg.chart")
            chart.wait_for()
            assert chart.locator("g.day").count() == (end - start).days + 1
            assert chart.bounding_box()["width"] > 600
            _shot(page, "dashboard-chart")
            csp_errors = [e for e in page.errors if "Content Security Policy" in e]
            assert csp_errors == []

            # no token anywhere in what the browser was given
            from resources.crypto import TokenCipher

            connection = db.users.find_one({"email": EMAIL})["oauth"]["google"]
            token = TokenCipher.from_settings(settings).decrypt(connection["token"])
            for path in ("/dashboard", "/connections", "/account", "/sync/status"):
                page.goto(f"{url}{path}")
                content = page.content()
                assert token["access_token"] not in content and token["refresh_token"] not in content
                assert connection["token"] not in content

            # ---- disconnect, keeping the synced data
            page.goto(f"{url}/connections")
            page.click("text=Disconnect Google Ads")
            page.wait_for_url(f"{url}/connections")
            assert page.locator("#platform-google").get_attribute("data-status") == "not_connected"
            assert "Your synced campaign data is kept" in page.inner_text(".flashes")
            page.goto(f"{url}/dashboard")
            assert f"{campaigns:,} campaigns" in page.inner_text("#campaigns h2")

            # ---- delete the account
            page.goto(f"{url}/account")
            page.fill("#delete #password", PASSWORD)
            page.click("text=Delete my account and all its data")
            page.wait_for_url(f"{url}/signup")
            assert "account was deleted" in page.inner_text(".flashes")
            assert db.users.count_documents({"email": EMAIL}) == 0
            for pid in registry.PLATFORMS:
                for name in (campaigns_collection(pid), metrics_collection(pid)):
                    assert db[name].count_documents({"user_id": user["_id"]}) == 0, name
            assert db.sync_requests.count_documents({"user_id": user["_id"]}) == 0
            page.goto(f"{url}/dashboard")
            page.wait_for_url(re.compile(re.escape(url) + "/login.*"))
            tick(defs, instance, "google_connections_sensor")
            assert user_id not in instance.get_dynamic_partitions("google_connections")
    finally:
        stop()
