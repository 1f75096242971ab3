#!/usr/bin/env bash
# Install Debian's chromium and chromium-driver packages, unless both are on PATH already.
#
#   scripts/install-chromium.sh && make browser
#
# The search page of `vecpipe serve` is tested in a real headless browser, driven by Selenium
# through chromium-driver (`playwright install` would download a browser, which this machine
# cannot). Installing needs root (apt-get); a later call returns at once.
set -euo pipefail

if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    exit 0
fi
# shellcheck source=lib/debian-package.sh
source "$(dirname "$0")/lib/debian-package.sh"
install_debian_package install-chromium.sh chromium chromium
install_debian_package install-chromium.sh chromium-driver chromium-driver
echo "install-chromium.sh: $(chromium --version 2>/dev/null | head -n 1)" >&2
