#!/usr/bin/env bash
# Install Debian's pgbouncer package (1.18 on bookworm), unless pgbouncer is on PATH already.
#
#   scripts/install-pgbouncer.sh && vecpipe services up --pgbouncer
#
# The integration tests run the pipeline, the writer, search and the database-restart fault a
# second time through a real PgBouncer in transaction pooling mode. Installing needs root
# (apt-get); a later call returns at once. The package's own service is never started
# (scripts/lib/debian-package.sh): the tests and `vecpipe services up --pgbouncer` start their
# own, with their own configuration.
set -euo pipefail

if command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ]; then
    exit 0
fi
# shellcheck source=lib/debian-package.sh
source "$(dirname "$0")/lib/debian-package.sh"
install_debian_package install-pgbouncer.sh pgbouncer pgbouncer
echo "install-pgbouncer.sh: $(/usr/sbin/pgbouncer --version 2>&1 | head -n 1)" >&2
