"""The kserve SDK's clients against a tpd, run by test_kserve.py with the python of the kserve
venv (scripts/venv-kserve.sh): the kserve package cannot share a process with tritonclient.

    kserve_client.py rest|grpc ADDR MODEL X.npy OUT_DIR

asks for liveness and readiness, then infers X (FP32) once per way the client can send it --
REST: JSON data and binary data; gRPC: raw_input_contents and typed fp32_contents -- and writes
each answer to OUT_DIR/WAY.npy. Prints one JSON line: the health answers and the ids echoed.
A failure raises (non-zero exit, traceback on stderr)."""

import asyncio
import json
import os
import sys

import numpy as np
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig


def request(model, x, way):
    inp = InferInput(name="input", shape=list(x.shape), datatype="FP32")
    if way in ("binary", "raw"):
        inp.set_data_from_numpy(x, binary_data=True)
    else:  # JSON data over REST, typed contents over gRPC
        inp.set_data_from_numpy(x, binary_data=False)
    return InferRequest(model_name=model, infer_inputs=[inp], request_id="kserve-" + way)


async def rest(addr, model, x, out):
    client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
    base = "http://" + addr
    try:
        seen = {"live": await client.is_server_live(base),
                "ready": await client.is_server_ready(base),
                "model_ready": await client.is_model_ready(base, model), "ids": {}}
        for way in ("json", "binary"):
            r = await client.infer(base, request(model, x, way), model_name=model)
            seen["ids"][way] = r.id
            np.save(os.path.join(out, way + ".npy"), r.outputs[0].as_numpy())
        return seen
    finally:
        await client.close()


async def grpc(addr, model, x, out):
    client = InferenceGRPCClient(url=addr, timeout=60)
    try:
        seen = {"live": await client.is_server_live(), "ready": await client.is_server_ready(),
                "model_ready": await client.is_model_ready(model), "ids": {}}
        for way in ("raw", "typed"):
            r = await client.infer(request(model, x, way))
            seen["ids"][way] = r.id
            np.save(os.path.join(out, way + ".npy"), r.outputs[0].as_numpy())
        return seen
    finally:
        await client.close()


def main():
    kind, addr, model, xpath, out = sys.argv[1:6]
    x = np.load(xpath).astype(np.float32)
    seen = asyncio.run((rest if kind == "rest" else grpc)(addr, model, x, out))
    print(json.dumps(seen))


if __name__ == "__main__":
    main()
