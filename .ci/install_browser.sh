#!/usr/bin/env bash
# What the demo's browser test (tests/test_demo_browser.py) needs from the system: Debian's Chromium.
# Playwright (a pip package of the dev extra) drives it through executable_path=/usr/bin/chromium;
# no browser build is ever downloaded (never run `playwright install`).
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
    echo "install_browser: $(chromium --version 2>/dev/null) already installed"
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq chromium >/dev/null
echo "install_browser: $(chromium --version 2>/dev/null) installed"
