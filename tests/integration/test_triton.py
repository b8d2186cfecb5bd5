"""tpd against clients that are not ours: Triton's Python gRPC client (tritonclient.grpc), and raw
gRPC calls built from tritonclient's generated KServe-v2 stubs, for every kind of bad request.

The daemon: a generated layer (in 24, out 18, bias, F32), 2 ranks, --max-batch 8,
--model tplinear, listening on a unix socket (grpc's "unix:PATH" target, which tritonclient
passes straight to grpc.insecure_channel).

Each bad request must get the right status code and a message that says what was expected and
what came (we check that the offending value, and where it is a number the expected one, appear
in it). Nothing sent may crash a worker: the worker pids are the same at the end, a good request
still succeeds, and tpd stops with exit 0 -- with the client channels still open.
"""

import os
import struct
import sys
import unittest

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tpdtest import TpdTestCase, make_layer, reference, rel_err  # noqa: E402

import grpc  # noqa: E402
import tritonclient.grpc as tgrpc  # noqa: E402
from tritonclient.grpc import service_pb2 as pb  # noqa: E402
from tritonclient.grpc import service_pb2_grpc as pbg  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

TOL = 1e-5
IN, OUT, RANKS, MAX_BATCH = 24, 18, 2, 8
MODEL = "tplinear"


class TritonCase(TpdTestCase):

    def setUp(self):
        super().setUp()
        self.wpath = self.path("tri.safetensors")
        self.W, self.b = make_layer(self.wpath, OUT, IN, bias=True, dtype="F32", seed=77)
        self.d = self.start_daemon(self.wpath, "--cpu", RANKS, "--max-batch", MAX_BATCH,
                                   "--model", MODEL, name="triton")
        self.url = self.d.addr
        self.rng = np.random.default_rng(31)

    def x(self, rows):
        return self.rng.standard_normal((rows, IN)).astype(np.float32)

    def check(self, y, x, what):
        ref, mag = reference(x, self.W, self.b)
        self.assertEqual(y.shape, ref.shape, what)
        err = rel_err(y, ref, mag)
        self.assertLessEqual(err, TOL, "%s: relative error %.3g" % (what, err))


class TestTritonClient(TritonCase):
    """The calls a Triton user makes, through tritonclient.grpc."""

    def test_tritonclient(self):
        client = tgrpc.InferenceServerClient(url=self.url)
        self.addCleanup(client.close)
        self.assertTrue(client.is_server_live())
        self.assertTrue(client.is_server_ready())
        self.assertTrue(client.is_model_ready(MODEL))
        self.assertTrue(client.is_model_ready(MODEL, "1"))
        sm = client.get_server_metadata()
        self.assertTrue(sm.name, "server metadata has no name")

        md = client.get_model_metadata(MODEL)
        self.assertEqual(md.name, MODEL)
        self.assertEqual(len(md.inputs), 1, str(md))
        self.assertEqual(len(md.outputs), 1, str(md))
        self.assertEqual(md.inputs[0].datatype, "FP32")
        self.assertEqual(list(md.inputs[0].shape), [-1, IN])
        self.assertEqual(md.outputs[0].datatype, "FP32")
        self.assertEqual(list(md.outputs[0].shape), [-1, OUT])
        in_name, out_name = md.inputs[0].name, md.outputs[0].name
        self.assertTrue(in_name and out_name, str(md))

        for rows in (1, 5):
            with self.subTest(batch=rows):
                x = self.x(rows)
                inp = tgrpc.InferInput(in_name, [rows, IN], "FP32")
                inp.set_data_from_numpy(x)
                res = client.infer(MODEL, [inp], outputs=[tgrpc.InferRequestedOutput(out_name)],
                                   request_id="tc-%d" % rows)
                y = res.as_numpy(out_name)
                self.assertIsNotNone(y, "no output named %s" % out_name)
                self.assertEqual(y.dtype, np.float32)
                self.check(y, x, "tritonclient batch %d" % rows)
                self.assertEqual(res.get_response().id, "tc-%d" % rows)
                # without naming the output
                res = client.infer(MODEL, [inp])
                self.check(res.as_numpy(out_name), x, "tritonclient batch %d, no outputs" % rows)

        with self.assertRaises(InferenceServerException):
            client.get_model_metadata("nosuch")
        self.d.stop()


class TestBadRequests(TritonCase):
    """Raw gRPC with the generated stubs: every bad request, then a good one."""

    def setUp(self):
        super().setUp()
        self.channel = grpc.insecure_channel(self.url)
        self.addCleanup(self.channel.close)
        self.stub = pbg.GRPCInferenceServiceStub(self.channel)
        md = self.stub.ModelMetadata(pb.ModelMetadataRequest(name=MODEL), timeout=10)
        self.in_name = md.inputs[0].name
        self.out_name = md.outputs[0].name

    def request(self, x=None, rows=2):
        """A good request for x (default: random rows) -> (request, x)."""
        if x is None:
            x = self.x(rows)
        r = pb.ModelInferRequest(model_name=MODEL, id="req-%d" % x.shape[0])
        t = r.inputs.add()
        t.name = self.in_name
        t.datatype = "FP32"
        t.shape.extend(x.shape)
        r.raw_input_contents.append(x.astype("<f4").tobytes())
        return r, x

    def infer_ok(self, r, x, what):
        try:
            resp = self.stub.ModelInfer(r, timeout=30)
        except grpc.RpcError as e:
            self.fail("%s: %s %s\n%s" % (what, e.code(), e.details(), self.d.log_tail()))
        self.assertEqual(len(resp.outputs), 1, what)
        o = resp.outputs[0]
        self.assertEqual(o.name, self.out_name, what)
        self.assertEqual(o.datatype, "FP32", what)
        self.assertEqual(list(o.shape), [x.shape[0], OUT], what)
        self.assertEqual(resp.id, r.id, "%s: id not echoed" % what)
        self.assertEqual(resp.model_name, MODEL, what)
        if resp.raw_output_contents:
            self.assertEqual(len(resp.raw_output_contents[0]), x.shape[0] * OUT * 4, what)
            y = np.frombuffer(resp.raw_output_contents[0], dtype="<f4").reshape(x.shape[0], OUT)
        else:
            y = np.array(o.contents.fp32_contents, dtype=np.float32).reshape(x.shape[0], OUT)
        self.check(y, x, what)
        return resp

    def expect(self, call, req, code, words=(), any_of=None):
        """call(req) must fail with code; the message must contain every one of words and, when
        any_of is given (a list of tuples), all words of at least one tuple. Case-insensitive."""
        try:
            call(req, timeout=30)
        except grpc.RpcError as e:
            msg = e.details() or ""
            self.assertEqual(e.code(), code, "got %s %r, expected %s" % (e.code(), msg, code))
            low = msg.lower()
            for w in words:
                self.assertIn(str(w).lower(), low, "message %r lacks %r" % (msg, w))
            if any_of:
                self.assertTrue(any(all(str(w).lower() in low for w in group) for group in any_of),
                                "message %r has none of %r" % (msg, any_of))
            return msg
        self.fail("request succeeded, expected %s" % code)

    def test_bad_requests(self):
        pids = self.d.worker_pids()
        self.assertEqual(len(pids), RANKS)
        INV, NF = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
        infer = self.stub.ModelInfer

        with self.subTest("unknown model"):
            r, _ = self.request()
            r.model_name = "nosuch"
            self.expect(infer, r, NF, ["nosuch"])
        with self.subTest("unknown model version"):
            r, _ = self.request()
            r.model_version = "7"
            self.expect(infer, r, NF, ["7"])
        for version in ("", "1"):
            with self.subTest("model version %r accepted" % version):
                r, x = self.request()
                r.model_version = version
                self.infer_ok(r, x, "version %r" % version)

        with self.subTest("zero inputs"):
            r = pb.ModelInferRequest(model_name=MODEL)
            self.expect(infer, r, INV, ["input", "0"])
        with self.subTest("two inputs"):
            r, x = self.request()
            t = r.inputs.add()
            t.CopyFrom(r.inputs[0])
            r.raw_input_contents.append(x.astype("<f4").tobytes())
            self.expect(infer, r, INV, ["input", "2"])
        with self.subTest("wrong input name"):
            r, _ = self.request()
            r.inputs[0].name = "bogus_in"
            self.expect(infer, r, INV, ["bogus_in", self.in_name])

        for dtype, npdt in (("FP64", "<f8"), ("INT32", "<i4")):
            with self.subTest("datatype " + dtype):
                r, x = self.request()
                r.inputs[0].datatype = dtype
                r.raw_input_contents[0] = x.astype(npdt).tobytes()
                self.expect(infer, r, INV, [dtype, "FP32"])

        shape_words = [("shape",), ("dim",), ("2-d",), ("rank",), ("[",)]
        bad_shapes = [
            # [IN] and [B, S, IN] are served (test_shapes.py); 5 dims are not
            ("5-D", [1, 1, 1, 2, IN], np.zeros((2, IN), np.float32), ["5 dims", "at most 4"],
             None),
            ("3-D over --max-batch", [3, 3, IN], np.zeros((9, IN), np.float32),
             ["9 rows", str(MAX_BATCH)], None),
            ("in+1", [2, IN + 1], np.zeros((2, IN + 1), np.float32), [str(IN + 1), str(IN)],
             None),
            ("batch 0", [0, IN], np.zeros((0, IN), np.float32), ["0"], None),
            ("batch over --max-batch", [MAX_BATCH + 1, IN],
             np.zeros((MAX_BATCH + 1, IN), np.float32), [str(MAX_BATCH + 1), str(MAX_BATCH)],
             None),
            ("negative dim", [-1, IN], np.zeros((1, IN), np.float32), None, None),
            ("huge dim", [1 << 40, IN], np.zeros((1, IN), np.float32), None, None),
            ("overflowing shape", [1 << 62, 1 << 62], np.zeros((1, IN), np.float32), None, None),
        ]
        for what, shape, data, words, any_of in bad_shapes:
            with self.subTest("shape " + what):
                r, _ = self.request()
                del r.inputs[0].shape[:]
                r.inputs[0].shape.extend(shape)
                r.raw_input_contents[0] = data.astype("<f4").tobytes()
                self.expect(infer, r, INV, words or (), any_of)

        size_words = [("188", "192"), ("47", "48")]  # bytes, or floats
        with self.subTest("raw contents too short"):
            r, x = self.request(rows=2)
            r.raw_input_contents[0] = r.raw_input_contents[0][:-4]
            self.expect(infer, r, INV, any_of=size_words)
        with self.subTest("raw contents too long"):
            r, x = self.request(rows=2)
            r.raw_input_contents[0] += b"\0\0\0\0"
            self.expect(infer, r, INV, any_of=[("196", "192"), ("49", "48")])
        with self.subTest("no data at all"):
            r, x = self.request(rows=2)
            del r.raw_input_contents[:]
            self.expect(infer, r, INV, any_of=[("data",), ("content",), ("raw",)])
        with self.subTest("typed fp32_contents"):
            r, x = self.request(rows=3)
            del r.raw_input_contents[:]
            r.inputs[0].contents.fp32_contents.extend(x.ravel().tolist())
            self.infer_ok(r, x, "typed fp32_contents")
        with self.subTest("typed fp32_contents, one value short"):
            r, x = self.request(rows=2)
            del r.raw_input_contents[:]
            r.inputs[0].contents.fp32_contents.extend(x.ravel().tolist()[:-1])
            self.expect(infer, r, INV, any_of=size_words)

        with self.subTest("unknown requested output"):
            r, _ = self.request()
            r.outputs.add().name = "bogus_out"
            self.expect(infer, r, INV, ["bogus_out"])
        with self.subTest("requested output by its name; id, name, datatype, shape echoed"):
            r, x = self.request(rows=4)
            r.id = "the-id-123"
            r.outputs.add().name = self.out_name
            self.infer_ok(r, x, "named output")

        with self.subTest("metadata of an unknown model"):
            self.expect(self.stub.ModelMetadata, pb.ModelMetadataRequest(name="nosuch"), NF,
                        ["nosuch"])
        with self.subTest("readiness of an unknown model"):
            try:
                resp = self.stub.ModelReady(pb.ModelReadyRequest(name="nosuch"), timeout=10)
                self.assertFalse(resp.ready, "unknown model reported ready")
            except grpc.RpcError as e:
                self.assertEqual(e.code(), NF, e.details())

        with self.subTest("model control without --model-control-mode explicit"):
            call = self.channel.unary_unary("/inference.GRPCInferenceService/RepositoryModelLoad")
            self.expect(call, b"", grpc.StatusCode.UNAVAILABLE, ["model-control-mode"])
        with self.subTest("unknown method"):
            call = self.channel.unary_unary("/no.such.Service/Method")
            self.expect(call, b"", grpc.StatusCode.UNIMPLEMENTED)

        with self.subTest("grpc.health.v1.Health/Check"):
            check = self.channel.unary_unary("/grpc.health.v1.Health/Check")
            # HealthCheckRequest{} is empty; HealthCheckResponse{status: SERVING = 1} is 08 01
            resp = check(b"", timeout=10)
            self.assertEqual(resp, b"\x08\x01", "Health/Check answered %r, expected SERVING" % resp)
            # HealthCheckRequest{service: ""} spelled out explicitly gives the same
            resp = check(b"\x0a\x00", timeout=10)
            self.assertEqual(resp, b"\x08\x01")

        # the daemon kept serving, no worker died, and it stops cleanly with channels open
        r, x = self.request(rows=MAX_BATCH)
        self.infer_ok(r, x, "good request after the bad ones")
        self.assertEqual(self.d.worker_pids(), pids, "a worker was restarted\n" + self.d.log_tail())
        for pid in pids.values():
            self.assertTrue(os.path.exists("/proc/%d" % pid), "worker pid %d is gone" % pid)
        self.assertNotRegex(self.d.log(), r"warning: worker rank \d+ .*(exited|killed)")
        self.d.stop()


if __name__ == "__main__":
    unittest.main(verbosity=2)
