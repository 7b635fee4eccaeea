"""The event inspector in a real browser: headless Chromium, driven through Selenium,
against a reference server on loopback that a real `Tracker` sends to.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them); without
them the tests are skipped. ``LEHNZ_SCREENSHOT=docs/images/inspector.png`` makes
`test_counters_and_screenshot` save the README's screenshot there.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lehnz_async import DeliveryError, Tracker
from lehnz_async.testing import ReferenceServer

from .conftest import FAST_RETRY

webdriver = pytest.importorskip(
    "selenium.webdriver", reason="needs selenium: pip install -e '.[test]'"
)
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

CHROMIUM = os.environ.get("LEHNZ_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = (
    os.environ.get("LEHNZ_CHROMEDRIVER") or shutil.which("chromedriver") or "/usr/bin/chromedriver"
)
_MISSING = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(path)]

pytestmark = pytest.mark.skipif(
    bool(_MISSING),
    reason=f"needs Chromium and its driver ({', '.join(_MISSING)} missing): "
    "apt-get install chromium chromium-driver",
)

#: Explicit waits: generous for a loaded 2-core machine; they end as soon as the page is.
WAIT = 10.0
KEY = "lehnz_pk_Sup3rSecretK3y"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium for the module (a fresh page per test)."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1000",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--disable-background-networking",
        "--proxy-server=direct://",
        "--proxy-bypass-list=*",
    ):
        options.add_argument(arg)
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()


class Served:
    """A reference server on its own event loop in a thread, so that the test's blocking
    WebDriver calls never stall it."""

    def __init__(self, **options: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.server = ReferenceServer(api_keys={KEY}, **options)
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.server.start())
            ready.set()
            self.loop.run_forever()
            self.loop.run_until_complete(self.server.stop())
            self.loop.close()

        self.thread = threading.Thread(target=run, name="inspector-server", daemon=True)
        self.thread.start()
        assert ready.wait(WAIT), "the reference server did not start"

    def call(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on the server's loop (to read its state between two of its requests)."""

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(WAIT)

    def post(self, body: bytes, **headers: str) -> int:
        """POST ``body`` to the ingestion endpoint as it is; the status."""
        request = urllib.request.Request(
            self.server.url, data=body, method="POST", headers={"X-API-KEY": KEY, **headers}
        )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(request, timeout=WAIT) as response:
                return int(response.status)
        except urllib.error.HTTPError as error:
            return int(error.code)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT)


@pytest.fixture
def served() -> Iterator[Served]:
    served = Served()
    yield served
    served.stop()


@pytest.fixture
def errors() -> list[DeliveryError]:
    return []


@pytest.fixture
def tracker(served: Served, errors: list[DeliveryError]) -> Iterator[Tracker]:
    """A real tracker, running its own loop in a thread, sending to the server; batches
    are cut by ``flush_sync()`` (the interval is long), so each test knows its requests."""
    tracker = Tracker(
        KEY,
        endpoint=served.server.url,
        retry=FAST_RETRY,
        on_error=errors.append,
        flush_interval=60.0,
    )
    yield tracker
    tracker.close()


def open_inspector(browser: Any, served: Served) -> None:
    """Load the page and wait until its live stream is connected."""
    browser.get(served.server.inspector.url)
    wait(browser).until(
        lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-stream") == "live",
        "the page's live stream did not connect",
    )


def wait(browser: Any) -> WebDriverWait[Any]:
    return WebDriverWait(browser, WAIT, ignored_exceptions=[StaleElementReferenceException])


def rows(browser: Any, table: str = "events") -> list[list[str]]:
    """The cells' texts of a table's rows, top (newest) first, read in one go."""
    script = (
        f"return Array.from(document.querySelectorAll('#{table} tbody tr'))"
        ".map(r => Array.from(r.cells).map(c => c.textContent));"
    )
    return list(browser.execute_script(script))


def users(browser: Any) -> list[str]:
    return [row[2] for row in rows(browser)]


def text(browser: Any, element_id: str) -> str:
    return str(browser.find_element(By.ID, element_id).text)


def test_rows_appear_live_without_reload(browser: Any, served: Served, tracker: Tracker) -> None:
    open_inspector(browser, served)
    assert rows(browser) == []
    browser.execute_script("window.__sameDocument = true;")  # gone if the page reloads

    for i in range(3):
        tracker.track(f"usr_live_{i}", "view", item_id=f"prod_{i}")
    tracker.flush_sync(timeout=WAIT)
    wait(browser).until(lambda d: len(rows(d)) == 3, "the first events did not appear")
    assert users(browser) == ["usr_live_2", "usr_live_1", "usr_live_0"]  # newest first
    assert text(browser, "counter-events") == "3"

    tracker.track("usr_live_3", "purchase", item_id="prod_3", context={"price": 9.5})
    tracker.flush_sync(timeout=WAIT)
    wait(browser).until(lambda d: len(rows(d)) == 4, "a later event did not appear")
    assert rows(browser)[0][2:6] == ["usr_live_3", "purchase", "conversion", "prod_3"]
    assert text(browser, "counter-requests") == "2"
    assert browser.execute_script("return window.__sameDocument === true;"), "the page reloaded"


def test_filters(browser: Any, served: Served, tracker: Tracker) -> None:
    for user in ("usr_a", "usr_b"):
        tracker.track(user, "view", item_id="prod_1")
        tracker.track(user, "search", context={"query": "shoes"})
        tracker.track(user, "purchase", item_id="prod_1", context={"price": 20.0})
    tracker.flush_sync(timeout=WAIT)
    open_inspector(browser, served)
    wait(browser).until(lambda d: len(rows(d)) == 6, "the events were not listed")

    browser.find_element(By.ID, "filter-user_id").send_keys("usr_a")
    wait(browser).until(lambda d: users(d) == ["usr_a"] * 3, "the user_id filter did not apply")
    Select(browser.find_element(By.ID, "filter-event_family")).select_by_visible_text("conversion")
    wait(browser).until(
        lambda d: [(r[2], r[3]) for r in rows(d)] == [("usr_a", "purchase")],
        "the event_family filter did not apply",
    )

    # live events are filtered too: usr_b's purchase and usr_a's view stay out
    tracker.track("usr_b", "purchase", item_id="prod_2", context={"price": 5.0})
    tracker.track("usr_a", "view", item_id="prod_2")
    tracker.track("usr_a", "checkout_start", item_id="prod_2")
    tracker.flush_sync(timeout=WAIT)
    wait(browser).until(lambda d: len(rows(d)) == 2, "a matching live event did not appear")
    assert [(r[2], r[3]) for r in rows(browser)] == [
        ("usr_a", "checkout_start"),
        ("usr_a", "purchase"),
    ]

    browser.find_element(By.ID, "filter-clear").click()
    browser.find_element(By.ID, "filter-event_name").send_keys("search")
    wait(browser).until(
        lambda d: sorted(users(d)) == ["usr_a", "usr_b"] and {r[3] for r in rows(d)} == {"search"},
        "the event_name filter did not apply",
    )


def test_refused_requests_show_status_reason_and_event(
    browser: Any, served: Served, tracker: Tracker, errors: list[DeliveryError]
) -> None:
    served.server.faults.reject_event = lambda event: (
        "Item withdrawn from sale" if event.get("item_id") == "prod_gone" else None
    )
    open_inspector(browser, served)
    tracker.track("usr_1", "add_to_cart", item_id="prod_gone")
    tracker.flush_sync(timeout=WAIT)
    assert [e.status for e in errors] == [400]
    missing = {"user_id": "usr_2", "event_family": "engagement", "item_id": "prod_9"}
    assert served.post(json.dumps([missing]).encode()) == 400

    wait(browser).until(lambda d: text(d, "counter-refused") == "2", "refusals were not counted")
    assert text(browser, "counter-events") == "0"
    browser.find_element(By.ID, "tab-refused").click()
    wait(browser).until(lambda d: len(rows(d, "refused")) == 2, "refusals were not listed")
    (missed, withdrawn) = rows(browser, "refused")
    assert withdrawn[2:5] == ["400", "Item withdrawn from sale", "1"]
    assert json.loads(withdrawn[5])["item_id"] == "prod_gone"
    assert missed[2:4] == ["400", "Missing mandatory fields"]
    assert json.loads(missed[5]) == missing

    browser.find_elements(By.CSS_SELECTOR, "#refused tbody tr")[1].click()
    wait(browser).until(lambda d: "Item withdrawn from sale" in text(d, "detail-reason"))
    assert "prod_gone" in text(browser, "detail-json")
    assert "lehnz_pk_****" in text(browser, "detail-headers")


def test_event_detail_shows_its_request_without_the_api_key(
    browser: Any, served: Served, tracker: Tracker
) -> None:
    open_inspector(browser, served)
    tracker.track("usr_9", "purchase", item_id="prod_7", context={"price": 49.99, "cur": "EUR"})
    tracker.track("usr_9", "view", item_id="prod_8")
    tracker.flush_sync(timeout=WAIT)
    wait(browser).until(lambda d: len(rows(d)) == 2, "the events did not appear")
    (request,) = served.call(lambda: list(served.server.requests))
    assert request.idempotency_key

    browser.find_elements(By.CSS_SELECTOR, "#events tbody tr")[1].click()  # the purchase
    wait(browser).until(lambda d: d.find_elements(By.ID, "detail-json"), "no detail shown")
    shown = json.loads(text(browser, "detail-json"))
    assert shown == {
        "user_id": "usr_9",
        "event_family": "conversion",
        "event_name": "purchase",
        "item_id": "prod_7",
        "context": {"price": 49.99, "cur": "EUR"},
    }
    assert text(browser, "detail-idempotency-key") == request.idempotency_key
    assert text(browser, "detail-batch-size") == "2 event(s)"
    headers = text(browser, "detail-headers")
    assert "X-API-KEY lehnz_pk_****" in headers
    assert f"Idempotency-Key {request.idempotency_key}" in headers
    assert KEY not in browser.page_source
    assert "Sup3rSecret" not in browser.find_element(By.TAG_NAME, "body").text


def test_counters_and_screenshot(browser: Any, served: Served, tracker: Tracker) -> None:
    """Counters over a realistic mix; with LEHNZ_SCREENSHOT=PATH, the README's screenshot."""
    served.server.faults.reject_event = lambda event: (
        "Item withdrawn from sale" if event.get("item_id") == "prod_retired" else None
    )
    open_inspector(browser, served)
    shop = [
        ("usr_1042", "view", "prod_7", None),
        ("usr_1042", "add_to_cart", "prod_7", None),
        ("usr_388", "search", None, {"query": "running shoes"}),
        ("usr_388", "view", "prod_12", {"page": "category"}),
        ("usr_1042", "checkout_start", "prod_7", None),
        ("usr_1042", "purchase", "prod_7", {"price": 89.9, "quantity": 1}),
        ("usr_51", "view", "prod_3", {"page": "home"}),
        ("usr_51", "click", "prod_12", {"page": "product"}),
    ]
    for user, name, item, context in shop:
        tracker.track(user, name, item_id=item, context=context)
    tracker.identify("usr_51", previous_user_id="anon_7f3a")
    tracker.flush_sync(timeout=WAIT)
    tracker.track("usr_388", "add_to_cart", item_id="prod_retired")
    tracker.flush_sync(timeout=WAIT)
    batch = json.dumps(
        [
            {
                "user_id": "usr_7",
                "event_family": "engagement",
                "event_name": "view",
                "item_id": "prod_5",
            }
        ]
    ).encode()
    assert served.post(batch, **{"Idempotency-Key": "k-1"}) == 202
    assert served.post(batch, **{"Idempotency-Key": "k-1"}) == 202  # a retry: a duplicate

    expected = {"events": "10", "requests": "4", "refused": "1", "duplicates": "1"}
    wait(browser).until(
        lambda d: {name: text(d, f"counter-{name}") for name in expected} == expected,
        "the counters are wrong",
    )
    assert text(browser, "tab-refused-count") == "1"
    assert len(rows(browser)) == 10

    purchase = next(i for i, row in enumerate(rows(browser)) if row[3] == "purchase")
    browser.find_elements(By.CSS_SELECTOR, "#events tbody tr")[purchase].click()
    wait(browser).until(lambda d: "purchase" in text(d, "detail-json"), "no detail shown")
    path = os.environ.get("LEHNZ_SCREENSHOT")
    if path:
        browser.execute_script("document.activeElement.blur();")
        wait(browser).until(  # new rows flash for a moment
            lambda d: d.execute_script("return document.getAnimations().length === 0;")
        )
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(path), f"could not write {path}"
