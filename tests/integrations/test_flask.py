"""lehnz_async.flask on the real thing: the app factory in tests/integrations/apps/shop_flask
under gunicorn sync workers recycled by --max-requests, stopped with SIGTERM (every event
arrives exactly once), and the extension's session id and login in Flask's test client."""

from __future__ import annotations

import signal
import sys
import time

import pytest

pytest.importorskip("flask", reason="Flask is not installed: pip install 'lehnz-async[flask]'")

from flask import Flask

from lehnz_async import ConfigurationError, Tracker
from lehnz_async.flask import SESSION_KEY, Lehnz
from lehnz_async.testing import ReferenceServer

from ._procs import assert_once, get_all, gunicorn_args, needs, report, spawn, tracker_env

REQUESTS = 300  # each of the 2 workers is recycled every 50 requests


@pytest.mark.anyio
@needs("gunicorn")
@pytest.mark.skipif(sys.platform == "win32", reason="stops the server with SIGTERM")
async def test_gunicorn_sync_workers_recycled_and_stopped_deliver_every_event_once(
    server: ReferenceServer,
) -> None:
    began = time.monotonic()
    async with spawn(
        *gunicorn_args(
            "shop_flask:create_app()",
            "--workers", "2", "--worker-class", "sync",
            "--max-requests", "50", "--max-requests-jitter", "0", "--graceful-timeout", "20",
        ),
        env=tracker_env(server),
    ) as proc:  # fmt: skip
        port = await proc.wait_for(r"Listening at: http://127\.0\.0\.1:(\d+)")
        await proc.wait_for(r"Booting worker", count=2)
        requests = [f"/aview/{i}" if i % 2 else f"/view/{i}" for i in range(REQUESTS)]
        await get_all(f"http://127.0.0.1:{port}", requests)
        shutdown = await proc.stop(signal.SIGTERM)
    assert proc.process.returncode == 0, proc.text
    assert "Traceback" not in proc.text, proc.text
    recycled = proc.text.count("Autorestarting worker")
    assert recycled >= 4, proc.text
    assert_once(server, (f"req_{i}" for i in range(REQUESTS)))
    report(
        "flask gunicorn sync",
        tracked=REQUESTS,
        delivered=len(server.events),
        recycled=recycled,
        shutdown=shutdown,
        wall=time.monotonic() - began,
    )


def test_the_extension_keeps_an_anonymous_id_in_the_session_and_identifies_at_login(
    threaded_server: ReferenceServer,
) -> None:
    server = threaded_server
    made: list[Tracker] = []

    def make() -> Tracker:
        made.append(Tracker(server.api_key, endpoint=server.url, flush_interval=3600))
        return made[-1]

    lehnz = Lehnz(tracker=make)
    app = Flask(__name__)
    app.config["SECRET_KEY"] = "test"
    lehnz.init_app(app)

    @app.get("/view/<item>")
    async def view(item: str) -> dict[str, str]:  # Flask runs it on a loop of its own
        lehnz.tracker.track(lehnz.user_id(), "view", item_id=item)
        return {"item": item}

    @app.post("/login/<account>")
    def sign_in(account: str) -> dict[str, str]:
        lehnz.login(account)
        return {"account": account}

    client = app.test_client()
    assert client.get("/view/p1").status_code == 200
    assert client.get("/view/p2").status_code == 200
    with client.session_transaction() as session:
        anon = session[SESSION_KEY]
    assert client.post("/login/usr_1").status_code == 200
    with client.session_transaction() as session:
        assert SESSION_KEY not in session
    with app.app_context():
        assert lehnz.tracker is made[0]
        lehnz.close()  # everything settled when it returns
    assert [(e["user_id"], e["event_name"], e.get("previous_user_id")) for e in server.events] == [
        (anon, "view", None),
        (anon, "view", None),
        ("usr_1", "identify", anon),
    ]
    with pytest.raises(ConfigurationError, match="init_app"), Flask("other").app_context():
        _ = lehnz.tracker
