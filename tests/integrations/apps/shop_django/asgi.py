import os

from django.core.asgi import get_asgi_application

from lehnz_async.django import with_lifespan

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "shop_django.settings")
application = with_lifespan(get_asgi_application())
