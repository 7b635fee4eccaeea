"""Settings of the test shop: no database (sessions in signed cookies), the Lehnz app and
middleware; the tracker's key and endpoint come from LEHNZ_API_KEY and LEHNZ_ENDPOINT."""

SECRET_KEY = "lehnz-async-integration-tests"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1"]
ROOT_URLCONF = "shop_django.urls"
USE_TZ = True
DATABASES: dict[str, dict[str, str]] = {}
INSTALLED_APPS = ["django.contrib.sessions", "lehnz_async.django.LehnzConfig"]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "lehnz_async.django.TrackerMiddleware",
]
SESSION_ENGINE = "django.contrib.sessions.backends.signed_cookies"
LEHNZ = {"flush_interval": 0.5}
