"""Correctness of `tpclient forward` through tpd with N = 1..4 CPU ranks.

* The PyTorch seed cases (tests/data/seed: seed, mlp-up, nobias; F32 and BF16 files) for every
  N: tpd's answer against NAME.y64.npy / NAME.bf16.y64.npy and against our own float64
  reference, relative error (docs/cli.md) <= 1e-5, for the case's x, one row of it, and a
  random batch of 64.
* Generated layers chosen to cover: batch 1, 7 and 64; out/N not a power of two (36/3, 60/4,
  6/2, 20/4, 15/3); with and without bias; F32, F16 and BF16 storage, each used with N > 1.
* Every daemon's shard loading: the 'loaded rows [A, B) of OUT ...' lines partition [0, out) in
  rank order, and each worker read exactly its rows' bytes (never the whole matrix when N > 1).
* tpclient I/O: raw float32 .bin input and output, a .bin of the wrong size, --verify passing
  and failing (exit 2), the summary printed without -o, health and metadata output.

At the end the worst relative error of each family is printed on stdout.
"""

import os
import re
import sys
import unittest
import zlib

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tpdtest  # noqa: E402
from tpdtest import (ELEM_SIZE, TpdTestCase, make_layer, one_line_error, reference,  # noqa: E402
                     rel_err, seed_case)

TOL = 1e-5

# family -> (worst relative error, where)
WORST = {}
# informational: max |y_tp - y_ref| against nn.Linear's float32 y.npy (the reference test wants 0)
NN_LINEAR_ABS = {}


def note(family, err, where):
    if family not in WORST or err > WORST[family][0]:
        WORST[family] = (err, where)


def tearDownModule():
    print("\nworst relative error per family (tolerance %g):" % TOL)
    for family in sorted(WORST):
        err, where = WORST[family]
        print("  %-34s %.3e  (%s)" % (family, err, where))
    for name in sorted(NN_LINEAR_ABS):
        print("  max |y - %s.y.npy| (nn.Linear fp32): %.3e" % (name, NN_LINEAR_ABS[name]))
    sys.stdout.flush()


SEED_CASES = [
    # name, in, out, bias
    ("seed", 8, 12, True),
    ("mlp-up", 512, 1536, True),
    ("nobias", 96, 60, False),
]

GENERATED = [
    # tag, in, out, bias, dtype, N     (out/N)
    ("o36_i40_f32_bias_n3", 40, 36, True, "F32", 3),  # 12
    ("o15_i24_f32_nobias_n3", 24, 15, False, "F32", 3),  # 5
    ("o20_i50_f32_bias_n4", 50, 20, True, "F32", 4),  # 5
    ("o60_i33_f16_nobias_n4", 33, 60, False, "F16", 4),  # 15
    ("o60_i96_f16_bias_n2", 96, 60, True, "F16", 2),  # 30
    ("o6_i8_f16_bias_n1", 8, 6, True, "F16", 1),  # 6
    ("o6_i17_bf16_bias_n2", 17, 6, True, "BF16", 2),  # 3
    ("o36_i64_bf16_nobias_n3", 64, 36, False, "BF16", 3),  # 12
    ("o96_i128_bf16_nobias_n1", 128, 96, False, "BF16", 1),  # 96
]


class ForwardCase(TpdTestCase):

    def check_startup(self, d, n, out, in_, dtype, bias):
        """Worker start and shard loading lines of a daemon with n ranks."""
        log = d.log()
        started = tpdtest.STARTED_RE.findall(log)
        self.assertEqual(sorted(int(r) for r, _ in started), list(range(n)),
                         "expected one 'started worker rank R pid P' per rank 0..%d\n%s" % (
                             n - 1, d.log_tail()))
        self.assertEqual(len(set(p for _, p in started)), n, "worker pids not distinct")
        loaded = sorted(d.loaded())
        self.assertEqual([r[0] for r in loaded], list(range(n)),
                         "expected one 'loaded rows' line per rank 0..%d\n%s" % (
                             n - 1, d.log_tail()))
        esize = ELEM_SIZE[dtype]
        expect_a = 0
        for rank, a, b, o, name, dt, wbytes, bbytes in loaded:
            where = "rank %d: [%d, %d) of %d" % (rank, a, b, o)
            self.assertEqual(o, out, where)
            self.assertEqual(a, expect_a, "%s: ranges do not partition [0, %d) in rank order" % (
                where, out))
            self.assertGreater(b, a, where)
            self.assertEqual(name, "weight", where)
            self.assertEqual(dt, dtype, where)
            self.assertEqual(wbytes, (b - a) * in_ * esize, "%s: weight bytes read" % where)
            self.assertEqual(bbytes, (b - a) * esize if bias else 0, "%s: bias bytes read" % where)
            if n > 1:
                self.assertLess(wbytes, out * in_ * esize, "%s read the whole matrix" % where)
            expect_a = b
        self.assertEqual(expect_a, out, "ranges end at %d, not at out = %d" % (expect_a, out))
        # column-parallel layout of DESIGN.md: rank r owns [r*out/N, (r+1)*out/N)
        for rank, a, b, *_ in loaded:
            self.assertEqual((a, b), (rank * out // n, (rank + 1) * out // n))

    def check_info(self, d, model, n, out, in_, dtype=None):
        """`tpclient health` and `tpclient metadata` output."""
        h = d.client("health")
        self.assertEqual(h.rc, 0, repr(h))
        self.assertIn("server live: true", h.out, repr(h))
        self.assertIn("server ready: true", h.out, repr(h))
        self.assertIn("model %s ready: true" % model, h.out, repr(h))
        m = d.client("metadata", "--model", model)
        self.assertEqual(m.rc, 0, repr(m))
        kv = {}
        for line in m.out.splitlines():
            k, sep, v = line.partition(":")
            if sep:
                kv[k.strip()] = v.strip()
        for key in ("model", "platform", "input", "output", "ranks", "backend"):
            self.assertIn(key, kv, "metadata has no '%s:' line: %r" % (key, m))
        self.assertEqual(kv["model"], model, repr(m))
        self.assertEqual(kv["ranks"], str(n), repr(m))
        self.assertIn("cpu", kv["backend"].lower(), repr(m))
        self.assertRegex(kv["input"], r"(?<!\d)%d(?!\d)" % in_, "input line lacks in = %d" % in_)
        self.assertRegex(kv["output"], r"(?<!\d)%d(?!\d)" % out, "output line lacks out = %d" % out)
        self.assertIn("FP32", kv["input"])
        self.assertIn("FP32", kv["output"])
        if dtype and "weight_dtype" in kv:  # beyond docs/cli.md's list, checked when present
            self.assertEqual(kv["weight_dtype"], dtype, repr(m))


class TestSeedCases(ForwardCase):
    """The PyTorch reference cases, F32 and BF16, with 1, 2, 3 and 4 ranks."""

    def run_seed(self, n):
        rng = np.random.default_rng(100 + n)
        for name, in_, out, bias in SEED_CASES:
            for bf16 in (False, True):
                dtype = "BF16" if bf16 else "F32"
                with self.subTest(case=name, dtype=dtype, ranks=n):
                    wpath, x, W, b, y64 = seed_case(name, bf16)
                    self.assertEqual(W.shape, (out, in_))
                    self.assertEqual(b is not None, bias)
                    model = os.path.basename(wpath)[:-len(".safetensors")]
                    d = self.start_daemon(wpath, "--cpu", n, name="%s-%s-n%d" % (name, dtype, n))
                    self.check_startup(d, n, out, in_, dtype, bias)
                    family = "seed %s" % dtype
                    where = "%s %s N=%d" % (name, dtype, n)

                    # the case's own x: against the float64 file and our own reference
                    y = self.forward(d, x, model=model if bf16 else None)
                    ref, mag = reference(x, W, b)
                    e_file = rel_err(y, y64.astype(np.float64), mag)
                    e_ref = rel_err(y, ref, mag)
                    note(family + " vs y64.npy", e_file, where)
                    note(family + " vs own reference", e_ref, where)
                    self.assertLessEqual(e_file, TOL, "%s: against y64.npy" % where)
                    self.assertLessEqual(e_ref, TOL, "%s: against float64 reference" % where)
                    if not bf16:
                        ynn = np.load(os.path.join(tpdtest.SEED_DIR, name + ".y.npy"))
                        diff = float(np.abs(y.astype(np.float64) - ynn).max())
                        NN_LINEAR_ABS[name] = max(NN_LINEAR_ABS.get(name, 0.0), diff)

                    # one row, and a fresh batch of 64
                    row = x[2:3]
                    note(family + " vs own reference", self.assert_close(
                        self.forward(d, row, model=model), row, W, b, TOL, where + " batch 1"),
                        where + " batch 1")
                    x64 = rng.standard_normal((64, in_)).astype(np.float32)
                    note(family + " vs own reference", self.assert_close(
                        self.forward(d, x64), x64, W, b, TOL, where + " batch 64"),
                        where + " batch 64")
                    d.stop()

    def test_seed_n1(self):
        self.run_seed(1)

    def test_seed_n2(self):
        self.run_seed(2)

    def test_seed_n3(self):
        self.run_seed(3)

    def test_seed_n4(self):
        self.run_seed(4)


class TestGenerated(ForwardCase):
    """Generated layers: see GENERATED; batches 1, 7 (one row of zeros) and 64, then 7 again."""

    def run_generated(self, tag, in_, out, bias, dtype, n):
        wpath = self.path(tag + ".safetensors")
        W, b = make_layer(wpath, out, in_, bias=bias, dtype=dtype, seed=zlib.crc32(tag.encode()))
        d = self.start_daemon(wpath, "--cpu", n, name=tag)
        self.check_startup(d, n, out, in_, dtype, bias)
        self.check_info(d, tag, n, out, in_, dtype)
        rng = np.random.default_rng(len(tag) * 7 + n)
        family = "generated %s" % dtype
        batches = [rng.standard_normal((1, in_)), rng.standard_normal((7, in_)),
                   rng.uniform(-4, 4, (64, in_)), rng.standard_normal((7, in_)) * 1e-3]
        batches[1][3] = 0.0  # y = b exactly (or 0 without bias)
        for i, x in enumerate(batches):
            x = x.astype(np.float32)
            where = "%s batch %d (#%d)" % (tag, x.shape[0], i)
            y = self.forward(d, x, model=tag if i % 2 else None)
            note(family, self.assert_close(y, x, W, b, TOL, where), where)
        d.stop()


def _add_generated():
    for tag, in_, out, bias, dtype, n in GENERATED:
        def test(self, args=(tag, in_, out, bias, dtype, n)):
            self.run_generated(*args)
        test.__name__ = "test_" + tag
        test.__doc__ = "%s: in %d, out %d, %s, %s, %d ranks" % (
            tag, in_, out, "bias" if bias else "no bias", dtype, n)
        setattr(TestGenerated, test.__name__, test)


_add_generated()


VERIFY_RE = re.compile(r"verify: max abs error (\S+), max rel error (\S+) \(tolerance (\S+)\): (\S+)")


class TestClientIO(ForwardCase):
    """tpclient's .bin files, its summary without -o, and --verify."""

    def test_bin_and_verify(self):
        in_, out, n = 40, 36, 2
        wpath = self.path("io.safetensors")
        W, b = make_layer(wpath, out, in_, bias=True, dtype="F32", seed=5)
        other = self.path("other.safetensors")
        make_layer(other, out, in_, bias=True, dtype="F32", seed=6)
        d = self.start_daemon(wpath, "--cpu", n, name="io")
        rng = np.random.default_rng(9)
        x = rng.standard_normal((5, in_)).astype(np.float32)
        xbin = self.path("x.bin")
        x.astype("<f4").tofile(xbin)
        np.save(self.path("x.npy"), x)

        with self.subTest("bin in, npy out"):
            res = d.client("forward", xbin, "-o", self.path("y1.npy"))
            self.assertEqual(res.rc, 0, repr(res))
            y = np.load(self.path("y1.npy"))
            note("generated F32", self.assert_close(y, x, W, b, TOL, ".bin input"), ".bin input")

        with self.subTest("bin in, bin out"):
            res = d.client("forward", xbin, "-o", self.path("y2.bin"))
            self.assertEqual(res.rc, 0, repr(res))
            raw = np.fromfile(self.path("y2.bin"), dtype="<f4")
            self.assertEqual(raw.size, 5 * out, "y2.bin holds %d floats, expected %d" % (
                raw.size, 5 * out))
            self.assert_close(raw.reshape(5, out), x, W, b, TOL, ".bin output")

        with self.subTest("npy in, bin out"):
            res = d.client("forward", self.path("x.npy"), "-o", self.path("y3.bin"))
            self.assertEqual(res.rc, 0, repr(res))
            raw = np.fromfile(self.path("y3.bin"), dtype="<f4")
            self.assertEqual(raw.size, 5 * out)
            self.assert_close(raw.reshape(5, out), x, W, b, TOL, ".npy in, .bin out")

        with self.subTest(".bin whose size is not a multiple of in*4"):
            bad = self.path("bad.bin")
            with open(bad, "wb") as f:
                f.write(x.astype("<f4").tobytes()[:2 * in_ * 4 + 4])
            res = d.client("forward", bad, "-o", self.path("ybad.npy"))
            self.assertEqual(res.rc, 1, repr(res))
            one_line_error(self, res)

        with self.subTest("summary without -o"):
            res = d.client("forward", self.path("x.npy"))
            self.assertEqual(res.rc, 0, repr(res))
            self.assertIn("output [5, %d] FP32" % out, res.out, repr(res))

        with self.subTest("--verify with the served weights"):
            res = d.client("forward", self.path("x.npy"), "--verify", wpath)
            self.assertEqual(res.rc, 0, repr(res))
            m = VERIFY_RE.search(res.out)
            self.assertIsNotNone(m, "no verify: line: %r" % res)
            self.assertEqual(m.group(4), "ok", repr(res))
            self.assertLessEqual(float(m.group(2).rstrip(",")), TOL, repr(res))
            note("tpclient --verify (reported)", float(m.group(2).rstrip(",")), "io F32 N=2")

        with self.subTest("--verify with -o"):
            res = d.client("forward", self.path("x.npy"), "-o", self.path("y4.npy"),
                           "--verify", wpath)
            self.assertEqual(res.rc, 0, repr(res))
            self.assertRegex(res.out, VERIFY_RE)
            self.assert_close(np.load(self.path("y4.npy")), x, W, b, TOL, "--verify -o")

        with self.subTest("--verify with other weights of the same shape"):
            res = d.client("forward", self.path("x.npy"), "--verify", other)
            self.assertEqual(res.rc, 2, repr(res))
            m = VERIFY_RE.search(res.out + res.err)
            self.assertIsNotNone(m, "no verify: line: %r" % res)
            self.assertEqual(m.group(4), "FAILED", repr(res))
            self.assertGreater(float(m.group(2).rstrip(",")), TOL, repr(res))
        d.stop()

    def test_verify_half_precision(self):
        """--verify reads F16 and BF16 files too (the reference uses the stored values)."""
        rng = np.random.default_rng(11)
        for dtype, n in (("F16", 2), ("BF16", 3)):
            with self.subTest(dtype=dtype):
                wpath = self.path("v%s.safetensors" % dtype)
                W, b = make_layer(wpath, 24, 20, bias=(dtype == "F16"), dtype=dtype, seed=3)
                d = self.start_daemon(wpath, "--cpu", n, name="verify-" + dtype)
                x = rng.standard_normal((7, 20)).astype(np.float32)
                np.save(self.path("xv.npy"), x)
                res = d.client("forward", self.path("xv.npy"), "-o", self.path("yv.npy"),
                               "--verify", wpath)
                self.assertEqual(res.rc, 0, repr(res))
                m = VERIFY_RE.search(res.out)
                self.assertIsNotNone(m, "no verify: line: %r" % res)
                self.assertEqual(m.group(4), "ok", repr(res))
                self.assertLessEqual(float(m.group(2).rstrip(",")), TOL)
                self.assert_close(np.load(self.path("yv.npy")), x, W, b, TOL, dtype)
                d.stop()


if __name__ == "__main__":
    unittest.main(verbosity=2)
