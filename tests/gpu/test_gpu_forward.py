#!/usr/bin/env python3
"""test_gpu_forward -- the cuda backend against the CPU reference, through real tpd, tpd-worker
and tpclient processes. Exits 77 (ctest's skip code) with the reason when no GPU is visible.

Every answer is checked by `tpclient forward --verify` (tests/ref, double accumulation):
FP32 GEMMs (TF32 off) to 1e-5, FP16/BF16 GEMMs and TF32 to 1e-2. Batches 1, 7, 64 and 1024; a
layer of in 320, out 840, so that out/N is not a power of two for N = 2 (420) and divides for
N up to 8. Groups: one rank with NCCL, two ranks on GPU 0 with --gather host, and every
visible GPU with NCCL (and with the host gather) when there are two or more. Weights stored as
F32, F16 and BF16. A killed worker must be replaced and the group must answer correctly again.
With --io-dtype fp16/bf16 the requests and responses are FP16/BF16 (tpclient rounds the input and
verifies against the rounded input), alone and combined with FP16/BF16 GEMMs, to 1e-2.
"""
import os
import signal
import sys
import time
import unittest

import gputest
from gputest import Daemon

gputest.require_programs()
NGPUS = gputest.skip_without_gpu()

IN, OUT = 320, 840
BATCHES = (1, 7, 64, 1024)
TOL32, TOL16 = 1e-5, 1e-2


class TestGpuForward(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.dir = gputest.tmpdir()
        cls.layers = {}
        for dtype in ("F32", "F16", "BF16"):
            cls.layers[dtype] = gputest.write_layer(os.path.join(cls.dir, dtype.lower()), IN,
                                                    OUT, dtype=dtype)
        cls.layers["nobias"] = gputest.write_layer(os.path.join(cls.dir, "nobias"), IN, OUT,
                                                   bias=False, seed=3)
        cls.x = {b: gputest.write_x(os.path.join(cls.dir, "x%d.npy" % b), b, IN, seed=b)
                 for b in BATCHES}

    def serve_and_check(self, name, layer, tol, *args, batches=BATCHES):
        d = Daemon(self.dir, name, "--weights", self.layers[layer], "--max-batch", "1024",
                   *args)
        try:
            t0 = time.monotonic()
            d.wait_ready()
            ready = time.monotonic() - t0
            errs = []
            for b in batches:
                rel, _ = gputest.verify(d, self.x[b], self.layers[layer], tol)
                errs.append("%d:%.2g" % (b, rel))
            print("%-44s ready %.1f s; max rel error per batch %s" % (
                " ".join(args) + " " + layer, ready, " ".join(errs)))
            self.assertEqual(d.stop(), 0, d.log()[-3000:])
        finally:
            d.kill()

    def test_one_rank_nccl_fp32(self):
        self.serve_and_check("n1", "F32", TOL32, "--gpus", "0")

    def test_two_ranks_one_gpu_host_fp32(self):
        self.serve_and_check("h2", "F32", TOL32, "--gpus", "0,0", "--gather", "host")

    @unittest.skipIf(NGPUS < 2, "needs two GPUs")
    def test_all_gpus_nccl_fp32(self):
        gpus = ",".join(str(i) for i in range(min(NGPUS, 8)))
        self.serve_and_check("nall", "F32", TOL32, "--gpus", gpus)

    @unittest.skipIf(NGPUS < 2, "needs two GPUs")
    def test_all_gpus_host_fp32(self):
        gpus = ",".join(str(i) for i in range(min(NGPUS, 8)))
        self.serve_and_check("hall", "F32", TOL32, "--gpus", gpus, "--gather", "host")

    def test_half_weights_fp32_gemm(self):
        # F16 and BF16 files convert exactly to float32: the FP32 tolerance holds
        self.serve_and_check("f16w", "F16", TOL32, "--gpus", "0", batches=(7, 64))
        self.serve_and_check("bf16w", "BF16", TOL32, "--gpus", "0,0", "--gather", "host",
                             batches=(7, 64))

    def test_fp16_gemm(self):
        self.serve_and_check("fp16", "F16", TOL16, "--gpus", "0", "--dtype", "fp16")
        self.serve_and_check("fp16h", "F32", TOL16, "--gpus", "0,0", "--gather", "host",
                             "--dtype", "fp16", batches=(7, 1024))

    def test_bf16_gemm(self):
        self.serve_and_check("bf16", "BF16", TOL16, "--gpus", "0,0", "--gather", "host",
                             "--dtype", "bf16")
        self.serve_and_check("bf16n", "F32", TOL16, "--gpus", "0", "--dtype", "bf16",
                             batches=(7, 1024))
        if NGPUS >= 2:
            self.serve_and_check("bf16all", "BF16", TOL16, "--gpus", "0,1", "--dtype", "bf16")

    def test_io_dtypes(self):
        # FP16 on the wire into an FP16 GEMM (the coordinator widens, the worker narrows again:
        # exact), and BF16 on the wire into FP32 GEMMs over two ranks of one GPU
        self.serve_and_check("io16", "F16", TOL16, "--gpus", "0", "--dtype", "fp16",
                             "--io-dtype", "fp16", batches=(1, 7, 64))
        self.serve_and_check("iobf16", "F32", TOL16, "--gpus", "0,0", "--gather", "host",
                             "--io-dtype", "bf16", batches=(7, 1024))
        self.serve_and_check("io16bf", "BF16", TOL16, "--gpus", "0", "--dtype", "bf16",
                             "--io-dtype", "fp16", batches=(64,))

    def test_no_bias_and_tf32(self):
        self.serve_and_check("nob", "nobias", TOL32, "--gpus", "0,0", "--gather", "host",
                             batches=(7, 64))
        self.serve_and_check("tf32", "F32", TOL16, "--gpus", "0", "--tf32", batches=(7, 1024))

    def test_worker_killed_group_rebuilt(self):
        gpus = ["--gpus", "0,1"] if NGPUS >= 2 else ["--gpus", "0,0", "--gather", "host"]
        d = Daemon(self.dir, "kill", "--weights", self.layers["F32"], "--max-batch", "1024",
                   "--restart-backoff-ms", "300", *gpus)
        try:
            d.wait_ready()
            gputest.verify(d, self.x[64], self.layers["F32"], TOL32)
            before = gputest.worker_pids(d.log())
            os.kill(before[1], signal.SIGKILL)
            t0 = time.monotonic()
            # the group goes down, is rebuilt with new processes, and answers correctly again
            deadline = t0 + gputest.READY_TIMEOUT
            while time.monotonic() < deadline:
                pids = gputest.worker_pids(d.log())
                if len(pids) == 2 and pids[1] != before[1] and d.client("health").rc == 0:
                    break
                time.sleep(0.2)
            after = gputest.worker_pids(d.log())
            self.assertNotEqual(after[0], before[0], "rank 0 was not restarted:\n" + d.log())
            self.assertNotEqual(after[1], before[1], "rank 1 was not restarted:\n" + d.log())
            d.wait_ready(timeout=5)
            for b in (7, 1024):
                gputest.verify(d, self.x[b], self.layers["F32"], TOL32)
            print("%s: worker killed, group ready again after %.1f s" % (
                " ".join(gpus), time.monotonic() - t0))
            self.assertEqual(d.stop(), 0, d.log()[-3000:])
        finally:
            d.kill()


if __name__ == "__main__":
    unittest.main(verbosity=2)
