#!/usr/bin/env python3
"""Writes a random linear layer and an input for it, with the standard library only.

    make_layer.py --in 1024 --out 4096 [--rows 8] [--dtype F32|F16|BF16] [--no-bias] PREFIX

makes PREFIX.safetensors (tensors 'weight' [out, in] and 'bias' [out]) and PREFIX.x.npy
(float32 [rows, in]). Values are uniform in [-1/sqrt(in), 1/sqrt(in)] like nn.Linear's.
"""
import argparse
import array
import json
import math
import random
import struct


def to_half_bits(values, dtype):
    if dtype == "F16":
        return array.array("H", struct.unpack(f"<{len(values)}H",
                                              struct.pack(f"<{len(values)}e", *values)))
    # BF16: round to nearest even on the float32 bits
    bits = array.array("I", struct.unpack(f"<{len(values)}I",
                                          struct.pack(f"<{len(values)}f", *values)))
    return array.array("H", ((b + 0x7FFF + ((b >> 16) & 1)) >> 16 for b in bits))


def tensor_bytes(values, dtype):
    if dtype == "F32":
        return array.array("f", values).tobytes()
    return to_half_bits(values, dtype).tobytes()


def write_safetensors(path, tensors):
    header, blobs, off = {}, [], 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)


def write_npy(path, values, shape):
    head = "{'descr': '<f4', 'fortran_order': False, 'shape': (%s), }" % "".join(
        f"{d}, " for d in shape)
    head += " " * (-(10 + len(head) + 1) % 64) + "\n"
    with open(path, "wb") as f:
        f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(head)) + head.encode())
        f.write(array.array("f", values).tobytes())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--in", dest="in_", type=int, required=True)
    p.add_argument("--out", type=int, required=True)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--dtype", choices=["F32", "F16", "BF16"], default="F32")
    p.add_argument("--no-bias", action="store_true")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("prefix")
    a = p.parse_args()
    rng = random.Random(a.seed)
    bound = 1 / math.sqrt(a.in_)
    w = [rng.uniform(-bound, bound) for _ in range(a.out * a.in_)]
    tensors = {"weight": (a.dtype, [a.out, a.in_], tensor_bytes(w, a.dtype))}
    if not a.no_bias:
        b = [rng.uniform(-bound, bound) for _ in range(a.out)]
        tensors["bias"] = (a.dtype, [a.out], tensor_bytes(b, a.dtype))
    write_safetensors(a.prefix + ".safetensors", tensors)
    write_npy(a.prefix + ".x.npy", [rng.gauss(0, 1) for _ in range(a.rows * a.in_)],
              [a.rows, a.in_])


if __name__ == "__main__":
    main()
