"""Example in-process plugin (mode = "python"): the worker imports this module and
calls handle(method, payload, inputs) -> bytes, inputs being the local files of the
task's input blobs. handle(method, payload) and handle(payload) work too.
"""

import hashlib
import time


def handle(method: str, payload: bytes, inputs: list) -> bytes:
    if method == "inputs":
        out = []
        for path in inputs:
            with open(path, "rb") as f:
                data = f.read()
            out.append(f"{hashlib.sha256(data).hexdigest()} {len(data)}")
        return "\n".join(out).encode()
    if method == "echo":
        return payload
    if method == "upper":
        return payload.upper()
    if method == "fail":
        raise ValueError(f"fail was called with {len(payload)} bytes")
    if method == "sleep":
        time.sleep(int(payload.decode()) / 1000)
        return payload
    if method == "spin":
        # Pure-Python busy loop: interruptible by the host's injected exception.
        end = time.monotonic() + int(payload.decode()) / 1000
        while time.monotonic() < end:
            pass
        return payload
    if method == "not_bytes":
        return 42
    raise ValueError(f"unknown method {method!r}")
