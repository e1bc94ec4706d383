"""A sidecar exits as soon as the worker's end of its stdin pipe closes.

Its parent (this test) stays alive throughout, so the re-parenting check cannot be what
ends it: only the pipe can.
"""

import os
import subprocess
import sys
import tempfile
import time
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ECHO = os.path.join(ROOT, "examples", "echo_plugin.py")


def start(env_extra):
    sock_dir = tempfile.mkdtemp()
    sock = os.path.join(sock_dir, "echo.sock")
    env = dict(os.environ, PYTHONPATH=ROOT, **env_extra)
    proc = subprocess.Popen([sys.executable, ECHO, "--socket", sock], stdin=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 30
    while not os.path.exists(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the sidecar did not start listening")
        time.sleep(0.02)
    return proc


class ParentPipe(unittest.TestCase):
    def test_closing_the_pipe_ends_the_sidecar(self):
        proc = start({"ROLLOUT_PLUGIN_PARENT_PIPE": "stdin"})
        proc.stdin.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            self.fail("the sidecar outlived the close of its parent pipe by 5 s")

    def test_without_the_variable_stdin_is_left_alone(self):
        proc = start({"ROLLOUT_PLUGIN_PARENT_PIPE": ""})
        proc.stdin.close()
        try:
            self.assertIsNone(proc.poll())
            time.sleep(1)
            self.assertIsNone(proc.poll(), "the sidecar exited on a closed stdin nobody said was its parent pipe")
        finally:
            proc.terminate()
            proc.wait(timeout=10)


if __name__ == "__main__":
    unittest.main()
