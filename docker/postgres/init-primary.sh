#!/bin/sh
# Run once by the official image on a new primary's first start (compose.yaml mounts it in
# /docker-entrypoint-initdb.d): the app's role and database, the replication role, and the
# pg_hba.conf line that lets standbys stream (the image's own line, "host all all all", does not
# cover replication connections). A standby cloned from here gets the same roles and file.
set -eu

psql -v ON_ERROR_STOP=1 --username postgres --dbname postgres \
    -v app_password="$APP_PASSWORD" -v replication_password="$REPLICATION_PASSWORD" <<'SQL'
create role app login password :'app_password';
create database app owner app;
create role replicator replication login password :'replication_password';
SQL

echo "host replication replicator all scram-sha-256" >> "$PGDATA/pg_hba.conf"
