"""Kafka client settings and topic management shared by every Kafka client layerwatch makes."""

from __future__ import annotations

from typing import Any

from streams.settings import Settings

#: every topic layerwatch uses, by short name (full name: ``settings.topic(name)``)
TOPICS = ("predictions", "predictions-by-model", "drift", "labels", "alerts", "actions", "dlq", "windows")


def kafka_python_config(settings: Settings) -> dict[str, Any]:
    """Connection keyword arguments for kafka-python clients (security passes through)."""
    config: dict[str, Any] = {
        "bootstrap_servers": [b.strip() for b in settings.kafka_bootstrap.split(",") if b.strip()],
        "security_protocol": settings.kafka_security_protocol,
    }
    if settings.kafka_security_protocol.startswith("SASL"):
        config.update(
            sasl_mechanism=settings.kafka_sasl_mechanism,
            sasl_plain_username=settings.kafka_sasl_username,
            sasl_plain_password=settings.kafka_sasl_password,
        )
    if "SSL" in settings.kafka_security_protocol and settings.kafka_ssl_cafile:
        config["ssl_cafile"] = settings.kafka_ssl_cafile
    return config


def aiokafka_config(settings: Settings) -> dict[str, Any]:
    """The same connection settings for aiokafka clients, which take an SSL context, not a CA file."""
    config = kafka_python_config(settings)
    cafile = config.pop("ssl_cafile", None)
    if "SSL" in settings.kafka_security_protocol:
        import ssl

        config["ssl_context"] = ssl.create_default_context(cafile=cafile)
    return config


def faust_credentials(settings: Settings) -> Any:
    """Faust's ``broker_credentials`` for the same settings (None for PLAINTEXT)."""
    if settings.kafka_security_protocol == "PLAINTEXT":
        return None
    import faust

    context = aiokafka_config(settings).get("ssl_context")
    if settings.kafka_security_protocol.startswith("SASL"):
        return faust.SASLCredentials(username=settings.kafka_sasl_username, password=settings.kafka_sasl_password,
                                     ssl_context=context, mechanism=settings.kafka_sasl_mechanism)
    return context


def ensure_topics(settings: Settings) -> list[str]:
    """Create layerwatch's topics with their final partition count (Tansu cannot add partitions)."""
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import TopicAlreadyExistsError

    names = [settings.topic(t) for t in TOPICS]
    admin = KafkaAdminClient(**kafka_python_config(settings), client_id="layerwatch-admin")
    try:
        existing = set(admin.list_topics())
        missing = [NewTopic(n, settings.topic_partitions, 1) for n in names if n not in existing]
        if missing:
            try:
                admin.create_topics(missing)
            except TopicAlreadyExistsError:
                pass
    finally:
        admin.close()
    return names
