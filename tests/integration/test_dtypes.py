"""FP16 and BF16 on the wire (tpd --io-dtype): the coordinator widens requests to the workers'
FP32 and rounds responses to the model's datatype, for any backend.

The layer: in 40, out 42, bias, F32 weights, 2 cpu ranks (21 columns each, not a power of two),
--max-batch 64. For each of FP16 and BF16 a daemon with that --io-dtype:

(a) ModelMetadata and ModelConfig name the datatype (and tpd's io_dtype parameter, shown by
    `tpclient metadata`).
(b) tritonclient sends FP16 (np.float16) or BF16 (ml_dtypes.bfloat16) rows at batch 1, 7 and 64
    and gets outputs of the same datatype, within a tolerance of the float64 reference of the
    rounded input that only a correctly rounded output meets: 6e-4 for FP16 (half an ulp is
    2^-11 = 4.9e-4 relative; truncation would reach 9.8e-4), 4.5e-3 for BF16 (2^-8 = 3.9e-3;
    truncation 7.8e-3). Every output value is also within half an ulp (plus the FP32
    accumulation's error) of the float64 result: correctly rounded, which truncation is not.
(c) A request of the wrong datatype (FP32, or the other half type) or FP32-sized data is
    INVALID_ARGUMENT, and the message names both datatypes; an FP32 model refuses FP16 alike.
(d) FP16 through system shared memory (input and output regions sized in 2-byte elements).
(e) `tpclient forward --verify`: float16 .npy input, float16 .npy output (float32 for BF16, values
    exactly BF16), verification passes with the default tolerance and fails with 1e-6; float32
    input is rounded by tpclient with a note. `tpclient bench` runs against the FP16 model.
    The same rows sent by tpclient (in a 64 + 6 row split) and by tritonclient (alone) are the
    same bits where the model says batch_invariant (the default GEMM), and only within the
    tolerance with --cpu-gemm openblas, whose kernels change with the number of rows.
(f) A bad --io-dtype is refused in one line naming the value.
"""

import os
import sys
import unittest

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tpdtest import TpdTestCase, make_layer, reference, rel_err, run, TPD  # noqa: E402

import grpc  # noqa: E402
import ml_dtypes  # noqa: E402
import tritonclient.grpc as tgrpc  # noqa: E402
import tritonclient.utils.shared_memory as shm  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

IN, OUT, RANKS, MAX_BATCH = 40, 42, 2, 64
NP = {"FP16": np.float16, "BF16": ml_dtypes.bfloat16}
TOL = {"FP16": 6e-4, "BF16": 4.5e-3}
# explicit mantissa bits and smallest normal exponent
MANT = {"FP16": 10, "BF16": 7}
EMIN = {"FP16": -14, "BF16": -126}


class DtypeCase(TpdTestCase):

    def setUp(self):
        super().setUp()
        self.wpath = self.path("dt.safetensors")
        self.W, self.b = make_layer(self.wpath, OUT, IN, bias=True, dtype="F32", seed=5)
        self.rng = np.random.default_rng(17)

    def start(self, io_dtype, *extra):
        d = self.start_daemon(self.wpath, "--cpu", RANKS, "--max-batch", MAX_BATCH,
                              "--io-dtype", io_dtype, "--model", "lin", *extra,
                              name="dt_" + io_dtype)
        client = tgrpc.InferenceServerClient(url=d.addr)
        self.addCleanup(client.close)
        return d, client

    def x(self, rows, dt):
        return self.rng.standard_normal((rows, IN)).astype(np.float32).astype(NP[dt])

    def check(self, y, x, dt, what):
        """y (in dt) against the float64 reference of x (in dt, as the server saw it)."""
        self.assertEqual(y.dtype, NP[dt], what)
        y32 = y.astype(np.float32)
        ref, mag = reference(x.astype(np.float32), self.W, self.b)
        err = rel_err(y32, ref, mag)
        self.assertLessEqual(err, TOL[dt], "%s: relative error %.3g" % (what, err))
        # correctly rounded: within half an ulp of the float64 result, plus room for the FP32
        # accumulation (a few 1e-7 of mag here); truncation or a wrong rounding exceeds it
        big = np.maximum(np.abs(ref), np.abs(y32.astype(np.float64)))
        _, ex = np.frexp(big)
        ulp = np.ldexp(1.0, np.maximum(ex - 1, EMIN[dt]) - MANT[dt])
        over = np.abs(y32.astype(np.float64) - ref) - (0.5 * ulp + 1e-5 * mag)
        i = int(np.argmax(over))
        self.assertLessEqual(float(over.flat[i]), 0.0,
                             "%s: element %d is %r, float64 %r: not correctly rounded"
                             % (what, i, float(y32.flat[i]), float(ref.flat[i])))
        return err

    def infer(self, client, x, dt):
        inp = tgrpc.InferInput("input", list(x.shape), dt)
        inp.set_data_from_numpy(x)
        return client.infer("lin", [inp]).as_numpy("output")

    def assert_same_rows(self, y, y_alone, x, dt, invariant, what):
        """The same input rows answered in different jobs: bit-equal where the GEMM is batch-
        invariant, each within the tolerance of the reference otherwise."""
        if invariant:
            self.assertTrue(np.array_equal(y.view(np.uint16), y_alone.view(np.uint16)),
                            "%s: answers differ between jobs of a batch-invariant model" % what)
        else:
            self.check(y, x, dt, what)
            self.check(y_alone, x, dt, what + ", alone")

    def expect_invalid(self, client, datatype, arr, words):
        inp = tgrpc.InferInput("input", list(arr.shape), datatype)
        inp.set_data_from_numpy(arr)
        with self.assertRaises(InferenceServerException) as cm:
            client.infer("lin", [inp])
        e = cm.exception
        self.assertEqual(e.status(), str(grpc.StatusCode.INVALID_ARGUMENT), str(e))
        for w in words:
            self.assertIn(w, e.message(), str(e))

    def run_dtype(self, dt):
        other = "BF16" if dt == "FP16" else "FP16"
        d, client = self.start(dt.lower())
        pids = d.worker_pids()

        with self.subTest("metadata and config"):
            md = client.get_model_metadata("lin")
            self.assertEqual(md.inputs[0].datatype, dt)
            self.assertEqual(md.outputs[0].datatype, dt)
            m = d.client("metadata")
            self.assertEqual(m.rc, 0, repr(m))
            self.assertIn("io_dtype: %s\n" % dt, m.out)
            self.assertIn("gemm_dtype: FP32\n", m.out)
            self.assertIn("batch_invariant: true\n", m.out)
            self.assertRegex(m.out, r"input: .*%s" % dt)
            cfg = client.get_model_config("lin").config
            want = getattr(tgrpc.model_config_pb2, "TYPE_" + dt)
            self.assertEqual(cfg.input[0].data_type, want)
            self.assertEqual(cfg.output[0].data_type, want)

        for rows in (1, 7, 64):
            with self.subTest("batch", rows=rows):
                x = self.x(rows, dt)
                self.check(self.infer(client, x, dt), x, dt, "%s batch %d" % (dt, rows))

        with self.subTest("wrong datatypes"):
            x = self.x(3, dt)
            self.expect_invalid(client, "FP32", x.astype(np.float32), ["FP32", dt])
            self.expect_invalid(client, other, x.astype(NP[other]), [other, dt])
            # the right datatype with FP32-sized bytes
            inp = tgrpc.InferInput("input", [3, IN], dt)
            inp.set_data_from_numpy(x)
            inp._raw_content = x.astype(np.float32).tobytes()
            with self.assertRaises(InferenceServerException) as cm:
                client.infer("lin", [inp])
            self.assertEqual(cm.exception.status(), str(grpc.StatusCode.INVALID_ARGUMENT))
            self.assertIn("needs %d bytes" % (3 * IN * 2), cm.exception.message())

        # nothing above hurt a worker, and a good request still succeeds
        self.assertEqual(d.worker_pids(), pids)
        x = self.x(5, dt)
        self.check(self.infer(client, x, dt), x, dt, "after the bad requests")
        return d, client

    def test_fp16(self):
        d, client = self.run_dtype("FP16")

        with self.subTest("shared memory"):
            rows = 7
            x = self.x(rows, "FP16")
            in_bytes, out_bytes = rows * IN * 2, rows * OUT * 2
            h_in = shm.create_shared_memory_region("dt_in", "/tpd_dt_in_%d" % os.getpid(), 64 + in_bytes)
            self.addCleanup(shm.destroy_shared_memory_region, h_in)
            h_out = shm.create_shared_memory_region("dt_out", "/tpd_dt_out_%d" % os.getpid(), out_bytes)
            self.addCleanup(shm.destroy_shared_memory_region, h_out)
            client.register_system_shared_memory("dt_in", "/tpd_dt_in_%d" % os.getpid(), 64 + in_bytes)
            client.register_system_shared_memory("dt_out", "/tpd_dt_out_%d" % os.getpid(), out_bytes)
            self.addCleanup(client.unregister_system_shared_memory)
            shm.set_shared_memory_region(h_in, [x], offset=64)
            inp = tgrpc.InferInput("input", [rows, IN], "FP16")
            inp.set_shared_memory("dt_in", in_bytes, offset=64)
            out = tgrpc.InferRequestedOutput("output")
            out.set_shared_memory("dt_out", out_bytes)
            client.infer("lin", [inp], outputs=[out])
            y = shm.get_contents_as_numpy(h_out, np.float16, [rows, OUT])
            self.check(np.array(y), x, "FP16", "FP16 through shared memory")
            # FP32-sized regions are refused with the FP16 size
            inp.set_shared_memory("dt_in", rows * IN * 4, offset=0)
            with self.assertRaises(InferenceServerException) as cm:
                client.infer("lin", [inp])
            self.assertIn("FP16 needs %d bytes" % in_bytes, cm.exception.message())

        with self.subTest("tpclient forward --verify, float16 in and out"):
            x = self.x(70, "FP16")  # above --max-batch: two requests
            xin, yout = self.path("x16.npy"), self.path("y16.npy")
            np.save(xin, x)
            res = d.client("forward", xin, "-o", yout, "--verify", self.wpath)
            self.assertEqual(res.rc, 0, repr(res))
            self.assertIn("tolerance 0.01): ok", res.out)
            self.assertNotIn("note", res.err)
            y = np.load(yout)
            self.check(y, x, "FP16", "tpclient forward")
            # the same answer as tritonclient's for the same rows, sent alone
            self.assertEqual(y[:7].dtype, np.float16)
            self.assert_same_rows(y[:7], self.infer(client, x[:7], "FP16"), x[:7], "FP16", True,
                                  "tpclient forward and tritonclient")
            # a tolerance below FP16's rounding fails
            res = d.client("forward", xin, "--verify", self.wpath, "--tolerance", "1e-6")
            self.assertEqual(res.rc, 2, repr(res))
            self.assertIn("FAILED", res.out)

        with self.subTest("tpclient forward, float32 input rounded with a note"):
            x32 = self.rng.standard_normal((9, IN)).astype(np.float32)
            xin, yout = self.path("x32.npy"), self.path("y32.npy")
            np.save(xin, x32)
            res = d.client("forward", xin, "-o", yout, "--verify", self.wpath, "--shm")
            self.assertEqual(res.rc, 0, repr(res))
            self.assertIn("rounded to FP16", res.err)
            self.check(np.load(yout), x32.astype(np.float16), "FP16", "float32 input")

        with self.subTest("tpclient bench"):
            res = d.client("bench", "--rows", "7", "--iters", "20", "--warmup", "2",
                           "--concurrency", "2")
            self.assertEqual(res.rc, 0, repr(res))
            self.assertIn("bench-result:", res.out)
            self.assertIn(" dtype=FP16", res.out)
            res = d.client("bench", "--rows", "7", "--iters", "10", "--warmup", "1", "--shm")
            self.assertEqual(res.rc, 0, repr(res))

    def test_bf16(self):
        d, client = self.run_dtype("BF16")

        with self.subTest("tpclient forward --verify: BF16 output as float32 .npy"):
            x = self.x(7, "BF16")
            xin, yout = self.path("xb.npy"), self.path("yb.npy")
            np.save(xin, x.astype(np.float32))  # exact BF16 values: no rounding, no note
            res = d.client("forward", xin, "-o", yout, "--verify", self.wpath)
            self.assertEqual(res.rc, 0, repr(res))
            self.assertIn("tolerance 0.01): ok", res.out)
            y = np.load(yout)
            self.assertEqual(y.dtype, np.float32)
            yb = y.astype(ml_dtypes.bfloat16)
            self.assertTrue(np.array_equal(yb.astype(np.float32), y), "not BF16 values")
            self.check(yb, x, "BF16", "tpclient forward")
            self.assert_same_rows(yb, self.infer(client, x, "BF16"), x, "BF16", True,
                                  "tpclient forward and tritonclient")
            res = d.client("forward", xin, "--verify", self.wpath, "--tolerance", "1e-6")
            self.assertEqual(res.rc, 2, repr(res))

    def test_openblas_answers_within_tolerance(self):
        d, client = self.start("fp16", "--cpu-gemm", "openblas")
        m = d.client("metadata")
        self.assertIn("batch_invariant: false\n", m.out, repr(m))
        x = self.x(70, "FP16")
        xin, yout = self.path("x16b.npy"), self.path("y16b.npy")
        np.save(xin, x)
        res = d.client("forward", xin, "-o", yout, "--verify", self.wpath)
        self.assertEqual(res.rc, 0, repr(res))
        y = np.load(yout)
        self.check(y, x, "FP16", "tpclient forward, openblas")
        self.assert_same_rows(y[:7], self.infer(client, x[:7], "FP16"), x[:7], "FP16", False,
                              "tpclient forward and tritonclient, openblas")

    def test_fp32_model_refuses_half(self):
        d, client = self.start("fp32")
        md = client.get_model_metadata("lin")
        self.assertEqual(md.inputs[0].datatype, "FP32")
        x = self.x(2, "FP16")
        self.expect_invalid(client, "FP16", x, ["FP16", "FP32"])

    def test_bad_flag(self):
        res = run([TPD, "--weights", self.wpath, "--io-dtype", "fp8", "--config", "none"])
        self.assertEqual(res.rc, 64, repr(res))
        lines = [l for l in res.err.splitlines() if l.strip()]
        self.assertEqual(len(lines), 1, repr(res))
        self.assertIn("--io-dtype", lines[0])
        self.assertIn("'fp8'", lines[0])
        # and it is a key of the configuration file too
        conf = self.path("dt.conf")
        with open(conf, "w") as f:
            f.write("weights = %s\nio-dtype = bf17\n" % self.wpath)
        res = run([TPD, "--config", conf], timeout=30)
        self.assertEqual(res.rc, 78, repr(res))
        self.assertIn("key 'io-dtype'", res.err)
        self.assertIn("'bf17'", res.err)


if __name__ == "__main__":
    unittest.main()
