#!/usr/bin/env bash
# Configures and builds tpd into build/ (Release with debug info, warnings as errors).
# Extra arguments go to cmake's configure step.
set -euo pipefail
cd "$(dirname "$0")/.."
cmake -S . -B build -DTP_WERROR=ON "$@" >/dev/null
cmake --build build -j"$(nproc)"
