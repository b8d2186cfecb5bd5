#!/usr/bin/env bash
# Creates build/venv with what the integration tests use: numpy, safetensors, NVIDIA's
# tritonclient[grpc,http] as an independent KServe v2 client, grpcio-reflection's client and grpcurl
# (tests/requirements.txt). Prints the interpreter's path.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=build/venv
# everything tests/requirements.txt brings, so that a venv made before a new line of it is
# brought up to date
if ! "$venv/bin/python" -c "import numpy, safetensors, tritonclient.grpc, tritonclient.http, \
        tritonclient.http.aio, ml_dtypes, h2, \
        grpc_reflection" 2>/dev/null || [ ! -x "$venv/bin/grpcurl" ]; then
    mkdir -p build
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv" >&2
    "$venv/bin/pip" install -q --disable-pip-version-check -r tests/requirements.txt >&2
fi
echo "$PWD/$venv/bin/python"
