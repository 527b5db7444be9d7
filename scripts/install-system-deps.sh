#!/usr/bin/env bash
# System packages the tests need, all from Debian: Chromium (and a font) for the browser tests,
# PostgreSQL for the storage tests (they start their own throwaway server from its binaries),
# espeak-ng for the avatar tests (real speech to play through the avatar).
# Safe to run again: apt-get install leaves what is already there.
set -euo pipefail
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
$SUDO apt-get install -y --no-install-recommends chromium fonts-dejavu-core \
    postgresql espeak-ng redis-server
# Node.js and npm fetch and bundle the published @decartai/sdk for its browser test
# (tests/decart_js.py); Debian's are installed only where there is no npm on the PATH.
if ! command -v npm >/dev/null 2>&1; then
    $SUDO apt-get install -y --no-install-recommends nodejs npm
fi
