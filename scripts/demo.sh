#!/usr/bin/env bash
# Installs, builds, generates a demo layer (1024 -> 4096, bias, F32), serves it with tpd on
# 2 CPU worker processes, and answers a real forward request through tpclient, verified against
# the CPU reference. Leaves nothing running.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
scripts/build.sh
dir=$(mktemp -d)
tpd_pid=
cleanup() {
    [ -n "$tpd_pid" ] && kill -TERM "$tpd_pid" 2>/dev/null && wait "$tpd_pid" || true
    rm -rf "$dir"
}
trap cleanup EXIT
python3 scripts/make_layer.py --in 1024 --out 4096 --rows 8 "$dir/demo"
sock="unix:$dir/tpd.sock"
build/bin/tpd --weights "$dir/demo.safetensors" --cpu 2 --listen "$sock" &
tpd_pid=$!
for _ in $(seq 100); do
    build/bin/tpclient --server "$sock" health >/dev/null 2>&1 && break
    sleep 0.1
done
build/bin/tpclient --server "$sock" metadata
build/bin/tpclient --server "$sock" forward "$dir/demo.x.npy" --verify "$dir/demo.safetensors"
