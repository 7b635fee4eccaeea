"""A small Django project for the integration tests, run by gunicorn and uvicorn."""
