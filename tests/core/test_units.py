"""Human units of the cache settings: sizes and durations parse to bytes and seconds, a
malformed value is refused naming itself and the accepted forms, and the cache settings
take them from every layer, blaming a bad one on its source."""

from __future__ import annotations

import os

import pytest

from mstar.config import ConfigError
from mstar.config.settings import layered_settings
from mstar.config.units import format_size, parse_duration, parse_size


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.upper().startswith("MSTAR_")]:
        monkeypatch.delenv(name)


@pytest.mark.parametrize(("text", "expected"), [
    ("0", 0), (1234, 1234), ("512B", 512), ("50GB", 50 * 10**9), ("50gb", 50 * 10**9),
    ("1.5 KB", 1500), ("2KiB", 2048), ("1MiB", 2**20), ("3GiB", 3 * 2**30),
    ("1TiB", 2**40), ("2TB", 2 * 10**12), ("7MB", 7 * 10**6), (" 10 ", 10)])
def test_sizes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("90", 90.0), (30, 30.0), ("90s", 90.0), ("30m", 1800.0), ("1h", 3600.0),
    ("1.5H", 5400.0), ("7d", 7 * 86400.0), ("2w", 14 * 86400.0), (".5m", 30.0)])
def test_durations(text, expected):
    assert parse_duration(text) == expected


@pytest.mark.parametrize("bad", ["lots", "50XB", "GB", "-1GB", "", "1e3", "5 G B", -3,
                                 float("nan"), True])
def test_a_malformed_size_names_itself_and_the_accepted_forms(bad):
    with pytest.raises(ValueError) as info:
        parse_size(bad)
    assert repr(bad) in str(info.value) and "KiB" in str(info.value)


@pytest.mark.parametrize("bad", ["soon", "7days", "1y", "h", "-5s", float("inf")])
def test_a_malformed_duration_names_itself_and_the_accepted_forms(bad):
    with pytest.raises(ValueError) as info:
        parse_duration(bad)
    assert repr(bad) in str(info.value) and "7d" in str(info.value)


@pytest.mark.parametrize("count", [0, 999, 1500, 2 * 10**9, 123_456_789_000])
def test_formatted_sizes_read_back_within_their_rounding(count):
    assert abs(parse_size(format_size(count)) - count) <= max(1, count // 1000)


def test_cache_settings_take_human_units_from_every_layer(monkeypatch):
    monkeypatch.setenv("MSTAR_CACHE_MIN_FREE_SPACE", "20GiB")
    settings = layered_settings(
        {"cache_max_size": "50GB"},
        {"cache_unused_threshold": "7d", "cache_check_interval": "30m", "cache_max_models": 3,
         "cache_max_size": "1TB", "cache_gc": True})
    assert (settings.cache_max_size, settings.cache_min_free_space) == (50 * 10**9, 20 * 2**30)
    assert (settings.cache_unused_threshold, settings.cache_check_interval) == (
        7 * 86400.0, 1800.0)
    policy = settings.eviction_policy()
    assert (policy.max_size_bytes, policy.min_free_space_bytes, policy.unused_threshold,
            policy.max_models, policy.check_interval) == (
        50 * 10**9, 20 * 2**30, 7 * 86400.0, 3, 1800.0)
    assert settings.cache_gc


def test_cache_settings_default_to_no_limits_and_an_hourly_check():
    settings = layered_settings({})
    assert (settings.cache_max_size, settings.cache_min_free_space,
            settings.cache_unused_threshold, settings.cache_max_models) == (None,) * 4
    assert settings.cache_check_interval == 3600.0 and not settings.cache_gc


@pytest.mark.parametrize(("cli", "env", "yaml_section", "blamed"), [
    ({}, {}, {"cache_unused_threshold": "soon"}, "server.cache_unused_threshold: "),
    ({}, {"MSTAR_CACHE_MAX_SIZE": "lots"}, {}, "MSTAR_CACHE_MAX_SIZE: "),
    ({"cache_check_interval": "hourly"}, {}, {}, "--cache-check-interval: "),
    ({}, {}, {"cache_check_interval": "0s"}, "server.cache_check_interval: "),
    ({}, {}, {"cache_max_models": 0}, "server.cache_max_models: "),
])
def test_a_malformed_cache_setting_is_blamed_on_its_source(cli, env, yaml_section, blamed,
                                                           monkeypatch):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        layered_settings(cli, yaml_section)
    assert len(info.value.problems) == 1 and info.value.problems[0].startswith(blamed)
