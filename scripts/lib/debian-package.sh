# Sourced by the install-*.sh scripts: install one Debian package without starting its service.
#
#   install_debian_package SCRIPT PACKAGE SERVICE
#
# Needs root (apt-get). policy-rc.d exit 101 tells invoke-rc.d "not now", as in containers; only
# a policy-rc.d of our own is removed again. Were the service started anyway (no policy
# honoured), it is stopped: vecpipe's tests and `vecpipe services` start their own.

install_debian_package() {
    local script="$1" package="$2" service="$3"
    if [ "$(id -u)" -ne 0 ]; then
        echo "${script}: ${package} is not installed and installing it needs root; run" \
             "'sudo apt-get install --no-install-recommends ${package}' (Debian, Ubuntu) or put" \
             "its binaries on PATH." >&2
        return 1
    fi
    local policy=/usr/sbin/policy-rc.d ours=""
    if [ ! -e "${policy}" ]; then
        printf '#!/bin/sh\nexit 101\n' > "${policy}"
        chmod 755 "${policy}"
        ours=1
    fi
    echo "${script}: installing Debian's ${package} package (apt-get)..." >&2
    local status=0
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${package}" >&2 || status=$?
    if [ -n "${ours}" ]; then rm -f "${policy}"; fi
    [ "${status}" -eq 0 ] || return "${status}"
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "${service}" 2>/dev/null; then
        systemctl stop "${service}" >&2 || true
    elif [ -x "/etc/init.d/${service}" ] && "/etc/init.d/${service}" status >/dev/null 2>&1; then
        "/etc/init.d/${service}" stop >&2 || true
    fi
}
