#!/bin/sh
# Kafka's SCRAM-SHA-512 users, one per imstream service (compose.yaml's kafka-users, once the
# brokers are up). It connects as the administrator: the kafka-admin certificate on the brokers'
# internal listener (mutual TLS; a super user by its certificate's name). Idempotent.
set -eu
cat > /tmp/admin.properties <<PROPERTIES
security.protocol=SSL
ssl.keystore.type=PEM
ssl.keystore.location=/etc/imstream/certs/kafka-admin-bundle.pem
ssl.truststore.type=PEM
ssl.truststore.location=/etc/imstream/certs/ca.pem
PROPERTIES
for user in ingress stream-worker cql-sink clickhouse-sink push-sink; do
  variable="KAFKA_$(echo "$user" | tr 'a-z-' 'A-Z_')_PASSWORD"
  password=$(printenv "$variable")
  /opt/kafka/bin/kafka-configs.sh --bootstrap-server kafka-1:9094 \
    --command-config /tmp/admin.properties --alter --entity-type users --entity-name "$user" \
    --add-config "SCRAM-SHA-512=[password=$password]"
done
