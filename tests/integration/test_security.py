"""Who may talk to tpd: TLS, mutual TLS, unix socket permissions, the loopback default.

Certificates are made on the fly with the openssl command: a CA, a server certificate signed by
it for 127.0.0.1 and localhost, a client certificate signed by it, and a second CA with a client
certificate of its own (the "wrong certificate"). tpd listens on 127.0.0.1:0 (the system picks a
free port, which tpd logs) with TLS, and on a plain unix socket in the test's directory, which the
harness uses to wait for readiness.

(a) TLS: a plaintext client and a client that trusts another CA are refused; a client that trusts
    the CA is served (tpclient --tls-ca, and tritonclient with ssl=True).
(b) mTLS (--tls-client-ca): a client without a certificate, and one whose certificate another CA
    signed, are refused; one with the right certificate is served, by tpclient and tritonclient;
    refused handshakes leave the daemon serving the others.
(c) TLS settings that cannot work fail at start with exit 64 (incomplete) or 1 (unreadable file),
    naming the flag or file.
(r) the REST API takes the same TLS files: HTTPS only (a plaintext request gets no answer), curl
    and tritonclient.http trusting the CA are served, one trusting another CA is refused; with
    --tls-client-ca, a client without a certificate, or with another CA's, gets 403, and one
    with the right certificate is served.
(d) unix sockets get mode 0660 by default, --socket-mode sets another, bad modes exit 64.
(e) the default listen address is loopback.
"""

import os
import re
import stat
import subprocess
import sys
import unittest

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tpdtest  # noqa: E402
from tpdtest import TpdTestCase, make_layer, one_line_error, run  # noqa: E402

import tritonclient.grpc as tgrpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

TOL = 1e-5
IN, OUT = 24, 36
PORT_RE = re.compile(r"listening on 127\.0\.0\.1:0 \(port (\d+), ([^)]*)\)")


def openssl(*args, cwd):
    res = run(["openssl"] + list(args), timeout=60)
    if res.rc != 0:
        raise AssertionError("openssl failed: %r" % res)


def make_pki(d):
    """CA, server cert (SAN 127.0.0.1, localhost), client cert; a second CA and its client cert.
    Returns {name: path}."""
    p = {k: os.path.join(d, k) for k in (
        "ca.pem", "ca.key", "ca2.pem", "ca2.key", "server.pem", "server.key", "client.pem",
        "client.key", "other.pem", "other.key", "san.ext", "client.ext")}
    for ca in ("ca", "ca2"):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                "-subj", "/CN=tpd test %s" % ca, "-keyout", p[ca + ".key"], "-out", p[ca + ".pem"],
                cwd=d)
    with open(p["san.ext"], "w") as f:
        f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    with open(p["client.ext"], "w") as f:
        f.write("extendedKeyUsage=clientAuth\n")
    for name, ca, ext, cn in (("server", "ca", "san.ext", "localhost"),
                              ("client", "ca", "client.ext", "client"),
                              ("other", "ca2", "client.ext", "other")):
        csr = os.path.join(d, name + ".csr")
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=" + cn,
                "-keyout", p[name + ".key"], "-out", csr, cwd=d)
        openssl("x509", "-req", "-in", csr, "-CA", p[ca + ".pem"], "-CAkey", p[ca + ".key"],
                "-CAcreateserial", "-days", "2", "-extfile", p[ext], "-out", p[name + ".pem"],
                cwd=d)
    return p


class TlsCase(TpdTestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        import tempfile
        cls.pki_dir = tempfile.mkdtemp(prefix="tpdtest-pki-")
        cls.pki = make_pki(cls.pki_dir)

    @classmethod
    def tearDownClass(cls):
        import shutil
        shutil.rmtree(cls.pki_dir, ignore_errors=True)

    def setUp(self):
        super().setUp()
        self.wpath = self.path("sec.safetensors")
        self.W, self.b = make_layer(self.wpath, OUT, IN, bias=True, dtype="F32", seed=41)
        self.rng = np.random.default_rng(17)

    def start_tls(self, mtls):
        p = self.pki
        args = ["--cpu", 2, "--listen", "127.0.0.1:0", "--tls-cert", p["server.pem"],
                "--tls-key", p["server.key"]]
        if mtls:
            args += ["--tls-client-ca", p["ca.pem"]]
        d = self.start_daemon(self.wpath, *args, name="tls")
        m = PORT_RE.search(d.log())
        self.assertIsNotNone(m, "no 'listening on 127.0.0.1:0 (port N, ...)' line\n" + d.log_tail())
        self.assertEqual(m.group(2), "TLS, client certificate required" if mtls else "TLS")
        self.tcp = "127.0.0.1:" + m.group(1)
        return d

    def tpclient_tcp(self, *args):
        return tpdtest.tpclient("--server", self.tcp, "--timeout", "5000", *args, timeout=30)

    def forward_ok(self, d, *tls):
        x = self.rng.standard_normal((5, IN)).astype(np.float32)
        xin, yout = self.path("x.npy"), self.path("y.npy")
        np.save(xin, x)
        if os.path.exists(yout):
            os.unlink(yout)
        res = self.tpclient_tcp(*tls, "forward", xin, "-o", yout)
        self.assertEqual(res.rc, 0, "forward over TLS with %s: %r\n%s" % (tls, res, d.log_tail()))
        self.assert_close(np.load(yout), x, self.W, self.b, TOL, "tpclient over TLS")

    def refused(self, *tls):
        res = self.tpclient_tcp(*tls, "health")
        self.assertEqual(res.rc, 1, "expected refusal with %s: %r" % (tls, res))
        line = one_line_error(self, res)
        self.assertIn("UNAVAILABLE", line, repr(res))

    def triton(self, **kw):
        files = {}
        for k, v in kw.items():
            files[k] = self.pki[v]
        c = tgrpc.InferenceServerClient(url=self.tcp, ssl=True, **files)
        self.addCleanup(c.close)
        return c

    def triton_infer(self, c):
        x = self.rng.standard_normal((3, IN)).astype(np.float32)
        inp = tgrpc.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        r = c.infer("sec", [inp], client_timeout=20)
        self.assert_close(r.as_numpy("output"), x, self.W, self.b, TOL, "tritonclient over TLS")

    def triton_refused(self, c):
        with self.assertRaises(InferenceServerException) as cm:
            c.is_server_ready(client_timeout=10)
        self.assertIn("UNAVAILABLE", str(cm.exception.status()) + str(cm.exception))


class TestTls(TlsCase):

    def test_server_tls(self):
        d = self.start_tls(mtls=False)
        p = self.pki
        with self.subTest("plaintext client refused"):
            self.refused()
        with self.subTest("client trusting another CA refused"):
            self.refused("--tls-ca", p["ca2.pem"])
        with self.subTest("tpclient trusting the CA served"):
            self.forward_ok(d, "--tls-ca", p["ca.pem"])
        with self.subTest("tritonclient trusting the CA served"):
            self.triton_infer(self.triton(root_certificates="ca.pem"))
        with self.subTest("tritonclient trusting another CA refused"):
            self.triton_refused(self.triton(root_certificates="ca2.pem"))
        self.assertIn("handshake", d.log().lower(), "refused handshakes were not logged")
        d.stop()

    def test_mutual_tls(self):
        d = self.start_tls(mtls=True)
        p = self.pki
        pids = d.worker_pids()
        with self.subTest("no client certificate refused"):
            self.refused("--tls-ca", p["ca.pem"])
        with self.subTest("client certificate of another CA refused"):
            self.refused("--tls-ca", p["ca.pem"], "--tls-cert", p["other.pem"],
                         "--tls-key", p["other.key"])
        with self.subTest("plaintext refused"):
            self.refused()
        with self.subTest("right client certificate served"):
            self.forward_ok(d, "--tls-ca", p["ca.pem"], "--tls-cert", p["client.pem"],
                            "--tls-key", p["client.key"])
        with self.subTest("tritonclient without a certificate refused"):
            self.triton_refused(self.triton(root_certificates="ca.pem"))
        with self.subTest("tritonclient with another CA's certificate refused"):
            self.triton_refused(self.triton(root_certificates="ca.pem", private_key="other.key",
                                            certificate_chain="other.pem"))
        with self.subTest("tritonclient with the right certificate served"):
            c = self.triton(root_certificates="ca.pem", private_key="client.key",
                            certificate_chain="client.pem")
            self.assertTrue(c.is_server_ready(client_timeout=10))
            self.triton_infer(c)
        self.assertEqual(d.worker_pids(), pids, "workers restarted")
        self.assertEqual(d.client("health").rc, 0, "unix socket stopped serving")
        d.stop()

    def curl_rest(self, d, path, *tls):
        """(exit status, HTTP status or None, body) of curl GET https://REST/path."""
        argv = ["curl", "-s", "-o", "-", "-w", "\n%{http_code}", "--max-time", "10", *tls,
                "https://" + d.http_addr() + path]
        res = subprocess.run(argv, capture_output=True, timeout=30)
        body, _, code = res.stdout.rpartition(b"\n")
        return res.returncode, int(code) if code.strip() and code != b"000" else None, body

    def test_rest_tls(self):
        import tritonclient.http as thttp
        p = self.pki
        for mtls in (False, True):
            with self.subTest(mtls=mtls):
                d = self.start_tls(mtls=mtls)
                self.assertIn("REST API on https://", d.log())
                mine = ["--cacert", p["ca.pem"]] + (
                    ["--cert", p["client.pem"], "--key", p["client.key"]] if mtls else [])
                rc, code, body = self.curl_rest(d, "/v2/health/ready", *mine)
                self.assertEqual((rc, code), (0, 200), body)
                # plaintext gets no HTTP answer; another CA's server certificate is refused
                res = subprocess.run(["curl", "-s", "--max-time", "5", "-o", "/dev/null", "-w",
                                      "%{http_code}", "http://" + d.http_addr() + "/v2"],
                                     capture_output=True, timeout=30)
                self.assertNotEqual(res.stdout, b"200", "plaintext REST answered")
                rc, code, _ = self.curl_rest(d, "/v2", "--cacert", p["ca2.pem"])
                self.assertNotEqual(rc, 0, "a client trusting another CA got through")
                if mtls:
                    rc, code, body = self.curl_rest(d, "/v2/health/ready", "--cacert",
                                                    p["ca.pem"])
                    self.assertEqual(code, 403, (rc, body))
                    self.assertIn(b"client certificate", body)
                    rc, code, body = self.curl_rest(d, "/v2", "--cacert", p["ca.pem"], "--cert",
                                                    p["other.pem"], "--key", p["other.key"])
                    self.assertTrue(rc != 0 or code == 403, (rc, code, body))
                opts = {"ca_certs": p["ca.pem"]}
                if mtls:
                    opts.update(certfile=p["client.pem"], keyfile=p["client.key"])
                c = thttp.InferenceServerClient(d.http_addr(), ssl=True, ssl_options=opts,
                                                insecure=False)
                x = self.rng.standard_normal((3, IN)).astype(np.float32)
                inp = thttp.InferInput("input", list(x.shape), "FP32")
                inp.set_data_from_numpy(x)
                self.assert_close(c.infer("sec", [inp]).as_numpy("output"), x, self.W, self.b,
                                  TOL, "tritonclient.http over TLS")
                c.close()
                d.stop()

    def test_bad_tls_settings(self):
        p = self.pki
        sock = "unix:" + self.path("bad.sock")
        base = [tpdtest.TPD, "--weights", self.wpath, "--listen", sock, "--http-listen", "off"]
        junk = self.path("junk.pem")
        with open(junk, "w") as f:
            f.write("not a certificate\n")
        for args, rc, needle in (
                (["--tls-cert", p["server.pem"]], 64, "--tls-key"),
                (["--tls-key", p["server.key"]], 64, "--tls-cert"),
                (["--tls-client-ca", p["ca.pem"]], 64, "--tls-cert"),
                (["--tls-cert", self.path("missing.pem"), "--tls-key", p["server.key"]], 1,
                 "missing.pem"),
                (["--tls-cert", p["server.pem"], "--tls-key", junk], 1, "junk.pem"),
                (["--tls-cert", p["server.pem"], "--tls-key", p["ca.key"], "--listen",
                  "127.0.0.1:0"], 1, "ca.key"),
                (["--tls-cert", p["server.pem"], "--tls-key", p["server.key"], "--tls-client-ca",
                  p["server.key"], "--listen", "127.0.0.1:0"], 1, "a CA certificate"),
                (["--tls-cert", p["server.pem"], "--tls-key", p["server.key"],
                  "--tls-client-ca", self.path("nope.pem")], 1, "nope.pem")):
            with self.subTest(args=args):
                res = run(base + args, timeout=30)
                self.assertEqual(res.rc, rc, repr(res))
                self.assertIn(needle, res.err, repr(res))
        with self.subTest("tpclient: cert without key"):
            res = tpdtest.tpclient("--server", sock, "--tls-cert", p["client.pem"], "health")
            self.assertEqual(res.rc, 1, repr(res))
            self.assertIn("--tls-key", one_line_error(self, res))
        with self.subTest("tpclient: missing CA file"):
            res = tpdtest.tpclient("--server", sock, "--tls-ca", self.path("nope.pem"), "health")
            self.assertEqual(res.rc, 1, repr(res))
            self.assertIn("nope.pem", one_line_error(self, res))


class TestUnixSocket(TpdTestCase):

    def mode(self, d):
        return stat.S_IMODE(os.stat(d.sock).st_mode)

    def test_default_mode_0660(self):
        seed = os.path.join(tpdtest.SEED_DIR, "seed.safetensors")
        old = os.umask(0)  # the daemon must not rely on the caller's umask
        try:
            d = self.start_daemon(seed, name="mode")
        finally:
            os.umask(old)
        self.assertTrue(stat.S_ISSOCK(os.stat(d.sock).st_mode))
        self.assertEqual(self.mode(d), 0o660, "socket mode %o" % self.mode(d))
        d.stop()

    def test_socket_mode_flag(self):
        seed = os.path.join(tpdtest.SEED_DIR, "seed.safetensors")
        for arg, want in (("600", 0o600), ("0666", 0o666)):
            with self.subTest(mode=arg):
                d = self.start_daemon(seed, "--socket-mode", arg, name="mode" + arg)
                self.assertEqual(self.mode(d), want, "--socket-mode %s gave %o" % (
                    arg, self.mode(d)))
                self.assertEqual(d.client("health").rc, 0)
                d.stop()

    def test_bad_socket_modes(self):
        seed = os.path.join(tpdtest.SEED_DIR, "seed.safetensors")
        for arg in ("999", "rw", "-1", "01000", "", "0x1ff"):
            with self.subTest(mode=arg):
                res = run([tpdtest.TPD, "--weights", seed, "--listen",
                           "unix:" + self.path("m.sock"), "--http-listen", "off", "--socket-mode", arg], timeout=30)
                self.assertEqual(res.rc, 64, repr(res))
                self.assertIn("--socket-mode", res.err, repr(res))
                self.assertIn("'%s'" % arg, res.err, repr(res))


class TestDefaults(unittest.TestCase):

    def test_default_listen_is_loopback(self):
        tpdtest.check_environment()
        res = run([tpdtest.TPD, "--help"], timeout=30)
        self.assertEqual(res.rc, 0, repr(res))
        m = re.search(r"--listen ADDR.*\(default: ([^)]*)\)", res.out)
        self.assertIsNotNone(m, "--help does not state the default listen address: %r" % res)
        self.assertEqual(m.group(1), "127.0.0.1:8001")


if __name__ == "__main__":
    unittest.main(verbosity=2)
