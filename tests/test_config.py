"""Key rules and option validation, checked when the Tracker is made."""

from __future__ import annotations

from typing import Any

import pytest

from lehnz_async import DEFAULT_INGEST_URL, ConfigurationError, Tracker


def test_secret_key_is_refused_with_the_reason() -> None:
    with pytest.raises(ConfigurationError, match=r"403.*publishable key \(lehnz_pk_"):
        Tracker("lehnz_sk_live_123")


def test_missing_key_names_the_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LEHNZ_API_KEY", raising=False)
    with pytest.raises(ConfigurationError, match="LEHNZ_API_KEY"):
        Tracker()


def test_key_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEHNZ_API_KEY", "lehnz_pk_from_env")
    assert Tracker()._config.api_key == "lehnz_pk_from_env"


def test_secret_key_from_the_environment_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEHNZ_API_KEY", "lehnz_sk_oops")
    with pytest.raises(
        ConfigurationError, match="LEHNZ_API_KEY environment variable holds a secret"
    ):
        Tracker()


def test_a_malformed_key_is_blamed_on_where_it_came_from(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEHNZ_API_KEY", "lehnz_pk_abc ")  # a stray space from a .env file
    with pytest.raises(ConfigurationError) as raised:
        Tracker()
    assert str(raised.value).startswith(
        "the LEHNZ_API_KEY environment variable is not a well-formed publishable key"
    )
    with pytest.raises(ConfigurationError, match=r"^api_key is not a well-formed"):
        Tracker("lehnz_pk_abc ")


@pytest.mark.parametrize(
    ("typo", "meant"),
    [("flush_intervall", "flush_interval"), ("apikey", "api_key"), ("on_erorr", "on_error")],
)
def test_a_misspelt_option_is_a_configuration_error_with_the_closest_option(
    typo: str, meant: str
) -> None:
    with pytest.raises(ConfigurationError) as raised:
        Tracker("lehnz_pk_test", **{typo: 1.0})
    assert str(raised.value) == f"Tracker() has no option {typo!r}; did you mean {meant!r}?"


def test_an_option_like_no_other_points_at_the_options_table() -> None:
    with pytest.raises(ConfigurationError, match=r"no option 'zzz' \(see the README's options"):
        Tracker("lehnz_pk_test", zzz=1)  # type: ignore[call-arg]


@pytest.mark.parametrize("key", ["", "pk_live_1", "lehnz_pk_abc\n", " lehnz_pk_abc", "lehnz_pk_"])
def test_malformed_keys_are_refused(key: str) -> None:
    with pytest.raises(ConfigurationError):
        Tracker(key)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("max_batch_size", 0),
        ("max_batch_size", 1.5),
        ("max_batch_size", True),
        ("flush_interval", 0),
        ("flush_interval", float("nan")),
        ("request_timeout", -1),
        ("max_concurrent_requests", 0),
        ("max_batch_bytes", 0),
        ("max_queue_size", 10),  # below max_batch_size
        ("endpoint", "ingestion.lehnz.com"),
        ("on_error", "print"),
    ],
)
def test_bad_options_are_refused_with_their_name(option: str, value: Any) -> None:
    with pytest.raises(ConfigurationError, match=option):
        Tracker("lehnz_pk_test", **{option: value})


def test_endpoint_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEHNZ_ENDPOINT", "http://127.0.0.1:8080/api/v1/events/ingest")
    assert Tracker("lehnz_pk_test")._config.endpoint == "http://127.0.0.1:8080/api/v1/events/ingest"
    monkeypatch.delenv("LEHNZ_ENDPOINT")
    assert Tracker("lehnz_pk_test")._config.endpoint == DEFAULT_INGEST_URL


def test_a_capture_tracker_needs_no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LEHNZ_API_KEY", raising=False)
    assert Tracker(capture=True)._config.api_key.startswith("lehnz_pk_")
