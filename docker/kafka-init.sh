#!/usr/bin/env bash
# Create the pipeline's topics on the compose Kafka, then exit 0 (the kafka-init service).
# Runs inside the apache/kafka image; idempotent (--if-not-exists), so restarts are harmless.
# Topic names and the partition count come from the same variables the services read;
# the defaults are the contract's names (fraudstream/topics.py).
set -euo pipefail

bootstrap="${KAFKA_BOOTSTRAP_SERVERS:-kafka:29092}"
partitions="${TRANSACTIONS_PARTITIONS:-3}"
replication="${TOPIC_REPLICATION_FACTOR:-1}"
topics_bin="${KAFKA_TOPICS_BIN:-/opt/kafka/bin/kafka-topics.sh}"
wanted=(
  "${TRANSACTIONS_TOPIC:-transactions}"
  "${ALERTS_TOPIC:-fraud-alerts}"
  "${DLQ_TOPIC:-transactions-dlq}"
)

if ! [[ "$partitions" =~ ^[1-9][0-9]*$ ]]; then
  echo "kafka-init: TRANSACTIONS_PARTITIONS must be a positive integer, got '$partitions'" >&2
  exit 2
fi

for topic in "${wanted[@]}"; do
  # Alerts and the DLQ are keyed by user like transactions, so all three share the count.
  "$topics_bin" --bootstrap-server "$bootstrap" --create --if-not-exists \
    --topic "$topic" --partitions "$partitions" --replication-factor "$replication"
done
# Rule definitions: one partition (changes apply in the order published), compacted (the newest
# definition per rule_id is the rule). The detector publishes the defaults when it is empty.
rules_topic="${RULES_TOPIC:-fraud-rules}"
"$topics_bin" --bootstrap-server "$bootstrap" --create --if-not-exists \
  --topic "$rules_topic" --partitions 1 --replication-factor "$replication" \
  --config cleanup.policy=compact
wanted+=("$rules_topic")
# Analysts' verdicts, keyed by alert_id: the newest per key is the verdict in force.
verdicts_topic="${VERDICTS_TOPIC:-fraud-verdicts}"
"$topics_bin" --bootstrap-server "$bootstrap" --create --if-not-exists \
  --topic "$verdicts_topic" --partitions "$partitions" --replication-factor "$replication"
wanted+=("$verdicts_topic")

echo "kafka-init: topics on $bootstrap:"
"$topics_bin" --bootstrap-server "$bootstrap" --describe --topic "$(IFS='|'; echo "${wanted[*]}")" \
  | grep -E '^Topic:' || true
