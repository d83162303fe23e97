"""Settings: defaults, TOML file, LW_* environment, clear errors, secrets masked."""

from __future__ import annotations

import pytest

from streams.settings import Settings, SettingsError, load_settings


def test_defaults_match_the_architecture() -> None:
    s = load_settings(env={})
    assert s.kafka_bootstrap == "127.0.0.1:9092"
    assert s.clickhouse_url == "chdb://./.layerwatch/store"
    assert s.topic("predictions") == "lw.predictions"


def test_environment_overrides_toml(tmp_path) -> None:
    path = tmp_path / "lw.toml"
    path.write_text('[layerwatch]\nweb_port = 7000\nalpha = 0.01\nkafka_bootstrap = "k:1"\n')
    s = load_settings(env={"LW_WEB_PORT": "7001", "LW_CLICKHOUSE_SECURE": "yes"}, toml_path=path)
    assert (s.web_port, s.alpha, s.kafka_bootstrap, s.clickhouse_secure) == (7001, 0.01, "k:1", True)


def test_bad_value_names_the_variable() -> None:
    with pytest.raises(SettingsError, match=r"LW_WEB_PORT='eighty': not a valid int"):
        load_settings(env={"LW_WEB_PORT": "eighty"})


def test_unknown_toml_key_is_rejected(tmp_path) -> None:
    path = tmp_path / "lw.toml"
    path.write_text("web_prot = 1\n")
    with pytest.raises(SettingsError, match="web_prot"):
        load_settings(env={}, toml_path=path)


def test_secrets_never_in_repr_or_safe_dict() -> None:
    s = load_settings(env={"LW_CLICKHOUSE_PASSWORD": "hunter2", "LW_WEB_TOKEN": "tok-123"})
    assert "hunter2" not in repr(s) and "tok-123" not in repr(s)
    assert "hunter2" not in str(s.safe_dict()) and s.safe_dict()["web_token"] == "***"
    with pytest.raises(SettingsError) as info:
        load_settings(env={"LW_CLICKHOUSE_SECURE": "maybe"})
    assert isinstance(Settings(), Settings) and "maybe" in str(info.value)


@pytest.mark.parametrize("env, message", [
    ({"LW_WINDOW_SIZE_S": "-5"}, r"LW_WINDOW_SIZE_S=-5.0: must be > 0"),
    ({"LW_WINDOW_SIZE_S": "4", "LW_WINDOW_STEP_S": "5"}, r"LW_WINDOW_STEP_S=5.0: must be <= LW_WINDOW_SIZE_S=4.0"),
    ({"LW_WEB_PORT": "65536"}, r"LW_WEB_PORT=65536: must be in \[1, 65535\]"),
    ({"LW_ALPHA": "0"}, r"LW_ALPHA=0.0: must be in \(0, 1\)"),
    ({"LW_ALERT_ADVERSARIAL_SHARE": "-0.1"}, r"LW_ALERT_ADVERSARIAL_SHARE=-0.1: must be in \[0, 1\]"),
    ({"LW_PROBING_SIMILARITY": "1.01"}, r"LW_PROBING_SIMILARITY=1.01"),
    ({"LW_MMD_PERMUTATIONS": "0"}, r"LW_MMD_PERMUTATIONS=0: must be >= 1"),
    ({"LW_WINDOW_MIN_SAMPLES": "300"}, r"LW_WINDOW_MIN_SAMPLES=300: must be <= LW_WINDOW_MAX_SAMPLES=200"),
    ({"LW_KAFKA_SECURITY_PROTOCOL": "TLS"}, r"LW_KAFKA_SECURITY_PROTOCOL='TLS': must be one of PLAINTEXT"),
    ({"LW_CLICKHOUSE_URL": "./store"}, r"LW_CLICKHOUSE_URL: must start with chdb://"),
])
def test_out_of_range_values_name_the_variable(env, message) -> None:
    with pytest.raises(SettingsError, match=message):
        load_settings(env=env)


def test_out_of_range_toml_value_names_the_key_and_file(tmp_path) -> None:
    path = tmp_path / "lw.toml"
    path.write_text("window_size_s = 0\n")
    with pytest.raises(SettingsError, match=rf"window_size_s in {path}=0.0: must be > 0"):
        load_settings(env={}, toml_path=path)


def test_every_numeric_setting_has_a_range() -> None:
    from dataclasses import fields

    from streams.settings import _RANGES

    numeric = {f.name for f in fields(Settings) if f.type in ("int", "float", int, float)}
    assert numeric - set(_RANGES) == set(), "add the new setting's range to streams.settings._RANGES"
    load_settings(env={})  # the defaults are in range
