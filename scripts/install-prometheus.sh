#!/usr/bin/env bash
# Install Debian's prometheus package (prometheus and promtool), unless both are on PATH already.
#
#   scripts/install-prometheus.sh && promtool test rules tests/monitoring/*.test.yml
#
# The monitoring tests run a real Prometheus against real workers and `promtool test rules`
# against the alert rules. Installing needs root (apt-get); a later call returns at once. The
# package's own service is never started: a temporary policy-rc.d refuses it, as in containers.
set -euo pipefail

if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "install-prometheus.sh: prometheus and promtool are not on PATH and installing them" \
         "needs root; run 'sudo apt-get install --no-install-recommends prometheus' (Debian," \
         "Ubuntu) or put both binaries on PATH." >&2
    exit 1
fi

# policy-rc.d is what invoke-rc.d and deb-systemd-invoke ask before starting a service: exit
# 101 means "not now". Only ours is removed again; one already there is left as it was.
policy=/usr/sbin/policy-rc.d
ours=""
if [ ! -e "${policy}" ]; then
    printf '#!/bin/sh\nexit 101\n' > "${policy}"
    chmod 755 "${policy}"
    ours=1
fi
cleanup() { if [ -n "${ours}" ]; then rm -f "${policy}"; fi; }
trap cleanup EXIT

echo "install-prometheus.sh: installing Debian's prometheus package (apt-get)..." >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >&2
apt-get install -y -qq --no-install-recommends prometheus >&2

# Were the service started anyway (no policy honoured), stop it: the tests start their own.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
    systemctl stop prometheus >&2 || true
elif [ -x /etc/init.d/prometheus ] && /etc/init.d/prometheus status >/dev/null 2>&1; then
    /etc/init.d/prometheus stop >&2 || true
fi
command -v prometheus >/dev/null && command -v promtool >/dev/null
echo "install-prometheus.sh: $(prometheus --version 2>&1 | head -n 1)" >&2
