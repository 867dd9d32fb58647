"""Run adapters over cases and collect rows: the one engine the CLI, pytest and the self-check share.

``run_rows(adapters, cases, dtypes)`` returns the rows; ``on_rows`` sees each batch as it is produced
(the session appends them to rows.jsonl there). With ``isolate=True`` (the default) each adapter runs
in its own worker process (``mhabench.impls.worker``, the same protocol that hosts Keras layers),
``jobs`` of them at a time: a case that hangs or crashes its framework costs that case, not the run.
"""
from __future__ import annotations

import os
import queue
import sys
import threading
from typing import Callable, Iterable

from mhabench import impls
from mhabench.impls import worker as worker_mod

from .cases import Case, row_id
from .evaluate import evaluate, status_rows

DEFAULT_TIMEOUT = 120.0
EVALUATE = "mhabench.conformance.evaluate:evaluate_in_child"
SETUP = "mhabench.conformance.evaluate:setup_child"


def default_memory_budget() -> int:
    """A quarter of the memory available now (a case estimated above it is skipped, not run into OOM)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 4
    except OSError:
        pass
    return 4 << 30


def expected_row_ids(adapter: str, case: Case, dtypes) -> list[str]:
    return [row_id(adapter, case.id, d, q) for d in case.run_dtypes(dtypes) for q in case.quantities()]


def tasks(adapter: str, cases, dtypes, skip: set) -> list[tuple[Case, list[str]]]:
    """(case, dtypes still needed) for one adapter, leaving out the rows in ``skip``."""
    out = []
    for case in cases:
        needed = [d for d in case.run_dtypes(dtypes) if any(r not in skip for r in expected_row_ids(adapter, case, [d]))]
        if needed:
            out.append((case, needed))
    return out


def adapter_worker(name: str, setup: dict, timeout: float) -> worker_mod.Worker:
    """The isolation worker for one adapter: its own environment, the run's plugins replayed at start."""
    env = impls.get_adapter(name).worker_env()
    return worker_mod.Worker(env=env, name=f"{name} worker", setup=[(SETUP, (setup,), {})])


def run_rows(adapters: Iterable[str], cases: Iterable[Case], dtypes: Iterable[str], *, isolate: bool = True,
             timeout: float = DEFAULT_TIMEOUT, jobs: int | None = None, memory_budget: int | None = None,
             on_rows: Callable[[list[dict]], None] | None = None, skip: Iterable[str] = (), adhoc: Iterable[str] = (),
             catalogue_dir: str | None = None, entries=None) -> list[dict]:
    """Rows of every adapter x case x dtype (x quantity), except the row ids in ``skip``.

    ``adhoc`` ("module:Class" targets for ``impls.plugins.load_adhoc``) are replayed in each worker, so
    adapters defined outside the registry run there too.
    """
    adapters, cases, dtypes, skip = list(adapters), list(cases), list(dtypes), set(skip)
    memory_budget = default_memory_budget() if memory_budget is None else memory_budget
    collected: list[dict] = []
    lock = threading.Lock()

    def emit(rows):
        rows = [r for r in rows if r["row_id"] not in skip]
        with lock:
            collected.extend(rows)
            if on_rows is not None and rows:
                on_rows(rows)

    if not isolate:
        from . import catalogue
        entries = entries if entries is not None else catalogue.load(catalogue_dir or catalogue.DIVERGENCE_DIR)
        for name in adapters:
            for case, needed in tasks(name, cases, dtypes, skip):
                emit(evaluate(name, case, needed, entries, memory_budget))
        return collected

    setup = {"adhoc": list(adhoc),
             "sys_path": [p for p in sys.path if p], "catalogue": str(catalogue_dir) if catalogue_dir else None}
    work: queue.Queue = queue.Queue()
    for name in adapters:
        work.put(name)

    def worker_loop():
        while True:
            try:
                name = work.get_nowait()
            except queue.Empty:
                return
            child = adapter_worker(name, setup, timeout)
            try:
                for case, needed in tasks(name, cases, dtypes, skip):
                    try:
                        rows = child.run(EVALUATE, name, case.to_dict(), needed, memory_budget, timeout=timeout)
                    except worker_mod.WorkerError as exc:
                        rows = status_rows(impls.get_adapter(name), case, needed, "error", _one_line(exc))
                    except Exception as exc:  # a harness bug: reported as the case's error, the run goes on
                        rows = status_rows(impls.get_adapter(name), case, needed, "error",
                                           f"harness error: {type(exc).__name__}: {exc}")
                    emit(rows)
            finally:
                child.close()

    jobs = jobs or min(len(adapters), os.cpu_count() or 1) or 1
    threads = [threading.Thread(target=worker_loop, daemon=True) for _ in range(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return collected


def _one_line(exc: BaseException) -> str:
    """A worker failure for a row's message: what happened, then the child's stderr tail."""
    text = str(exc)
    tail = getattr(exc, "stderr_tail", "")
    if tail:
        text = text.split("\n--- worker stderr", 1)[0] + f"; stderr tail: {tail[-1500:]}"
    return text
