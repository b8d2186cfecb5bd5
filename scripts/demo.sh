#!/usr/bin/env bash
# Installs, builds, generates a demo layer (1024 -> 4096, bias, F32), serves it with tpd on
# 2 CPU worker processes, and answers a real forward request through tpclient, verified against
# the CPU reference. Leaves nothing running.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
scripts/build.sh
. scripts/lib.sh
python3 scripts/make_layer.py --in 1024 --out 4096 --rows 8 "$tp_dir/demo"
tp_start --weights "$tp_dir/demo.safetensors" --cpu 2
build/bin/tpclient --server "$tp_sock" metadata
build/bin/tpclient --server "$tp_sock" forward "$tp_dir/demo.x.npy" --verify "$tp_dir/demo.safetensors"
