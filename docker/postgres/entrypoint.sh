#!/bin/sh
# Entrypoint of both PostgreSQL services (compose.yaml), wrapping the official image's.
#
# UPSTREAM_HOST empty: the official entrypoint initialises a new cluster on the first start
# (init-primary.sh creates the roles) and runs it as a primary.
# UPSTREAM_HOST set and no cluster in $PGDATA yet: clone that server with pg_basebackup
# (-R: standby.signal and primary_conninfo are written; -C -S: a physical replication slot on
# the upstream, so it keeps the WAL this standby has not received), then run it as its
# streaming standby. A volume that already holds a cluster is started as it is.
set -eu

if [ -n "${UPSTREAM_HOST:-}" ] && [ ! -s "$PGDATA/PG_VERSION" ]; then
    tries=0
    until pg_isready -q -h "$UPSTREAM_HOST" -p 5432 -U replicator; do
        tries=$((tries + 1))
        if [ "$tries" -ge 60 ]; then
            echo "entrypoint: $UPSTREAM_HOST:5432 not ready after 60 s" >&2
            exit 1
        fi
        sleep 1
    done
    mkdir -p "$PGDATA"
    chown postgres:postgres "$PGDATA"
    chmod 700 "$PGDATA"
    echo "entrypoint: cloning $UPSTREAM_HOST into $PGDATA (slot ${REPLICATION_SLOT})"
    PGPASSWORD="$REPLICATION_PASSWORD" gosu postgres pg_basebackup \
        --host="$UPSTREAM_HOST" --port=5432 --username=replicator \
        --pgdata="$PGDATA" --wal-method=stream --checkpoint=fast \
        --write-recovery-conf --create-slot --slot="$REPLICATION_SLOT" --progress
fi

exec docker-entrypoint.sh "$@"
