#!/usr/bin/env bash
# Install everything the test suite needs, then run it: lint, types, tests.
# Usage: bash tests/run.sh [pytest arguments...]
set -euo pipefail
cd "$(dirname "$0")/.."

# Headless Chromium drives the page test. Debian's package; root installs it.
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "tests/run.sh: installing chromium (Debian package)"
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null
    else
        echo "tests/run.sh: chromium is missing and cannot be installed here;" \
             "the page test will be skipped" >&2
    fi
fi

python3 -m pip install -q --disable-pip-version-check -e '.[test]'

python3 -m ruff check oracle tests bench docs
python3 -m mypy oracle
python3 -m pytest "$@"
