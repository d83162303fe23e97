#!/bin/sh
# Create (or update) layerwatch's topics from deploy/kafka/topics.conf.
#
# Runs in the apache/kafka image as the one-shot compose service `kafka-topics`,
# and works against any Kafka cluster with Kafka's CLI tools on the PATH or in
# /opt/kafka/bin:
#
#   KAFKA_BOOTSTRAP=broker:9092 LW_TOPIC_PARTITIONS=4 sh deploy/kafka/create-topics.sh
#
# Environment: KAFKA_BOOTSTRAP (default kafka:9092), LW_TOPIC_PREFIX (default lw.),
# LW_TOPIC_PARTITIONS (default 4), KAFKA_REPLICATION_FACTOR (default 1),
# TOPICS_CONF (default: topics.conf beside this script), KAFKA_COMMAND_CONFIG
# (optional client properties file, e.g. for SASL/SSL).
#
# Idempotent: existing topics get their configs updated. A topic whose partition
# count differs from LW_TOPIC_PARTITIONS is an error (exit 1): the workers declare
# the same count, and adding partitions silently changes which partition a key
# goes to, so that is a decision for the operator.
set -eu

BOOTSTRAP="${KAFKA_BOOTSTRAP:-kafka:9092}"
PREFIX="${LW_TOPIC_PREFIX:-lw.}"
PARTITIONS="${LW_TOPIC_PARTITIONS:-4}"
REPLICATION="${KAFKA_REPLICATION_FACTOR:-1}"
CONF="${TOPICS_CONF:-$(dirname "$0")/topics.conf}"

if [ -x /opt/kafka/bin/kafka-topics.sh ]; then
    BIN=/opt/kafka/bin/
else
    BIN=
fi
set --
if [ -n "${KAFKA_COMMAND_CONFIG:-}" ]; then
    set -- --command-config "$KAFKA_COMMAND_CONFIG"
fi

case "$PARTITIONS" in
    ''|*[!0-9]*|0) echo "create-topics: LW_TOPIC_PARTITIONS=$PARTITIONS is not a positive integer" >&2; exit 2 ;;
esac
[ -r "$CONF" ] || { echo "create-topics: cannot read $CONF" >&2; exit 2; }

# The broker may still be electing its controller right after it reports healthy.
tries=0
until "${BIN}kafka-topics.sh" --bootstrap-server "$BOOTSTRAP" "$@" --list >/dev/null 2>&1; do
    tries=$((tries + 1))
    if [ "$tries" -ge 30 ]; then
        echo "create-topics: no Kafka broker answers at $BOOTSTRAP" >&2
        exit 1
    fi
    sleep 2
done

status=0
while read -r name configs; do
    case "$name" in ''|'#'*) continue ;; esac
    topic="${PREFIX}${name}"
    config_args=""
    alter_list=""
    for kv in $configs; do
        config_args="$config_args --config $kv"
        alter_list="${alter_list:+$alter_list,}$kv"
    done
    # shellcheck disable=SC2086  # config_args is a list of words on purpose
    "${BIN}kafka-topics.sh" --bootstrap-server "$BOOTSTRAP" "$@" --create --if-not-exists \
        --topic "$topic" --partitions "$PARTITIONS" --replication-factor "$REPLICATION" $config_args </dev/null >/dev/null
    if [ -n "$alter_list" ]; then
        "${BIN}kafka-configs.sh" --bootstrap-server "$BOOTSTRAP" "$@" --alter \
            --entity-type topics --entity-name "$topic" --add-config "$alter_list" </dev/null >/dev/null
    fi
    actual=$("${BIN}kafka-topics.sh" --bootstrap-server "$BOOTSTRAP" "$@" --describe --topic "$topic" </dev/null \
        | sed -n 's/.*PartitionCount: *\([0-9][0-9]*\).*/\1/p' | head -n 1)
    if [ "$actual" != "$PARTITIONS" ]; then
        echo "create-topics: $topic has ${actual:-?} partitions but LW_TOPIC_PARTITIONS=$PARTITIONS;" \
             "set LW_TOPIC_PARTITIONS=${actual:-?} or change the topic yourself" \
             "(kafka-topics.sh --alter --partitions N; this remaps keys to partitions)" >&2
        status=1
        continue
    fi
    echo "create-topics: $topic partitions=$PARTITIONS replication=$REPLICATION ${alter_list}"
done < "$CONF"
exit "$status"
