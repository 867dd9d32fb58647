"""The one worker protocol: a child process that serves requests, for whoever needs one.

Why: Keras fixes its backend once per process, and a crashing or hanging
framework must not take the caller down. Two things use it: a layer hosted in
another process behind the ordinary Layer interface (:func:`host`; Keras on a
backend other than this process's), and the conformance runner's isolation of
each adapter (:meth:`Worker.run` of ``mhabench.conformance.evaluate``).

The child is a fresh interpreter started with its own environment (e.g.
``KERAS_BACKEND``); requests and replies are pickles on two private pipes
(NumPy arrays, ml_dtypes bfloat16 included), so whatever a framework prints
cannot corrupt them. Requests: ``build`` a layer, ``make`` an object the child
keeps by name, ``call`` a method of a hosted layer or kept object, ``run`` an
importable function. A request that outlives its timeout kills the child (its
whole process group); a child that dies (``os._exit``, a segfault) turns the
request into a :class:`WorkerError` carrying the tail of the child's stderr.
The next request starts a fresh child, replays the worker's ``setup`` calls
and ``objects``, and layers hosted there are rebuilt from their recipe on first
use.
"""
from __future__ import annotations

import atexit
import importlib
import itertools
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback

from .base import Layer


# ---- children die with their parent ------------------------------------------------------------------
def die_with_parent(sig: int = signal.SIGKILL, parent: int | None = None) -> None:
    """Have the kernel send ``sig`` to this process when its parent ends, however it ends (Linux's
    PR_SET_PDEATHSIG; strictly, when the parent's thread that started this process ends). A parent
    killed with SIGKILL cleans nothing up, and a child left behind goes on working: a worker stuck in a
    hung case, asv measuring into the next run. ``parent``: the pid that started this process (default:
    the current parent); if it has already gone, the signal comes now. Elsewhere than Linux, nothing.

    The one mechanism for every child mhabench starts: workers arm it as they start (:func:`serve`),
    asv and the main job's stages through :func:`dies_with_parent`, asv's own processes as they import
    the benchmarks."""
    prctl = _prctl()
    if prctl is None:
        return
    parent = os.getppid() if parent is None else parent
    prctl(1, int(sig))  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it ended before the signal was armed
        os.kill(os.getpid(), sig)


def dies_with_parent(sig: int = signal.SIGKILL):
    """A ``preexec_fn`` for :class:`subprocess.Popen`: the child arms :func:`die_with_parent` before it runs
    its program (for a program that cannot arm it itself). libc is looked up here, before the fork."""
    parent = os.getpid()
    _prctl()
    return lambda: die_with_parent(sig, parent)


_libc_prctl = []


def _prctl():
    if not _libc_prctl:
        try:
            import ctypes
            _libc_prctl.append(ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None)
        except (OSError, AttributeError):
            _libc_prctl.append(None)
    return _libc_prctl[0]


_spawner = None  # (pid, executor): one long-lived thread of this process starts every worker
_spawner_lock = threading.Lock()


def _spawn(*args, **kwargs) -> subprocess.Popen:
    """subprocess.Popen, run by one thread that lives as long as this process: a child's parent-death signal
    fires when the thread that started it ends, and a worker may be started from a short-lived thread."""
    global _spawner
    from concurrent.futures import ThreadPoolExecutor
    with _spawner_lock:
        if _spawner is None or _spawner[0] != os.getpid():  # a forked process starts its own thread
            _spawner = (os.getpid(), ThreadPoolExecutor(max_workers=1, thread_name_prefix="mhabench-spawner"))
        spawner = _spawner[1]
    return spawner.submit(subprocess.Popen, *args, **kwargs).result()


def kill(proc: subprocess.Popen) -> None:
    """Kill a child started in its own session, with everything it started, and reap it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()
    proc.wait()

BUILD_TIMEOUT = 300.0
CALL_TIMEOUT = 120.0
STARTUP_TIMEOUT = 60.0
STDERR_TAIL = 4000
# Framework log noise a child would otherwise print (TensorFlow's C++ and absl INFO/WARNING lines)
QUIET_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2"}
_HEADER = struct.Struct("<Q")


class WorkerError(RuntimeError):
    """A request the worker process could not answer (timeout, crash, unpicklable failure)."""

    def __init__(self, message: str, stderr_tail: str = "", returncode: int | None = None):
        self.stderr_tail, self.returncode = stderr_tail, returncode
        text = message if not stderr_tail else f"{message}\n--- worker stderr (last lines) ---\n{stderr_tail}"
        super().__init__(text)


class WorkerTimeout(WorkerError):
    """The request ran past its timeout; the worker was killed."""


class WorkerCrashed(WorkerError):
    """The worker process died while serving the request."""


# ---- framing: length-prefixed pickles on raw fds, with deadlines ---------------
def _write(fd: int, obj, deadline: float | None = None) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(_HEADER.pack(len(data)) + data)
    while view:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([], [fd], [], left)[1]:
                raise TimeoutError
        view = view[os.write(fd, view[:1 << 20]):]


def _read_exact(fd: int, n: int, deadline: float | None) -> bytes:
    chunks, got = [], 0
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
        chunk = os.read(fd, min(n - got, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _read(fd: int, deadline: float | None = None):
    (size,) = _HEADER.unpack(_read_exact(fd, _HEADER.size, deadline))
    return pickle.loads(_read_exact(fd, size, deadline))


# ---- the parent side --------------------------------------------------------
class Worker:
    """One child process serving requests one at a time. Restarts on the next request after a failure."""

    def __init__(self, env: dict | None = None, name: str = "worker", setup=(), objects=None):
        """``setup``: ``("module:function", args, kwargs)`` calls every fresh child runs first. ``objects``:
        ``{name: ("module:Class", args, kwargs)}``, made by every fresh child after its setup and kept there
        under ``name`` for :meth:`call` (what a run's evaluations share in the child: its catalogue, say)."""
        self.env, self.name = dict(env or {}), name
        self.setup = [tuple(call) for call in setup]
        self.objects = {key: tuple(recipe) for key, recipe in (objects or {}).items()}
        self.generation = 0  # bumps at every (re)start; layers rebuild when it changes
        self._proc = None
        self._lock = threading.RLock()

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _start(self):
        env = {**QUIET_ENV, **os.environ, **self.env}
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # import what the parent imports
        self._stderr = tempfile.TemporaryFile(mode="w+b")
        req_r, self._req = os.pipe()
        self._rep, rep_w = os.pipe()
        try:
            self._proc = _spawn(
                [sys.executable, "-c", f"from mhabench.impls.worker import serve; serve({req_r}, {rep_w}, "
                                       f"{os.getpid()})"],
                env=env, pass_fds=(req_r, rep_w), stdin=subprocess.DEVNULL, stdout=self._stderr,
                stderr=self._stderr, start_new_session=True)
        finally:
            os.close(req_r)
            os.close(rep_w)
        self.generation += 1
        self._exchange(("ping",), STARTUP_TIMEOUT)
        requests = [("run", *call) for call in self.setup] + [("make", key, *recipe)
                                                              for key, recipe in self.objects.items()]
        for request in requests:
            status, payload = self._exchange(request, BUILD_TIMEOUT)
            if status != "ok":
                self._stop()
                target = request[1] if request[0] == "run" else request[2]
                raise WorkerError(f"{self.name}: setup {target} failed: {payload[1]}: {payload[2]}", payload[3])

    def stderr_tail(self) -> str:
        try:
            self._stderr.seek(0, os.SEEK_END)
            size = self._stderr.tell()
            self._stderr.seek(max(0, size - STDERR_TAIL))
            return self._stderr.read().decode("utf-8", "replace")
        except (OSError, ValueError, AttributeError):
            return ""

    def _stop(self):
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for fd in (self._req, self._rep):
            try:
                os.close(fd)
            except OSError:
                pass
        kill(proc)

    def close(self):
        with self._lock:
            self._stop()

    def _exchange(self, message, timeout: float):
        deadline = time.monotonic() + timeout
        try:
            _write(self._req, message, deadline)
            return _read(self._rep, deadline)
        except TimeoutError:
            tail = self.stderr_tail()
            self._stop()
            raise WorkerTimeout(f"{self.name}: timed out after {timeout:g} s ({message[0]} request); the worker "
                                f"was killed and starts afresh on the next request", tail) from None
        except (EOFError, BrokenPipeError, ConnectionResetError, OSError):
            proc = self._proc
            try:
                code = proc.wait(timeout=10) if proc is not None else None
            except subprocess.TimeoutExpired:
                code = None
            tail = self.stderr_tail()
            self._stop()
            how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit status {code}"
            raise WorkerCrashed(f"{self.name}: the worker died during a {message[0]} request ({how})",
                                tail, code) from None

    def run(self, target: str, *args, timeout: float = CALL_TIMEOUT, **kwargs):
        """``module:function(*args, **kwargs)`` in the child; its result (pickled back)."""
        return self.request(("run", target, args, kwargs), timeout)

    def call(self, name: str, method: str, *args, timeout: float = CALL_TIMEOUT, **kwargs):
        """``method(*args, **kwargs)`` of the child's object ``name`` (one of ``objects``); its result."""
        return self.request(("call", name, method, args, kwargs), timeout)

    def request(self, message: tuple, timeout: float):
        """Send ``message`` and return the reply's value, re-raising the child's exception."""
        with self._lock:
            if not self.alive:
                self._stop()
                self._start()
            status, payload = self._exchange(message, timeout)
        if status == "ok":
            return payload
        exc_bytes, kind, text, tb = payload
        try:
            exc = pickle.loads(exc_bytes) if exc_bytes is not None else None
        except Exception:
            exc = None
        if isinstance(exc, Exception):
            exc.add_note(f"(raised in {self.name} process)\n{tb}")
            raise exc
        raise WorkerError(f"{self.name}: {kind}: {text}", tb)


_shared: dict[tuple, Worker] = {}  # one child per environment, shared by the layers hosted there
_shared_lock = threading.Lock()


def shared_worker(env: dict | None = None) -> Worker:
    """The process-wide worker for this environment (started lazily, on first request)."""
    key = tuple(sorted((env or {}).items()))
    with _shared_lock:
        if key not in _shared:
            label = " ".join(f"{k}={v}" for k, v in key) or "default"
            _shared[key] = Worker(env, name=f"worker[{label}]")
        return _shared[key]


@atexit.register
def _close_all():
    for worker in list(_shared.values()):
        worker.close()


class WorkerLayer(Layer):
    """A layer living in a worker process. Inputs are validated here, so errors read the same."""

    def __init__(self, adapter, spec, weights, dtype, device, mode, *, target: str, worker: Worker,
                 build_timeout: float = BUILD_TIMEOUT, call_timeout: float = CALL_TIMEOUT, options=None):
        super().__init__(adapter, spec, weights, dtype, device, mode)
        self.worker, self.build_timeout, self.call_timeout = worker, float(build_timeout), float(call_timeout)
        self._recipe = (target, spec, weights, dtype, device, mode, dict(options or {}))
        self._handle = self._generation = None
        self._ensure_built()

    def _ensure_built(self):
        if self._handle is None or self._generation != self.worker.generation or not self.worker.alive:
            self._handle = None
            self._handle = self.worker.request(("build",) + self._recipe, self.build_timeout)
            self._generation = self.worker.generation

    def remote(self, method: str, *args, **kwargs):
        """Call ``method`` on the hosted layer."""
        self._ensure_built()
        return self.worker.request(("call", self._handle, method, args, kwargs), self.call_timeout)

    def _forward(self, call, return_scores, training, seed):
        return self.remote("__call__", call.query, call.value, call.key if call.key_given else None, call.given_mask,
                           call.causal_argument, return_scores, training=training, seed=seed,
                           **call.feature_kwargs())

    def _gradients(self, call, cotangent):
        return self.remote("gradients", call.query, call.value, call.key if call.key_given else None,
                           call.given_mask, call.causal_argument, cotangent, **call.feature_kwargs())

    def export_weights(self):
        return self.remote("export_weights")

    def emulations(self, call):
        return self.remote("emulations", call)

    def call_opset(self, call):
        return self.remote("call_opset", call)

    def native_inputs(self, *args, **kwargs):
        raise NotImplementedError(f"{self.adapter.name} is hosted in a worker process here: no native benchmark "
                                  f"path (run it in a process where it runs in-process)")

    native_forward = native_forward_backward = native_inputs


def import_target(target: str):
    """The object a ``"module:attribute"`` string names."""
    module, _, attr = str(target).partition(":")
    if not attr:
        raise ValueError(f"target must be 'module:attribute', got {target!r}")
    return getattr(importlib.import_module(module), attr)


# The registry that turns an adapter's name into the adapter, named as every request names its code: the
# worker sits below the registry (which runs plugins' checks in workers), so it imports no part of it.
RESOLVE = "mhabench.impls.registry:resolve"


def host(target: str, spec, weights, dtype="float32", device="cpu", mode="eager", *, adapter=None,
         env: dict | None = None, worker: Worker | None = None, build_timeout: float = BUILD_TIMEOUT,
         call_timeout: float = CALL_TIMEOUT, **options) -> WorkerLayer:
    """Build ``target``'s layer in a worker process (the shared one for ``env`` unless ``worker`` is given)."""
    adapter = adapter if adapter is not None else import_target(RESOLVE)(target)
    worker = worker if worker is not None else shared_worker(env)
    return WorkerLayer(adapter, spec, weights, dtype, device, mode, target=target, worker=worker,
                       build_timeout=build_timeout, call_timeout=call_timeout, options=options)


# ---- the child side ---------------------------------------------------------
def _error_payload(exc: BaseException):
    try:
        exc_bytes = pickle.dumps(exc)
        pickle.loads(exc_bytes)
    except Exception:
        exc_bytes = None
    return (exc_bytes, type(exc).__name__, str(exc), traceback.format_exc())


_serving = False  # this process is a worker child (``serve`` runs)


def in_worker() -> bool:
    """Whether this process is a worker child: isolated already, so what would be isolated runs here."""
    return _serving


def serve(req_fd: int, rep_fd: int, parent: int | None = None) -> None:
    """The child's loop: answer requests until the parent closes the pipe. ``parent``: the pid of the
    process that started it, which it dies with (:func:`die_with_parent`)."""
    global _serving
    die_with_parent(signal.SIGKILL, parent)
    import faulthandler
    faulthandler.enable()  # a segfault leaves a traceback in the stderr tail
    _serving = True
    held, ids = {}, itertools.count(1)  # the layers built (by handle) and the objects made (by name)
    while True:
        try:
            message = _read(req_fd)
        except EOFError:
            return
        try:
            op = message[0]
            if op == "ping":
                result = os.getpid()
            elif op == "build":
                target, spec, weights, dtype, device, mode, options = message[1:]
                handle = next(ids)
                held[handle] = import_target(RESOLVE)(target).build(spec, weights, dtype, device, mode, **options)
                result = handle
            elif op == "call":
                handle, method, args, kwargs = message[1:]
                result = getattr(held[handle], method)(*args, **kwargs)
            elif op == "make":
                name, target, args, kwargs = message[1:]
                held[name] = import_target(target)(*args, **kwargs)
                result = name
            elif op == "run":
                target, args, kwargs = message[1:]
                result = import_target(target)(*args, **kwargs)
            else:
                raise ValueError(f"unknown worker request {op!r}")
            reply = ("ok", result)
            pickle.dumps(reply)  # an unpicklable result becomes an error reply, not a dead worker
        except BaseException as exc:  # everything goes back to the caller
            reply = ("err", _error_payload(exc))
        _write(rep_fd, reply)
