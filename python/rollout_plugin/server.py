"""The gRPC server side of plugin.proto, on a Unix socket."""

from __future__ import annotations

import argparse
import inspect
import os
import signal
import sys
import threading
import traceback
from concurrent import futures
from typing import Callable, Iterable, Optional

import grpc

from . import _schema

# Must equal rollout_plugin_host::SIDECAR_ABI_VERSION; the worker refuses anything else.
ABI_VERSION = 1
# Must equal rollout_plugin_host::SIDECAR_MESSAGE_BYTES_MAX.
MESSAGE_BYTES_MAX = 64 * 1024 * 1024
SOCKET_ENV = "ROLLOUT_PLUGIN_SOCKET"
# Must equal rollout_plugin_host::PARENT_PIPE_ENV: "stdin" when the worker holds the
# write end of this process's stdin (end of file: the worker is gone).
PARENT_PIPE_ENV = "ROLLOUT_PLUGIN_PARENT_PIPE"

Handler = Callable[[str, bytes], bytes]


def socket_path(argv: Optional[list] = None) -> str:
    """The socket to serve on: ``--socket PATH`` in argv, else $ROLLOUT_PLUGIN_SOCKET."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--socket")
    known, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    path = known.socket or os.environ.get(SOCKET_ENV)
    if not path:
        raise SystemExit(f"rollout_plugin: no socket given; pass --socket PATH or set {SOCKET_ENV}")
    return path


def _takes_inputs(handler) -> bool:
    """Whether ``handler`` takes a third positional argument: the task's input files."""
    try:
        params = [
            p for p in inspect.signature(handler).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "cancelled"
        ]
    except (TypeError, ValueError):
        return False
    return len(params) >= 3


def _takes_cancelled(handler) -> bool:
    """Whether ``handler`` has a ``cancelled`` parameter (a threading.Event set when the
    worker cancels the call or its deadline passes)."""
    try:
        return "cancelled" in inspect.signature(handler).parameters
    except (TypeError, ValueError):
        return False


class _Running:
    """The calls running now, by call_id, for Health: the worker asks after it cancels one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ids: dict = {}

    def add(self, call_id: int) -> None:
        with self._lock:
            self._ids[call_id] = self._ids.get(call_id, 0) + 1

    def remove(self, call_id: int) -> None:
        with self._lock:
            left = self._ids.get(call_id, 0) - 1
            if left > 0:
                self._ids[call_id] = left
            else:
                self._ids.pop(call_id, None)

    def ids(self) -> list:
        with self._lock:
            return sorted(self._ids)


def _call(handler: Handler, request, context, running: "_Running"):
    cancelled = threading.Event()
    # Runs when the RPC ends however it ends, also when the worker cancels it (its
    # deadline passed, or the task was cancelled): a handler taking `cancelled` can stop.
    context.add_callback(cancelled.set)
    running.add(request.call_id)
    try:
        kwargs = {"cancelled": cancelled} if _takes_cancelled(handler) else {}
        if _takes_inputs(handler):
            result = handler(request.method, bytes(request.payload), list(request.input_paths), **kwargs)
        else:
            result = handler(request.method, bytes(request.payload), **kwargs)
        if isinstance(result, str):
            result = result.encode()
        if not isinstance(result, (bytes, bytearray, memoryview)):
            raise TypeError(f"handle returned {type(result).__name__}, expected bytes")
        return _schema.CallResponse(result=bytes(result))
    except Exception as e:  # noqa: BLE001 - every plugin error becomes a failed call
        return _schema.CallResponse(
            failure=_schema.CallFailure(message=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        )
    finally:
        running.remove(request.call_id)


def _exit_with_parent(parent: int) -> None:
    """A sidecar must not outlive its worker: exit when re-parented (checked twice a second)."""
    while True:
        if os.getppid() != parent:
            os._exit(0)
        threading.Event().wait(0.5)


def _exit_when_the_pipe_closes() -> None:
    """Exit at once when the worker's end of the stdin pipe closes (it died, however).

    Its tasks may already run elsewhere: the coordinator leases them again as soon as it
    sees the worker's connection close.
    """
    try:
        while os.read(0, 4096):
            pass
    except OSError:
        pass
    os._exit(0)


def serve(
    handler: Handler,
    *,
    name: str = "",
    methods: Iterable[str] = (),
    socket: Optional[str] = None,
    max_workers: int = 4,
) -> None:
    """Serves ``handler(method, payload) -> bytes`` until SIGTERM/SIGINT or the worker dies.

    A handler with a third parameter, ``handler(method, payload, inputs)``, also gets the
    task's input blobs as a list of local file paths (fetched by the worker, verified,
    shared by every task that names the same blob).

    A handler with a ``cancelled`` keyword parameter gets a ``threading.Event`` that is
    set when the worker cancels the call (the task was cancelled, or its deadline
    passed): checking it (or waiting on it) lets the handler stop cooperatively. The
    worker waits a grace period for a cancelled call to return; one that does not is
    stopped by killing this process, and the worker re-runs the other calls it was
    running elsewhere without charging their tasks an attempt.

    ``max_workers`` bounds how many calls run at once (the worker may send several).
    """
    path = socket or socket_path()
    if os.path.exists(path):
        os.unlink(path)
    options = [
        ("grpc.max_receive_message_length", MESSAGE_BYTES_MAX),
        ("grpc.max_send_message_length", MESSAGE_BYTES_MAX),
    ]
    # Two threads more than calls: Health (which the worker asks after cancelling a call)
    # and Describe must answer while every call thread is busy.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers + 2), options=options)
    calls = threading.BoundedSemaphore(max_workers)

    def bounded_call(request, context):
        with calls:
            return _call(handler, request, context, running)

    methods = list(methods)

    running = _Running()

    def describe(_request, _context):
        return _schema.DescribeResponse(name=name, abi_version=ABI_VERSION, methods=methods, cooperative_cancel=True)

    def health(_request, _context):
        return _schema.HealthResponse(serving=True, running=running.ids())

    def unary(fn, request, response):
        return grpc.unary_unary_rpc_method_handler(
            fn, request_deserializer=request.FromString, response_serializer=response.SerializeToString
        )

    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                _schema.SERVICE,
                {
                    "Describe": unary(describe, _schema.DescribeRequest, _schema.DescribeResponse),
                    "Call": unary(bounded_call, _schema.CallRequest, _schema.CallResponse),
                    "Health": unary(health, _schema.HealthRequest, _schema.HealthResponse),
                },
            ),
        )
    )
    if server.add_insecure_port("unix:" + path) == 0:
        raise SystemExit(f"rollout_plugin: cannot listen on unix:{path}")
    server.start()
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    if os.environ.get(PARENT_PIPE_ENV) == "stdin":
        threading.Thread(target=_exit_when_the_pipe_closes, daemon=True).start()
    stopped = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopped.set())
    stopped.wait()
    server.stop(grace=1).wait()
