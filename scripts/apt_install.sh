#!/usr/bin/env bash
# Installs one Debian package for a test that needs a real program (never one a test tool would
# download): `apt_install.sh PACKAGE WHAT-FOR`. As root, or through sudo; otherwise says what to
# run and fails. The callers check first whether the program is already there.
set -euo pipefail
package="$1"
why="$2"
sudo=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "[afinar] $package is missing and this user cannot install it: apt-get install $package" >&2; exit 1; }
  sudo="sudo"
fi
echo "[afinar] installing Debian's $package for $why" >&2
$sudo apt-get update -qq >/dev/null 2>&1 || true
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$package" >/dev/null
