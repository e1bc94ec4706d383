"""The messages of proto/plugin.proto (package rollout.plugin.v1), built at import time
from a hand-written descriptor with the protobuf runtime: no protoc, no generated code,
nothing fetched. python/tests/test_schema.py checks this against the .proto file.
"""

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PACKAGE = "rollout.plugin.v1"
SERVICE = PACKAGE + ".Plugin"

_F = descriptor_pb2.FieldDescriptorProto


def _file() -> descriptor_pb2.FileDescriptorProto:
    f = descriptor_pb2.FileDescriptorProto(name="rollout/plugin.proto", package=PACKAGE, syntax="proto3")

    def message(name, fields, oneofs=()):
        m = f.message_type.add(name=name)
        for oneof in oneofs:
            m.oneof_decl.add(name=oneof)
        for number, (field_name, kind, extra) in enumerate(fields, start=1):
            field = m.field.add(name=field_name, number=number, label=_F.LABEL_OPTIONAL, type=kind)
            if "repeated" in extra:
                field.label = _F.LABEL_REPEATED
            if "type_name" in extra:
                field.type_name = extra["type_name"]
            if "oneof" in extra:
                field.oneof_index = extra["oneof"]
        return m

    message("DescribeRequest", [])
    message(
        "DescribeResponse",
        [
            ("name", _F.TYPE_STRING, {}),
            ("abi_version", _F.TYPE_UINT32, {}),
            ("methods", _F.TYPE_STRING, {"repeated": True}),
            ("cooperative_cancel", _F.TYPE_BOOL, {}),
        ],
    )
    message(
        "CallRequest",
        [
            ("method", _F.TYPE_STRING, {}),
            ("payload", _F.TYPE_BYTES, {}),
            ("deadline_ms", _F.TYPE_UINT64, {}),
            ("task_id", _F.TYPE_STRING, {}),
            ("attempt", _F.TYPE_UINT32, {}),
            ("input_paths", _F.TYPE_STRING, {"repeated": True}),
            ("call_id", _F.TYPE_UINT64, {}),
        ],
    )
    message(
        "CallResponse",
        [
            ("result", _F.TYPE_BYTES, {"oneof": 0}),
            ("failure", _F.TYPE_MESSAGE, {"oneof": 0, "type_name": "." + PACKAGE + ".CallFailure"}),
        ],
        oneofs=["outcome"],
    )
    message("CallFailure", [("message", _F.TYPE_STRING, {}), ("traceback", _F.TYPE_STRING, {})])
    message("HealthRequest", [])
    message("HealthResponse", [("serving", _F.TYPE_BOOL, {}), ("running", _F.TYPE_UINT64, {"repeated": True})])

    service = f.service.add(name="Plugin")
    for rpc, request, response in [
        ("Describe", "DescribeRequest", "DescribeResponse"),
        ("Call", "CallRequest", "CallResponse"),
        ("Health", "HealthRequest", "HealthResponse"),
    ]:
        service.method.add(
            name=rpc, input_type="." + PACKAGE + "." + request, output_type="." + PACKAGE + "." + response
        )
    return f


FILE = _file()
# A private pool, so a process that also loads generated code for plugin.proto does
# not hit a duplicate-symbol error.
_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(FILE)


def _message(name):
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(PACKAGE + "." + name))


DescribeRequest = _message("DescribeRequest")
DescribeResponse = _message("DescribeResponse")
CallRequest = _message("CallRequest")
CallResponse = _message("CallResponse")
CallFailure = _message("CallFailure")
HealthRequest = _message("HealthRequest")
HealthResponse = _message("HealthResponse")
