#!/usr/bin/env bash
# Installs what building and testing tpd needs on Debian 12 (as root, or with sudo).
# Idempotent: packages already present are left as they are.
set -euo pipefail

# curl: the REST tests; libb64-0d: Triton's perf_analyzer (scripts/perf-analyzer.sh); prometheus: its promtool, which
# a test runs on tpd's /metrics
pkgs=(build-essential cmake pkg-config libgrpc-dev libprotobuf-c-dev protobuf-c-compiler
      libopenblas-dev libcjson-dev libmicrohttpd-dev libgnutls28-dev zlib1g-dev libsystemd-dev systemd python3 python3-venv
      clang libclang-rt-14-dev openssl curl libb64-0d prometheus)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
fi
