#!/bin/sh
# The password file PgBouncer's scram-sha-256 authentication needs (plain passwords: PgBouncer
# then authenticates clients and logs in to the server with them), from the environment; then
# PgBouncer itself, in the foreground.
set -eu
umask 077
printf '"postgres" "%s"\n"app" "%s"\n' "$POSTGRES_PASSWORD" "$APP_PASSWORD" \
    > /tmp/pgbouncer-userlist.txt
exec pgbouncer /etc/pgbouncer/pgbouncer.ini
