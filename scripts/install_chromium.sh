#!/usr/bin/env bash
# The report test opens report.html in a real headless browser: Debian's chromium package (never
# a browser downloaded by a test tool). Does nothing when it is already installed.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then
  exit 0
fi
sudo=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "[afinar] chromium is missing and this user cannot install it: apt-get install chromium" >&2; exit 1; }
  sudo="sudo"
fi
echo "[afinar] installing Debian's chromium for the report test" >&2
$sudo apt-get update -qq >/dev/null 2>&1 || true
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
