"""lehnz_async.django on the real thing: Django's test client in this process (sync and
async views, identify() at login), then the shop in tests/integrations/apps/shop_django
under gunicorn (sync and gthread workers recycled by --max-requests) and under uvicorn
(ASGI, two workers), each stopped with SIGTERM. Every event must arrive exactly once."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("django", reason="Django is not installed: pip install 'lehnz-async[django]'")

from django.contrib.auth import alogin, login
from django.http import HttpRequest, JsonResponse
from django.urls import path

from lehnz_async.django import (
    SESSION_KEY,
    TrackedRequest,
    auser_id,
    get_tracker,
    user_id,
    with_lifespan,
)
from lehnz_async.testing import ReferenceServer

from ._procs import assert_once, get_all, gunicorn_args, needs, report, spawn, tracker_env

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="stops servers with SIGTERM")
BACKEND = "django.contrib.auth.backends.ModelBackend"
REQUESTS = 400  # per server run: each gunicorn worker is recycled every 50 requests


# -- Django's test client, in this process ------------------------------------------------


def view(request: TrackedRequest, item: str) -> JsonResponse:
    assert request.lehnz is get_tracker()
    request.lehnz.track(user_id(request), "view", item_id=item)
    return JsonResponse({"item": item})


async def aview(request: TrackedRequest, item: str) -> JsonResponse:
    request.lehnz.track(await auser_id(request), "view", item_id=item)
    return JsonResponse({"item": item})


def sign_in(request: HttpRequest, name: str) -> JsonResponse:
    from django.contrib.auth.models import User

    user, _ = User.objects.get_or_create(username=name)
    login(request, user, backend=BACKEND)
    return JsonResponse({"pk": user.pk})


async def asign_in(request: HttpRequest, name: str) -> JsonResponse:
    from django.contrib.auth.models import User

    user, _ = await User.objects.aget_or_create(username=name)
    await alogin(request, user, backend=BACKEND)
    return JsonResponse({"pk": user.pk})


urlpatterns = [
    path("view/<str:item>", view),
    path("aview/<str:item>", aview),
    path("login/<str:name>", sign_in),
    path("alogin/<str:name>", asign_in),
]


@pytest.fixture(scope="module")
def django_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReferenceServer]:
    """A reference server on a thread of its own, and Django set up (once per process)
    with this module's views, its auth and sessions, and the Lehnz app and middleware."""
    import django
    from django.conf import settings
    from django.core.management import call_command

    if settings.configured:
        pytest.skip("Django was already set up in this process by another test module")
    loop = asyncio.new_event_loop()
    srv = ReferenceServer()
    loop.run_until_complete(srv.start())
    thread = threading.Thread(target=loop.run_forever, name="reference-server", daemon=True)
    thread.start()
    settings.configure(
        SECRET_KEY="lehnz-async-tests",
        ALLOWED_HOSTS=["testserver"],
        ROOT_URLCONF=__name__,
        USE_TZ=True,
        DATABASES={
            "default": {
                "ENGINE": "django.db.backends.sqlite3",
                "NAME": str(tmp_path_factory.mktemp("django") / "db.sqlite3"),
            }
        },
        INSTALLED_APPS=[
            "django.contrib.contenttypes",
            "django.contrib.auth",
            "django.contrib.sessions",
            "lehnz_async.django.LehnzConfig",
        ],
        MIDDLEWARE=[
            "django.contrib.sessions.middleware.SessionMiddleware",
            "django.contrib.auth.middleware.AuthenticationMiddleware",
            "lehnz_async.django.TrackerMiddleware",
        ],
        LEHNZ={"api_key": srv.api_key, "endpoint": srv.url, "flush_interval": 3600},
    )
    django.setup()  # LehnzConfig.ready() makes and starts the tracker
    call_command("migrate", verbosity=0)
    try:
        yield srv
    finally:
        get_tracker().close()
        asyncio.run_coroutine_threadsafe(srv.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def summary(event: dict[str, Any]) -> tuple[Any, ...]:
    return (
        event["user_id"],
        event["event_name"],
        event.get("item_id"),
        event.get("previous_user_id"),
    )


def test_views_track_through_request_lehnz_and_login_identifies_the_visitor(
    django_server: ReferenceServer,
) -> None:
    from django.test import Client

    began = time.monotonic()
    alice, bob = Client(), Client()
    for client, path_ in [(alice, "/view/p1"), (alice, "/aview/p2"), (bob, "/aview/q1")]:
        assert client.get(path_).status_code == 200
    anon_alice, anon_bob = alice.session[SESSION_KEY], bob.session[SESSION_KEY]
    assert anon_alice.startswith("anon_") and anon_bob.startswith("anon_")
    assert anon_alice != anon_bob
    alice_pk = str(alice.post("/login/alice").json()["pk"])  # login(): user_logged_in
    bob_pk = str(bob.post("/alogin/bob").json()["pk"])  # alogin(): the signal's asend()
    assert SESSION_KEY not in alice.session and SESSION_KEY not in bob.session
    for client, path_ in [(alice, "/view/p3"), (alice, "/aview/p4"), (bob, "/view/q2")]:
        assert client.get(path_).status_code == 200

    tracker = get_tracker()
    tracker.flush_sync(10)
    events = [e for e in django_server.events if e["user_id"] != "usr_lifespan"]  # other test
    assert sorted(map(summary, events), key=str) == sorted(
        [
            (anon_alice, "view", "p1", None),
            (anon_alice, "view", "p2", None),
            (anon_bob, "view", "q1", None),
            (alice_pk, "identify", None, anon_alice),
            (bob_pk, "identify", None, anon_bob),
            (alice_pk, "view", "p3", None),
            (alice_pk, "view", "p4", None),
            (bob_pk, "view", "q2", None),
        ],
        key=str,
    )
    stats = tracker.stats
    assert stats.delivered == stats.tracked == 8, stats
    report(
        "django test client",
        tracked=stats.tracked,
        delivered=stats.delivered,
        wall=time.monotonic() - began,
    )


def test_with_lifespan_answers_the_lifespan_protocol_and_closes_the_tracker(
    django_server: ReferenceServer,
) -> None:
    """Driven as an ASGI server drives it; afterwards a new tracker serves the next run."""
    from django.core.asgi import get_asgi_application

    application = with_lifespan(get_asgi_application())
    sent: list[dict[str, Any]] = []
    trackers = []

    async def run() -> None:
        messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

        async def send(message: Any) -> None:
            sent.append(dict(message))
            if message["type"] == "lifespan.startup.complete":
                trackers.append(get_tracker())  # what views see while the app runs
                trackers[-1].track("usr_lifespan", "view", item_id="l1")
                await messages.put({"type": "lifespan.shutdown"})

        await messages.put({"type": "lifespan.startup"})
        await application({"type": "lifespan", "asgi": {"version": "3.0"}}, messages.get, send)

    asyncio.run(run())
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    (tracker,) = trackers
    assert tracker.closed  # closed at lifespan.shutdown, with its event delivered
    assert [e["user_id"] for e in django_server.events if e.get("item_id") == "l1"] == [
        "usr_lifespan"
    ]
    assert get_tracker() is not tracker and not get_tracker().closed


# -- real servers, stopped with SIGTERM ---------------------------------------------------


def paths(n: int) -> list[str]:
    """Half sync views, half async views; event ``req_<i>`` for each."""
    return [f"/aview/{i}" if i % 2 else f"/view/{i}" for i in range(n)]


@pytest.mark.anyio
@needs("gunicorn")
@pytest.mark.parametrize(("worker", "preload"), [("sync", False), ("gthread", True)])
async def test_gunicorn_workers_recycled_and_stopped_deliver_every_event_once(
    server: ReferenceServer, worker: str, preload: bool
) -> None:
    """gthread also with --preload: the app (and its tracker) is made in the master, and
    each forked worker starts its own, empty, copy."""
    began = time.monotonic()
    env = {**tracker_env(server), "DJANGO_SETTINGS_MODULE": "shop_django.settings"}
    async with spawn(
        *gunicorn_args(
            "shop_django.wsgi:application",
            "--workers", "2", "--worker-class", worker, "--threads", "4",
            "--max-requests", "50", "--max-requests-jitter", "0", "--graceful-timeout", "20",
            *(["--preload"] if preload else []),
        ),
        env=env,
    ) as proc:  # fmt: skip
        port = await proc.wait_for(r"Listening at: http://127\.0\.0\.1:(\d+)")
        await proc.wait_for(r"Booting worker", count=2)
        await get_all(f"http://127.0.0.1:{port}", paths(REQUESTS))
        shutdown = await proc.stop(signal.SIGTERM)
    assert proc.process.returncode == 0, proc.text
    assert "Traceback" not in proc.text, proc.text
    recycled = proc.text.count("Autorestarting worker")
    assert recycled >= 4, proc.text  # several workers ended by --max-requests
    assert_once(server, (f"req_{i}" for i in range(REQUESTS)))
    report(
        f"django gunicorn {worker}{' --preload' * preload}",
        tracked=REQUESTS,
        delivered=len(server.events),
        recycled=recycled,
        shutdown=shutdown,
        wall=time.monotonic() - began,
    )


@pytest.mark.anyio
@needs("uvicorn")
async def test_uvicorn_workers_stopped_with_sigterm_deliver_every_event_once(
    server: ReferenceServer, tmp_path: Path
) -> None:
    began = time.monotonic()
    env = {**tracker_env(server), "DJANGO_SETTINGS_MODULE": "shop_django.settings"}
    async with spawn(
        "-m", "uvicorn", "shop_django.asgi:application", "--host", "127.0.0.1", "--port", "0",
        "--workers", "2", "--no-access-log", env=env,
    ) as proc:  # fmt: skip
        port = await proc.wait_for(r"Uvicorn running on http://127\.0\.0\.1:(\d+)")
        await proc.wait_for("Application startup complete", count=2)  # with_lifespan
        await get_all(f"http://127.0.0.1:{port}", paths(REQUESTS))
        shutdown = await proc.stop(signal.SIGTERM)
    # uvicorn shuts down gracefully, then may re-raise the signal it caught
    assert proc.process.returncode in (0, -signal.SIGTERM), proc.text
    assert proc.text.count("Application shutdown complete") == 2, proc.text
    assert "Traceback" not in proc.text, proc.text
    assert_once(server, (f"req_{i}" for i in range(REQUESTS)))
    report(
        "django uvicorn",
        tracked=REQUESTS,
        delivered=len(server.events),
        shutdown=shutdown,
        wall=time.monotonic() - began,
    )


README_DJANGO_CHECK = """
import os, sys
import django
from django.test import Client

django.setup()
from django.urls import path

import urls_readme  # noqa: F401  (the README's views under two paths)
from asgi import application  # the README's asgi.py

assert callable(application)
client = Client()
assert client.get("/products/p1").status_code == 200
assert client.post("/cart/p1").status_code == 200
from lehnz_async.django import get_tracker

tracker = get_tracker()
tracker.close()
print("tracked", tracker.stats.tracked, "delivered", tracker.stats.delivered)
"""


@pytest.mark.anyio
async def test_the_readme_django_blocks(tmp_path: Path, server: ReferenceServer) -> None:
    """The README's settings.py, views.py and asgi.py, as written, in a project of their
    own (with what the README leaves to ``# ...``: the auth app, the URLs): a sync and an
    async view track through ``request.lehnz``, and the ASGI wrapper imports."""
    from ..test_readme_blocks import unmarked

    (tmp_path / "settings.py").write_text(
        unmarked("# settings.py")
        + "\n# what the README leaves to `# ...`\n"
        + 'SECRET_KEY = "readme"\nALLOWED_HOSTS = ["testserver"]\nROOT_URLCONF = "urls_readme"\n'
        + 'DATABASES = {}\nSESSION_ENGINE = "django.contrib.sessions.backends.signed_cookies"\n'
        + 'INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.auth",\n'
        + '                  "django.contrib.sessions", *INSTALLED_APPS]\n'
    )
    (tmp_path / "views.py").write_text(unmarked("# views.py"))
    (tmp_path / "asgi.py").write_text(unmarked("# asgi.py: only for ASGI servers"))
    (tmp_path / "urls_readme.py").write_text(
        "from django.urls import path\n\nfrom views import add_to_cart, product\n\n"
        'urlpatterns = [path("products/<str:product_id>", product),\n'
        '               path("cart/<str:product_id>", add_to_cart)]\n'
    )
    env = {
        **tracker_env(server),
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(tmp_path),
        "DJANGO_SETTINGS_MODULE": "settings",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", README_DJANGO_CHECK, cwd=tmp_path, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, out.decode()
    assert "tracked 2 delivered 2" in out.decode()
    assert [e["event_name"] for e in server.events] == ["view", "add_to_cart"]
    assert len({e["user_id"] for e in server.events}) == 1  # one visitor: the session's id
