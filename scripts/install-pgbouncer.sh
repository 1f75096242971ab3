#!/usr/bin/env bash
# Install Debian's pgbouncer package (1.18 on bookworm), unless pgbouncer is on PATH already.
#
#   scripts/install-pgbouncer.sh && vecpipe services up --pgbouncer
#
# The integration tests run the pipeline, the writer, search and the database-restart fault a
# second time through a real PgBouncer in transaction pooling mode. Installing needs root
# (apt-get); a later call returns at once. The package's own service is never started: the
# tests and `vecpipe services up --pgbouncer` start their own, with their own configuration.
set -euo pipefail

if command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ]; then
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "install-pgbouncer.sh: pgbouncer is not installed and installing it needs root; run" \
         "'sudo apt-get install --no-install-recommends pgbouncer' (Debian, Ubuntu) or put a" \
         "pgbouncer binary on PATH." >&2
    exit 1
fi

# policy-rc.d exit 101 tells invoke-rc.d "not now"; only ours is removed again.
policy=/usr/sbin/policy-rc.d
ours=""
if [ ! -e "${policy}" ]; then
    printf '#!/bin/sh\nexit 101\n' > "${policy}"
    chmod 755 "${policy}"
    ours=1
fi
cleanup() { if [ -n "${ours}" ]; then rm -f "${policy}"; fi; }
trap cleanup EXIT

echo "install-pgbouncer.sh: installing Debian's pgbouncer package (apt-get)..." >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >&2
apt-get install -y -qq --no-install-recommends pgbouncer >&2

if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet pgbouncer 2>/dev/null; then
    systemctl stop pgbouncer >&2 || true
elif [ -x /etc/init.d/pgbouncer ] && /etc/init.d/pgbouncer status >/dev/null 2>&1; then
    /etc/init.d/pgbouncer stop >&2 || true
fi
echo "install-pgbouncer.sh: $(/usr/sbin/pgbouncer --version 2>&1 | head -n 1)" >&2
