"""Checks rollout_plugin/_schema.py against proto/plugin.proto, compiled here with
grpcio-tools (a dev-only dependency), so the hand-written descriptor cannot drift."""

import os
import tempfile
import unittest

from google.protobuf import descriptor_pb2

from rollout_plugin import _schema
from rollout_plugin.server import _call

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _normalised(f: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    f = descriptor_pb2.FileDescriptorProto.FromString(f.SerializeToString())
    f.name = "plugin.proto"
    f.ClearField("source_code_info")
    for m in f.message_type:
        for field in m.field:
            field.ClearField("json_name")
    return f


class SchemaMatchesProto(unittest.TestCase):
    def test_descriptor_matches_plugin_proto(self):
        from grpc_tools import protoc

        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "plugin.pb")
            rc = protoc.main(["protoc", "-I" + os.path.join(ROOT, "proto"), "--descriptor_set_out=" + out, "plugin.proto"])
            self.assertEqual(rc, 0, "grpc_tools.protoc failed on proto/plugin.proto")
            with open(out, "rb") as fh:
                compiled = descriptor_pb2.FileDescriptorSet.FromString(fh.read()).file[0]
        self.assertEqual(_normalised(compiled), _normalised(_schema.FILE))


class CallMapsOutcomes(unittest.TestCase):
    def handler(self, method, payload):
        if method == "fail":
            raise ValueError("boom")
        if method == "text":
            return "ok"
        if method == "int":
            return 3
        return payload

    def test_result_failure_and_bad_return(self):
        ok = _call(self.handler, _schema.CallRequest(method="echo", payload=b"x"), None)
        self.assertEqual(ok.WhichOneof("outcome"), "result")
        self.assertEqual(ok.result, b"x")
        self.assertEqual(_call(self.handler, _schema.CallRequest(method="text"), None).result, b"ok")
        failed = _call(self.handler, _schema.CallRequest(method="fail"), None)
        self.assertEqual(failed.failure.message, "ValueError: boom")
        self.assertIn("Traceback", failed.failure.traceback)
        bad = _call(self.handler, _schema.CallRequest(method="int"), None)
        self.assertIn("expected bytes", bad.failure.message)


if __name__ == "__main__":
    unittest.main()
