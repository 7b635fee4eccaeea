from django.http import JsonResponse
from django.urls import path

from lehnz_async.django import TrackedRequest, auser_id, user_id


def view(request: TrackedRequest, i: int) -> JsonResponse:
    request.lehnz.track(user_id(request), "view", item_id=f"req_{i}")
    return JsonResponse({"i": i})


async def aview(request: TrackedRequest, i: int) -> JsonResponse:
    request.lehnz.track(await auser_id(request), "view", item_id=f"req_{i}")
    return JsonResponse({"i": i})


urlpatterns = [path("view/<int:i>", view), path("aview/<int:i>", aview)]
