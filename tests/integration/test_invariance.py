"""Batch invariance (tpd --cpu-gemm invariant, the default): a row's answer is the same bits
whatever it was batched with, however many rows its job had, and wherever it sat in them.

The layer: in 1024, out 1026, bias, F32 weights; out / N = 1026, 513, 342 at N = 1, 2, 3 (none a
power of two); --max-batch 16, one slot, so that requests queue behind a job. For each N in 1, 2, 3 and each datatype on the wire (FP32, FP16, BF16)
one daemon with dynamic batching on (a 20 ms delay), and 16 probe rows:

(a) alone: each probe row as its own 1-row request, one at a time (one job each). These bits are
    the answer every later case must give, and they are checked against the float64 reference
    (FP32: relative error <= 1e-5; FP16/BF16: within the datatype's rounding).
(b) every job size: one request of m rows for each m from 1 to --max-batch, filled with probe rows
    in a rotating order, so each size puts rows at other places; every row must be bit-equal to
    (a).
(c) under load: 3 waves of 12 requests of 1 to 6 rows (so that several fit in a job), mixing probe
    rows at random places with random other rows. The workers are stopped (SIGSTOP) while a wave
    is sent and until tpd has accepted all of it (the debug log), so that the scheduler batches
    them into shared jobs however fast the workers and however slow the client are (the debug log must show jobs of more than one request, or the case proves
    nothing); every probe row must be bit-equal to (a), and every other row within the tolerance
    of its reference.
(d) the rank count: the alone answers at N = 1, 2 and 3 are the same bits (every element is summed
    in the same order, whichever rank computes it).
ModelMetadata says batch_invariant true; with --cpu-gemm openblas it says false.

TP_INVARIANCE_GEMM=openblas runs the same cases against cblas_sgemm, to see them fail where its
kernels change with the shape (on most x86 CPUs); the suite never sets it.
"""

import os
import re
import sys
import unittest

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tpdtest import TpdTestCase, infer_all_at_once, make_layer, reference, rel_err  # noqa: E402

import ml_dtypes  # noqa: E402
import tritonclient.grpc as tgrpc  # noqa: E402

IN, OUT, MAX_BATCH, PROBES = 1024, 1026, 16, 16
RANKS = (1, 2, 3)
NP = {"FP32": np.float32, "FP16": np.float16, "BF16": ml_dtypes.bfloat16}
TOL = {"FP32": 1e-5, "FP16": 6e-4, "BF16": 4.5e-3}
GEMM = os.environ.get("TP_INVARIANCE_GEMM", "invariant")
BATCH_RE = re.compile(r"tpd: debug: batch of (\d+) requests, (\d+) rows on slot")
WAVES, WAVE_REQUESTS, LOAD_ROWS = 3, 12, 6


def bits(a):
    """The bytes of an array: equal bits, not equal values (so -0.0 != 0.0, and NaN == NaN)."""
    return np.ascontiguousarray(a).tobytes()


class TestInvariance(TpdTestCase):

    def setUp(self):
        super().setUp()
        self.wpath = self.path("inv.safetensors")
        self.W, self.b = make_layer(self.wpath, OUT, IN, bias=True, dtype="F32", seed=41)
        rng = np.random.default_rng(43)
        # mixed scales, so that any change of summation order shows in the low bits
        self.probe32 = (rng.standard_normal((PROBES, IN)) *
                        rng.choice([0.01, 1.0, 30.0], size=(PROBES, 1))).astype(np.float32)

    def infer(self, client, x, dt):
        inp = tgrpc.InferInput("input", list(x.shape), dt)
        inp.set_data_from_numpy(x)
        y = client.infer("inv", [inp], client_timeout=60).as_numpy("output")
        self.assertEqual(y.dtype, NP[dt])
        self.assertEqual(y.shape, (x.shape[0], OUT))
        return y

    def check_ref(self, y, x, dt, what):
        ref, mag = reference(x.astype(np.float32), self.W, self.b)
        err = rel_err(y.astype(np.float32), ref, mag)
        self.assertLessEqual(err, TOL[dt], "%s: relative error %.3g" % (what, err))

    def assert_rows(self, y, rows, alone, what):
        for i, r in enumerate(rows):
            if r >= 0 and bits(y[i]) != bits(alone[r]):
                diff = np.abs(y[i].astype(np.float64) - alone[r].astype(np.float64)).max()
                self.fail("%s: probe row %d at place %d of %d differs from the row alone "
                          "(max |diff| %.3g)" % (what, r, i, len(rows), diff))

    def run_case(self, ranks, dt):
        """Cases (a) to (c) on one daemon; returns the alone answers."""
        d = self.start_daemon(self.wpath, "--cpu", ranks, "--max-batch", MAX_BATCH,
                              "--io-dtype", dt.lower(), "--model", "inv", "--cpu-gemm", GEMM,
                              "--batch-delay-us", 20000, "--slots", 1, "--log-level", "debug",
                              name="inv_%d_%s" % (ranks, dt))
        client = tgrpc.InferenceServerClient(url=d.addr)
        self.addCleanup(client.close)
        m = d.client("metadata")
        self.assertIn("batch_invariant: %s\n" % ("true" if GEMM == "invariant" else "false"),
                      m.out, repr(m))
        probe = self.probe32.astype(NP[dt])
        what = "N=%d %s" % (ranks, dt)

        alone = np.stack([self.infer(client, probe[r:r + 1], dt)[0] for r in range(PROBES)])
        self.check_ref(alone, probe, dt, what + " alone")

        for m in range(1, MAX_BATCH + 1):
            rows = [(m * 5 + i) % PROBES for i in range(m)]
            self.assert_rows(self.infer(client, probe[rows], dt), rows, alone,
                             "%s, a request of %d rows" % (what, m))

        before = len([n for n, _ in BATCH_RE.findall(d.log()) if int(n) > 1])
        rng = np.random.default_rng(100 + ranks)
        shared = 0
        for wave in range(1, WAVES + 1):
            sent = []
            for i in range(WAVE_REQUESTS):
                m = int(rng.integers(1, LOAD_ROWS + 1))
                # -1 marks a random row that is no probe
                rows = [int(r) if rng.random() < 0.5 else -1
                        for r in rng.integers(0, PROBES, size=m)]
                x = np.where(np.array(rows)[:, None] >= 0, probe[np.maximum(rows, 0)],
                             rng.standard_normal((m, IN)).astype(NP[dt]))
                sent.append((rows, x))
            # all at once, to stopped workers: they queue behind the first job and share the
            # next ones once the workers go on
            results = infer_all_at_once(client, "inv", [x for _, x in sent], "wave%d" % wave,
                                        hold=d, datatype=dt)
            for i, (rows, x) in enumerate(sent):
                result, error = results[i]
                self.assertIsNone(error, "%s wave %d request %d: %s" % (what, wave, i, error))
                y = result.as_numpy("output")
                self.assert_rows(y, rows, alone, "%s under load" % what)
                self.check_ref(y, x, dt, "%s under load" % what)
            shared = len([n for n, _ in BATCH_RE.findall(d.log()) if int(n) > 1]) - before
        self.assertGreater(shared, 0, "%s: no job of more than one request formed under load: "
                           "the case did not test batching" % what)
        d.stop()
        return alone

    def test_rows_are_batch_invariant(self):
        for dt in ("FP32", "FP16", "BF16"):
            answers = {}
            for ranks in RANKS:
                with self.subTest(ranks=ranks, dtype=dt):
                    answers[ranks] = self.run_case(ranks, dt)
            with self.subTest("rank counts", dtype=dt):
                for ranks in RANKS[1:]:
                    if ranks in answers and RANKS[0] in answers:
                        self.assertEqual(bits(answers[ranks]), bits(answers[RANKS[0]]),
                                         "%s: N=%d and N=%d answers differ" % (dt, ranks,
                                                                                RANKS[0]))

    def test_openblas_is_not_claimed_invariant(self):
        d = self.start_daemon(self.wpath, "--cpu", 2, "--model", "inv", "--cpu-gemm", "openblas",
                              name="inv_blas")
        client = tgrpc.InferenceServerClient(url=d.addr)
        self.addCleanup(client.close)
        x = self.probe32[:5]
        self.check_ref(self.infer(client, x, "FP32"), x, "FP32", "openblas")
        m = d.client("metadata")
        self.assertIn("batch_invariant: false\n", m.out, repr(m))


if __name__ == "__main__":
    unittest.main(verbosity=2)
