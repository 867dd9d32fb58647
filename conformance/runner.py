"""Run adapters over cases and collect rows: the one engine the CLI, pytest and the self-check share.

``run_rows(adapters, cases, dtypes)`` returns the rows; ``on_rows`` sees each batch as it is produced
(the session appends them to rows.jsonl there). With ``isolate=True`` (the default) each adapter runs
in worker processes of its own (``mhabench.impls.worker``, the same protocol that hosts Keras layers),
``jobs`` of them at a time, scheduled by estimated cost (``schedule``): a case that hangs or crashes its
framework costs that case, not the run, and a crash in one dtype's kernel costs that dtype only (the case's
other dtypes are retried one by one in a fresh process). ``switches`` ({switch name: setting}, the kernel
switches of ``impls.facts``) are set in the worker processes of the adapters they reach, so one machine runs
another machine's kernels; the rows record the facts that show it.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time
from typing import Callable, Iterable

from mhabench import impls
from mhabench.impls import memory
from mhabench.impls import worker as worker_mod
from mhabench.schema import Row, RowId, Status

from . import schedule
from .cases import AnyCase
from .evaluate import evaluate, status_rows

DEFAULT_TIMEOUT = 120.0
EVALUATOR = "mhabench.conformance.evaluate:Evaluator"  # what each worker process makes once and keeps


WORKER_BYTES = 2 << 30  # a worker process with its framework imported and its compile caches, roughly


def available_memory() -> int | None:
    """Memory available now, as the shared validation reads it (a function here so tests can set it)."""
    return memory.available_bytes()


def default_memory_budget() -> int:
    """A quarter of the memory available now (a case estimated above it is skipped, not run into OOM)."""
    available = available_memory()
    return available // 4 if available is not None else 4 << 30


def default_jobs() -> int:
    """One worker process per core, as many as the memory available holds (``WORKER_BYTES`` each)."""
    cores = os.cpu_count() or 1
    available = available_memory()
    return max(1, min(cores, available // WORKER_BYTES)) if available is not None else cores


def expected_row_ids(adapter: str, case: AnyCase, dtypes) -> list[str]:
    return [RowId(adapter, case.id, d, q).format() for d in case.run_dtypes(dtypes) for q in case.quantities()]


def tasks(adapter: str, cases, dtypes, skip: set, include=None) -> list[tuple[AnyCase, list[str]]]:
    """(case, dtypes still needed) for one adapter, leaving out the rows in ``skip`` and, when ``include``
    is given, every (adapter, case id, dtype) not in it (another shard's)."""
    out = []
    for case in cases:
        needed = [d for d in case.run_dtypes(dtypes) if (include is None or (adapter, case.id, d) in include)
                  and any(r not in skip for r in expected_row_ids(adapter, case, [d]))]
        if needed:
            out.append((case, needed))
    return out


def switch_environment(adapter: str, switches: dict | None) -> dict[str, str]:
    """The environment variables of ``switches`` ({switch name: setting}) that reach ``adapter``'s kernels."""
    env: dict[str, str] = {}
    for switch in impls.get_adapter(adapter).switches():
        if switches and switch.name in switches:
            env.update(switch.environment(switches[switch.name]))
    return env


def adapter_worker(name: str, setup: dict, timeout: float, switches: dict | None = None) -> worker_mod.Worker:
    """The isolation worker for one adapter: its own environment (with the run's kernel switches that reach it),
    and an ``evaluate.Evaluator`` (the run's plugins registered, its catalogue loaded) made at start and kept as
    ``"evaluator"``."""
    env = {**impls.get_adapter(name).worker_env(), **switch_environment(name, switches)}
    return worker_mod.Worker(env=env, name=f"{name} worker", objects={"evaluator": (EVALUATOR, (setup,), {})})


def evaluate_in(child: worker_mod.Worker, adapter: str, case: AnyCase, dtypes, memory_budget=None, *,
                timeout: float = DEFAULT_TIMEOUT) -> list[Row]:
    """The rows of ``adapter x case x dtypes``, evaluated by ``child``'s evaluator (see :func:`adapter_worker`)."""
    return child.call("evaluator", "evaluate", adapter, case.to_dict(), dtypes, memory_budget, timeout=timeout)


def run_rows(adapters: Iterable[str], cases: Iterable[AnyCase], dtypes: Iterable[str], *, isolate: bool = True,
             timeout: float = DEFAULT_TIMEOUT, jobs: int | None = None, memory_budget: int | None = None,
             on_rows: Callable[[list[Row]], None] | None = None, skip: Iterable[str] = (), adhoc: Iterable[str] = (),
             catalogue_dir: str | None = None, entries=None, include=None, history=None,
             switches: dict | None = None, scheduler: schedule.Scheduler | None = None) -> list[Row]:
    """Rows of every adapter x case x dtype (x quantity), except the row ids in ``skip``.

    ``include``: only these (adapter, case id, dtype) tasks (a shard); None for all. When ``on_rows``
    raises, the run stops (no more rows are produced; the cases in flight are dropped) and its
    exception is raised here. ``adhoc``
    ("module:Class" targets for ``impls.plugins.load_adhoc``) are replayed in each worker, so adapters
    defined outside the registry run there too. ``history``: {(adapter, case id, dtype): ms} measured
    by an earlier run, which orders the work better than the prior (``schedule``). ``jobs`` worker
    threads (default: ``default_jobs()``) each drive one worker process at a time; an adapter with much
    work left gets several (see ``schedule.Scheduler``). Which process evaluates a case never changes
    its rows.

    ``scheduler``: one built by the caller over ``planned_tasks`` (a time budget's deadline and coverage
    rounds, see ``schedule.Scheduler``); a task the scheduler drops, or one still running when its grace past
    the deadline ends, is not run and yields no rows (the scheduler's ``dropped`` lists it).
    """
    adapters, cases, dtypes, skip = list(adapters), list(cases), list(dtypes), set(skip)
    include = None if include is None else set(include)
    memory_budget = default_memory_budget() if memory_budget is None else memory_budget
    collected: list[Row] = []
    lock = threading.Lock()
    stop = threading.Event()
    failed: list[BaseException] = []  # what stopped the run: ``on_rows`` could not take its rows, or a bug

    def emit(rows):
        rows = [r for r in rows if r.row_id not in skip]
        with lock:
            if stop.is_set():
                return
            collected.extend(rows)
            if on_rows is not None and rows:
                try:
                    on_rows(rows)
                except BaseException as exc:  # e.g. the journal's disk is full: the run stops, not one thread
                    failed.append(exc)
                    stop.set()

    if not isolate:
        if switches:
            raise ValueError("switches are set in worker processes: they need isolate=True")
        from . import catalogue
        entries = catalogue.as_catalogue(entries) if entries is not None else \
            catalogue.load(catalogue_dir or catalogue.DIVERGENCE_DIR)
        for name in adapters:
            for case, needed in tasks(name, cases, dtypes, skip, include):
                emit(evaluate(name, case, needed, entries, memory_budget))
        return collected

    setup = {"adhoc": list(adhoc),
             "sys_path": [p for p in sys.path if p], "catalogue": str(catalogue_dir) if catalogue_dir else None}
    if scheduler is None:
        scheduler = schedule.Scheduler(planned_tasks(adapters, cases, dtypes, skip, include, history))

    def evaluate_task(child, task):
        limit = scheduler.timeout(timeout)
        try:
            return evaluate_in(child, task.adapter, task.case, task.dtypes, memory_budget, timeout=limit)
        except worker_mod.WorkerTimeout as exc:
            if limit < timeout:  # stopped at the budget's end, not by the case's own timeout: not run
                scheduler.drop(task)
                return []
            return status_rows(impls.get_adapter(task.adapter), task.case, task.dtypes, Status.ERROR, _one_line(exc))
        except worker_mod.WorkerCrashed as exc:
            if len(task.dtypes) > 1:  # one dtype's kernel may have killed the process: each dtype alone, afresh
                return [row for dtype in task.dtypes
                        for row in evaluate_task(child, dataclasses.replace(task, dtypes=[dtype]))]
            return status_rows(impls.get_adapter(task.adapter), task.case, task.dtypes, Status.ERROR, _one_line(exc))
        except worker_mod.WorkerError as exc:
            return status_rows(impls.get_adapter(task.adapter), task.case, task.dtypes, Status.ERROR, _one_line(exc))
        except Exception as exc:  # a harness bug: reported as the case's error, the run goes on
            return status_rows(impls.get_adapter(task.adapter), task.case, task.dtypes, Status.ERROR,
                               f"harness error: {type(exc).__name__}: {exc}")

    def worker_loop():
        current, child = None, None
        try:
            while not stop.is_set() and (task := scheduler.next(current)) is not None:
                if task is schedule.WAIT:
                    scheduler.wait(1.0)
                    continue
                fresh = task.adapter != current
                if fresh:
                    if child is not None:
                        child.close()
                    current, child = task.adapter, adapter_worker(task.adapter, setup, timeout, switches)
                started = time.perf_counter()
                rows = evaluate_task(child, task)
                scheduler.finished(task, time.perf_counter() - started, fresh)
                emit(rows)
        except BaseException as exc:  # a harness bug outside a case (a worker that cannot start): the run stops
            with lock:
                failed.append(exc)
                stop.set()
        finally:
            if child is not None:
                child.close()

    jobs = jobs or default_jobs()
    threads = [threading.Thread(target=worker_loop, daemon=True) for _ in range(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failed:
        raise failed[0]
    return collected


def planned_tasks(adapters, cases, dtypes, skip=(), include=None, history=None, rounds=None) -> list[schedule.Task]:
    """The run's tasks, one per adapter x case (its dtypes together), each with its estimated cost:
    measured where ``history`` has the task, else the prior. ``rounds``: {(adapter, case id, dtype): coverage
    round} under a time budget; the dtypes of a case then form one task per round."""
    history = history or {}
    memo: dict = {}
    out = []
    for name in adapters:
        for case, needed in tasks(name, cases, dtypes, set(skip), include):
            by_round: dict[int, list[str]] = {}
            for d in needed:
                by_round.setdefault((rounds or {}).get((name, case.id, d), 1), []).append(d)
            for number, group in sorted(by_round.items()):
                estimate = sum(schedule.estimate_ms(name, case, d, history, _compiles=memo) for d in group)
                out.append(schedule.Task(name, case, group, estimate, number))
    return out


def _one_line(exc: BaseException) -> str:
    """A worker failure for a row's message: what happened, then the child's stderr tail."""
    text = str(exc)
    tail = getattr(exc, "stderr_tail", "")
    if tail:
        text = text.split("\n--- worker stderr", 1)[0] + f"; stderr tail: {tail[-1500:]}"
    return text
