"""A small shop on FastAPI that tracks what its visitors do, with `lehnz_async.asgi`.

Run it from the repository root, with the reference server as the ingestion API::

    lehnz-async serve --port 8080 &
    LEHNZ_API_KEY=lehnz_pk_test \\
    LEHNZ_ENDPOINT=http://127.0.0.1:8080/api/v1/events/ingest \\
        uvicorn examples.fastapi_app:app --port 8000

    curl -c jar -b jar localhost:8000/products/prod_1              # view, anonymous
    curl -c jar -b jar -X POST localhost:8000/cart/prod_1          # add_to_cart, anonymous
    curl -c jar -b jar -X POST localhost:8000/login -H 'content-type: application/json' \\
        -d '{"user_id": "usr_1"}'                                  # identify
    curl -c jar -b jar -X POST localhost:8000/checkout/prod_1      # purchase, as usr_1

Visitors are tracked under an anonymous id kept in a cookie until they sign in; signing
in merges that id into their account (an ``identify`` event), and from then on they are
tracked under their account's id. Stopping the server (Ctrl+C, SIGTERM) sends whatever
is still queued before the process exits.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from pydantic import BaseModel

from lehnz_async import DEFAULT_INGEST_URL, Tracker
from lehnz_async.asgi import ANONYMOUS_ID_COOKIE, anonymous_id, get_tracker, lifespan

# Demo sign-in: a cookie holding the user id. Use your real authentication instead.
USER_COOKIE = "shop_user"

CATALOG = {"prod_1": 49.99, "prod_2": 19.50, "prod_3": 5.00}


def make_tracker() -> Tracker:
    """The app's tracker, made each time the app starts; the key comes from LEHNZ_API_KEY."""
    return Tracker(endpoint=os.environ.get("LEHNZ_ENDPOINT", DEFAULT_INGEST_URL))


@asynccontextmanager
async def shop_lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
    """The lifespan the app had before tracking: it sets up what the endpoints use."""
    yield {"catalog": dict(CATALOG)}


# The tracker starts before shop_lifespan and is flushed and closed after it ends.
app = FastAPI(lifespan=lifespan(make_tracker, app_lifespan=shop_lifespan))

TrackerDep = Annotated[Tracker, Depends(get_tracker)]


async def visitor_id(request: Request, response: Response) -> str:
    """Who is asking: the signed-in user, else an anonymous id kept in a cookie."""
    user = request.cookies.get(USER_COOKIE)
    if user:
        return user
    return anonymous_id(request, response).user_id


VisitorDep = Annotated[str, Depends(visitor_id)]


def price_of(request: Request, product_id: str) -> float:
    catalog: dict[str, float] = request.state.catalog
    try:
        return catalog[product_id]
    except KeyError:
        raise HTTPException(404, f"no product {product_id!r}") from None


@app.get("/products/{product_id}")
async def view_product(
    product_id: str, request: Request, user_id: VisitorDep, tracker: TrackerDep
) -> dict[str, Any]:
    price = price_of(request, product_id)
    tracker.track(user_id, "view", item_id=product_id)
    return {"product_id": product_id, "price": price}


# A plain `def` endpoint runs in FastAPI's thread pool; track() may be called from any
# thread and never blocks, so it is used exactly as in an `async def` endpoint.
@app.post("/cart/{product_id}")
def add_to_cart(
    product_id: str, request: Request, user_id: VisitorDep, tracker: TrackerDep
) -> dict[str, str]:
    price_of(request, product_id)
    tracker.track(user_id, "add_to_cart", item_id=product_id)
    return {"added": product_id}


@app.post("/checkout/{product_id}")
def checkout(
    product_id: str, request: Request, user_id: VisitorDep, tracker: TrackerDep
) -> dict[str, Any]:
    price = price_of(request, product_id)
    tracker.track(user_id, "purchase", item_id=product_id, context={"price": price})
    return {"purchased": product_id, "price": price}


class Login(BaseModel):
    user_id: str


@app.post("/login")
async def login(body: Login, request: Request, response: Response) -> dict[str, str]:
    # `request.state.lehnz_tracker` is what get_tracker returns, without a dependency.
    tracker: Tracker = request.state.lehnz_tracker
    anon = anonymous_id(request)
    if not anon.is_new:
        # what this browser did before signing in now belongs to the account
        tracker.identify(body.user_id, previous_user_id=anon.user_id)
    # Forget the anonymous id: whoever uses this browser after signing out is someone new.
    response.delete_cookie(ANONYMOUS_ID_COOKIE)
    response.set_cookie(USER_COOKIE, body.user_id, httponly=True, samesite="lax")
    return {"user_id": body.user_id}
