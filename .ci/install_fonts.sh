#!/usr/bin/env bash
# A CJK font for the legend tests (tests/test_fonts.py draws a Chinese class name; without a CJK
# font those cases are skipped). Latin, Greek and Cyrillic come from matplotlib's DejaVu Sans.
set -euo pipefail
if fc-list :lang=zh 2>/dev/null | grep -q .; then
    echo "install_fonts: a CJK font is installed already"
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq fontconfig fonts-droid-fallback >/dev/null
echo "install_fonts: fonts-droid-fallback installed"
