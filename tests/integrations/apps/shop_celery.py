"""A Celery app for the integration tests: each task tracks one event, then records in
Redis that it ran (the set ``ran``), so that a test knows exactly what was tracked.
``LEHNZ_SETUP=factory`` uses ``setup(factory)`` and ``get_tracker()``; otherwise a
module-level ``Tracker`` given to ``setup()`` and used directly."""

import logging
import os

import billiard.pool
import redis
from celery import Celery

from lehnz_async import DeliveryError, Tracker
from lehnz_async.celery import get_tracker, setup

BROKER = os.environ["CELERY_BROKER_URL"]
app = Celery("shop", broker=BROKER)
app.conf.update(task_ignore_result=True, broker_connection_retry_on_startup=True)
logger = logging.getLogger("lehnz_async")
logger.setLevel(logging.DEBUG)  # its "closed the tracker of process N in T s" lines

# Not lehnz_async's: a pool process that ends while the main process is stopping waits for
# the main process to read its last results, 300 x 0.1 s, before it ends (billiard 4.3's
# "ensure messages consumed"); a warm shutdown under load takes 30 s more about every
# other time, with or without lehnz_async. The tests shorten that wait to keep their
# time in check; the hooks under test run after it.
if hasattr(billiard.pool, "GUARANTEE_MESSAGE_CONSUMPTION_RETRY_LIMIT"):
    billiard.pool.GUARANTEE_MESSAGE_CONSUMPTION_RETRY_LIMIT = 10


def report(error: DeliveryError) -> None:
    logger.error("NOT DELIVERED: %d event(s): %r", len(error.events), error)


if os.environ.get("LEHNZ_SETUP") == "factory":  # a tracker made in each process
    setup(lambda: Tracker(on_error=report), shutdown_timeout=float(os.environ["SHUTDOWN_TIMEOUT"]))
else:  # the README's module-level tracker, as the issue tried it, plus setup()
    tracker = Tracker(on_error=report)
    setup(tracker, shutdown_timeout=float(os.environ["SHUTDOWN_TIMEOUT"]))
_ran = redis.Redis.from_url(BROKER)


@app.task(name="track")
def track(i: int) -> None:
    if os.environ.get("LEHNZ_SETUP") == "factory":
        get_tracker().track(f"usr_{i % 97}", "view", item_id=f"task_{i}")
    else:
        tracker.track(f"usr_{i % 97}", "view", item_id=f"task_{i}")
    _ran.sadd("ran", i)
