"""A Lambda function for awslambdaric (``python -m awslambdaric lambda_app.handler``), run
by tests/integrations/test_aws_lambda.py against a Runtime API endpoint of its own.

Each invocation's event is ``{"events": [{"user": ..., "item": ...}, ...], "raise": bool}``;
the handler tracks them (then raises if asked to) and answers with its process id and
the tracker's stats as the invocation began (so the next answer shows how the previous
flush went)."""

from __future__ import annotations

import os
from typing import Any

from lehnz_async import Tracker
from lehnz_async.aws_lambda import lehnz_handler


def make_tracker() -> Tracker:
    # flush_interval of a minute: what reaches the server is what the wrapper flushed
    return Tracker(spool_path=os.environ["LEHNZ_SPOOL_PATH"], flush_interval=60.0)


@lehnz_handler(make_tracker)
def handler(event: dict[str, Any], context: Any, tracker: Tracker) -> dict[str, Any]:
    stats = tracker.stats
    for e in event["events"]:
        tracker.track(e["user"], "view", item_id=e["item"])
    if event.get("raise"):
        raise RuntimeError("the handler failed after tracking")
    return {
        "pid": os.getpid(),
        "stats": {
            "tracked": stats.tracked,
            "delivered": stats.delivered,
            "retries": stats.retries,
            "outages": stats.outages,
            "spooled": stats.spooled,
            "requests": stats.requests,
        },
        "remaining_ms": context.get_remaining_time_in_millis(),
    }
