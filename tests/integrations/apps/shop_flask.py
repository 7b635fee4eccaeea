"""A small Flask app for the integration tests, made by a factory, run by gunicorn."""

from flask import Flask

from lehnz_async.flask import Lehnz

lehnz = Lehnz()


def create_app() -> Flask:
    app = Flask(__name__)
    app.config["SECRET_KEY"] = "lehnz-async-integration-tests"
    app.config["LEHNZ"] = {"flush_interval": 0.5}  # key and endpoint from the environment
    lehnz.init_app(app)

    @app.get("/view/<int:i>")
    def view(i: int) -> dict[str, int]:
        lehnz.tracker.track(lehnz.user_id(), "view", item_id=f"req_{i}")
        return {"i": i}

    @app.get("/aview/<int:i>")
    async def aview(i: int) -> dict[str, int]:
        lehnz.tracker.track(lehnz.user_id(), "view", item_id=f"req_{i}")
        return {"i": i}

    return app
