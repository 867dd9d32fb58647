"""Run adapters over cases and collect rows: the one entry point the CLI, pytest and self-checks share.

``run_rows(adapters, cases, dtypes)`` returns the rows; ``on_rows`` sees each
batch as it is produced (the CLI appends them to rows.jsonl there). With
``isolate=True`` (the default) each adapter runs in its own child process
(``conformance.worker``), ``jobs`` of them at a time.
"""
from __future__ import annotations

import importlib.util
import os
import queue
import sys
import threading
from typing import Callable, Iterable

import impls

from .cases import Case, row_id
from .evaluate import evaluate, status_rows
from .worker import AdapterProcess, WorkerFailure

DEFAULT_TIMEOUT = 120.0


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


def looks_available(name: str) -> bool:
    """Whether the adapter's framework is installed, without importing it (the child finds out for sure)."""
    adapter = impls.get_adapter(name)
    if adapter._available is not None:  # already known, e.g. a broken adapter module
        return adapter._available[0]
    try:
        return all(importlib.util.find_spec(m) is not None for m in adapter.requires)
    except (ImportError, ValueError):
        return False


def expected_row_ids(adapter: str, case: Case, dtypes) -> list[str]:
    if case.area == "invalid":
        return [row_id(adapter, case.id, "float32", "raises")]
    return [row_id(adapter, case.id, d, q) for d in dtypes for q in case.quantities()]


def _tasks(adapter: str, cases, dtypes, skip: set) -> list[tuple[Case, list[str]]]:
    tasks = []
    for case in cases:
        needed = [d for d in (("float32",) if case.area == "invalid" else dtypes)
                  if any(r not in skip for r in expected_row_ids(adapter, case, [d]))]
        if needed:
            tasks.append((case, needed))
    return tasks


def run_rows(adapters: Iterable[str], cases: Iterable[Case], dtypes: Iterable[str], *, isolate: bool = True,
             timeout: float = DEFAULT_TIMEOUT, jobs: int | None = None, memory_budget: int | None = None,
             on_rows: Callable[[list[dict]], None] | None = None, skip: Iterable[str] = (),
             registrations: Iterable[tuple[str, str]] = (), adhoc: Iterable[str] = (),
             catalogue_dir: str | None = None, entries=None) -> list[dict]:
    """Rows of every adapter x case x dtype (x quantity), except the row ids in ``skip``.

    ``registrations`` (name, "module:Class") and ``adhoc`` ("module:Class" for ``impls.plugins.load_adhoc``)
    are replayed in each child so adapters defined outside the registry run there too.
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
            for case, needed in _tasks(name, cases, dtypes, skip):
                emit(evaluate(name, case, needed, entries, memory_budget))
        return collected

    setup = {"registrations": [list(r) for r in registrations], "adhoc": list(adhoc),
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
            process = AdapterProcess(name, setup, timeout)
            try:
                for case, needed in _tasks(name, cases, dtypes, skip):
                    request = {"adapter": name, "case": case.to_dict(), "dtypes": needed,
                               "memory_budget": memory_budget}
                    try:
                        reply = process.request(request)
                        rows = reply["rows"] if "rows" in reply else status_rows(
                            impls.get_adapter(name), case, needed, "error", f"harness error: {reply.get('error')}")
                    except WorkerFailure as exc:
                        rows = status_rows(impls.get_adapter(name), case, needed, "error", str(exc))
                    emit(rows)
            finally:
                process.stop()

    jobs = jobs or min(len(adapters), os.cpu_count() or 1) or 1
    threads = [threading.Thread(target=worker_loop, daemon=True) for _ in range(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return collected
