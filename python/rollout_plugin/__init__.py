"""rollout_plugin: write a rollout sidecar plugin as one function.

    from rollout_plugin import serve

    def handle(method: str, payload: bytes) -> bytes:
        if method == "echo":
            return payload
        raise ValueError(f"unknown method {method!r}")

    if __name__ == "__main__":
        serve(handle, name="echo", methods=["echo"])

The worker starts the script with ``--socket PATH`` (also in the environment as
``ROLLOUT_PLUGIN_SOCKET``) and talks gRPC (proto/plugin.proto) to it over that Unix
socket. An exception raised by ``handle`` fails that call with its message and
traceback; the process keeps serving. A call that overruns its deadline, or a process
that dies, is handled by the worker: it kills the process and starts a new one.
"""

from .server import ABI_VERSION, serve, socket_path

__all__ = ["ABI_VERSION", "serve", "socket_path"]
