"""Checks rollout_plugin/_schema.py against proto/plugin.proto, compiled here with
grpcio-tools (a dev-only dependency), so the hand-written descriptor cannot drift."""

import os
import tempfile
import unittest

from google.protobuf import descriptor_pb2

from rollout_plugin import _schema
from rollout_plugin.server import _call, _Running

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
        call = lambda request: _call(self.handler, request, _Context(), _Running())  # noqa: E731
        ok = call(_schema.CallRequest(method="echo", payload=b"x"))
        self.assertEqual(ok.WhichOneof("outcome"), "result")
        self.assertEqual(ok.result, b"x")
        self.assertEqual(call(_schema.CallRequest(method="text")).result, b"ok")
        failed = call(_schema.CallRequest(method="fail"))
        self.assertEqual(failed.failure.message, "ValueError: boom")
        self.assertIn("Traceback", failed.failure.traceback)
        bad = call(_schema.CallRequest(method="int"))
        self.assertIn("expected bytes", bad.failure.message)

    def test_a_handler_taking_cancelled_gets_the_event_the_rpc_sets_and_is_listed_while_it_runs(self):
        context, running, seen = _Context(), _Running(), {}

        def handler(method, payload, cancelled):
            seen["running"] = running.ids()
            context.cancel()  # the worker cancels the RPC while the handler runs
            seen["set"] = cancelled.wait(1)
            return b"stopped"

        self.assertEqual(_call(handler, _schema.CallRequest(method="m", call_id=7), context, running).result, b"stopped")
        self.assertEqual(seen, {"running": [7], "set": True})
        self.assertEqual(running.ids(), [], "a finished call leaves the list")


class _Context:
    """The part of grpc.ServicerContext that _call uses: callbacks run when the RPC ends."""

    def __init__(self):
        self.callbacks = []

    def add_callback(self, callback):
        self.callbacks.append(callback)
        return True

    def cancel(self):
        for callback in self.callbacks:
            callback()


if __name__ == "__main__":
    unittest.main()
