"""One child process per adapter: a case that hangs or crashes the framework costs one case, not the run.

The parent writes one JSON request per line to the child's stdin and reads
one JSON reply per line from a private copy of the child's stdout (the
child's fd 1 is pointed at stderr, so a framework printing to stdout cannot
corrupt the protocol). A reply that does not come within the timeout gets
the child killed; a child that dies leaves its stderr tail in the error.
Either way the next request starts a fresh child.
"""
from __future__ import annotations

import json
import math
import os
import select
import subprocess
import sys
import tempfile
import time
import traceback

from impls._worker import kill

STARTUP_TIMEOUT = 120.0
STDERR_TAIL = 2000


class WorkerFailure(RuntimeError):
    """The child could not answer: it timed out (and was killed) or died."""


def _clean(value):
    """JSON-safe: non-finite floats become None (rows never carry NaN figures)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def child_env(adapter_name: str) -> dict:
    """Environment for an adapter's child: Keras's multi-backend adapters declare a ``backend`` to select."""
    import impls
    backend = getattr(impls.get_adapter(adapter_name), "backend", None)
    env = {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "TF_CPP_MIN_LOG_LEVEL": "2"}
    if isinstance(backend, str):
        env["KERAS_BACKEND"] = backend
    return env


class AdapterProcess:
    """The parent's handle on one adapter's child process."""

    def __init__(self, adapter: str, setup: dict, timeout: float):
        self.adapter, self.setup, self.timeout = adapter, setup, timeout
        self.proc = None
        self.restarts = 0

    def _start(self):
        self._stderr = tempfile.TemporaryFile()
        env = dict(os.environ, **child_env(self.adapter))
        self.proc = subprocess.Popen([sys.executable, "-m", "conformance.worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._stderr, env=env, start_new_session=True)
        self._buffer = b""
        self._send(self.setup)
        self._receive(STARTUP_TIMEOUT + self.timeout)

    def stderr_tail(self) -> str:
        try:
            self._stderr.seek(0, os.SEEK_END)
            self._stderr.seek(max(0, self._stderr.tell() - STDERR_TAIL))
            return self._stderr.read().decode("utf-8", "replace").strip()
        except (OSError, ValueError, AttributeError):
            return ""

    def _send(self, message: dict):
        self.proc.stdin.write((json.dumps(message) + "\n").encode())
        self.proc.stdin.flush()

    def _receive(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self.stop()
                raise WorkerFailure(f"timed out after {timeout:g} s; the {self.adapter} worker was killed "
                                    f"and restarted")
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                code = self.proc.wait()
                tail = self.stderr_tail()
                self.stop()
                how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
                raise WorkerFailure(f"the {self.adapter} worker died ({how}); stderr tail: {tail[-1500:]}")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)

    def request(self, message: dict) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            if self.proc is not None:
                self.restarts += 1
            self.stop()
            self._start()
        try:
            self._send(message)
        except (BrokenPipeError, OSError):
            pass  # the child died: _receive reports it with its stderr
        return self._receive(self.timeout)

    def stop(self):
        proc, self.proc = self.proc, None
        if proc is None:
            return
        kill(proc)
        for stream in (proc.stdin, proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


# ---- the child ----------------------------------------------------------------------------------------

def serve():
    import faulthandler
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # stray prints from frameworks go to stderr, never into the protocol
    faulthandler.enable()

    def reply(obj):
        protocol.write(json.dumps(_clean(obj)) + "\n")
        protocol.flush()

    setup = json.loads(sys.stdin.readline())
    for path in setup.get("sys_path", []):
        if path not in sys.path:
            sys.path.append(path)
    import impls
    for name, target in setup.get("registrations", []):
        impls.register_adapter(name, target)
    for target in setup.get("adhoc", []):
        from impls import plugins
        plugins.load_adhoc(target)
    from . import catalogue
    from .cases import Case
    from .evaluate import evaluate
    entries = catalogue.load(setup["catalogue"]) if setup.get("catalogue") else catalogue.load()
    reply({"ready": os.getpid()})
    for line in sys.stdin:
        request = json.loads(line)
        try:
            rows = evaluate(request["adapter"], Case.from_dict(request["case"]), request["dtypes"], entries,
                            request.get("memory_budget"), request.get("device", "cpu"))
            reply({"rows": rows})
        except Exception:  # a harness bug: reported as the case's error, the child goes on
            reply({"error": traceback.format_exc()[-STDERR_TAIL:]})


if __name__ == "__main__":
    serve()
