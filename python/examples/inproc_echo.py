"""Example in-process plugin (mode = "python"): the worker imports this module and
calls handle(method, payload) -> bytes. A one-argument handle(payload) also works.
"""

import time


def handle(method: str, payload: bytes) -> bytes:
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
