"""The kserve SDK's own clients (InferenceRESTClient and InferenceGRPCClient), each in a process
of its own with the kserve venv's python (TP_KSERVE_PYTHON, scripts/venv-kserve.sh; kserve and
tritonclient cannot be imported together). One tpd serves the seed case that PyTorch computed;
every way the clients send a tensor -- REST JSON and binary, gRPC raw_input_contents and typed
fp32_contents -- must answer it within 1e-5 of PyTorch's float64 output, with the request ids
echoed, and the health calls must say live and ready. Without TP_KSERVE_PYTHON this test fails:
it is not skipped."""

import json
import os
import sys
import unittest

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tpdtest import TpdTestCase, rel64, run, seed_case  # noqa: E402

KSERVE_PYTHON = os.environ.get("TP_KSERVE_PYTHON", "")
CLIENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kserve_client.py")


class TestKserve(TpdTestCase):

    def test_rest_and_grpc_clients(self):
        self.assertTrue(KSERVE_PYTHON and os.access(KSERVE_PYTHON, os.X_OK),
                        "TP_KSERVE_PYTHON is not set to the kserve venv's python "
                        "(scripts/venv-kserve.sh; configure with -DTP_KSERVE_PYTHON=...)")
        wpath, x, _, _, y64 = seed_case("mlp-up")
        d = self.start_daemon(wpath, "--cpu", 2, "--model", "m")
        xpath = self.path("x.npy")
        np.save(xpath, x)
        for kind, addr, ways in (("rest", d.http_addr(), ("json", "binary")),
                                 ("grpc", d.addr, ("raw", "typed"))):
            with self.subTest(kind):
                out = self.path(kind)
                os.mkdir(out)
                res = run([KSERVE_PYTHON, CLIENT, kind, addr, "m", xpath, out], timeout=120)
                self.assertEqual(res.rc, 0, repr(res))
                seen = json.loads(res.out.strip().splitlines()[-1])
                self.assertEqual((seen["live"], seen["ready"], seen["model_ready"]),
                                 (True, True, True), seen)
                for way in ways:
                    self.assertEqual(seen["ids"][way], "kserve-" + way)
                    y = np.load(os.path.join(out, way + ".npy"))
                    self.assertLessEqual(rel64(y, y64), 1e-5, "%s %s" % (kind, way))


if __name__ == "__main__":
    unittest.main()
