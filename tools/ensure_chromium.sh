#!/usr/bin/env bash
# tests/test_ui_browser.py drives Debian's chromium (Playwright cannot download browsers here).
# Install it when it is missing (as root, or through sudo); fail loudly if that fails.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then exit 0; fi
echo "installing chromium for the browser test (apt-get)"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
/usr/bin/chromium --version
