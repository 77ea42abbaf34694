#!/bin/bash
# One-off job of the compose stack (apache/kafka image): give every Clave principal of
# CLAVE_KAFKA_PRINCIPALS its SCRAM-SHA-512 credential, from /run/secrets/kafka_<name>_password.
# Idempotent (a credential is replaced by the same password). Waits for the cluster up to
# CLAVE_WAIT_S seconds.
set -euo pipefail

: "${CLAVE_KAFKA_PRINCIPALS:?set CLAVE_KAFKA_PRINCIPALS}"
bootstrap=${KAFKA_BOOTSTRAP_SERVERS:-kafka-1:9092,kafka-2:9092,kafka-3:9092}
deadline=$((SECONDS + ${CLAVE_WAIT_S:-180}))
config=/tmp/admin.properties  # a tmpfs

umask 077
cat >"$config" <<PROPS
security.protocol=SASL_SSL
sasl.mechanism=SCRAM-SHA-512
sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="admin" password="$(cat /run/secrets/kafka_admin_password)";
ssl.truststore.type=PEM
ssl.truststore.location=/run/secrets/tls_ca
PROPS

configs() { /opt/kafka/bin/kafka-configs.sh --bootstrap-server "$bootstrap" --command-config "$config" "$@"; }

until configs --describe --entity-type brokers --entity-default >/dev/null 2>&1; do
  if ((SECONDS > deadline)); then
    echo "kafka-users: the cluster did not answer within ${CLAVE_WAIT_S:-180} s" >&2
    exit 1
  fi
  sleep 2
done

for name in $CLAVE_KAFKA_PRINCIPALS; do
  [[ $name == admin ]] && continue  # made when the brokers formatted their storage
  # kafka-configs takes the password on its command line: visible only inside this
  # short-lived job container.
  configs --alter --entity-type users --entity-name "$name" \
    --add-config "SCRAM-SHA-512=[iterations=8192,password=$(cat "/run/secrets/kafka_${name}_password")]" >/dev/null
  echo "kafka-users: SCRAM-SHA-512 credential set for $name"
done
