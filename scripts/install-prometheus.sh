#!/usr/bin/env bash
# Install Debian's prometheus package (prometheus and promtool), unless both are on PATH already.
#
#   scripts/install-prometheus.sh && promtool test rules tests/monitoring/*.test.yml
#
# The monitoring tests run a real Prometheus against real workers and `promtool test rules`
# against the alert rules. Installing needs root (apt-get); a later call returns at once. The
# package's own service is never started (scripts/lib/debian-package.sh).
set -euo pipefail

if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
    exit 0
fi
# shellcheck source=lib/debian-package.sh
source "$(dirname "$0")/lib/debian-package.sh"
install_debian_package install-prometheus.sh prometheus prometheus
command -v prometheus >/dev/null && command -v promtool >/dev/null
echo "install-prometheus.sh: $(prometheus --version 2>&1 | head -n 1)" >&2
