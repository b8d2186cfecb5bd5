"""Activations of any leading shape: tpd takes an input [..., in] of 1 to 4 dims, flattens its
leading dims into rows, and answers [..., out] in the same leading dims.

The layer: in 40, out 36, bias, F32 weights, 2 cpu ranks, --max-batch 16. Every answer is
checked against a float64 NumPy reference computed from the weights file as the test reads it
(relative error <= 1e-5 for FP32, as docs/cli.md measures it).

* tritonclient sends [in], [B, in], [B, S, in] and [A, B, S, in] FP32 inputs, up to 16 rows, and
  gets outputs [out], [B, out], [B, S, out] and [A, B, S, out]; typed fp32_contents of a 3-D
  input (raw gRPC) too. ModelMetadata still says [-1, in] and [-1, out].
* Dynamic batching (--batch-delay-us): concurrent 3-D requests of different shapes, each with
  its own input at its own scale, each get exactly their own answer in their own shape, and jobs
  of more than one request form; the rows of all jobs add up to the rows sent.
* System shared memory: a 3-D input read from a region, its 3-D answer written to another (and
  either one alone), region sizes counted in rows.
* --io-dtype FP16 and BF16: 3-D (and 1-D) inputs of that datatype, answered in it, within the
  tolerance of a correctly rounded output.
* Refused shapes get INVALID_ARGUMENT naming the shape sent and the dim at fault: 5 dims, a dim
  of 0, a wrong last dim, more rows than --max-batch in 3 or 4 dims, and data of the wrong size
  for a 3-D shape. The daemon then still serves, with the same workers, and stops with exit 0.
"""

import os
import re
import sys
import unittest

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tpdtest import (TpdTestCase, infer_all_at_once, make_layer, read_safetensors,  # noqa: E402
                     reference, rel_err)

import grpc  # noqa: E402
import ml_dtypes  # noqa: E402
import tritonclient.grpc as tgrpc  # noqa: E402
import tritonclient.utils.shared_memory as shm  # noqa: E402
from tritonclient.grpc import service_pb2 as pb  # noqa: E402
from tritonclient.grpc import service_pb2_grpc as pbg  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

TOL = 1e-5
HALF_TOL = {"FP16": 6e-4, "BF16": 4.5e-3}  # as in test_dtypes.py: only correct rounding meets it
NP = {"FP32": np.float32, "FP16": np.float16, "BF16": ml_dtypes.bfloat16}
IN, OUT, RANKS, MAX_BATCH = 40, 36, 2, 16
BATCH_RE = re.compile(r"tpd: debug: batch of (\d+) requests, (\d+) rows on slot")
INV = str(grpc.StatusCode.INVALID_ARGUMENT)


class ShapesCase(TpdTestCase):

    def setUp(self):
        super().setUp()
        self.wpath = self.path("shapes.safetensors")
        make_layer(self.wpath, OUT, IN, bias=True, dtype="F32", seed=23)
        # the reference reads the file itself, not what make_layer meant to write
        t = read_safetensors(self.wpath)
        self.W, self.b = t["weight"], t["bias"]
        self.rng = np.random.default_rng(29)

    def start(self, *extra, name="shapes"):
        d = self.start_daemon(self.wpath, "--cpu", RANKS, "--max-batch", MAX_BATCH,
                              "--model", "lin", *extra, name=name)
        client = tgrpc.InferenceServerClient(url=d.addr)
        self.addCleanup(client.close)
        return d, client

    def x(self, shape, dt="FP32", scale=1.0):
        return (self.rng.standard_normal(shape) * scale).astype(np.float32).astype(NP[dt])

    def check(self, y, x, what, dt="FP32"):
        """y against the float64 reference of x, row by row in x's leading dims."""
        lead = x.shape[:-1]
        self.assertEqual(y.dtype, NP[dt], what)
        self.assertEqual(y.shape, lead + (OUT,), "%s: output shape" % what)
        ref, mag = reference(x.astype(np.float32).reshape(-1, IN), self.W, self.b)
        err = rel_err(y.astype(np.float32).reshape(-1, OUT), ref, mag)
        tol = TOL if dt == "FP32" else HALF_TOL[dt]
        self.assertLessEqual(err, tol, "%s: relative error %.3g > %.3g" % (what, err, tol))
        return err

    def infer(self, client, x, dt="FP32", **kw):
        inp = tgrpc.InferInput("input", list(x.shape), dt)
        inp.set_data_from_numpy(x)
        return client.infer("lin", [inp], **kw)

    def expect_invalid(self, client, x, words):
        with self.assertRaises(InferenceServerException) as cm:
            self.infer(client, x)
        e = cm.exception
        self.assertEqual(e.status(), INV, str(e))
        for w in words:
            self.assertIn(w, e.message(), "message %r lacks %r" % (e.message(), w))
        self.assertNotIn("\n", e.message())
        return e.message()


class TestShapes(ShapesCase):

    def test_fp32_shapes(self):
        d, client = self.start()
        pids = d.worker_pids()
        md = client.get_model_metadata("lin")
        self.assertEqual(list(md.inputs[0].shape), [-1, IN])
        self.assertEqual(list(md.outputs[0].shape), [-1, OUT])
        for shape in [(IN,), (1, IN), (5, IN), (MAX_BATCH, IN), (1, 1, IN), (2, 3, IN),
                      (4, 4, IN), (1, 7, IN), (1, 1, 1, IN), (2, 2, 2, IN), (2, 4, 2, IN),
                      (1, 16, 1, IN)]:
            with self.subTest(shape=shape):
                x = self.x(shape, scale=1 + len(shape))
                res = self.infer(client, x, request_id="s%d" % len(shape))
                self.assertEqual(list(res.get_response().outputs[0].shape),
                                 list(shape[:-1]) + [OUT])
                self.check(res.as_numpy("output"), x, "shape %s" % (shape,))

        with self.subTest("typed fp32_contents of a 3-D input"):
            channel = grpc.insecure_channel(d.addr)
            self.addCleanup(channel.close)
            stub = pbg.GRPCInferenceServiceStub(channel)
            x = self.x((2, 3, IN))
            r = pb.ModelInferRequest(model_name="lin", id="typed")
            t = r.inputs.add(name="input", datatype="FP32", shape=[2, 3, IN])
            t.contents.fp32_contents.extend(x.ravel().tolist())
            resp = stub.ModelInfer(r, timeout=30)
            self.assertEqual(list(resp.outputs[0].shape), [2, 3, OUT])
            y = np.frombuffer(resp.raw_output_contents[0], "<f4").reshape(2, 3, OUT)
            self.check(y, x, "typed 3-D")
            # the wrong number of values, and raw bytes of the wrong size, for a 3-D shape
            del t.contents.fp32_contents[-1:]
            with self.assertRaises(grpc.RpcError) as cm:
                stub.ModelInfer(r, timeout=30)
            self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
            self.assertIn("[2, 3, %d] needs %d fp32_contents, got %d" % (IN, 6 * IN, 6 * IN - 1),
                          cm.exception.details())
            r = pb.ModelInferRequest(model_name="lin", id="raw")
            r.inputs.add(name="input", datatype="FP32", shape=[2, 3, IN])
            r.raw_input_contents.append(self.x((5, IN)).tobytes())
            with self.assertRaises(grpc.RpcError) as cm:
                stub.ModelInfer(r, timeout=30)
            self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
            self.assertIn("[2, 3, %d] FP32 needs %d bytes, raw_input_contents has %d"
                          % (IN, 6 * IN * 4, 5 * IN * 4), cm.exception.details())

        with self.subTest("refused shapes"):
            self.expect_invalid(client, self.x((1, 1, 1, 2, IN)),
                                ["shape [1, 1, 1, 2, %d]" % IN, "expected [..., %d]" % IN,
                                 "5 dims", "at most 4 dims"])
            self.expect_invalid(client, self.x((2, 0, IN)),
                                ["shape [2, 0, %d]" % IN, "dim 1 is 0"])
            self.expect_invalid(client, self.x((0, IN)), ["shape [0, %d]" % IN, "dim 0 is 0"])
            self.expect_invalid(client, self.x((2, 3, IN + 1)),
                                ["shape [2, 3, %d], expected [..., %d]: last dim %d is not the "
                                 "model's %d inputs" % (IN + 1, IN, IN + 1, IN)])
            self.expect_invalid(client, self.x((IN - 1,)),
                                ["shape [%d]" % (IN - 1), "last dim %d" % (IN - 1)])
            self.expect_invalid(client, self.x((3, 6, IN)),
                                ["shape [3, 6, %d]" % IN, "1 to %d rows (--max-batch)" % MAX_BATCH,
                                 "make 18 rows"])
            self.expect_invalid(client, self.x((2, 3, 3, IN)),
                                ["shape [2, 3, 3, %d]" % IN, "make 18 rows"])

        # still serving, with the same workers
        x = self.x((2, 2, IN))
        self.check(self.infer(client, x).as_numpy("output"), x, "after the refusals")
        self.assertEqual(d.worker_pids(), pids, "a worker was restarted")
        d.stop()

    def test_batching_3d(self):
        d, client = self.start("--batch-delay-us", 20000, "--log-level", "debug", name="batch3d")
        shapes = [(1, 1, IN), (1, 3, IN), (2, 2, IN), (2, 3, IN), (1, 8, IN), (3, 1, IN),
                  (4, 2, IN), (2, 1, 1, IN), (1, 5, IN), (2, 5, IN), (IN,), (3, 3, IN)]
        sent_rows = 0
        for wave in range(2):
            xs = [self.x(s, scale=1 + i) for i, s in enumerate(shapes)]
            results = infer_all_at_once(client, "lin", xs, "w%d" % wave, hold=d)
            for i, x in enumerate(xs):
                result, error = results[i]
                self.assertIsNone(error, "wave %d request %d: %s" % (wave, i, error))
                self.assertEqual(result.get_response().id, "w%d-%d" % (wave, i))
                self.check(result.as_numpy("output"), x,
                           "wave %d request %d, shape %s" % (wave, i, x.shape))
                sent_rows += int(np.prod(x.shape[:-1]))
        jobs = [(int(n), int(r)) for n, r in BATCH_RE.findall(d.log())]
        self.assertEqual(sum(n for n, _ in jobs), 2 * len(shapes), "requests in jobs")
        self.assertEqual(sum(r for _, r in jobs), sent_rows, "rows in jobs")
        self.assertTrue(all(r <= MAX_BATCH for _, r in jobs), "a job over max-batch: %s" % jobs)
        self.assertTrue(any(n > 1 for n, _ in jobs), "no job carried more than one request")
        d.stop()

    def test_shm_3d(self):
        d, client = self.start(name="shm3d")
        tag = "tpdshapes%d" % os.getpid()
        shape = (2, 4, IN)
        rows = 8
        in_bytes, out_bytes = rows * IN * 4, rows * OUT * 4
        handles = {}
        for name, size in (("in", 64 + in_bytes), ("out", 32 + out_bytes)):
            key = "/%s-%s" % (tag, name)
            handles[name] = shm.create_shared_memory_region(name, key, size)
            self.addCleanup(shm.destroy_shared_memory_region, handles[name])
            client.register_system_shared_memory(name, key, size)

        x = self.x(shape)
        shm.set_shared_memory_region(handles["in"], [x], offset=64)
        inp = tgrpc.InferInput("input", list(shape), "FP32")
        inp.set_shared_memory("in", in_bytes, offset=64)
        out = tgrpc.InferRequestedOutput("output")
        out.set_shared_memory("out", out_bytes, offset=32)
        resp = client.infer("lin", [inp], outputs=[out]).get_response()
        self.assertEqual(list(resp.outputs[0].shape), [2, 4, OUT])
        self.assertEqual(list(resp.raw_output_contents), [b""])
        y = shm.get_contents_as_numpy(handles["out"], np.float32, [2, 4, OUT], offset=32)
        self.check(y, x, "3-D input and output in shared memory")

        x = self.x(shape)
        shm.set_shared_memory_region(handles["in"], [x], offset=64)
        self.check(client.infer("lin", [inp]).as_numpy("output"), x, "3-D input in shm")

        x = self.x(shape)
        inp2 = tgrpc.InferInput("input", list(shape), "FP32")
        inp2.set_data_from_numpy(x)
        client.infer("lin", [inp2], outputs=[out])
        self.check(shm.get_contents_as_numpy(handles["out"], np.float32, [2, 4, OUT], offset=32),
                   x, "3-D output in shm")

        # the byte size is that of the flattened rows
        bad = tgrpc.InferInput("input", list(shape), "FP32")
        bad.set_shared_memory("in", 4 * IN * 4, offset=64)
        with self.assertRaises(InferenceServerException) as cm:
            client.infer("lin", [bad])
        self.assertEqual(cm.exception.status(), INV)
        self.assertIn("needs %d bytes, shared_memory_byte_size is %d" % (in_bytes, 4 * IN * 4),
                      cm.exception.message())
        d.stop()

    def test_half_io_3d(self):
        for dt in ("FP16", "BF16"):
            with self.subTest(io_dtype=dt):
                d, client = self.start("--io-dtype", dt, name="half_" + dt)
                for shape in [(2, 3, IN), (1, 16, IN), (IN,), (2, 2, 2, IN)]:
                    x = self.x(shape, dt)
                    res = self.infer(client, x, dt)
                    self.assertEqual(res.get_response().outputs[0].datatype, dt)
                    self.check(res.as_numpy("output"), x, "%s %s" % (dt, shape), dt)
                d.stop()


if __name__ == "__main__":
    unittest.main(verbosity=2)
