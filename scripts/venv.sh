#!/usr/bin/env bash
# Creates build/venv with what the integration tests use: numpy, safetensors, and NVIDIA's
# tritonclient[grpc] as an independent KServe v2 client. Prints the interpreter's path.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=build/venv
if ! "$venv/bin/python" -c "import numpy, safetensors, tritonclient.grpc" 2>/dev/null; then
    mkdir -p build
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install -q --disable-pip-version-check -r tests/requirements.txt >&2
fi
echo "$PWD/$venv/bin/python"
