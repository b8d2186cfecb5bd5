"""Writes the seed corpus of the fuzz targets into tests/fuzz/corpus/<target>/: valid inputs of
every kind each parser accepts, and a few near misses, under names that say what they are. The
files named by a SHA-1 beside them are inputs the fuzzers found that add coverage (merged in with
`fuzz_<target> -merge=1 NEW tests/fuzz/corpus/<target> RUN_CORPUS`); this script leaves them
alone. Inputs that once crashed a target go to tests/fuzz/regress/<target>/ by hand.

    python tests/fuzz/make_corpus.py      (needs numpy and tritonclient[grpc])
"""

import io
import json
import os
import struct

import numpy as np
from tritonclient.grpc import service_pb2 as pb

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = os.path.join(HERE, "..", "data", "seed")


def put(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def infer_request(rows=2, in_=3, model="lin", version="", raw=True, name="input",
                  dtype="FP32", outputs=("output",), shape=None, nraw=1):
    r = pb.ModelInferRequest(model_name=model, model_version=version, id="r1")
    t = r.inputs.add(name=name, datatype=dtype, shape=shape or [rows, in_])
    x = np.arange(rows * in_, dtype=np.float32)
    if raw:
        for _ in range(nraw):
            r.raw_input_contents.append(x.tobytes())
    else:
        t.contents.fp32_contents.extend(x.tolist())
    for o in outputs:
        r.outputs.add(name=o)
    return r.SerializeToString()


def infer():
    put("infer", "raw-2x3", infer_request())
    put("infer", "raw-4x3-v1", infer_request(rows=4, version="1"))
    put("infer", "typed-1x3", infer_request(rows=1, raw=False))
    put("infer", "no-outputs", infer_request(outputs=()))
    put("infer", "bad-model", infer_request(model="other"))
    put("infer", "bad-version", infer_request(version="7"))
    put("infer", "bad-name", infer_request(name="x"))
    put("infer", "bad-dtype", infer_request(dtype="FP16"))
    put("infer", "raw-3", infer_request(rows=1, shape=[3]))
    put("infer", "raw-1x2x3", infer_request(shape=[1, 2, 3]))
    put("infer", "raw-2x1x2x3", infer_request(rows=4, shape=[2, 1, 2, 3]))
    put("infer", "bad-shape-5d", infer_request(shape=[1, 1, 1, 2, 3]))
    put("infer", "zero-dim-3d", infer_request(shape=[2, 0, 3]))
    put("infer", "too-many-rows", infer_request(rows=5))
    put("infer", "negative-rows", infer_request(shape=[-1, 3]))
    put("infer", "two-raw", infer_request(nraw=2))
    # strings that are not proto3 strings: a NUL inside, bytes that are not UTF-8 (protobuf will
    # not serialize those, so they replace a placeholder of the same length)
    put("infer", "dtype-nul", infer_request(dtype="FP32\0junk"))
    put("infer", "model-nul", infer_request(model="lin\0"))
    put("infer", "id-not-utf8", infer_request().replace(b"\x1a\x02r1", b"\x1a\x02\xff\xfe"))
    put("infer", "name-overlong-nul",
        infer_request(name="inpuXX").replace(b"inpuXX", b"inpu\xc0\x80"))
    put("infer", "short-raw", infer_request()[:-5])
    put("infer", "empty", b"")


def npy_bytes(a, version=None):
    buf = io.BytesIO()
    if version is None:
        np.save(buf, a)
    else:
        np.lib.format.write_array(buf, a, version=version)
    return buf.getvalue()


def npy():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    put("npy", "f32-2x3", npy_bytes(x))
    put("npy", "f16-3", npy_bytes(np.arange(3, dtype=np.float16)))
    put("npy", "f64-2x2", npy_bytes(np.eye(2)))
    put("npy", "f32-scalar", npy_bytes(np.float32(1.5)))
    put("npy", "f32-empty", npy_bytes(np.zeros((0, 4), np.float32)))
    put("npy", "v2", npy_bytes(x, version=(2, 0)))
    put("npy", "v3", npy_bytes(x, version=(3, 0)))
    put("npy", "fortran", npy_bytes(np.asfortranarray(np.ones((2, 3), np.float32))))
    put("npy", "big-endian", npy_bytes(x.astype(">f4")))
    put("npy", "int32", npy_bytes(np.arange(4, dtype=np.int32)))
    put("npy", "int64", npy_bytes(np.arange(4, dtype="<i8")))
    bits = np.arange(0x3f80, 0x3f80 + 24, dtype=np.uint16).reshape(2, 3, 4)
    put("npy", "bf16-void", npy_bytes(bits.view("V2")))  # '|V2', plain NumPy
    put("npy", "bf16-ml-dtypes", npy_bytes(bits.view("V2")).replace(b"'|V2'", b"'<V2'"))
    put("npy", "bf16-fortran", npy_bytes(np.asfortranarray(bits).view("V2")))
    put("npy", "fortran-3d", npy_bytes(np.asfortranarray(np.arange(24, dtype=np.float32)
                                                          .reshape(2, 3, 4))))
    put("npy", "f16-fortran-4d", npy_bytes(np.asfortranarray(np.ones((2, 1, 3, 2), np.float16))))
    put("npy", "truncated", npy_bytes(x)[:-4])
    with open(os.path.join(SEED, "seed.x.npy"), "rb") as f:
        put("npy", "seed-x", f.read())


def st_bytes(tensors, metadata=None, pad=True):
    header = {}
    off = 0
    for name, dtype, shape, data in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(data)]}
        off += len(data)
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(t[3] for t in tensors)


def safetensors():
    w = np.arange(12, dtype=np.float32).reshape(4, 3)
    b = np.ones(4, np.float32)
    put("safetensors", "f32-w-b", st_bytes([("weight", "F32", [4, 3], w.tobytes()),
                                             ("bias", "F32", [4], b.tobytes())],
                                            {"format": "pt"}))
    put("safetensors", "f16", st_bytes([("weight", "F16", [2, 2], np.ones(4, np.float16).tobytes())]))
    put("safetensors", "bf16", st_bytes([("w", "BF16", [3, 1], b"\x80\x3f" * 3)]))
    put("safetensors", "f64", st_bytes([("w", "F64", [1, 2], np.ones(2).tobytes())]))
    put("safetensors", "scalar", st_bytes([("s", "F32", [], b"\0\0\x80\x3f")]))
    put("safetensors", "i32", st_bytes([("w", "I32", [2], b"\0" * 8)]))
    put("safetensors", "other-dtypes", st_bytes([
        ("position_ids", "I64", [1, 4], np.arange(4, dtype="<i8").tobytes()),
        ("weight", "F32", [4, 3], w.tobytes()),
        ("masked_bias", "BOOL", [2, 2], b"\1\0\0\1"),
        ("scale", "F8_E4M3", [4], b"\x38" * 4),
        ("zero", "U16", [3], b"\0" * 6)]))
    put("safetensors", "unknown-dtype", st_bytes([("weight", "F32", [1, 2], b"\0" * 8),
                                                  ("packed", "F4", [5], b"\x21\x43\x05")]))
    put("safetensors", "i64-bad-size", st_bytes([("w", "I64", [3], b"\0" * 20)]))
    put("safetensors", "bad-range", st_bytes([("w", "F32", [4], b"\0" * 12)]))
    put("safetensors", "unpadded", st_bytes([("w", "F32", [1], b"\0" * 4)], pad=False))
    put("safetensors", "empty-header", struct.pack("<Q", 2) + b"{}")
    put("safetensors", "huge-length", struct.pack("<Q", 1 << 62) + b"{}")
    with open(os.path.join(SEED, "seed.safetensors"), "rb") as f:
        put("safetensors", "seed", f.read())


CTL_FMT = "<IHHQIIiIQ256s128s"  # struct ctl_msg, 424 bytes


def ctl_msg(type_, id_=1, slot=0, rows=1, status=0, rank=0, nbytes=0, text=b"",
            magic=0x74706431, version=6, nccl_id=b""):
    return struct.pack(CTL_FMT, magic, version, type_, id_, slot, rows, status, rank, nbytes,
                       text, nccl_id)


def ctl():
    assert struct.calcsize(CTL_FMT) == 424
    put("ctl", "ready", ctl_msg(1))
    put("ctl", "ready-failed", ctl_msg(1, status=1, text=b"cannot read weights"))
    put("ctl", "job", ctl_msg(2, id_=7, slot=3, rows=256))
    put("ctl", "done", ctl_msg(3, id_=7, slot=1))
    put("ctl", "done-allreduce", ctl_msg(3, id_=7, slot=1, nbytes=1))
    put("ctl", "done-too-many-collectives", ctl_msg(3, id_=7, slot=1, nbytes=9))
    put("ctl", "done-error", ctl_msg(3, id_=7, slot=1, status=3, text=b"bad"))
    put("ctl", "init", ctl_msg(4, nccl_id=bytes(range(128))))
    put("ctl", "stop", ctl_msg(5))
    put("ctl", "old-version", ctl_msg(2, version=5))
    put("ctl", "load", ctl_msg(7, id_=3, slot=1, rows=256, nbytes=3))
    put("ctl", "load-past-the-slots", ctl_msg(7, id_=3, slot=2, rows=8, nbytes=3))
    put("ctl", "load-no-rows", ctl_msg(7, id_=3, slot=0, rows=0, nbytes=1))
    put("ctl", "loaded", ctl_msg(8, id_=63, nbytes=4096))
    put("ctl", "loaded-failed", ctl_msg(8, id_=2, status=5, text=b"no such tensor"))
    put("ctl", "unload", ctl_msg(9, id_=3))
    put("ctl", "unloaded-bad-model", ctl_msg(10, id_=64))
    put("ctl", "bad-magic", ctl_msg(2, magic=0))
    put("ctl", "bad-slot", ctl_msg(2, slot=4))
    put("ctl", "unterminated", ctl_msg(3)[:40] + b"x" * 256 + ctl_msg(3)[296:])
    put("ctl", "short", ctl_msg(2)[:100])
    put("ctl", "long", ctl_msg(2) + b"\0" * 8)


PLAN_TENSOR_FMT = "<256s4096sQQQqQQII2q"  # struct plan_tensor, 4424 bytes
PLAN_LINEAR_FMT = "<IIIIqq256s256s128s"    # struct plan_linear up to its tensors, 672 bytes
PLAN_HEAD_FMT = "<IHHIIIIqqq256s128s"      # struct plan up to its layers, 432 bytes


def plan_tensor(name=b"", path=b"", dtype=0, shape=(0, 0), ndim=0, begin=0, esize=4):
    count = shape[0] * (shape[1] if ndim == 2 else 1) if ndim else 0
    return struct.pack(PLAN_TENSOR_FMT, name, path, 2049, 1234, 1 << 20, 1700000000 * 10**9,
                       begin, begin + count * esize, dtype, ndim, shape[0], shape[1])


def plan_linear(name, layout=1, in_=8, out=12, bias=True, dtype=1, esize=4, split=1,
                wshape=None):
    wshape = wshape or ((out, in_) if layout == 1 else (in_, out))
    w = plan_tensor(name + b".weight", b"model.safetensors", dtype, wshape, 2, 64, esize)
    b = (plan_tensor(name + b".bias", b"model.safetensors", dtype, (out, 0), 1,
                     64 + in_ * out * esize, esize) if bias else plan_tensor())
    head = struct.pack(PLAN_LINEAR_FMT, layout, int(bias), split, 0, in_, out, name, b"",
                       b"config.json")
    return head + w + b


def plan_msg(kind=1, act=0, in_=8, out=12, inter=0, layers=None, magic=0x74706c31, version=2,
             type_=6, block=b""):
    layers = layers or [plan_linear(b"model.layers.0.mlp.up_proj", in_=in_, out=out)]
    nlin = len(layers)
    layers = layers + [b"\0" * 9520] * (3 - len(layers))
    head = struct.pack(PLAN_HEAD_FMT, magic, version, type_, kind, act, nlin, 0, in_, out, inter,
                       block, b"config.json: hidden_act silu" if act else b"")
    return head + b"".join(layers)


def plan():
    assert struct.calcsize(PLAN_TENSOR_FMT) == 4424 and struct.calcsize(PLAN_HEAD_FMT) == 432
    assert struct.calcsize(PLAN_LINEAR_FMT) == 672 and len(plan_msg()) == 28992
    m = b"model.layers.0.mlp"
    put("plan", "linear-f32-bias", plan_msg())
    put("plan", "conv1d-bf16", plan_msg(in_=120, out=360, layers=[
        plan_linear(b"h.0.attn.c_attn", layout=2, in_=120, out=360, dtype=3, esize=2)]))
    put("plan", "linear-f16-no-bias", plan_msg(in_=128, out=64, layers=[
        plan_linear(b"q_proj", in_=128, out=64, bias=False, dtype=2, esize=2)]))
    put("plan", "row-f32", plan_msg(kind=2, in_=432, out=160, layers=[
        plan_linear(m + b".down_proj", in_=432, out=160, split=2)]))
    put("plan", "gated-bf16", plan_msg(kind=3, act=1, in_=160, out=160, inter=432, block=m, layers=[
        plan_linear(m + b".gate_proj", in_=160, out=432, bias=False, dtype=3, esize=2),
        plan_linear(m + b".up_proj", in_=160, out=432, bias=False, dtype=3, esize=2),
        plan_linear(m + b".down_proj", in_=432, out=160, bias=False, dtype=3, esize=2, split=2)]))
    put("plan", "mlp-conv1d", plan_msg(kind=4, act=3, in_=120, out=120, inter=480,
                                       block=b"h.0.mlp", layers=[
        plan_linear(b"h.0.mlp.c_fc", layout=2, in_=120, out=480),
        plan_linear(b"h.0.mlp.c_proj", layout=2, in_=480, out=120, split=2)]))
    put("plan", "gated-no-chain", plan_msg(kind=3, act=1, in_=160, out=160, inter=432, block=m,
                                           layers=[
        plan_linear(m + b".gate_proj", in_=160, out=432),
        plan_linear(m + b".up_proj", in_=160, out=431),
        plan_linear(m + b".down_proj", in_=432, out=160, split=2)]))
    put("plan", "bad-layout", plan_msg(layers=[plan_linear(b"x", layout=3)]))
    put("plan", "shape-disagrees", plan_msg(layers=[plan_linear(b"x", wshape=(8, 12))]))
    put("plan", "bad-magic", plan_msg(magic=0))
    put("plan", "short", plan_msg()[:700])
    put("plan", "long", plan_msg() + b"\0" * 8)


def rest_body(header, data=b"", prefix=True):
    """A REST request body; with prefix, the two bytes fuzz_rest reads as the JSON header's
    length come first (the target also reads the whole input as JSON)."""
    h = json.dumps(header).encode()
    return (struct.pack("<H", len(h)) if prefix else b"") + h + data


def rest():
    x = np.arange(6, dtype=np.float32)
    t = {"name": "input", "shape": [2, 3], "datatype": "FP32"}
    put("rest", "json-2x3", rest_body({"id": "r1", "inputs": [dict(t, data=x.tolist())]},
                                      prefix=False))
    put("rest", "json-nested", rest_body({"inputs": [dict(t, shape=[1, 2, 3], data=[
        [[0, 1, 2], [3, 4, 5]]])], "parameters": {"binary_data_output": True, "timeout": 9}},
        prefix=False))
    put("rest", "binary-2x3", rest_body({"inputs": [dict(t, parameters={
        "binary_data_size": 24})], "outputs": [{"name": "output", "parameters": {
            "binary_data": True}}]}, x.tobytes()))
    put("rest", "binary-fp16", rest_body({"inputs": [dict(t, datatype="FP16", parameters={
        "binary_data_size": 12})], "parameters": {"binary_data_output": True}},
        x.astype(np.float16).tobytes()))
    put("rest", "shm", rest_body({"inputs": [dict(t, parameters={
        "shared_memory_region": "in", "shared_memory_byte_size": 24})], "outputs": [{
            "name": "output", "parameters": {"shared_memory_region": "out",
                                             "shared_memory_byte_size": 16,
                                             "shared_memory_offset": 8}}]}, prefix=False))
    put("rest", "short-binary", rest_body({"inputs": [dict(t, parameters={
        "binary_data_size": 24})]}, x.tobytes()[:20]))
    put("rest", "bad-json", b'{"inputs": [{"name": "input", "shape": [2, 3],')
    put("rest", "nul-escape", b'{"id": "a\u0000", "inputs": []}')


if __name__ == "__main__":
    infer()
    rest()
    npy()
    safetensors()
    ctl()
    plan()
