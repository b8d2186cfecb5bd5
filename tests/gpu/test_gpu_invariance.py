#!/usr/bin/env python3
"""test_gpu_invariance -- does the cuda backend's answer for a row change with the batch it came
in? A measurement for the GPU check (docs/cuda.md, "Batch invariance"), with checks that can fail.
Exits 77 (ctest's skip code) with the reason when no GPU is visible.

cuBLAS picks its algorithm (tile shapes, split-K) by the GEMM's shape, so unlike the cpu
backend's default GEMM the cuda backend does not promise batch invariance, and its
ModelMetadata says batch_invariant: false. For FP32, TF32 and BF16 GEMMs, one rank with NCCL
and two ranks of GPU 0 with the host gather, 8 probe rows are sent alone (one request each),
then at the start of requests of 2, 3, 8, 17, 64, 255 and 1024 rows (the rest random rows). It
prints, per batch size, how many probe rows came back with other bits than alone and the
largest difference. It fails if an answer is wrong (tpclient forward --verify against the CPU
reference), or if the model claims batch_invariant: true and any row differs.
"""
import os
import re
import struct
import sys
import unittest

import gputest
from gputest import Daemon

gputest.require_programs()
NGPUS = gputest.skip_without_gpu()

IN, OUT, PROBES = 320, 840, 8
SIZES = (2, 3, 8, 17, 64, 255, 1024)
CONFIGS = (("fp32 nccl", ("--gpus", "0"), 1e-5),
           ("fp32 host x2", ("--gpus", "0,0", "--gather", "host"), 1e-5),
           ("tf32 nccl", ("--gpus", "0", "--tf32"), 1e-2),
           ("bf16 nccl", ("--gpus", "0", "--dtype", "bf16"), 1e-2))


def read_npy_f32(path):
    """(shape, raw little-endian float32 bytes) of a C-order float32 .npy written by tpclient."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:6] != b"\x93NUMPY":
        raise AssertionError("%s is not a .npy file" % path)
    major = data[6]
    hlen, start = ((struct.unpack("<H", data[8:10])[0], 10) if major == 1 else
                   (struct.unpack("<I", data[8:12])[0], 12))
    header = data[start:start + hlen].decode("latin1")
    if "'<f4'" not in header or "'fortran_order': False" not in header:
        raise AssertionError("%s: unexpected header %s" % (path, header))
    shape = tuple(int(v) for v in re.search(r"'shape': \(([^)]*)\)", header).group(1).split(",")
                  if v.strip())
    return shape, data[start + hlen:]


class TestGpuInvariance(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        import random
        cls.dir = gputest.tmpdir()
        cls.layer = gputest.write_layer(os.path.join(cls.dir, "inv"), IN, OUT, seed=11)
        rng = random.Random(5)
        cls.probe = [[rng.gauss(0, 1) for _ in range(IN)] for _ in range(PROBES)]
        cls.filler = [[rng.gauss(0, 1) for _ in range(IN)] for _ in range(max(SIZES))]

    def forward(self, d, rows, name, tol):
        """Sends rows (as one request), verifies them, returns the output's raw rows."""
        x = os.path.join(self.dir, name + ".npy")
        y = os.path.join(self.dir, name + ".out.npy")
        gputest.make_layer.write_npy(x, [v for r in rows for v in r], [len(rows), IN])
        res = d.client("forward", x, "-o", y, "--verify", self.layer, "--tolerance", "%g" % tol)
        self.assertEqual(res.rc, 0, "%r\n%s" % (res, d.log()[-3000:]))
        shape, raw = read_npy_f32(y)
        self.assertEqual(shape, (len(rows), OUT))
        return [raw[i * OUT * 4:(i + 1) * OUT * 4] for i in range(len(rows))]

    def test_rows_alone_and_in_batches(self):
        for what, args, tol in CONFIGS:
            with self.subTest(what):
                d = Daemon(self.dir, what.replace(" ", "_"), "--weights", self.layer,
                           "--max-batch", max(SIZES), "--batch-delay-us", 0, *args)
                try:
                    d.wait_ready()
                    md = d.client("metadata")
                    self.assertEqual(md.rc, 0, repr(md))
                    claimed = "batch_invariant: true" in md.out
                    self.assertIn("batch_invariant: %s" % ("true" if claimed else "false"),
                                  md.out)
                    alone = [self.forward(d, [self.probe[r]], "a%d" % r, tol)[0]
                             for r in range(PROBES)]
                    report = []
                    for m in SIZES:
                        rows = (self.probe + self.filler)[:m]
                        got = self.forward(d, rows, "m%d" % m, tol)
                        n = min(m, PROBES)
                        diff = [r for r in range(n) if got[r] != alone[r]]
                        worst = 0.0
                        for r in diff:
                            a = struct.unpack("<%df" % OUT, alone[r])
                            g = struct.unpack("<%df" % OUT, got[r])
                            worst = max(worst, max(abs(u - v) for u, v in zip(a, g)))
                        report.append("%d rows: %d/%d differ (max |diff| %.2g)" % (
                            m, len(diff), n, worst))
                        if claimed:
                            self.assertEqual(diff, [], "%s claims batch invariance, but probe "
                                             "rows %s differ in a %d-row request" % (what, diff, m))
                    print("batch invariance, %s: %s" % (what, "; ".join(report)))
                    self.assertEqual(d.stop(), 0, d.log()[-3000:])
                finally:
                    d.kill()


if __name__ == "__main__":
    unittest.main(verbosity=2)
