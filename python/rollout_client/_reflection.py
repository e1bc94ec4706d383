"""The coordinator's own schema, fetched over gRPC server reflection (grpc.reflection.v1).

The client carries no generated code and needs no protoc: it asks the coordinator it
talks to for the file that defines ``rollout.transport.v1.Operator`` and builds the
message classes from it with the protobuf runtime, so client and server always agree on
the schema. The few reflection messages it needs are described here by hand.
"""

from __future__ import annotations

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

REFLECTION_METHOD = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
_F = descriptor_pb2.FieldDescriptorProto


def _reflection_messages():
    f = descriptor_pb2.FileDescriptorProto(
        name="rollout_client/reflection_subset.proto", package="grpc.reflection.v1", syntax="proto3"
    )
    req = f.message_type.add(name="ServerReflectionRequest")
    req.field.add(name="host", number=1, label=_F.LABEL_OPTIONAL, type=_F.TYPE_STRING)
    req.field.add(name="file_containing_symbol", number=4, label=_F.LABEL_OPTIONAL, type=_F.TYPE_STRING)
    files = f.message_type.add(name="FileDescriptorResponse")
    files.field.add(name="file_descriptor_proto", number=1, label=_F.LABEL_REPEATED, type=_F.TYPE_BYTES)
    err = f.message_type.add(name="ErrorResponse")
    err.field.add(name="error_code", number=1, label=_F.LABEL_OPTIONAL, type=_F.TYPE_INT32)
    err.field.add(name="error_message", number=2, label=_F.LABEL_OPTIONAL, type=_F.TYPE_STRING)
    resp = f.message_type.add(name="ServerReflectionResponse")
    resp.field.add(
        name="file_descriptor_response",
        number=4,
        label=_F.LABEL_OPTIONAL,
        type=_F.TYPE_MESSAGE,
        type_name=".grpc.reflection.v1.FileDescriptorResponse",
    )
    resp.field.add(
        name="error_response",
        number=7,
        label=_F.LABEL_OPTIONAL,
        type=_F.TYPE_MESSAGE,
        type_name=".grpc.reflection.v1.ErrorResponse",
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    cls = lambda name: message_factory.GetMessageClass(pool.FindMessageTypeByName("grpc.reflection.v1." + name))
    return cls("ServerReflectionRequest"), cls("ServerReflectionResponse")


_Request, _Response = _reflection_messages()


def fetch_messages(channel: grpc.Channel, symbol: str, timeout: float):
    """A function giving the message class of a full name (e.g.
    ``rollout.transport.v1.TaskSpec``) from the file that defines ``symbol``."""
    call = channel.stream_stream(
        REFLECTION_METHOD, request_serializer=_Request.SerializeToString, response_deserializer=_Response.FromString
    )
    answer = next(iter(call(iter([_Request(file_containing_symbol=symbol)]), timeout=timeout)))
    if answer.HasField("error_response"):
        raise RuntimeError(f"reflection: {symbol}: {answer.error_response.error_message}")
    files = [descriptor_pb2.FileDescriptorProto.FromString(b) for b in answer.file_descriptor_response.file_descriptor_proto]
    pool = descriptor_pool.DescriptorPool()
    added = set()
    # Dependencies first (the answer may list them in any order).
    pending = list(files)
    while pending:
        progressed = False
        for f in list(pending):
            if all(d in added for d in f.dependency):
                pool.Add(f)
                added.add(f.name)
                pending.remove(f)
                progressed = True
        if not progressed:
            raise RuntimeError(f"reflection: unresolved imports in {[f.name for f in pending]}")
    return lambda name: message_factory.GetMessageClass(pool.FindMessageTypeByName(name))
