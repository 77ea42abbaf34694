#!/bin/bash
# One Kafka node of the compose stack (apache/kafka image): KRaft broker and controller,
# SASL/SCRAM-SHA-512 over TLS for clients and between brokers, ACLs enforced
# (StandardAuthorizer, nothing allowed without an ACL).
#
# Reads CLAVE_NODE_ID (1..3) and the compose secrets under /run/secrets: kafka_cluster_id,
# kafka_admin_password (the brokers' own SCRAM user, a super user), kafka_controller_password
# (the controllers' PLAIN listener), kafka_pem (this node's key and certificate chain, PEM) and
# tls_ca. The other principals' SCRAM users are added by the kafka-users job
# (deploy/compose/kafka/users.sh); their ACLs by kafka-provision (deploy/kafka/provision.py).
set -euo pipefail

secret() { cat "/run/secrets/$1"; }
: "${CLAVE_NODE_ID:?set CLAVE_NODE_ID}"
admin_pw=$(secret kafka_admin_password)
controller_pw=$(secret kafka_controller_password)
props=/tmp/server.properties  # a tmpfs: the passwords in it never reach a disk

# A PEM block of a file as a properties value (continuation lines). Kafka reads an
# unencrypted PKCS#8 key only inline (ssl.keystore.key); a PEM key store *file* needs an
# encrypted key and its password.
pem_value() {
  awk -v want="$2" '/^-----BEGIN / { on = index($0, want) > 0 } on { line[n++] = $0 }
    END { for (i = 0; i < n; i++) printf "%s%s\n", line[i], (i < n - 1 ? " \\" : "") }' "$1"
}

umask 077
cat >"$props" <<PROPS
process.roles=broker,controller
node.id=${CLAVE_NODE_ID}
controller.quorum.voters=1@kafka-1:9093,2@kafka-2:9093,3@kafka-3:9093
listeners=INTERNAL://:9092,CONTROLLER://:9093
advertised.listeners=INTERNAL://kafka-${CLAVE_NODE_ID}:9092
inter.broker.listener.name=INTERNAL
controller.listener.names=CONTROLLER
listener.security.protocol.map=INTERNAL:SASL_SSL,CONTROLLER:SASL_SSL

listener.name.internal.sasl.enabled.mechanisms=SCRAM-SHA-512
sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512
listener.name.internal.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="admin" password="${admin_pw}";
listener.name.controller.sasl.enabled.mechanisms=PLAIN
sasl.mechanism.controller.protocol=PLAIN
listener.name.controller.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required username="controller" password="${controller_pw}" user_controller="${controller_pw}";

ssl.keystore.type=PEM
ssl.keystore.key=$(pem_value /run/secrets/kafka_pem "PRIVATE KEY")
ssl.keystore.certificate.chain=$(pem_value /run/secrets/kafka_pem CERTIFICATE)
ssl.truststore.type=PEM
ssl.truststore.location=/run/secrets/tls_ca
ssl.endpoint.identification.algorithm=https
ssl.client.auth=none

authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
allow.everyone.if.no.acl.found=false
super.users=User:admin;User:controller

log.dirs=/var/lib/kafka/data
num.partitions=6
default.replication.factor=3
min.insync.replicas=2
offsets.topic.replication.factor=3
transaction.state.log.replication.factor=3
transaction.state.log.min.isr=2
unclean.leader.election.enable=false
auto.create.topics.enable=false
group.initial.rebalance.delay.ms=3000
PROPS

# Format once (KIP-900): the admin SCRAM user must exist before the brokers can talk to each
# other; --ignore-formatted makes a restart a no-op here.
/opt/kafka/bin/kafka-storage.sh format --ignore-formatted --cluster-id "$(secret kafka_cluster_id)" \
  --config "$props" --add-scram "SCRAM-SHA-512=[name=admin,password=${admin_pw}]"

exec /opt/kafka/bin/kafka-server-start.sh "$props"
