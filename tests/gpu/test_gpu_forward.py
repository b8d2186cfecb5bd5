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

TestGpuUnevenSplit: ranks that own different numbers of outputs (plan_split: the first out mod N
ranks own one more), where the NCCL gather pads every rank block to the widest shard and the
copy-out must use each rank's own width and first column. The seed layers of tests/data/seed at
two ranks of GPU 0 with the host gather and at the smallest N that does not divide their out;
a layer of 841 outputs (no N from 2 to 8 divides it) and one of 5 outputs (ranks of one row);
with NCCL over every GPU when there are two or more. ModelMetadata's shard_rows must show the
uneven split, so a case cannot silently turn even.

TestGpuGuards: with --dtype fp16, a weight of 70000 makes the start fail naming the element (and
BF16 serves it); an input element of 65520 or beyond fails its request naming row and column,
while 65519.996 (which rounds to 65504) is served, and the worker answers on; with TPD_CUDA_PIN=0
(an arena that cannot be pinned) the copies go through the pinned stage and the answers verify.

TestGpuBlocks: the MLP blocks and row-parallel layers of cases.json on the GPUs, with the
all-reduce in NCCL and on the host, FP32 against y64 and BF16 through --verify.

TestGpuRepository: three models of one repository over the same ranks, loaded and unloaded over
REST while a client thread keeps asking one of them (see the class).

TestGpuHuggingFace: every case of tests/data/hf/cases.json of kind linear, linear_conv1d and
lm_head_tied, served from its checkpoint directory by module name (tpd finds the shard file, the
bias sibling, GPT-2's Conv1D layout from config.json and the tied lm_head itself), at 1 rank, 2
ranks and every GPU, compared with the case's y64.npy: rel = max|y - y64| / max|y64| <= 1e-5,
for FP16 and BF16 checkpoints too. Why that tolerance holds: y64 is the module on the weights as
saved, upcast to float64, applied to the float32 x in float64. tpd widens FP16/BF16 weights to
FP32 exactly and multiplies in FP32 (--dtype fp32, no TF32), so it computes the same products
and differs only by FP32 rounding: sums of at most 480 products, which cuBLAS accumulates in
FP32 with an error of a few 2^-24 times sqrt(in) of the products' scale (about 1e-6 of
max|y64|), and the FP32 output itself (2^-24 relative). 1e-5 leaves a margin of about 10. The
checkpoints' own-dtype outputs (y.npy) are not the reference: they are 3e-4 (FP16) to 3e-3
(BF16) away from y64 by the rounding of the dtype alone (cases.json, y_rel_err_vs_y64).
"""
import json
import os
import re
import signal
import sys
import threading
import time
import unittest
import urllib.error
import urllib.request

import gputest
from gputest import Daemon

gputest.require_programs()
NGPUS = gputest.skip_without_gpu()

IN, OUT = 320, 840
BATCHES = (1, 7, 64, 1024)
TOL32, TOL16 = 1e-5, 1e-2


def gpus(n, device=None):
    """--gpus for n ranks: devices 0 to n-1, or device n times (for the host gather)."""
    return ",".join(str(i if device is None else device) for i in range(n))


def two_ranks():
    """--gpus (and --gather) for a group of two ranks: NCCL over two GPUs, or the host gather on
    GPU 0 when there is one (NCCL refuses two ranks on one device)."""
    return ["--gpus", "0,1"] if NGPUS >= 2 else ["--gpus", "0,0", "--gather", "host"]


def first_uneven(out, lo=2):
    """The smallest N >= lo that does not divide out."""
    n = lo
    while out % n == 0:
        n += 1
    return n


def serve_and_check(test, dir, name, weights, tol, xs, *args, max_batch=1024, split=None):
    """Serves weights with args, checks every input of xs ((label, path) pairs) with --verify,
    and, when split is given, that ModelMetadata's shard_rows is that split."""
    d = Daemon(dir, name, "--weights", weights, "--max-batch", str(max_batch), *args)
    try:
        t0 = time.monotonic()
        d.wait_ready()
        ready = time.monotonic() - t0
        if split is not None:
            test.assertEqual(gputest.metadata(d).get("shard_rows"), ",".join(map(str, split)),
                             "%s %s" % (weights, " ".join(args)))
        errs = []
        for label, x in xs:
            rel, _ = gputest.verify(d, x, weights, tol)
            errs.append("%s:%.2g" % (label, rel))
        print("%-44s ready %.1f s; max rel error per batch %s" % (
            " ".join(args) + " " + os.path.basename(weights), ready, " ".join(errs)))
        test.assertEqual(d.stop(), 0, d.log()[-3000:])
    finally:
        d.kill()


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
        serve_and_check(self, self.dir, name, self.layers[layer], tol,
                        [(str(b), self.x[b]) for b in batches], *args)

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
        gpus = two_ranks()
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

    def test_stuck_peer_group_rebuilt(self):
        # rank 1 stopped (SIGSTOP) while the group serves: rank 0 waits for it in the all-gather
        # (its process is alive, so nothing reports it gone) without blocking, tpd's job timeout
        # takes the group for hung, kills both ranks (the stopped one too) and rebuilds it
        gpus = two_ranks()
        d = Daemon(self.dir, "stuck", "--weights", self.layers["F32"], "--max-batch", "64",
                   "--job-timeout-ms", "1500", "--restart-backoff-ms", "300", *gpus)
        try:
            d.wait_ready()
            gputest.verify(d, self.x[7], self.layers["F32"], TOL32)
            before = gputest.worker_pids(d.log())
            os.kill(before[1], signal.SIGSTOP)
            t0 = time.monotonic()
            res = d.client("forward", self.x[7])
            failed_after = time.monotonic() - t0
            self.assertNotEqual(res.rc, 0, "answered with a rank stopped: %r" % res)
            self.assertIn("UNAVAILABLE", res.err)
            # the job timeout is 1.5 s at these sizes; the slack is for a slow machine
            self.assertLess(failed_after, 10, "the stuck job failed only after %.1f s" %
                            failed_after)
            deadline = time.monotonic() + gputest.READY_TIMEOUT
            while time.monotonic() < deadline:
                pids = gputest.worker_pids(d.log())
                if pids[1] != before[1] and d.client("health").rc == 0:
                    break
                time.sleep(0.1)
            self.assertFalse(gputest.alive(before[1]), "the stopped rank was left behind")
            for b in (7, 64):
                gputest.verify(d, self.x[b], self.layers["F32"], TOL32)
            print("%s: rank 1 stopped, the job failed after %.1f s, the group answered again "
                  "after %.1f s" % (" ".join(gpus), failed_after, time.monotonic() - t0))
            self.assertEqual(d.stop(), 0, d.log()[-3000:])
        finally:
            if gputest.alive(before[1]) if "before" in locals() else False:
                os.kill(before[1], signal.SIGKILL)
            d.kill()


class TestGpuGuards(unittest.TestCase):
    """What the backend refuses, and the path it takes when the arena cannot be pinned."""

    @classmethod
    def setUpClass(cls):
        cls.dir = gputest.tmpdir()
        cls.layer = gputest.write_layer(os.path.join(cls.dir, "g"), IN, OUT)
        cls.odd = gputest.write_layer(os.path.join(cls.dir, "g-odd"), IN, ODD_OUT)
        # one weight that FP16 cannot hold: element [out 3, in 5]
        import array
        w = array.array("f", [0.01] * (16 * 8))
        w[3 * 8 + 5] = 70000.0
        cls.big = os.path.join(cls.dir, "big.safetensors")
        gputest.make_layer.write_safetensors(cls.big, {"weight": ("F32", [16, 8], w.tobytes())})
        cls.x = {b: gputest.write_x(os.path.join(cls.dir, "x%d.npy" % b), b, IN, seed=b)
                 for b in (1, 7, 64)}

    def test_fp16_weight_beyond_range_refused(self):
        d = Daemon(self.dir, "big16", "--weights", self.big, "--gpus", "0", "--dtype", "fp16")
        try:
            rc = d.proc.wait(timeout=gputest.READY_TIMEOUT)
        finally:
            d.kill()
        self.assertEqual(rc, 1, d.log()[-3000:])
        self.assertRegex(d.log(), r"rank 0: tensor 'weight' has element \[out 3, in 5\] = 70000, "
                         r"which FP16 turns into an infinity .*--dtype bf16 or fp32",
                         d.log()[-3000:])
        # BF16 holds it
        x = gputest.write_x(os.path.join(self.dir, "x8.npy"), 4, 8)
        serve_and_check(self, self.dir, "big-bf16", self.big, TOL16, [("4", x)], "--gpus", "0",
                        "--dtype", "bf16")

    def test_fp16_input_beyond_range_refused(self):
        import struct
        d = Daemon(self.dir, "in16", "--weights", self.layer, "--gpus", "0", "--dtype", "fp16",
                   "--max-batch", "64")
        try:
            d.wait_ready()
            pids = gputest.worker_pids(d.log())
            below = struct.unpack("<f", struct.pack("<I", 0x477fefff))[0]  # 65519.996
            for value, ok in ((below, True), (65520.0, False), (-1e6, False)):
                values = [0.5] * (3 * IN)
                values[2 * IN + 7] = value
                x = os.path.join(self.dir, "in16-%g.npy" % value)
                gputest.make_layer.write_npy(x, values, [3, IN])
                res = d.client("forward", x, "-o", os.path.join(self.dir, "in16.y.npy"))
                if ok:
                    self.assertEqual(res.rc, 0, repr(res))
                else:
                    self.assertNotEqual(res.rc, 0, repr(res))
                    self.assertRegex(res.err, re.escape("input row 2, column 7 is %g, which FP16 "
                                                        "turns into an infinity" % value),
                                     repr(res))
            # refusing a request is not a failure of the worker: the same processes answer on
            gputest.verify(d, self.x[7], self.layer, TOL16)
            self.assertEqual(gputest.worker_pids(d.log()), pids, d.log()[-3000:])
            self.assertEqual(d.stop(), 0, d.log()[-3000:])
        finally:
            d.kill()

    def test_unpinned_arena_staged(self):
        # TPD_CUDA_PIN=0 leaves the arena unpinned, as a memlock limit would: the copies then go
        # through the pinned stage, and the answers must be the same; 841 outputs over 3 ranks
        # are uneven (281, 280, 280)
        for name, args in (("st-n1", ("--gpus", "0")),
                           ("st-h3", ("--gpus", "0,0,0", "--gather", "host"))):
            d = Daemon(self.dir, name, "--weights", self.odd, "--max-batch", "64", *args,
                       env={"TPD_CUDA_PIN": "0"})
            try:
                d.wait_ready()
                self.assertIn("arena staged", d.log())
                for b in (1, 7, 64):
                    gputest.verify(d, self.x[b], self.odd, TOL32)
                self.assertEqual(d.stop(), 0, d.log()[-3000:])
            finally:
                d.kill()
            print("%s with TPD_CUDA_PIN=0: staged copies verified" % " ".join(args))


SEED_LAYERS = (("seed", 8, 12), ("nobias", 96, 60), ("mlp-up", 512, 1536))  # name, in, out
ODD_OUT, FIVE_OUT = 841, 5  # 841 = 29^2: no N from 2 to 28 divides it


class TestGpuUnevenSplit(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        if not os.path.isfile(os.path.join(gputest.SEED_DIR, "seed.safetensors")):
            raise unittest.SkipTest("no seed layers in %s" % gputest.SEED_DIR)
        cls.dir = gputest.tmpdir()
        cls.layers = {"odd": gputest.write_layer(os.path.join(cls.dir, "odd"), IN, ODD_OUT),
                      "odd.bf16": gputest.write_layer(os.path.join(cls.dir, "odd-bf16"), IN,
                                                      ODD_OUT, dtype="BF16", seed=5),
                      "five": gputest.write_layer(os.path.join(cls.dir, "five"), 64, FIVE_OUT,
                                                  seed=9)}
        cls.xs = {}  # in -> [(label, path)]
        for in_ in sorted({IN, 64} | {layer[1] for layer in SEED_LAYERS}):
            batches = BATCHES if in_ == IN else (1, 7, 64)
            cls.xs[in_] = [(str(b), gputest.write_x(os.path.join(cls.dir, "x%d-%d.npy" % (
                in_, b)), b, in_, seed=b + in_)) for b in batches]

    def seed_case(self, name, in_, bf16=False):
        """(weights, inputs) of a seed layer: its own x.npy and random batches."""
        weights = os.path.join(gputest.SEED_DIR, name + (".bf16" if bf16 else "") +
                               ".safetensors")
        own = os.path.join(gputest.SEED_DIR, name + ".x.npy")
        return weights, [("seed x", own)] + self.xs[in_]

    def check(self, name, weights, tol, xs, nranks, out, *args):
        serve_and_check(self, self.dir, name, weights, tol, xs, *args,
                        split=gputest.split_rows(out, nranks))

    def test_seed_layers_two_ranks_host(self):
        for name, in_, out in SEED_LAYERS:
            for bf16 in (False, True):
                weights, xs = self.seed_case(name, in_, bf16)
                self.check("s2-" + name + ("-bf16" if bf16 else ""), weights, TOL32, xs, 2, out,
                           "--gpus", "0,0", "--gather", "host")

    def test_seed_layers_uneven_host(self):
        # seed 12 over 5 ranks (3,3,2,2,2), nobias 60 over 7, mlp-up 1536 over 5
        for name, in_, out in SEED_LAYERS:
            n = first_uneven(out)
            self.assertNotEqual(out % n, 0)
            for bf16 in (False, True) if name == "seed" else (False,):
                weights, xs = self.seed_case(name, in_, bf16)
                self.check("su-" + name + ("-bf16" if bf16 else ""), weights, TOL32, xs, n, out,
                           "--gpus", gpus(n, 0), "--gather", "host")

    def test_odd_layer_host(self):
        for n in (2, 3):
            self.check("odd%d" % n, self.layers["odd"], TOL32, self.xs[IN], n, ODD_OUT,
                       "--gpus", gpus(n, 0), "--gather", "host")
        self.check("oddbf", self.layers["odd.bf16"], TOL16, self.xs[IN][1:3], 3, ODD_OUT,
                   "--gpus", gpus(3, 0), "--gather", "host", "--dtype", "bf16")

    def test_one_row_ranks_host(self):
        # 5 outputs over 4 ranks (2,1,1,1) and over 5 (one each)
        for n in (4, 5):
            self.check("five%d" % n, self.layers["five"], TOL32, self.xs[64], n, FIVE_OUT,
                       "--gpus", gpus(n, 0), "--gather", "host")

    @unittest.skipIf(NGPUS < 2, "NCCL needs a GPU per rank: needs two GPUs")
    def test_uneven_nccl(self):
        n_all = min(NGPUS, 8)
        for n in sorted({2, n_all}):
            self.check("oddn%d" % n, self.layers["odd"], TOL32, self.xs[IN], n, ODD_OUT,
                       "--gpus", gpus(n))
        self.check("oddh%d" % n_all, self.layers["odd"], TOL32, self.xs[IN][1:3], n_all,
                   ODD_OUT, "--gpus", gpus(n_all), "--gather", "host")
        self.check("oddnbf", self.layers["odd.bf16"], TOL16, self.xs[IN][1:3], 2, ODD_OUT,
                   "--gpus", gpus(2), "--dtype", "bf16")
        n = min(n_all, FIVE_OUT - 1)  # 5 over 2, 3 or 4 ranks: uneven
        self.check("fiven%d" % n, self.layers["five"], TOL32, self.xs[64], n, FIVE_OUT,
                   "--gpus", gpus(n))
        for name, in_, out in SEED_LAYERS:
            if out % n_all:
                weights, xs = self.seed_case(name, in_)
                self.check("sn-" + name, weights, TOL32, xs, n_all, out, "--gpus", gpus(n_all))


HF_KINDS = ("linear", "linear_conv1d", "lm_head_tied")
TOL_HF = 1e-5


def hf_cases():
    """{checkpoint: {module: [case]}} of the kinds tpd serves, in cases.json's order."""
    with open(os.path.join(gputest.HF_DIR, "cases.json")) as f:
        cases = json.load(f)
    groups = {}
    for c in cases:
        if c["kind"] in HF_KINDS:
            groups.setdefault(c["checkpoint"], {}).setdefault(c["module"], []).append(c)
    return groups


def hf_rank_configs():
    """(ranks, args): 1 rank; 2 ranks (two GPUs with NCCL, else two ranks of GPU 0 with the host
    gather); every GPU (at most 8) with NCCL."""
    configs = [(1, ("--gpus", "0"))]
    configs.append((2, tuple(two_ranks())))
    if min(NGPUS, 8) > 2:
        configs.append((min(NGPUS, 8), ("--gpus", gpus(min(NGPUS, 8)))))
    return configs


@unittest.skipUnless(os.path.isfile(os.path.join(gputest.HF_DIR, "cases.json")),
                     "no Hugging Face cases in %s" % gputest.HF_DIR)
class TestGpuHuggingFace(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.dir = gputest.tmpdir()
        cls.cases = hf_cases()
        cls.served = 0

    def serve_module(self, ckpt, module, cases, nranks, args):
        """Serves module of ckpt with args and checks every case of it against its y64.npy."""
        type(self).served += 1
        name = "hf%d-%s" % (self.served, module.replace(".", "-"))
        first = cases[0]
        d = Daemon(self.dir, name, "--weights", os.path.join(gputest.HF_DIR, ckpt), "--weight",
                   module, "--max-batch", "16", *args)
        try:
            d.wait_ready()
            md = gputest.metadata(d)
            self.assertEqual(md.get("shard_rows"),
                             ",".join(map(str, gputest.split_rows(first["out"], nranks))))
            self.assertEqual(md.get("weight_tensor"), first["weights"][0]["tensor"])
            self.assertEqual(md.get("bias"), "true" if first["biases"] else "false")
            self.assertEqual(md.get("weight_layout"),
                             "[in, out]" if first["kind"] == "linear_conv1d" else "[out, in]")
            if first["kind"] == "lm_head_tied":
                self.assertEqual(md.get("tied_to"), "lm_head.weight")
            errs = []
            for c in cases:
                y_path = os.path.join(self.dir, name + "." + c["name"] + ".y.npy")
                shape, y = gputest.forward_npy(d, os.path.join(gputest.HF_DIR, c["x"]), y_path)
                ref_shape, ref = gputest.read_npy(os.path.join(gputest.HF_DIR, c["y64"]))
                self.assertEqual(list(shape), c["y_shape"], c["name"])
                self.assertEqual(list(ref_shape), c["y_shape"], c["name"])
                rel = gputest.rel_error(y, ref)
                self.assertLessEqual(rel, TOL_HF, "%s at %s: max|y - y64| / max|y64| = %.3g" % (
                    c["name"], " ".join(args), rel))
                errs.append("%s %.2g" % (c["name"], rel))
            print("%-34s %s" % (" ".join(args), "; ".join(errs)))
            self.assertEqual(d.stop(), 0, d.log()[-3000:])
        finally:
            d.kill()

    def check_checkpoint(self, ckpt):
        modules = self.cases.get(ckpt)
        self.assertTrue(modules, "cases.json has no %s case of kind %s" % (ckpt, HF_KINDS))
        for nranks, args in hf_rank_configs():
            for module, cases in modules.items():
                with self.subTest(module=module, args=" ".join(args)):
                    self.serve_module(ckpt, module, cases, nranks, args)

    def test_llama_sharded_bf16(self):
        self.check_checkpoint("llama-sharded-bf16")

    def test_gpt2_tied_fp32(self):
        self.check_checkpoint("gpt2-tied-fp32")

    def test_qwen2_bias_fp16(self):
        self.check_checkpoint("qwen2-bias-fp16")


BLOCK_KINDS = ("llama_mlp", "qwen2_mlp", "gpt2_mlp")


def block_configs():
    """(ranks, args) for reducing models: every config of hf_rank_configs (the all-reduce with
    NCCL where there are GPUs enough), and three ranks of GPU 0 with --gather host (the host
    all-reduce, an uneven split)."""
    return hf_rank_configs() + [(3, ("--gpus", "0,0,0", "--gather", "host"))]


@unittest.skipUnless(os.path.isfile(os.path.join(gputest.HF_DIR, "cases.json")),
                     "no Hugging Face cases in %s" % gputest.HF_DIR)
class TestGpuBlocks(unittest.TestCase):
    """The MLP block cases of cases.json (LlamaMLP, Qwen2MLP, GPT2MLP) served with --block, and
    the row-parallel cases (down_proj, c_proj) with --parallel row, at every config of
    block_configs: FP32 GEMMs against y64 to TOL_HF (the same reasoning as TestGpuHuggingFace:
    tpd widens the stored weights exactly and computes in FP32), and BF16 GEMMs through
    tpclient --verify (the C reference of the block) to TOL16. ModelMetadata shows the split of
    the intermediate (or of the inputs)."""

    @classmethod
    def setUpClass(cls):
        cls.dir = gputest.tmpdir()
        with open(os.path.join(gputest.HF_DIR, "cases.json")) as f:
            cases = json.load(f)
        cls.groups = {}
        for c in cases:
            if c["kind"] in BLOCK_KINDS:
                key = (c["checkpoint"], "--block", c["module"])
            elif c["module"].endswith(("mlp.down_proj", "mlp.c_proj")):
                key = (c["checkpoint"], "--weight", c["module"], "--parallel", "row")
            else:
                continue
            cls.groups.setdefault(key, []).append(c)
        cls.served = 0

    def serve(self, key, cases, nranks, args):
        type(self).served += 1
        ckpt = os.path.join(gputest.HF_DIR, key[0])
        name = "blk%d" % self.served
        block = key[1] == "--block"
        n = cases[0]["weights"][0]["shape"][0] if block else cases[0]["in"]
        if block and cases[0]["weights"][0]["layout"] == "[in, out]":
            n = cases[0]["weights"][0]["shape"][1]
        for dtype in ("fp32", "bf16"):
            d = Daemon(self.dir, "%s-%s" % (name, dtype), "--weights", ckpt, *key[1:],
                       "--max-batch", "16", "--dtype", dtype, *args)
            try:
                d.wait_ready()
                md = gputest.metadata(d)
                self.assertEqual(md.get("split"), "intermediate" if block else "inputs")
                self.assertEqual(md.get("shard_rows"),
                                 ",".join(map(str, gputest.split_rows(n, nranks))))
                errs = []
                for c in cases:
                    x = os.path.join(gputest.HF_DIR, c["x"])
                    if dtype == "bf16":
                        res = d.client("forward", x, "--verify", ckpt, *key[1:3],
                                       "--tolerance", "%g" % TOL16)
                        self.assertEqual(res.rc, 0, "%r\n%s" % (res, d.log()[-3000:]))
                        errs.append("%s bf16 ok" % c["name"])
                        continue
                    y_path = os.path.join(self.dir, name + "." + c["name"] + ".y.npy")
                    shape, y = gputest.forward_npy(d, x, y_path)
                    _, ref = gputest.read_npy(os.path.join(gputest.HF_DIR, c["y64"]))
                    self.assertEqual(list(shape), c["y_shape"], c["name"])
                    rel = gputest.rel_error(y, ref)
                    self.assertLessEqual(rel, TOL_HF, "%s at %s: rel %.3g vs y64" % (
                        c["name"], " ".join(args), rel))
                    errs.append("%s %.2g" % (c["name"], rel))
                print("%-34s %-5s %s" % (" ".join(args), dtype, "; ".join(errs)))
                self.assertEqual(d.stop(), 0, d.log()[-3000:])
            finally:
                d.kill()

    def test_blocks_and_row_layers(self):
        self.assertEqual(len(self.groups), 5, "cases.json changed")
        for nranks, args in block_configs():
            for key, cases in self.groups.items():
                with self.subTest(model=" ".join(key), args=" ".join(args)):
                    self.serve(key, cases, nranks, args)


def rest_post(d, path):
    """POSTs {} to path of d's REST API; returns (HTTP status, body)."""
    m = re.search(r"REST API on (http://127\.0\.0\.1:\d+)/v2", d.log())
    if not m:
        raise AssertionError("no REST address in the log:\n%s" % d.log()[-3000:])
    req = urllib.request.Request(m.group(1) + path, data=b"{}", method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=gputest.READY_TIMEOUT) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@unittest.skipUnless(os.path.isfile(os.path.join(gputest.HF_DIR, "cases.json")),
                     "no Hugging Face cases in %s" % gputest.HF_DIR)
class TestGpuRepository(unittest.TestCase):
    """Many models over the same GPU workers (docs/repository.md): a column layer (a), an uneven
    one (odd) and Llama's MLP block (mlp) in one repository, a and mlp loaded at start. Over
    REST, odd is loaded, a unloaded and loaded again and odd unloaded while a client thread
    keeps asking mlp (the GPU loads run between its jobs); then mlp is unloaded and loaded again.
    After each step every loaded model's answers are verified and an unloaded model is refused,
    and so is every answer of the client thread. With NCCL (the models' backends share the
    worker's one communicator) and with the host gather over three ranks. On the emulated device
    each stop also checks that every unload gave its device memory back (tests/cudaemu)."""

    @classmethod
    def setUpClass(cls):
        cls.dir = gputest.tmpdir()
        with open(os.path.join(gputest.HF_DIR, "cases.json")) as f:
            mlp = [c for c in json.load(f) if c["kind"] == "llama_mlp"][0]
        cls.repo = os.path.join(cls.dir, "repo")
        os.mkdir(cls.repo)
        ckpt = os.path.join(gputest.HF_DIR, mlp["checkpoint"])
        # model name -> (its description, the --verify arguments, its input)
        cls.models = {
            "a": ({"weights": gputest.write_layer(os.path.join(cls.dir, "a"), IN, OUT)}, None,
                  gputest.write_x(os.path.join(cls.dir, "xa.npy"), 7, IN, seed=11)),
            "odd": ({"weights": gputest.write_layer(os.path.join(cls.dir, "odd"), IN, ODD_OUT,
                                                    seed=4)}, None,
                    gputest.write_x(os.path.join(cls.dir, "xo.npy"), 64, IN, seed=12)),
            "mlp": ({"weights": ckpt, "block": mlp["module"]}, ["--block", mlp["module"]],
                    os.path.join(gputest.HF_DIR, mlp["x"])),
        }
        for name, (desc, _, _) in cls.models.items():
            with open(os.path.join(cls.repo, name + ".json"), "w") as f:
                json.dump(dict(desc, max_batch=64), f)

    def forward(self, d, name):
        desc, verify_args, x = self.models[name]
        return d.client("forward", x, "--model", name, "--verify", desc["weights"],
                        *(verify_args or []), "--tolerance", "%g" % TOL32)

    def check(self, d, loaded):
        for name in self.models:
            res = self.forward(d, name)
            if name in loaded:
                self.assertEqual(res.rc, 0, "%s: %r\n%s" % (name, res, d.log()[-3000:]))
            else:
                self.assertNotEqual(res.rc, 0, "%s is not loaded, but answered" % name)
                self.assertIn("not ready", res.err)

    def test_load_unload_while_serving(self):
        configs = [("--gpus", gpus(min(NGPUS, 2))), ("--gpus", "0,0,0", "--gather", "host")]
        for args in configs:
            with self.subTest(args=" ".join(args)):
                d = Daemon(self.dir, "repo%d" % configs.index(args), "--model-repository",
                           self.repo, "--model-control-mode", "explicit", "--load-model", "a",
                           "--load-model", "mlp", *args)
                try:
                    d.wait_ready()
                    loaded = {"a", "mlp"}
                    self.check(d, loaded)
                    stop, answers = threading.Event(), []

                    def ask_mlp():
                        while not stop.is_set():
                            answers.append(self.forward(d, "mlp"))

                    asker = threading.Thread(target=ask_mlp)
                    asker.start()
                    try:
                        for verb, name in (("load", "odd"), ("unload", "a"), ("load", "a"),
                                           ("unload", "odd"), (None, None), ("unload", "mlp"),
                                           ("load", "mlp")):
                            if verb is None:  # the client thread's part ends here
                                stop.set()
                                asker.join()
                                continue
                            status, body = rest_post(d, "/v2/repository/models/%s/%s" % (
                                name, verb))
                            self.assertEqual(status, 200, "%s %s: %s\n%s" % (
                                verb, name, body, d.log()[-3000:]))
                            (loaded.add if verb == "load" else loaded.discard)(name)
                            self.check(d, loaded)
                    finally:
                        stop.set()
                        asker.join()
                    bad = [r for r in answers if r.rc != 0]
                    self.assertFalse(bad, "%d of %d answers of mlp failed, the first: %r" % (
                        len(bad), len(answers), bad[:1]))
                    self.assertGreaterEqual(len(answers), 4, "the client thread hardly ran")
                    self.assertEqual(d.stop(), 0, d.log()[-3000:])
                finally:
                    d.kill()
                print("%-28s 3 models: 3 loads and 3 unloads, %d answers of mlp meanwhile, "
                      "every answer verified" % (" ".join(args), len(answers)))



@unittest.skipUnless(gputest.GPU_WORKER, "needs the emulated device (TPD_CUDAEMU_MEMORY_MB): a "
                     "real GPU has too much memory to fill here")
class TestGpuOutOfMemory(unittest.TestCase):
    """GPU memory and many models, on emulated GPUs of a given size (two ranks, NCCL). Per rank,
    small (1024 -> 2048) takes 4.75 MiB, big (2048 -> 4096) 17.5 MiB, of which 16 MiB are
    weights, and the worker's one cuBLAS workspace 32 MiB.

    At 60 MiB both fit: the models share the workspace (one each would need 86 MiB). At 51 MiB,
    with small loaded, big's load fails saying how much it needed for what and how much is free;
    the worker goes on serving small; once small is unloaded, the same load succeeds (its device
    memory was given back)."""

    @classmethod
    def setUpClass(cls):
        cls.dir = gputest.tmpdir()
        cls.repo = os.path.join(cls.dir, "repo")
        os.mkdir(cls.repo)
        cls.layers, cls.xs = {}, {}
        for name, (in_, out) in {"small": (1024, 2048), "big": (2048, 4096)}.items():
            cls.layers[name] = gputest.write_layer(os.path.join(cls.dir, name), in_, out)
            cls.xs[name] = gputest.write_x(os.path.join(cls.dir, name + ".x.npy"), 5, in_)
            with open(os.path.join(cls.repo, name + ".json"), "w") as f:
                json.dump({"weights": cls.layers[name], "max_batch": 64}, f)

    def serve(self, name, mib, *load):
        args = ["--model-repository", self.repo, "--model-control-mode", "explicit",
                "--gpus", gpus(min(NGPUS, 2))]
        for m in load:
            args += ["--load-model", m]
        d = Daemon(self.dir, name, *args, env={"TPD_CUDAEMU_MEMORY_MB": str(mib)})
        d.wait_ready()
        return d

    def check(self, d, name):
        res = d.client("forward", self.xs[name], "--model", name, "--verify", self.layers[name])
        self.assertEqual(res.rc, 0, "%s: %r\n%s" % (name, res, d.log()[-3000:]))

    def test_models_share_the_workspace(self):
        d = self.serve("mem60", 60, "small", "big")
        try:
            self.check(d, "small")
            self.check(d, "big")
            self.assertEqual(d.stop(), 0, d.log()[-3000:])
        finally:
            d.kill()

    def test_too_big_then_fits(self):
        d = self.serve("mem51", 51, "small")
        try:
            self.check(d, "small")
            status, body = rest_post(d, "/v2/repository/models/big/load")
            self.assertNotEqual(status, 200, body)
            self.assertRegex(body, r"GPU \d is out of memory: 16\.0 MiB for the weights, and "
                             r"14\.[0-9] MiB of its 51\.0 MiB are free")
            refused = re.search(r"GPU \d is out of memory[^\"]*", body).group(0)
            self.check(d, "small")
            status, body = rest_post(d, "/v2/repository/models/small/unload")
            self.assertEqual(status, 200, body)
            status, body = rest_post(d, "/v2/repository/models/big/load")
            self.assertEqual(status, 200, "big after small's unload: %s\n%s" % (
                body, d.log()[-3000:]))
            self.check(d, "big")
            self.assertEqual(d.stop(), 0, d.log()[-3000:])
        finally:
            d.kill()
        print("big refused beside small (%s), then loaded once small was unloaded" % refused)


if __name__ == "__main__":
    unittest.main(verbosity=2)
