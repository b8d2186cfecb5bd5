"""tpd's configuration file (--config): precedence, the shipped example, and errors.

(a) Precedence: a file setting weights, model, cpu, listen and log-level; flags given too
    override it (model, listen), what the file alone sets is used (weights, cpu, log level).
(b) deploy/tpd.conf.example: every key it shows, commented out or not, is accepted (the test
    uncomments them all and tpd serves with the example, paths overridden by flags), and every
    flag of `tpd --help` is documented in it as a key.
(c) Errors: an unknown key, a bad value, a line without '=', a key without value, a file that
    does not exist, 'config' or 'help' as a key: exit 78 (EX_CONFIG) with one line naming the
    file, the line and the key. Command-line errors stay 64; --help works whatever the file holds.
"""

import os
import re
import subprocess
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tpdtest  # noqa: E402
from tpdtest import TpdTestCase, make_layer, run  # noqa: E402

import numpy as np  # noqa: E402
import tritonclient.grpc as tgrpc  # noqa: E402

EXAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "deploy",
                       "tpd.conf.example")
EX_CONFIG = 78
KEY_LINE_RE = re.compile(r"^#?\s*([a-z][a-z0-9-]*)\s*=\s*(.*?)\s*$")


GPU_KEYS = ("gpus", "gather", "dtype", "tf32")
TLS_KEYS = ("tls-cert", "tls-key", "tls-client-ca")
BLOCK_KEYS = ("block", "act")  # an MLP block replaces the example's one layer
REPO_KEYS = ("model-repository", "model-control-mode", "load-model")  # many models instead


def example_keys():
    """{key: [values]} of every 'key = value' line of the example, commented out or not."""
    keys = {}
    with open(EXAMPLE) as f:
        for line in f:
            m = KEY_LINE_RE.match(line)
            if m:
                keys.setdefault(m.group(1), []).append(m.group(2))
    return keys


def help_flags():
    res = run([tpdtest.TPD, "--help"], timeout=30)
    assert res.rc == 0, repr(res)
    return sorted(set(re.findall(r"^\s+--([a-z][a-z0-9-]*)", res.out, re.M)))


class TestConfig(TpdTestCase):

    def setUp(self):
        super().setUp()
        self.wpath = self.path("cfg.safetensors")
        self.W, self.b = make_layer(self.wpath, 30, 16, bias=True, seed=5)

    def write(self, name, text):
        p = self.path(name)
        with open(p, "w") as f:
            f.write(text)
        return p

    def tpd(self, *args):
        """tpd that must fail before serving (metrics on a free port, never 8002)."""
        return run([tpdtest.TPD, "--listen", "unix:" + self.path("x.sock"), "--http-listen", "127.0.0.1:0", "--metrics-listen",
                    "127.0.0.1:0"] + [str(a) for a in args], timeout=30)

    def test_flags_override_the_file(self):
        conf = self.write("tpd.conf", "\n".join([
            "# a comment, then a blank line",
            "",
            "weights = %s" % self.wpath,
            "model = fromfile",
            "cpu = 3",
            "  log_level   =   \"debug\"  ",  # underscores, spaces, quotes
            "listen = unix:%s" % self.path("fromfile.sock"),
            "listen = unix:%s" % self.path("fromfile2.sock"),
        ]) + "\n")
        d = self.start_daemon(None, "--config", conf, "--model", "fromflag", name="prec")
        self.assertIn("read configuration file %s" % conf, d.log())
        client = tgrpc.InferenceServerClient(url=d.addr)
        meta = client.get_model_metadata("fromflag")
        self.assertEqual(meta.name, "fromflag")
        self.assertEqual(len(d.worker_pids()), 3, "cpu = 3 from the file")
        # the command line's --listen replaced both of the file's
        self.assertFalse(os.path.exists(self.path("fromfile.sock")))
        self.assertFalse(os.path.exists(self.path("fromfile2.sock")))
        x = np.random.default_rng(2).standard_normal((3, 16)).astype(np.float32)
        self.assert_close(self.forward(d, x), x, self.W, self.b, 1e-5, "configured")
        self.assertGreater(d.count(tpdtest.ACCEPTED_RE), 0, "log-level debug from the file")
        client.close()
        d.stop()

    def test_file_listen_used_without_flag(self):
        sock = self.path("onlyfile.sock")
        conf = self.write("tpd.conf", "weights = %s\nlisten = unix:%s\nmetrics-listen = off\n" % (
            self.wpath, sock))
        d = tpdtest.Daemon(self.tmp, None, ["--config", conf], name="filelisten")
        d.argv = [a for a in d.argv if a not in ("--listen", d.addr, "--http-listen", "127.0.0.1:0", "--metrics-listen",
                                                 "127.0.0.1:0")]
        d.addr = "unix:" + sock
        self.daemons.append(d)
        self.addCleanup(d.kill)
        d.start()
        self.assertIsNone(tpdtest.METRICS_RE.search(d.log()), "metrics-listen = off ignored")
        d.stop()

    def check_gpu_keys(self, gpu_lines):
        """The example's GPU keys are accepted: tpd gets past the configuration (no exit 64 or
        78) and either serves (a host with the GPUs) or fails to find a usable GPU (exit 1)."""
        conf = self.write("gpu.conf", "weights = %s\n" % self.wpath + "".join(gpu_lines))
        p = subprocess.Popen([tpdtest.TPD, "--config", conf, "--listen",
                              "unix:" + self.path("gpu.sock"), "--metrics-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            _, err = p.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            p.terminate()
            _, err = p.communicate(timeout=30)
            self.assertIn("ready", err, "tpd with the example's GPU keys neither failed nor served")
            return
        self.assertEqual(p.returncode, 1, "GPU keys of the example: " + err)
        self.assertRegex(err, r"GPU", "GPU keys of the example: " + err)

    def check_block_keys(self, block_lines):
        """The example's block keys are accepted: tpd gets past the configuration and fails only
        because this layer file has no such block (exit 1, naming it)."""
        conf = self.write("block.conf", "weights = %s\n" % self.wpath + "".join(block_lines))
        res = self.tpd("--config", conf)
        self.assertEqual(res.rc, 1, "block keys of the example: %r" % (res,))
        self.assertIn("no MLP block 'model.layers.0.mlp'", res.err, repr(res))

    def check_tls_keys(self, tls_lines):
        """The example's TLS keys are accepted: tpd gets past the configuration and fails only
        because this host has none of the example's certificate files (exit 1, naming one)."""
        conf = self.write("tls.conf", "weights = %s\n" % self.wpath + "".join(tls_lines))
        res = self.tpd("--config", conf)
        self.assertEqual(res.rc, 1, "TLS keys of the example: %r" % (res,))
        self.assertRegex(res.err, r"/etc/tpd/tls/", "TLS keys of the example: %r" % (res,))

    def check_repo_keys(self, repo_lines):
        """The example's repository keys are accepted: tpd gets past the configuration and fails
        only because this host has no such folder (exit 1, naming it)."""
        conf = self.write("repo.conf", "".join(repo_lines))
        res = self.tpd("--config", conf)
        self.assertEqual(res.rc, 1, "repository keys of the example: %r" % (res,))
        self.assertIn("model repository /var/lib/tpd/models", res.err, repr(res))

    def test_example_accepts_every_key_and_documents_every_flag(self):
        keys = example_keys()
        flags = [f for f in help_flags() if f not in ("help", "version", "config")]
        missing = [f for f in flags if f not in keys]
        self.assertEqual(missing, [], "flags of tpd --help not documented in %s" % EXAMPLE)
        unknown = [k for k in keys if k not in flags]
        self.assertEqual(unknown, [], "keys of the example that tpd --help does not list")
        # every key, commented out or not, uncommented; the GPU keys separately (below), since
        # they replace the cpu ranks and this host may have no GPU
        with open(EXAMPLE) as f:
            lines = [re.sub(r"^#\s*(?=[a-z][a-z0-9-]*\s*=)", "", line) for line in f]
        gpu_lines = [l for l in lines if l.split("=")[0].strip() in GPU_KEYS]
        tls_lines = [l for l in lines if l.split("=")[0].strip() in TLS_KEYS]
        block_lines = [l for l in lines if l.split("=")[0].strip() in BLOCK_KEYS]
        repo_lines = [l for l in lines if l.split("=")[0].strip() in REPO_KEYS]
        text = "".join(l for l in lines if l not in gpu_lines and l not in tls_lines and
                       l not in block_lines and l not in repo_lines)
        self.assertEqual(len(gpu_lines), len(GPU_KEYS), "GPU keys of the example")
        self.assertEqual(len(tls_lines), len(TLS_KEYS), "TLS keys of the example")
        self.assertEqual(len(block_lines), len(BLOCK_KEYS), "block keys of the example")
        self.check_gpu_keys(gpu_lines)
        self.check_tls_keys(tls_lines)
        self.check_block_keys(block_lines)
        self.assertEqual(len(repo_lines), len(REPO_KEYS), "repository keys of the example")
        self.check_repo_keys(repo_lines)
        conf = self.write("example.conf", text)
        real_worker = os.path.join(os.path.dirname(os.path.abspath(tpdtest.TPD)), "tpd-worker")
        # the example's paths and addresses are a production host's: flags override them
        d = self.start_daemon(self.wpath, "--config", conf, "--worker", real_worker,
                              "--model", "example", name="example")
        self.assertIn("read configuration file", d.log())
        x = np.random.default_rng(4).standard_normal((2, 16)).astype(np.float32)
        self.assert_close(self.forward(d, x), x, self.W, self.b, 1e-5, "example config")
        d.stop()

    def check_error(self, text, line, key, *extra):
        conf = self.write("bad.conf", text)
        res = self.tpd("--config", conf, *extra)
        self.assertEqual(res.rc, EX_CONFIG, repr(res))
        lines = [l for l in res.err.splitlines() if l.strip()]
        self.assertEqual(len(lines), 1, "expected one line: %r" % res)
        self.assertTrue(lines[0].startswith("tpd: "), lines[0])
        self.assertIn("%s:%d:" % (conf, line), lines[0])
        if key:
            self.assertIn("'%s'" % key, lines[0])
        return lines[0]

    def test_errors_name_file_line_and_key(self):
        w = "weights = %s\n" % self.wpath
        msg = self.check_error(w + "cpus = 2\n", 2, "cpus")
        self.assertIn("unknown key", msg)
        msg = self.check_error(w + "# c\ncpu = two\n", 3, "cpu")
        self.assertIn("two", msg)
        msg = self.check_error(w + "\n\nmax-batch = -3\n", 4, "max-batch")
        self.assertIn("-3", msg)
        msg = self.check_error(w + "log-level = loud\n", 2, "log-level")
        self.assertIn("loud", msg)
        self.check_error(w + "cpu\n", 2, "cpu")
        self.check_error("= 5\n", 1, None)
        self.check_error(w + "config = /etc/other.conf\n", 2, "config")
        self.check_error(w + "help = true\n", 2, "help")
        # flags after the file do not hide its errors
        self.check_error(w + "slots = 0\n", 2, "slots", "--slots", 2)

    def test_missing_file_and_command_line_errors(self):
        missing = self.path("nope/tpd.conf")
        res = self.tpd("--config", missing, "--weights", self.wpath)
        self.assertEqual(res.rc, EX_CONFIG, repr(res))
        self.assertIn(missing, res.err)
        self.assertIn("No such file", res.err)
        good = self.write("good.conf", "weights = %s\n" % self.wpath)
        res = self.tpd("--config", good, "--cpu", "zero")
        self.assertEqual(res.rc, 64, repr(res))
        self.assertIn("--cpu", res.err)
        bad = self.write("bad.conf", "nonsense = 1\n")
        res = run([tpdtest.TPD, "--config", bad, "--help"], timeout=30)
        self.assertEqual(res.rc, 0, repr(res))
        self.assertIn("--config PATH", res.out)
        # 'none' reads no file: weights then has to come from a flag
        res = self.tpd("--config", "none")
        self.assertEqual(res.rc, 64, repr(res))
        self.assertIn("--weights", res.err)


if __name__ == "__main__":
    unittest.main(verbosity=2)
