"""`tpclient forward` reads the inputs a user of LLM checkpoints has, or refuses them by name.

One layer (in 40, out 36, bias, F32 weights written here with safetensors.numpy), served by tpd
with 2 cpu ranks and --max-batch 8, so that most inputs below take several requests; the server
takes only 2-D [rows, in] requests, which is all tpclient may send.

* Ranks 1 to 4: [in], [B, in], [B, S, in] and [A, B, S, in] .npy inputs give outputs of shape
  [out], [B, out], [B, S, out], [A, B, S, out], each value within 1e-5 (relative error of
  docs/cli.md) of the float64 NumPy reference; a 2-D input of 21 rows is sent as requests of 8,
  8 and 5 rows (counted in tpd's debug log), and a 3-D one of 20 rows through --shm as 8, 8 and
  4. Fortran-order inputs (2-D, 3-D, 4-D), float16 and float64 inputs, --verify of a 4-D input,
  the printed summary of a 3-D input, and a .bin output of a 3-D input.
* Raw .bin inputs are read as the model's wire datatype unless --input-dtype says otherwise
  (fp16, bf16, fp32), with a note naming the assumption; a .bin whose size is not a whole number
  of rows is refused naming its size, the row size and the dtype.
* Shapes and dtypes that cannot be sent are refused (exit 1) in one line naming what is wrong:
  the last dim 255 against the model's 40 inputs, a scalar, 5 dims, a zero dim, '>f4', '<i8'.
* Other formats (.npz, .pt, .pth, .safetensors, .txt, no extension) as input, and anything but
  .npy or .bin as output, are usage errors (exit 64) naming the extension, found before any call
  to the server; so are a bad --input-dtype and --input-dtype with a .npy input.
* bfloat16 .npy files, as ml_dtypes saves them ('<V2', written here with NumPy's own header
  writer) and as plain NumPy saves uint16 bits viewed as 'V2' ('|V2'), C and Fortran order, go
  to a BF16 model (--io-dtype bf16) as they are (no rounding note) and come back as float32 .npy
  of exact BF16 values, within 4.5e-3 of the float64 reference: the inputs are exact, the
  workers accumulate in FP32 (error near 1e-7 of the magnitude), and the server rounds each
  output to BF16, at most half an ulp, 2^-8 = 3.9e-3 of its magnitude (truncation would reach
  7.8e-3). The same file to an FP16 model is rounded to FP16 by tpclient, with a note.
"""

import os
import re
import sys
import unittest

import numpy as np
from safetensors.numpy import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tpdtest import (TpdTestCase, f32_to_bf16_bits, bf16_bits_to_f32, one_line_error,  # noqa: E402
                     reference, rel_err)

IN, OUT, RANKS, MAX_BATCH = 40, 36, 2, 8
TOL = 1e-5
TOL_BF16 = 4.5e-3  # see the module docstring
TOL_FP16 = 6e-4  # half an FP16 ulp is 2^-11 = 4.9e-4 of the magnitude, plus FP32 accumulation
EXIT_ERROR, EXIT_USAGE = 1, 64
ACCEPTED_RE = re.compile(r"tpd: debug: accepted request '[^']*': (\d+) rows")


def save_bf16_npy(path, a, descr, fortran=False):
    """Saves float32 values a (exact BF16 values) as a bfloat16 .npy: '|V2' through np.save of
    the uint16 bits viewed as 'V2', '<V2' (what ml_dtypes writes) through NumPy's header writer."""
    bits = f32_to_bf16_bits(a).reshape(a.shape)
    if fortran:
        bits = np.asfortranarray(bits)
    v = bits.view("V2")
    if descr == "|V2":
        np.save(path, v)
    else:
        with open(path, "wb") as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": descr, "fortran_order": fortran, "shape": a.shape})
            f.write(bits.tobytes(order="F" if fortran else "C"))
    with open(path, "rb") as f:
        head = f.read(128)
    assert ("'descr': '%s'" % descr).encode() in head, head
    assert ("'fortran_order': %s" % fortran).encode() in head, head


class ClientInputs(TpdTestCase):

    def setUp(self):
        super().setUp()
        rng = np.random.default_rng(41)
        k = 1.0 / np.sqrt(IN)
        self.W = rng.uniform(-k, k, (OUT, IN)).astype(np.float32)
        self.b = rng.uniform(-k, k, OUT).astype(np.float32)
        self.wpath = self.path("lin.safetensors")
        save_file({"weight": self.W, "bias": self.b}, self.wpath)
        self.rng = np.random.default_rng(7)

    def start(self, io_dtype="fp32"):
        return self.start_daemon(self.wpath, "--cpu", RANKS, "--max-batch", MAX_BATCH,
                                 "--io-dtype", io_dtype, "--log-level", "debug",
                                 name="in_" + io_dtype)

    def x(self, *shape):
        return self.rng.standard_normal(shape).astype(np.float32)

    def run_ok(self, d, xin, *extra, out=None):
        """Runs forward xin -o out; asserts exit 0 and returns (y as loaded, Result)."""
        out = out or self.path("y.npy")
        res = d.client("forward", xin, "-o", out, *extra)
        self.assertEqual(res.rc, 0, repr(res))
        return (np.load(out) if out.endswith(".npy") else None), res

    def check(self, y, x, tol=TOL, what=""):
        """y ([..., OUT]) against the float64 reference of x ([..., IN]), shapes included."""
        self.assertEqual(y.shape, x.shape[:-1] + (OUT,), "%s: output shape" % what)
        ref, mag = reference(x.reshape(-1, IN), self.W, self.b)
        err = rel_err(y.reshape(-1, OUT).astype(np.float32), ref, mag)
        self.assertLessEqual(err, tol, "%s: relative error %.3g > %.3g" % (what, err, tol))
        return err

    def refused(self, d, rc, args, *needles):
        """Runs tpclient args against d; asserts exit rc, one error line holding every needle."""
        res = d.client(*args)
        self.assertEqual(res.rc, rc, repr(res))
        line = one_line_error(self, res)
        for n in needles:
            self.assertIn(n, line, repr(res))
        return line


class TestShapes(ClientInputs):

    def test_ranks_and_splitting(self):
        d = self.start()
        for shape in ((IN,), (3, IN), (2, 5, IN), (2, 3, 2, IN)):
            with self.subTest(shape=shape):
                x = self.x(*shape)
                np.save(self.path("x.npy"), x)
                y, res = self.run_ok(d, self.path("x.npy"))
                self.assertEqual(y.dtype, np.float32)
                self.check(y, x, what=str(shape))
                self.assertNotIn("note", res.err)

        with self.subTest("21 rows go as requests of 8, 8 and 5"):
            x = self.x(21, IN)
            np.save(self.path("x21.npy"), x)
            before = len(ACCEPTED_RE.findall(d.log()))
            y, _ = self.run_ok(d, self.path("x21.npy"))
            self.check(y, x, what="21 rows")
            rows = [int(r) for r in ACCEPTED_RE.findall(d.log())[before:]]
            self.assertEqual(rows, [8, 8, 5], "requests seen by tpd\n%s" % d.log_tail())

        with self.subTest("3-D input of 4 x 5 rows, two requests of more than one row each"):
            x = self.x(4, 5, IN)
            np.save(self.path("x3.npy"), x)
            before = len(ACCEPTED_RE.findall(d.log()))
            y, _ = self.run_ok(d, self.path("x3.npy"), "--shm")
            self.check(y, x, what="3-D --shm")
            rows = [int(r) for r in ACCEPTED_RE.findall(d.log())[before:]]
            self.assertEqual(rows, [8, 8, 4])

        for shape in ((6, IN), (3, 4, IN), (2, 2, 3, IN)):
            with self.subTest("fortran order", shape=shape):
                x = np.asfortranarray(self.x(*shape))
                np.save(self.path("xf.npy"), x)
                with open(self.path("xf.npy"), "rb") as f:
                    self.assertIn(b"'fortran_order': True", f.read(128))
                y, _ = self.run_ok(d, self.path("xf.npy"))
                self.check(y, np.ascontiguousarray(x), what="fortran %s" % (shape,))

        with self.subTest("float16 and float64 .npy"):
            x16 = self.x(3, 4, IN).astype(np.float16)
            np.save(self.path("x16.npy"), x16)
            y, res = self.run_ok(d, self.path("x16.npy"))
            self.check(y, x16.astype(np.float32), what="float16")
            self.assertNotIn("note", res.err)  # FP16 widens to FP32 exactly
            x64 = self.rng.standard_normal((2, 3, IN))
            np.save(self.path("x64.npy"), x64)
            y, res = self.run_ok(d, self.path("x64.npy"))
            self.check(y, x64.astype(np.float32), what="float64")
            self.assertIn("holds FP64 values; the model takes FP32, so they are rounded", res.err)

        with self.subTest("--verify of a 4-D input"):
            np.save(self.path("xv.npy"), self.x(2, 2, 3, IN))
            res = d.client("forward", self.path("xv.npy"), "--verify", self.wpath)
            self.assertEqual(res.rc, 0, repr(res))
            self.assertIn("(tolerance 1e-05): ok", res.out)

        with self.subTest("summary of a 3-D input"):
            np.save(self.path("xs.npy"), self.x(2, 5, IN))
            res = d.client("forward", self.path("xs.npy"))
            self.assertEqual(res.rc, 0, repr(res))
            self.assertIn("output [2, 5, %d] FP32" % OUT, res.out)

        with self.subTest(".bin output of a 3-D input is raw float32 rows"):
            x = self.x(2, 5, IN)
            np.save(self.path("xb.npy"), x)
            self.run_ok(d, self.path("xb.npy"), out=self.path("y.bin"))
            raw = np.fromfile(self.path("y.bin"), dtype="<f4")
            self.assertEqual(raw.size, 10 * OUT)
            self.check(raw.reshape(2, 5, OUT), x, what=".bin output")
        d.stop()

    def test_refused_shapes_and_dtypes(self):
        d = self.start()
        np.save(self.path("w255.npy"), self.x(5, 255))
        self.refused(d, EXIT_ERROR, ("forward", self.path("w255.npy")),
                     "w255.npy has shape [5, 255]: its last dim 255 is not the model's %d inputs"
                     % IN)
        np.save(self.path("w3.npy"), self.x(2, 3, 7))
        self.refused(d, EXIT_ERROR, ("forward", self.path("w3.npy")), "[2, 3, 7]", "last dim 7")
        np.save(self.path("scalar.npy"), np.float32(1.5))
        self.refused(d, EXIT_ERROR, ("forward", self.path("scalar.npy")), "shape []", "scalar")
        np.save(self.path("r5.npy"), self.x(1, 2, 1, 2, IN))
        self.refused(d, EXIT_ERROR, ("forward", self.path("r5.npy")),
                     "[1, 2, 1, 2, %d]: 5 dims" % IN, "1 to 4")
        np.save(self.path("z.npy"), self.x(3, 0, IN))
        self.refused(d, EXIT_ERROR, ("forward", self.path("z.npy")), "[3, 0, %d]" % IN,
                     "dim 1 is 0")
        np.save(self.path("be.npy"), self.x(2, IN).astype(">f4"))
        self.refused(d, EXIT_ERROR, ("forward", self.path("be.npy")), "be.npy", "'>f4'")
        np.save(self.path("i8.npy"), np.ones((2, IN), dtype="<i8"))
        self.refused(d, EXIT_ERROR, ("forward", self.path("i8.npy")), "i8.npy", "'<i8'")
        d.stop()

    def test_formats_refused_by_name(self):
        d = self.start()
        x = self.x(2, IN)
        np.savez(self.path("x.npz"), x=x)
        for name in ("x.npz", "x.pt", "x.pth", "x.safetensors", "x.txt"):
            path = self.path(name)
            if not os.path.exists(path):
                x.tofile(path)
            ext = name[1:]
            with self.subTest(input=name):
                self.refused(d, EXIT_USAGE, ("forward", path),
                             "%s: unsupported input format '%s' (expected .npy or raw .bin)"
                             % (path, ext))
        with self.subTest(input="no extension"):
            x.tofile(self.path("x"))
            self.refused(d, EXIT_USAGE, ("forward", self.path("x")), "no extension")
        np.save(self.path("ok.npy"), x)
        for name in ("y.npz", "y.pt", "y"):
            with self.subTest(output=name):
                self.refused(d, EXIT_USAGE, ("forward", self.path("ok.npy"), "-o", self.path(name)),
                             "unsupported output format")
                self.assertFalse(os.path.exists(self.path(name)))
        with self.subTest("found before any call to the server"):
            res = d.client("forward", self.path("x.npz"), "--server", "unix:" + self.path("none"))
            self.assertEqual(res.rc, EXIT_USAGE, repr(res))
            self.assertIn("'.npz'", one_line_error(self, res))
        with self.subTest("--input-dtype"):
            self.refused(d, EXIT_USAGE, ("forward", self.path("x.txt"), "--input-dtype", "fp64"),
                         "'fp64'")
            self.refused(d, EXIT_USAGE, ("forward", self.path("ok.npy"), "--input-dtype", "fp16"),
                         "--input-dtype is for raw .bin input")
        d.stop()


class TestRawBin(ClientInputs):

    def test_input_dtype(self):
        d = self.start()
        x = self.x(5, IN)
        with self.subTest("default: the model's FP32"):
            x.astype("<f4").tofile(self.path("x.bin"))
            y, res = self.run_ok(d, self.path("x.bin"))
            self.check(y, x, what="default")
            self.assertIn("x.bin read as raw FP32, 5 rows of %d (the model's wire datatype" % IN,
                          res.err)
        with self.subTest("--input-dtype fp16"):
            x16 = x.astype("<f2")
            x16.tofile(self.path("x16.bin"))
            y, res = self.run_ok(d, self.path("x16.bin"), "--input-dtype", "fp16")
            self.check(y, x16.astype(np.float32), what="fp16")
            self.assertIn("x16.bin read as raw FP16, 5 rows of %d (--input-dtype)" % IN, res.err)
            self.assertNotIn("rounded", res.err)
        with self.subTest("--input-dtype bf16"):
            f32_to_bf16_bits(x).astype("<u2").tofile(self.path("xb.bin"))
            y, res = self.run_ok(d, self.path("xb.bin"), "--input-dtype", "BF16")
            self.check(y, bf16_bits_to_f32(f32_to_bf16_bits(x)).reshape(x.shape), what="bf16")
            self.assertIn("xb.bin read as raw BF16, 5 rows of %d (--input-dtype)" % IN, res.err)
        with self.subTest("--input-dtype fp32"):
            y, _ = self.run_ok(d, self.path("x.bin"), "--input-dtype", "fp32")
            self.check(y, x, what="fp32")
        with self.subTest("the same file as fp16 is twice the rows"):
            y, res = self.run_ok(d, self.path("x.bin"), "--input-dtype", "fp16")
            self.assertEqual(y.shape, (10, OUT))
        with self.subTest("a size that is not a whole number of rows"):
            with open(self.path("bad.bin"), "wb") as f:
                f.write(x16.tobytes()[:2 * IN * 2 + 2])
            n = 2 * IN * 2 + 2
            self.refused(d, EXIT_ERROR, ("forward", self.path("bad.bin"), "--input-dtype", "fp16"),
                         "bad.bin has %d bytes, not a whole number of rows of %d FP16 elements, "
                         "%d bytes each (--input-dtype)" % (n, IN, IN * 2))
            self.refused(d, EXIT_ERROR, ("forward", self.path("bad.bin")),
                         "%d bytes" % n, "%d FP32 elements, %d bytes each" % (IN, IN * 4),
                         "the model's wire datatype")
            open(self.path("empty.bin"), "wb").close()
            self.refused(d, EXIT_ERROR, ("forward", self.path("empty.bin")), "empty")
        d.stop()


class TestBf16(ClientInputs):

    def test_bf16_npy_to_bf16_model(self):
        d = self.start("bf16")
        for descr in ("<V2", "|V2"):
            for shape, fortran in (((7, IN), False), ((2, 5, IN), False), ((3, 4, IN), True)):
                with self.subTest(descr=descr, shape=shape, fortran=fortran):
                    xb = bf16_bits_to_f32(f32_to_bf16_bits(self.x(*shape))).reshape(shape)
                    save_bf16_npy(self.path("xb.npy"), xb, descr, fortran)
                    y, res = self.run_ok(d, self.path("xb.npy"))
                    self.assertEqual(y.dtype, np.float32)
                    self.assertTrue(np.array_equal(y, bf16_bits_to_f32(
                        f32_to_bf16_bits(y)).reshape(y.shape)), "not BF16 values")
                    self.check(y, xb, TOL_BF16, "%s %s" % (descr, shape))
                    self.assertIn("dtype '%s', read as bfloat16" % descr, res.err)
                    self.assertNotIn("rounded", res.err)  # it goes as it is

        with self.subTest(".bin defaults to the model's BF16"):
            x = self.x(5, IN)
            f32_to_bf16_bits(x).astype("<u2").tofile(self.path("x.bin"))
            y, res = self.run_ok(d, self.path("x.bin"))
            self.check(y, bf16_bits_to_f32(f32_to_bf16_bits(x)).reshape(x.shape), TOL_BF16, "bin")
            self.assertIn("x.bin read as raw BF16, 5 rows of %d (the model's wire datatype" % IN,
                          res.err)
            self.assertNotIn("rounded", res.err)

        with self.subTest("float32 input is rounded, with a note"):
            x = self.x(3, IN)
            np.save(self.path("x32.npy"), x)
            y, res = self.run_ok(d, self.path("x32.npy"))
            self.assertIn("holds FP32 values; the model takes BF16, so they are rounded to BF16",
                          res.err)
            self.check(y, bf16_bits_to_f32(f32_to_bf16_bits(x)).reshape(x.shape), TOL_BF16,
                       "float32 input")
        d.stop()

    def test_bf16_npy_to_fp16_model(self):
        d = self.start("fp16")
        xb = bf16_bits_to_f32(f32_to_bf16_bits(self.x(2, 3, IN))).reshape(2, 3, IN)
        save_bf16_npy(self.path("xb.npy"), xb, "<V2")
        y, res = self.run_ok(d, self.path("xb.npy"))
        self.assertEqual(y.dtype, np.float16)
        self.assertIn("holds BF16 values; the model takes FP16, so they are rounded to FP16",
                      res.err)
        self.check(y, xb.astype(np.float16).astype(np.float32), TOL_FP16, "bf16 to FP16 model")
        d.stop()


if __name__ == "__main__":
    unittest.main(verbosity=2)
