"""One settings object for every layerwatch process.

Values come from, in increasing priority: the defaults below, an optional TOML file
(``LW_CONFIG``, else ``./layerwatch.toml`` when present; keys are the field names,
lower case, optionally under a ``[layerwatch]`` table), and ``LW_<FIELD>`` environment
variables. Secrets are kept out of ``repr`` so they never reach a log line.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

SECRET_FIELDS = frozenset({"kafka_sasl_password", "clickhouse_password", "web_token", "webhook_token",
                           "alertmanager_token", "ground_truth_token"})
#: Fields holding URLs (or comma lists of them) that may embed credentials: shown with those masked.
URL_FIELDS = ("clickhouse_url", "webhook_url", "alertmanager_url", "kafka_bootstrap")


class SettingsError(ValueError):
    """A setting that cannot be parsed; the message names the variable and the value's problem."""


def _secret() -> Any:
    return field(default="", repr=False)


@dataclass(frozen=True)
class Settings:
    """Every tunable of layerwatch; README's "Configuration" table documents each field."""

    # Kafka
    kafka_bootstrap: str = "127.0.0.1:9092"
    kafka_security_protocol: str = "PLAINTEXT"  # PLAINTEXT | SSL | SASL_PLAINTEXT | SASL_SSL
    kafka_sasl_mechanism: str = "PLAIN"
    kafka_sasl_username: str = ""
    kafka_sasl_password: str = _secret()
    kafka_ssl_cafile: str = ""
    topic_prefix: str = "lw."
    topic_partitions: int = 4
    repartition: bool = True  # forward records off their model's home partition (streams/repartition.py)
    # ClickHouse
    clickhouse_url: str = "chdb://./.layerwatch/store"
    clickhouse_user: str = ""
    clickhouse_password: str = _secret()
    clickhouse_secure: bool = False
    clickhouse_ca_certs: str = ""
    # worker
    app_id: str = "layerwatch"
    state_dir: str = "./.layerwatch"
    web_host: str = "127.0.0.1"
    web_port: int = 6066
    web_token: str = _secret()
    agents: str = "all"  # all, ingest or test, or a comma list of: sink, drift, windows, classify, probing, alerts, test
    # model server identities (workers/inference/identity.py)
    client_keys: str = ""  # path of a file of '<key> <client id>' lines (sha256:<hex> keys allowed)
    trust_client_id_header: bool = False  # honour X-Client-Id (only behind your own authenticating proxy)
    require_client_key: bool = False  # every /predict request needs a known API key
    ground_truth_token: str = _secret()  # requests writing X-Attack / X-Truth must carry it
    models: str = ""  # comma allow-list of model ids this worker accepts (empty: all); others are dead-lettered
    sink_batch_records: int = 256
    sink_within_s: float = 0.5
    rebalance_timeout_s: float = 2.0
    lag_interval_s: float = 10.0  # how often the consumer-lag gauge is refreshed
    torch_threads: int = 1  # torch intra-op and numpy BLAS threads (0: the libraries' defaults)
    # codec limits
    max_record_bytes: int = 32 * 1024 * 1024
    max_batch_rows: int = 65_536
    max_dim: int = 16_384
    max_event_skew_s: float = 5.0  # event times further ahead of their Kafka record's timestamp are clamped to it
    # windows and tests
    window_size_s: float = 10.0
    window_step_s: float = 5.0
    window_max_samples: int = 200
    window_min_samples: int = 50
    window_count_trigger: int = 0  # slow models: events of too-small windows are carried over and tested once this many arrived (0: off)
    window_lateness_s: float = 1.0  # a window closes when its model's newest event is this far past its end
    reference_max: int = 1000
    reference_bootstrap: int = 0  # a model version with no reference gets one from its first N live events (0: off)
    mmd_permutations: int = 200
    detection_repeats: int = 100
    detection_m: int = 100
    alpha: float = 0.05
    top_k: int = 20
    shift_adjust: bool = False  # LADIS shift_adjust: sample the reference by the window's predicted-class mix
    max_window_bytes: int = 8 * 1024 * 1024  # a window published to lw.windows is sampled down to fit
    test_batch_windows: int = 16  # windows a test worker takes per step
    drift_layers: str = "penultimate"  # layers the window test uses: all, or a comma list (the detector uses every layer)
    drift_batch: int = 32  # closed windows tested together (MMD GEMMs stacked across models)
    mmd_kernel: str = "median"  # the worker's MMD kernel: median (one bandwidth, raw features) or ladis
    drift_test: str = "mmd"  # the window test: mmd, or package.module:factory (docs/architecture.md)
    hidden_attack_tests: bool = True  # count test of flagged events and heavy-client tests per window
    event_flag_rate: float = 0.02  # the per-event score's threshold flags this share of clean events
    count_alpha: float = 0.001  # a window's count (or a heavy client's) test is positive at p <= this
    client_min_events: int = 20  # a client with this many sampled events in a window is tested alone
    # alerts
    alert_detection_rate: float = 0.5
    alert_consecutive: int = 2
    alert_clear_windows: int = 2
    alert_adversarial_share: float = 0.3
    alert_sinks: str = "kafka,webhook,alertmanager"  # comma list: kafka, webhook, alertmanager, or package.module:factory
    webhook_url: str = ""
    webhook_format: str = "json"  # json (the Alert record) or slack (incoming-webhook text + blocks)
    webhook_attempts: int = 5
    webhook_token: str = _secret()
    webhook_timeout_s: float = 5.0
    alertmanager_url: str = ""  # base URL of an Alertmanager (http://host:9093); the sink posts to /api/v2/alerts
    alertmanager_resend_s: float = 60.0  # open alerts are re-pushed this often (they expire after 4x without)
    alertmanager_attempts: int = 5
    alertmanager_timeout_s: float = 5.0
    alertmanager_token: str = _secret()  # bearer token, when a proxy in front of Alertmanager asks for one
    alertmanager_generator_url: str = ""  # link shown in Alertmanager (e.g. this worker's dashboard)
    # probing
    probing_similarity: float = 0.98
    probing_min_queries: int = 20
    probing_window_s: float = 30.0
    probing_throttle_s: float = 60.0
    probing_max_clients: int = 100_000  # (model, client) pairs tracked; the least recently seen are forgotten
    probing_buffer_rows: int = 1 << 20  # shared ring of recent queries (all models): at most ~150 MiB
    # classifier
    classifier_path: str = ""  # default: <state_dir>/classifier/classifier.skops

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir)

    @property
    def known_models(self) -> frozenset[str] | None:
        """The model ids allowed by ``models`` (None: every model)."""
        names = frozenset(m.strip() for m in self.models.split(",") if m.strip())
        return names or None

    def topic(self, name: str) -> str:
        """Full topic name for a short name such as 'predictions'."""
        return f"{self.topic_prefix}{name}"

    @property
    def classifier_file(self) -> Path:
        """``classifier_path``, or its default ``<state_dir>/classifier/classifier.skops``."""
        return Path(self.classifier_path) if self.classifier_path else self.state_path / "classifier" / "classifier.skops"

    def secret_values(self) -> list[str]:
        """Every secret value these settings hold: the secret fields and the credentials inside URLs."""
        from streams.secrets import url_secrets

        values = [str(getattr(self, name) or "") for name in SECRET_FIELDS]
        for name in URL_FIELDS:
            for url in str(getattr(self, name) or "").split(","):
                values.extend(url_secrets(url.strip()))
        return [v for v in values if v]

    def safe_dict(self) -> dict[str, Any]:
        """The effective settings with secrets masked, for logs and `layerwatch config`: secret
        fields read ``***``, URLs lose their passwords and credential query values, and
        defaults derived from other settings (``classifier_path``) show their value."""
        from streams.secrets import mask

        out = dataclasses.asdict(self)
        out["classifier_path"] = str(self.classifier_file)
        for k in URL_FIELDS:
            out[k] = mask(out[k])
        return {k: ("***" if k in SECRET_FIELDS and v else v) for k, v in out.items()}

    def __repr__(self) -> str:
        return "Settings(" + ", ".join(f"{k}={v!r}" for k, v in self.safe_dict().items()) + ")"

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)


def _convert(name: str, raw: Any, kind: type) -> Any:
    if isinstance(raw, kind) and not (kind is int and isinstance(raw, bool)):
        return raw
    text = str(raw).strip()
    try:
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError("expected true or false")
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
    except ValueError as exc:
        shown = "***" if name in SECRET_FIELDS else repr(text)
        raise SettingsError(f"LW_{name.upper()}={shown}: not a valid {kind.__name__} ({exc})") from None
    return text


def load_settings(env: Mapping[str, str] | None = None, toml_path: str | os.PathLike | None = None) -> Settings:
    """Build Settings from defaults, the optional TOML file and LW_* environment variables."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    path = toml_path or env.get("LW_CONFIG") or ("layerwatch.toml" if Path("layerwatch.toml").exists() else None)
    if path:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SettingsError(f"config file {path}: {exc}") from None
        values.update(data.get("layerwatch", data))
    types = {f.name: f.type for f in fields(Settings)}
    kinds = {"str": str, "int": int, "float": float, "bool": bool}
    for key in types:
        env_key = f"LW_{key.upper()}"
        if env_key in env:
            values[key] = env[env_key]
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise SettingsError(f"unknown setting(s) in {path}: {', '.join(unknown)}")
    parsed = {k: _convert(k, v, kinds[types[k]]) for k, v in values.items()}
    settings = Settings(**parsed)
    check_ranges(settings, source={k: (f"LW_{k.upper()}" if f"LW_{k.upper()}" in env else f"{k} in {path}")
                                   for k in values})
    return settings


# (low, high, low inclusive, high inclusive); None: unbounded on that side.
_RANGES: dict[str, tuple[float | None, float | None, bool, bool]] = {
    "topic_partitions": (1, None, True, True),
    "web_port": (1, 65535, True, True),
    "sink_batch_records": (1, None, True, True),
    "sink_within_s": (0, None, False, True),
    "rebalance_timeout_s": (0, None, False, True),
    "lag_interval_s": (0, None, False, True),
    "max_event_skew_s": (0, None, True, True),
    "max_window_bytes": (1, None, True, True),
    "test_batch_windows": (1, None, True, True),
    "alertmanager_resend_s": (0, None, False, True),
    "alertmanager_attempts": (1, None, True, True),
    "alertmanager_timeout_s": (0, None, False, True),
    "torch_threads": (0, None, True, True),
    "max_record_bytes": (1, None, True, True),
    "max_batch_rows": (1, None, True, True),
    "max_dim": (1, None, True, True),
    "window_size_s": (0, None, False, True),
    "window_step_s": (0, None, False, True),
    "window_max_samples": (2, None, True, True),
    "window_min_samples": (2, None, True, True),
    "window_count_trigger": (0, None, True, True),
    "window_lateness_s": (0, None, True, True),
    "reference_max": (2, None, True, True),
    "reference_bootstrap": (0, None, True, True),
    "mmd_permutations": (1, None, True, True),
    "detection_repeats": (1, None, True, True),
    "detection_m": (2, None, True, True),
    "alpha": (0, 1, False, False),
    "top_k": (0, None, True, True),
    "alert_detection_rate": (0, 1, True, True),
    "alert_consecutive": (1, None, True, True),
    "alert_clear_windows": (1, None, True, True),
    "alert_adversarial_share": (0, 1, True, True),
    "webhook_attempts": (1, None, True, True),
    "webhook_timeout_s": (0, None, False, True),
    "probing_similarity": (0, 1, True, True),
    "probing_min_queries": (1, None, True, True),
    "probing_window_s": (0, None, False, True),
    "probing_throttle_s": (0, None, True, True),
    "probing_max_clients": (1, None, True, True),
    "probing_buffer_rows": (256, None, True, True),
    "drift_batch": (1, None, True, True),
    "event_flag_rate": (0, 0.5, False, True),
    "count_alpha": (0, 1, False, False),
    "client_min_events": (2, None, True, True),
}

_CHOICES: dict[str, tuple[str, ...]] = {
    "kafka_security_protocol": ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"),
    "webhook_format": ("json", "slack"),
}


def _range_text(low: float | None, high: float | None, low_in: bool, high_in: bool) -> str:
    if high is None:
        return f"{'>=' if low_in else '>'} {low:g}"
    return f"in {'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"


def check_ranges(settings: Settings, source: Mapping[str, str] | None = None) -> None:
    """Raise SettingsError naming the variable when a value is out of its range (e.g. LW_WINDOW_SIZE_S <= 0)."""
    source = source or {}

    def name(key: str) -> str:
        return source.get(key, f"LW_{key.upper()}")

    for key, (low, high, low_in, high_in) in _RANGES.items():
        value = getattr(settings, key)
        ok = ((low is None or (value >= low if low_in else value > low))
              and (high is None or (value <= high if high_in else value < high)))
        if not ok:
            raise SettingsError(f"{name(key)}={value!r}: must be {_range_text(low, high, low_in, high_in)}")
    for key, allowed in _CHOICES.items():
        if getattr(settings, key) not in allowed:
            raise SettingsError(f"{name(key)}={getattr(settings, key)!r}: must be one of {', '.join(allowed)}")
    if settings.window_step_s > settings.window_size_s:
        raise SettingsError(f"{name('window_step_s')}={settings.window_step_s!r}: must be <= "
                            f"{name('window_size_s')}={settings.window_size_s!r} (windows would leave gaps)")
    if settings.window_min_samples > settings.window_max_samples:
        raise SettingsError(f"{name('window_min_samples')}={settings.window_min_samples!r}: must be <= "
                            f"{name('window_max_samples')}={settings.window_max_samples!r}")
    scheme = settings.clickhouse_url.split("://", 1)[0].lower() if "://" in settings.clickhouse_url else ""
    if scheme not in ("chdb", "clickhouse", "clickhouses"):
        raise SettingsError(f"{name('clickhouse_url')}: must start with chdb://, clickhouse:// or clickhouses://")
