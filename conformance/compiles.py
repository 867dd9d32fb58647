"""How many programs each adapter compiles (or exports) to run a conformance matrix, and how long that takes.

    python -m mhabench.conformance.compiles --adapters torch_flex,jax_dpa [--dtypes float32] [--full] [--warm]

Each adapter runs the matrix (the reduced one unless ``--full``) in one process of its own, in its worker
environment, with an empty compilation cache, while the compilers' own counters listen (``--warm``: then
once more in a new process, with the cache the first left):

* JAX (the JAX adapters and Keras on JAX): every XLA compile (``/jax/core/compile/backend_compile_duration``)
  and every persistent-cache hit. With the cache empty at the start, a hit is a program identical to one
  compiled earlier in the run, so the compiles are the distinct programs.
* torch.compile: the graphs dynamo compiled (``counters["stats"]["unique_graphs"]``) and Inductor's
  FX-graph cache misses, its distinct programs.
* ONNX: the graphs ``torch.onnx.export`` exported, and the onnxruntime sessions created (each optimises its
  graph when it is created).

The figures go to stdout as a table, and as JSON with ``--json``. The counts depend on the matrix and the
adapter's code, not on the machine; the seconds depend on both.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from mhabench.impls import registry

COLUMNS = ("xla_compiles", "xla_cache_hits", "dynamo_graphs", "inductor_compiles", "onnx_exports", "ort_sessions")


def _count_jax(found: dict) -> None:
    import jax.monitoring
    found.update(xla_compiles=0, xla_cache_hits=0, compile_s=0.0)

    def on_event(event, **kwargs):
        if event == "/jax/compilation_cache/cache_hits":
            found["xla_cache_hits"] += 1

    def on_duration(event, seconds, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            found["xla_compiles"] += 1
            found["compile_s"] += seconds
    jax.monitoring.register_event_listener(on_event)
    jax.monitoring.register_event_duration_secs_listener(on_duration)


def _count_onnx(found: dict) -> None:
    import onnxruntime
    import torch.onnx
    found.update(onnx_exports=0, ort_sessions=0, export_s=0.0)
    export = torch.onnx.export

    def counted_export(*args, **kwargs):
        started = time.perf_counter()
        try:
            return export(*args, **kwargs)
        finally:
            found["onnx_exports"] += 1
            found["export_s"] += time.perf_counter() - started
    torch.onnx.export = counted_export
    session_init = onnxruntime.InferenceSession.__init__

    def counted_session(self, *args, **kwargs):
        found["ort_sessions"] += 1
        return session_init(self, *args, **kwargs)
    onnxruntime.InferenceSession.__init__ = counted_session


def _torch_counts() -> dict:
    if "torch._dynamo" not in sys.modules:
        return {}
    from torch._dynamo.utils import counters
    return {"dynamo_graphs": counters["stats"]["unique_graphs"], "inductor_compiles": counters["inductor"]["fxgraph_cache_miss"]}


def count_one(adapter: str, dtypes, full: bool) -> dict:
    """Run one adapter's matrix in this process with the counters listening; the counts."""
    from mhabench.conformance import runner, session
    from mhabench.impls import cache
    os.environ.update(cache.torch_environment())  # Inductor's cache in this run's cache folder, not the default
    a = registry.get_adapter(adapter)
    found: dict = {}
    if a.family == "jax" or getattr(a, "backend", None) == "jax":
        _count_jax(found)
    if a.family == "onnxruntime" and "torch" in a.requires:
        _count_onnx(found)
    plan = session.make_plan(adapter, ",".join(dtypes), quick=not full, examples=0)
    started = time.perf_counter()
    rows = runner.run_rows(plan.adapters, plan.cases, plan.dtypes, isolate=False, include=plan.include)
    found.update(_torch_counts())
    found.update(adapter=adapter, tasks=len(plan.tasks()), rows=len(rows), seconds=time.perf_counter() - started,
                 statuses={s: sum(r["status"] == s for r in rows) for s in sorted({r["status"] for r in rows})})
    return found


def count(adapter: str, dtypes, full: bool, warm: bool = False) -> list[dict]:
    """``count_one`` in a fresh process with the adapter's environment and an empty cache folder; with ``warm``,
    then again in a second process with the cache the first one left (what a rerun compiles)."""
    out = []
    with tempfile.TemporaryDirectory(prefix="mhabench-compiles-") as cache:
        for run in ("cold", "warm")[:1 + warm]:
            env = dict(os.environ, **registry.get_adapter(adapter).worker_env(), MHABENCH_CACHE_DIR=cache)
            env.pop("TORCHINDUCTOR_CACHE_DIR", None)  # the child puts it in its own cache folder
            done = subprocess.run([sys.executable, "-m", "mhabench.conformance.compiles", "--one", adapter,
                                   "--dtypes", ",".join(dtypes)] + (["--full"] if full else []),
                                  env=env, capture_output=True, text=True)
            lines = done.stdout.strip().splitlines()
            if done.returncode != 0 or not lines:
                out.append({"adapter": adapter, "cache": run,
                            "error": (done.stderr.strip().splitlines() or ["no output"])[-1]})
                break
            out.append({**json.loads(lines[-1]), "cache": run})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mhabench.conformance.compiles", description=__doc__.split("\n")[0])
    parser.add_argument("--adapters", required=False, help="comma-separated adapters (default: every installed one)")
    parser.add_argument("--dtypes", default="float32", help="comma-separated dtypes (default: float32)")
    parser.add_argument("--full", action="store_true", help="the whole matrix, not the reduced one")
    parser.add_argument("--warm", action="store_true", help="also run each adapter a second time, in a new process "
                        "with the cache the first run left: what a rerun compiles")
    parser.add_argument("--json", action="store_true", help="one JSON object per adapter instead of the table")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if args.one:
        print(json.dumps(count_one(args.one, dtypes, args.full)))
        return 0
    from mhabench.options import runnable_adapters, split_list
    adapters = split_list(args.adapters, registry.list_adapters(), "adapter", "--adapters") or runnable_adapters()
    failed = False
    if not args.json:
        print(f"{'adapter':<18} {'cache':<5} {'tasks':>5} {'seconds':>8} " + " ".join(f"{c:>17}" for c in COLUMNS))
    for adapter in adapters:
        for found in count(adapter, dtypes, args.full, args.warm):
            failed |= "error" in found
            if args.json:
                print(json.dumps(found), flush=True)
            elif "error" in found:
                print(f"{adapter:<18} {found['cache']:<5} error: {found['error']}", flush=True)
            else:
                print(f"{adapter:<18} {found['cache']:<5} {found['tasks']:>5} {found['seconds']:>8.1f} "
                      + " ".join(f"{found.get(c, '-'):>17}" for c in COLUMNS), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
