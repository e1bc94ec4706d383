"""Example sidecar plugin. Methods:

- echo:  returns the payload
- upper: returns the payload upper-cased
- fail:  raises ValueError (the call fails with the traceback)
- sleep: sleeps for the payload, read as milliseconds, then returns it (ignoring a cancel)
- wait:  like sleep, but stops early, raising, when the call is cancelled (cooperative)
- crash: exits the process at once (the worker restarts it)
- pid:   returns this process's pid (tests use it to see a restart)
- inputs: returns, per input blob, its SHA-256 and size ("<hex> <bytes>" lines)
"""

import hashlib
import os
import time

from rollout_plugin import serve


def handle(method: str, payload: bytes, inputs: list, cancelled=None) -> bytes:
    if method == "inputs":
        lines = []
        for path in inputs:
            with open(path, "rb") as f:
                data = f.read()
            lines.append(f"{hashlib.sha256(data).hexdigest()} {len(data)}")
        return "\n".join(lines).encode()
    if method == "echo":
        return payload
    if method == "upper":
        return payload.upper()
    if method == "fail":
        raise ValueError(f"fail was called with {len(payload)} bytes")
    if method == "sleep":
        time.sleep(int(payload.decode()) / 1000)
        return payload
    if method == "wait":
        if cancelled is not None and cancelled.wait(int(payload.decode()) / 1000):
            raise TimeoutError("cancelled by the worker")
        return payload
    if method == "crash":
        os._exit(3)
    if method == "pid":
        return str(os.getpid()).encode()
    raise ValueError(f"unknown method {method!r}")


if __name__ == "__main__":
    serve(handle, name="echo", methods=["echo", "upper", "fail", "sleep", "wait", "crash", "pid", "inputs"])
