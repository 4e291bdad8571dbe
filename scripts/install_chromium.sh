#!/usr/bin/env bash
# The report test opens report.html in a real headless browser: Debian's chromium package (never
# a browser downloaded by a test tool). Does nothing when it is already installed.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then
  exit 0
fi
bash "$(dirname "${BASH_SOURCE[0]}")/apt_install.sh" chromium "the report test"
