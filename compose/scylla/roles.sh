#!/bin/sh
# ScyllaDB's roles (compose.yaml's scylla-roles, once the cluster is up): an administrator of our
# own replaces the built-in cassandra/cassandra superuser, which loses its login; the application
# role `imstream` may create keyspaces (it owns what it creates: the serving keyspace and its
# rebuilds) and nothing else. Idempotent: a second run finds the administrator and goes on.
set -eu
export SSL_CERTFILE=/etc/imstream/certs/ca.pem SSL_VALIDATE=true
cql() { cqlsh --ssl -u "$1" -p "$2" scylla-1 9042 -e "$3"; }

if ! cql admin "$SCYLLA_ADMIN_PASSWORD" "SELECT release_version FROM system.local" >/dev/null 2>&1; then
  cql cassandra cassandra "CREATE ROLE IF NOT EXISTS admin WITH PASSWORD = '$SCYLLA_ADMIN_PASSWORD' AND SUPERUSER = true AND LOGIN = true"
fi
cql admin "$SCYLLA_ADMIN_PASSWORD" "ALTER ROLE cassandra WITH LOGIN = false"
cql admin "$SCYLLA_ADMIN_PASSWORD" "CREATE ROLE IF NOT EXISTS imstream WITH PASSWORD = '$SCYLLA_IMSTREAM_PASSWORD' AND LOGIN = true"
cql admin "$SCYLLA_ADMIN_PASSWORD" "ALTER ROLE imstream WITH PASSWORD = '$SCYLLA_IMSTREAM_PASSWORD'"
cql admin "$SCYLLA_ADMIN_PASSWORD" "GRANT CREATE ON ALL KEYSPACES TO imstream"
echo "scylla roles: admin (superuser), imstream (creates and owns its keyspaces)"
