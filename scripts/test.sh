#!/usr/bin/env bash
# Installs the dependencies, builds tpd and runs every test (unit and integration) with ctest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
python=$(scripts/venv.sh)
scripts/build.sh -DTP_PYTHON="$python"
cd build
ctest --output-on-failure --timeout 600
