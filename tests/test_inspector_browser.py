"""The event inspector in a real browser: headless Chromium, driven through Selenium,
against a reference server on loopback that a real `Tracker` sends to.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them); without
them the tests are skipped. ``LEHNZ_SCREENSHOTS=docs/images`` makes
`test_counters_and_screenshot` and `test_timeline_and_screenshot` save the README's
screenshots there (``inspector.png``, ``inspector-timeline.png``).

The browser resolves ``rebind.test`` to 127.0.0.1 (``--host-resolver-rules``), as DNS
rebinding would make it resolve a name of another site: the inspector must refuse it.
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
#: A name of "another site" that the browser resolves to loopback.
REBIND = "rebind.test"


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
        f"--host-resolver-rules=MAP {REBIND} 127.0.0.1",
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
def served(request: pytest.FixtureRequest) -> Iterator[Served]:
    """The server; ``@pytest.mark.parametrize("served", [{...}], indirect=True)`` gives
    it options."""
    served = Served(**getattr(request, "param", {}))
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


def click_row(browser: Any, css: str, index: int) -> None:
    """Click the ``index``-th element matching ``css``, found afresh on each try: a live
    list may render its rows again between the find and the click."""

    def attempt(driver: Any) -> bool:
        found = driver.find_elements(By.CSS_SELECTOR, css)
        if len(found) <= index:
            return False
        found[index].click()
        return True

    wait(browser).until(attempt, f"could not click {css} [{index}]")


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

    click_row(browser, "#refused tbody tr", 1)
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

    click_row(browser, "#events tbody tr", 1)  # the purchase
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
    """Counters over a realistic mix; with LEHNZ_SCREENSHOTS=DIR, the README's screenshot."""
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
    click_row(browser, "#events tbody tr", purchase)
    wait(browser).until(lambda d: "purchase" in text(d, "detail-json"), "no detail shown")
    screenshot(browser, "inspector.png")


def screenshot(browser: Any, name: str) -> None:
    """With ``LEHNZ_SCREENSHOTS=DIR``, save the page as ``DIR/name``."""
    directory = os.environ.get("LEHNZ_SCREENSHOTS")
    if not directory:
        return
    browser.execute_script("document.activeElement.blur();")
    wait(browser).until(  # new rows flash for a moment
        lambda d: d.execute_script("return document.getAnimations().length === 0;")
    )
    path = Path(directory) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(path)), f"could not write {path}"


# -- issue 17: filters, paging, timeline, pause, export, first paint, security -------------


def fetch(browser: Any, path: str, method: str = "GET") -> dict[str, Any]:
    """``fetch(path)`` from the page (its origin, its cookies): status, text, headers."""
    script = """
        const [path, method, done] = arguments;
        fetch(path, {method}).then(async (r) => done({
            status: r.status, text: await r.text(),
            disposition: r.headers.get("Content-Disposition"),
        })).catch((e) => done({status: -1, text: String(e)}));
    """
    return dict(browser.execute_async_script(script, path, method))


def type_filter(browser: Any, name: str, value: str) -> None:
    field = browser.find_element(By.ID, f"filter-{name}")
    field.clear()
    field.send_keys(value)


def test_more_filters_and_search(browser: Any, served: Served, tracker: Tracker) -> None:
    tracker.track("usr_a", "view", item_id="prod_1", session_id="s_1")
    tracker.track("usr_a", "click", item_id="prod_2", session_id="s_1", recommendation_id="rec_9")
    tracker.track("usr_b", "search", session_id="s_2", context={"query": "Red Running Shoes"})
    tracker.track("usr_b", "purchase", item_id="prod_2", recommendation_id="rec_9")
    tracker.flush_sync(timeout=WAIT)
    open_inspector(browser, served)
    wait(browser).until(lambda d: len(rows(d)) == 4, "the events were not listed")

    def shown() -> list[tuple[str, str]]:
        return [(r[2], r[3]) for r in rows(browser)]

    type_filter(browser, "item_id", "prod_2")
    wait(browser).until(lambda d: shown() == [("usr_b", "purchase"), ("usr_a", "click")])
    browser.find_element(By.ID, "filter-clear").click()
    type_filter(browser, "session_id", "s_1")
    wait(browser).until(lambda d: shown() == [("usr_a", "click"), ("usr_a", "view")])
    browser.find_element(By.ID, "filter-clear").click()
    type_filter(browser, "recommendation_id", "rec_9")
    wait(browser).until(lambda d: shown() == [("usr_b", "purchase"), ("usr_a", "click")])
    browser.find_element(By.ID, "filter-clear").click()
    type_filter(browser, "q", "running")
    wait(browser).until(lambda d: shown() == [("usr_b", "search")], "the search did not apply")

    # live events are searched too
    tracker.track("usr_c", "search", context={"query": "trail RUNNING socks"})
    tracker.track("usr_c", "view", item_id="prod_3")
    tracker.flush_sync(timeout=WAIT)
    wait(browser).until(lambda d: shown() == [("usr_c", "search"), ("usr_b", "search")])
    assert text(browser, "counter-events") == "6"


def test_load_older_beyond_the_first_500(browser: Any, served: Served, tracker: Tracker) -> None:
    for i in range(1, 1204):
        tracker.track(f"usr_{i}", "view", item_id="prod_1")
    tracker.flush_sync(timeout=WAIT)
    open_inspector(browser, served)
    older = browser.find_element(By.ID, "events-older")
    wait(browser).until(lambda d: len(rows(d)) == 500 and older.is_displayed())
    assert rows(browser)[0][0] == "1203" and rows(browser)[-1][0] == "704"
    older.click()
    wait(browser).until(lambda d: len(rows(d)) == 1000, "no older page")
    older.click()
    wait(browser).until(lambda d: len(rows(d)) == 1203, "no last page")
    assert rows(browser)[-1][0] == "1" and not older.is_displayed()
    assert [int(r[0]) for r in rows(browser)] == list(range(1203, 0, -1))

    tracker.track("usr_new", "view", item_id="prod_1")  # live rows still arrive on top
    tracker.flush_sync(timeout=WAIT)
    wait(browser).until(lambda d: rows(d)[0][2] == "usr_new" and len(rows(d)) == 1204)


def timeline(browser: Any) -> list[str]:
    script = "return Array.from(document.querySelectorAll('#timeline li')).map(l => l.innerText);"
    return [" ".join(item.split()) for item in browser.execute_script(script)]


def test_timeline_and_screenshot(browser: Any, served: Served, tracker: Tracker) -> None:
    """One person across an identify: anonymous first, then signed in; live, and with
    LEHNZ_SCREENSHOTS=DIR the README's screenshot of it."""
    journey = [
        ("anon_7f3a", "view", "prod_7", {"page": "home"}),
        ("usr_388", "view", "prod_12", None),
        ("anon_7f3a", "search", None, {"query": "trail shoes"}),
        ("anon_7f3a", "view", "prod_12", {"page": "search"}),
        ("anon_7f3a", "add_to_cart", "prod_12", None),
    ]
    for user, name, item, context in journey:
        tracker.track(user, name, item_id=item, session_id="s_91c2", context=context)
        tracker.flush_sync(timeout=WAIT)  # one request each: the times differ
    tracker.identify("usr_51", previous_user_id="anon_7f3a", session_id="s_91c2")
    tracker.flush_sync(timeout=WAIT)
    tracker.track("usr_51", "checkout_start", item_id="prod_12", session_id="s_91c2")
    tracker.track("usr_388", "add_to_cart", item_id="prod_3")
    tracker.flush_sync(timeout=WAIT)
    tracker.track("usr_51", "purchase", item_id="prod_12", session_id="s_91c2",
                  context={"price": 89.9, "quantity": 1})  # fmt: skip
    tracker.flush_sync(timeout=WAIT)
    open_inspector(browser, served)
    wait(browser).until(lambda d: len(rows(d)) == 9, "the events were not listed")

    # from an anonymous event's detail to the person's timeline
    first = next(i for i, r in enumerate(rows(browser)) if r[0] == "1")
    click_row(browser, "#events tbody tr", first)
    wait(browser).until(lambda d: d.find_elements(By.ID, "detail-timeline"), "no timeline button")
    browser.find_element(By.ID, "detail-timeline").click()
    wait(browser).until(lambda d: len(timeline(d)) == 7, "the timeline did not load")
    assert [item.split(" ", 1)[1] for item in timeline(browser)] == [
        "anon_7f3a view engagement prod_7",
        "anon_7f3a search engagement",
        "anon_7f3a view engagement prod_12",
        "anon_7f3a add_to_cart engagement prod_12",
        "anon_7f3a signed in as usr_51 (identify)",
        "usr_51 checkout_start conversion prod_12",
        "usr_51 purchase conversion prod_12",
    ]
    ids = text(browser, "timeline-ids")
    assert "anon_7f3a" in ids and "usr_51" in ids and "usr_388" not in ids
    assert "joined by 1 identify event" in ids
    assert "anon_7f3a anonymous" in ids and "usr_51 signed in" in ids
    anon = browser.find_elements(By.CSS_SELECTOR, "#timeline li .who.anon")
    assert {a.text for a in anon} == {"anon_7f3a"}  # told apart from the account

    # the same timeline from the account's side, and live
    box = browser.find_element(By.ID, "timeline-user")
    box.clear()
    box.send_keys("usr_51")
    browser.find_element(By.ID, "timeline-show").click()
    tracker.track("usr_51", "view", item_id="prod_7", session_id="s_91c2")
    tracker.track("usr_388", "view", item_id="prod_7")
    tracker.flush_sync(timeout=WAIT)
    wait(browser).until(lambda d: len(timeline(d)) == 8, "a live event did not join the timeline")
    assert timeline(browser)[-1].endswith("usr_51 view engagement prod_7")
    assert timeline(browser)[0].endswith("anon_7f3a view engagement prod_7")

    click_row(browser, "#timeline li", 6)
    wait(browser).until(lambda d: "89.9" in text(d, "detail-json"), "no detail from the timeline")
    export = browser.find_element(By.ID, "timeline-export-json").get_attribute("href")
    exported = json.loads(fetch(browser, export)["text"])
    assert [e["user_id"] for e in exported] == ["anon_7f3a"] * 4 + ["usr_51"] * 4
    screenshot(browser, "inspector-timeline.png")


def test_pause_and_resume(browser: Any, served: Served, tracker: Tracker) -> None:
    open_inspector(browser, served)
    for i in range(2):
        tracker.track(f"usr_{i}", "view", item_id="prod_1")
    tracker.flush_sync(timeout=WAIT)
    wait(browser).until(lambda d: len(rows(d)) == 2)

    pause = browser.find_element(By.ID, "pause")
    pause.click()
    wait(browser).until(lambda d: text(d, "stream-status") == "paused")
    for i in range(2, 5):
        tracker.track(f"usr_{i}", "view", item_id="prod_1")
    tracker.flush_sync(timeout=WAIT)
    wait(browser).until(lambda d: pause.text == "Resume (3 new)", "the waiting rows not counted")
    assert text(browser, "counter-events") == "5"  # the counters keep counting
    assert users(browser) == ["usr_1", "usr_0"]  # the table does not move
    csv_link = browser.find_element(By.ID, "export-csv").get_attribute("href")
    assert "before=3" in csv_link  # the export is what the page shows
    assert len(fetch(browser, csv_link)["text"].splitlines()) == 1 + 2

    pause.click()
    wait(browser).until(lambda d: len(rows(d)) == 5, "resume did not show what arrived")
    assert users(browser) == ["usr_4", "usr_3", "usr_2", "usr_1", "usr_0"]
    assert pause.text == "Pause" and text(browser, "stream-status") == "live"
    tracker.track("usr_5", "view", item_id="prod_1")
    tracker.flush_sync(timeout=WAIT)
    wait(browser).until(lambda d: len(rows(d)) == 6, "live again after resume")


def test_export_follows_the_filters(browser: Any, served: Served, tracker: Tracker) -> None:
    for user in ("usr_a", "usr_b", "usr_a"):
        tracker.track(user, "purchase", item_id="prod_1", context={"price": 9.5})
    tracker.flush_sync(timeout=WAIT)
    open_inspector(browser, served)
    wait(browser).until(lambda d: len(rows(d)) == 3)
    type_filter(browser, "user_id", "usr_a")
    wait(browser).until(lambda d: users(d) == ["usr_a", "usr_a"])

    link = browser.find_element(By.ID, "export-csv")
    assert link.get_attribute("download") is not None
    got = fetch(browser, link.get_attribute("href"))
    assert got["status"] == 200 and "lehnz-events.csv" in got["disposition"]
    lines = got["text"].splitlines()
    assert lines[0].startswith("id,time,request,user_id") and len(lines) == 3
    assert [line.split(",")[3] for line in lines[1:]] == ["usr_a", "usr_a"]
    got = fetch(browser, browser.find_element(By.ID, "export-json").get_attribute("href"))
    assert [e["user_id"] for e in json.loads(got["text"])] == ["usr_a", "usr_a"]


def test_the_first_paint_shows_no_misleading_numbers(browser: Any, served: Served) -> None:
    """Before the server answered, no counter reads 0 and nothing says what it keeps."""
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd(
        "Network.setBlockedURLs", {"urls": ["*/inspector/api/*", "*/inspector/stream*"]}
    )
    try:
        browser.get(served.server.inspector.url)
        wait(browser).until(lambda d: text(d, "endpoint").endswith("/api/v1/events/ingest"))
        for name in ("events", "requests", "refused", "duplicates"):
            assert text(browser, f"counter-{name}") == "\u2013", name
        assert text(browser, "holding") == "Loading…"
        assert text(browser, "events-empty") == "Loading events…"
        assert "keeps everything" not in browser.find_element(By.TAG_NAME, "body").text
    finally:
        browser.execute_cdp_cmd("Network.setBlockedURLs", {"urls": []})
        browser.execute_cdp_cmd("Network.disable", {})
    open_inspector(browser, served)
    wait(browser).until(lambda d: text(d, "counter-events") == "0")
    assert "keeps everything it receives" in text(browser, "holding")


def test_a_rebinding_hostname_is_refused(browser: Any, served: Served) -> None:
    """A page of another site whose name now resolves to loopback (DNS rebinding) can
    neither read the events nor reset the server."""
    body = json.dumps([{"user_id": "usr_1", "event_family": "engagement", "event_name": "view"}])
    assert served.post(body.encode()) == 202
    port = served.server.port
    browser.get(f"http://{REBIND}:{port}/")
    page = browser.find_element(By.TAG_NAME, "body").text
    assert "not allowed" in page and "usr_1" not in page
    assert not browser.find_elements(By.ID, "events")
    for path, method in (("/inspector/api/events", "GET"), ("/inspector/api/reset", "POST"),
                         ("/inspector/api/export?format=json", "GET")):  # fmt: skip
        got = fetch(browser, path, method)  # same-origin for the page: only the Host tells
        assert got["status"] == 403, path
        assert "usr_1" not in got["text"]
    assert served.call(lambda: len(served.server.events)) == 1  # not reset

    browser.get(f"http://localhost:{port}/")  # loopback names are fine
    wait(browser).until(lambda d: len(rows(d)) == 1, "the page did not load on localhost")


@pytest.mark.parametrize("served", [{"allow_hosts": [REBIND]}], indirect=True)
def test_an_allowed_host_name_serves_the_page(browser: Any, served: Served) -> None:
    browser.get(f"http://{REBIND}:{served.server.port}/")
    wait(browser).until(
        lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-stream") == "live",
        "the page did not connect under an allowed name",
    )
    assert text(browser, "counter-events") == "0"


def test_key_shaped_values_are_masked_in_every_header(browser: Any, served: Served) -> None:
    secret = "lehnz_sk_Sup3rSecretServerK3y"
    body = json.dumps([{"user_id": "usr_1", "event_family": "engagement", "event_name": "view"}])
    headers = {"X-Forwarded-Authorization": f"Bearer {secret}", "X-Upstream-Key": KEY}
    assert served.post(body.encode(), **headers) == 202
    open_inspector(browser, served)
    wait(browser).until(lambda d: len(rows(d)) == 1)
    click_row(browser, "#events tbody tr", 0)
    wait(browser).until(lambda d: d.find_elements(By.ID, "detail-headers"), "no detail shown")
    shown = text(browser, "detail-headers")
    assert "X-Forwarded-Authorization Bearer lehnz_sk_****" in shown
    assert "X-Upstream-Key lehnz_pk_****" in shown
    assert secret not in browser.page_source and KEY not in browser.page_source
