"""The benchmark sweep: the asv suite run in the current environment, as ``mhabench bench`` drives it.

asv writes a results file only when a whole ``asv run`` ends, so the sweep is split into chunks (one
process group of adapters, or one adapter and one benchmark class), each its own
``asv run --python=same --set-commit-hash HASH``: an interrupted sweep keeps every finished chunk, and
``resume`` skips the chunks recorded in ``<results>/bench/progress.jsonl``. Each chunk runs under asv's
forkserver with its group's modules imported once in the server, so the many per-case processes asv
starts do not each pay the framework import. Groups, modes and FLOP and memory rules all come from the
adapters' own declarations, so a plugin adapter is benchmarked like a built-in one.

``--shard K/N`` keeps part K of N of the selected benchmarks (one benchmark = one asv method at one
parameter combination), split by :func:`estimated_ms` the same way on every machine
(``mhabench.shards``); ``<results>/bench/plan.json`` records the shard and its benchmark count.
"""
from __future__ import annotations

import ast
import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from mhabench import plausibility, results, shards
from mhabench.impls import registry
from mhabench.impls.worker import dies_with_parent
from mhabench.progress import Tally

from . import budget, common, sampling
from .accuracy import DTYPES
from .profiles import (DEVICES, ENV_ADAPTERS, ENV_PROFILE, MODES, PROFILES, accuracy_methods, get_profile,
                       is_accuracy, plugins_env)

BENCHMARK_DIR = Path(__file__).resolve().parent
PLACEHOLDER_HASH = "0" * 40  # recorded when the sources are not a git checkout


class SweepError(ValueError):
    """A sweep that cannot run as asked; the message is one line."""


@dataclass(frozen=True)
class Group:
    """Adapters that share a forkserver: one framework family in one environment. Its modules are imported
    once per chunk, in the environment its adapters declare (Keras picks its backend at import)."""

    key: str
    modules: tuple[str, ...]
    env: tuple[tuple[str, str], ...]


def group_of(adapter: str) -> Group:
    """The process group an adapter's benchmarks run in, from what the adapter declares."""
    a = registry.get_adapter(adapter)
    env = tuple(sorted(a.worker_env().items()))
    label = a.family + "".join(f"+{v}" for _, v in env if v not in (a.family, "1"))
    return Group(label, tuple(a.preimport()), env)


def machine_group(adapters) -> Group:
    """The GEMM peak is measured with torch where it is installed (NumPy otherwise)."""
    for name in adapters:
        group = group_of(name)
        if registry.get_adapter(name).family == "torch" and not group.env and registry.get_adapter(name).looks_installed():
            return group
    return Group("numpy", ("numpy",), ())


# ---- the grid, as asv will see it ---------------------------------------------------------------
def grid(profile_name: str) -> list[tuple[str, list[tuple[str, ...]]]]:
    """[(benchmark name, [param tuples as asv formats them])], without importing any framework."""
    from . import bench_attention, bench_machine
    profile = get_profile(profile_name)
    attention_params = [list(profile.adapters), list(MODES), list(profile.seq_lens), list(profile.num_heads),
                        list(profile.devices)]
    out = []
    classes = (bench_attention.SelfAttention, bench_attention.CausalSelfAttention, bench_attention.CrossAttention,
               *(getattr(bench_attention, name) for name in results.ACCURACY_CLASSES))
    for cls in classes:
        for method in sorted(m for m in dir(cls) if m.startswith(("time_", "track_"))):
            out.append((f"bench_attention.{cls.__name__}.{method}",
                        [tuple(map(repr, p)) for p in itertools.product(*attention_params)]))
    out.append(("bench_machine.Machine.track_gemm_gflops", [(repr(d),) for d in profile.devices]))
    return out


def gpu_present() -> bool:
    """An NVIDIA driver is loaded (checked without importing a framework)."""
    return Path("/proc/driver/nvidia/version").exists()


@dataclass
class Chunk:
    key: str
    group: Group
    regexes: list[str] = field(default_factory=list)
    benchmarks: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)  # (name, params as asv shows them)


def selection(profile_name: str, adapters, devices, bench_regex) -> list[tuple[str, tuple[str, ...]]]:
    """Every (benchmark name, params) the run selects, before any shard is taken. Combinations the profile
    leaves out (``keeps_mode``, ``keeps``) are not selected at all."""
    profile = get_profile(profile_name)
    out = []
    for name, combos in grid(profile_name):
        machine = name.startswith("bench_machine")
        for combo in combos:
            if combo[-1].strip("'") not in devices:
                continue
            if not machine:
                adapter, mode = combo[0].strip("'"), combo[1].strip("'")
                if adapter not in adapters or not profile.keeps_mode(adapter, mode) or \
                        not profile.keeps(name, int(combo[3]), int(combo[2])):
                    continue
            if bench_regex and not re.search(bench_regex, f"{name}({', '.join(combo)})"):
                continue
            out.append((name, combo))
    return out


# The cost of one benchmark, for --shard: asv's process and setup (import from the forkserver, build,
# compile, first call), then the calls it times or samples, each at an assumed rate of attention work.
SETUP_MS = 3000
COMPILE_MS = 2000            # more setup for a compiled mode
FLOPS_PER_MS = 10e6          # 10 GFLOP/s
MACHINE_MS = 10000           # the GEMM peak benchmark
ACCURACY_PROCESS_MS = 100    # an accuracy method's own process, which reads its case's measurement


def estimated_ms(profile_name: str, name: str, combo: tuple[str, ...]) -> int:
    """A benchmark's estimated cost in whole milliseconds, from its parameters alone (the same on every
    machine): setup, then the calls its sampling makes (``sampling.calls_per_point``) at an assumed rate of
    attention work; forward and backward cost about three forward calls."""
    from .flops import attention_flops
    if name.startswith("bench_machine"):
        return MACHINE_MS
    profile = get_profile(profile_name)
    _, cls, method = name.split(".")
    adapter, mode, seq_len, heads, _device = (ast.literal_eval(v) for v in combo)
    if is_accuracy(cls):  # each method's process, and its share of the case's one measurement
        call = attention_flops(profile.batch, seq_len, seq_len, profile.model_dim, heads, profile.model_dim // heads,
                               causal=False) / FLOPS_PER_MS
        share = (len(DTYPES) * (SETUP_MS + (COMPILE_MS if mode == "compiled" else 0))) / len(accuracy_methods())
        return int(ACCURACY_PROCESS_MS + share + sampling.calls_per_point(profile.sampling, method, call / 1000) * call)
    kv_len = max(1, int(seq_len * profile.cross_kv_ratio)) if cls == "CrossAttention" else seq_len
    backward = method.endswith("forward_backward")
    call = attention_flops(profile.batch, seq_len, kv_len, profile.model_dim, heads, profile.model_dim // heads,
                           causal=cls == "CausalSelfAttention", backward=backward) / FLOPS_PER_MS
    calls = sampling.calls_per_point(profile.sampling, method, call / 1000)
    return int(SETUP_MS + (COMPILE_MS if mode == "compiled" else 0) + (calls + 1) * call)


def shard_selection(profile_name: str, selected, shard: tuple[int, int] | None):
    """The part of ``selected`` that shard (K, N) runs, in the original order."""
    if shard is None:
        return list(selected)
    keys = {f"{name}({', '.join(combo)})": (name, combo) for name, combo in selected}
    chosen = shards.select({key: estimated_ms(profile_name, *item) for key, item in keys.items()}, shard)
    return [item for key, item in keys.items() if key in chosen]


def chunk_plan(profile_name: str, adapters, devices, bench_regex, shard: tuple[int, int] | None = None) -> list[Chunk]:
    """The chunks in run order.

    The quick profile runs one chunk per process group; longer sweeps one chunk per adapter and class,
    so an interruption loses little. ``shard`` (K, N): only the benchmarks of that shard.
    """
    profile = get_profile(profile_name)
    selected = shard_selection(profile_name, selection(profile_name, adapters, devices, bench_regex), shard)
    chosen: dict[str, list] = {}
    for name, combo in selected:
        chosen.setdefault(name, []).append(combo)
    chunks: dict[str, Chunk] = {}
    for name, combos in grid(profile_name):
        picked = chosen.get(name, [])
        if not picked:
            continue
        if name.startswith("bench_machine"):
            group = machine_group(adapters)
            key = group.key if profile.one_mode else "machine"
            chunk = chunks.setdefault(key, Chunk(key, group))
            chunk.regexes.extend(f"^{re.escape(name)}\\({re.escape(c[0])}\\)$" for c in picked)
            chunk.benchmarks.extend((name, c) for c in picked)
            continue
        cls = name.split(".")[1]
        for adapter in adapters:
            mine = [c for c in picked if c[0] == repr(adapter)]
            if not mine:
                continue
            group = group_of(adapter)
            key = group.key if profile.one_mode else f"{adapter}:{cls}"
            chunk = chunks.setdefault(key, Chunk(key, group))
            chunk.benchmarks.extend((name, c) for c in mine)
            if len(mine) == sum(c[0] == repr(adapter) for c in combos):
                chunk.regexes.append(f"^{re.escape(name)}\\({re.escape(repr(adapter))}, ")
            else:
                chunk.regexes.extend(f"^{re.escape(name)}\\({re.escape(', '.join(c))}\\)$" for c in mine)
    return list(chunks.values())


# ---- the options ----------------------------------------------------------------------------------
@dataclass
class Options:
    profile: str
    adapters: list[str]
    devices: list[str]
    results: Path
    bench: str | None = None
    memory_budget: str | None = None
    adhoc: list[str] = field(default_factory=list)
    shard: tuple[int, int] | None = None
    machine: str | None = None  # asv's machine name (default: asv's own, the host name)
    budget: float | None = None  # seconds of wall-clock time for the whole run (benchmarks.budget); None: no limit
    verify: bool = False        # also time each point's call plainly, call by call beside the suite


def parse_budget(text) -> float | None:
    """``--budget SECONDS``: a number of seconds, 0 for none; SweepError naming the option otherwise."""
    if text is None:
        return None
    try:
        seconds = float(text)
    except (TypeError, ValueError):
        raise SweepError(f"--budget {text!r}: expected a number of seconds, such as 150 (0: no budget)") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise SweepError(f"--budget {text!r}: expected a number of seconds >= 0 (0: no budget)")
    return seconds or None


def make_options(profile=None, adapters=None, devices=None, results_dir="results", bench=None, memory_budget=None,
                 adhoc=(), shard=None, machine=None, budget=None, verify=False) -> Options:
    """Checked options: ``adapters``/``devices`` comma-separated (the syntax of every list option),
    ``shard`` "K/N", ``machine`` a name for asv's results of this machine, ``budget`` seconds (0: none)."""
    budget = parse_budget(budget)
    from mhabench.benchmarks.common import parse_bytes
    from mhabench.options import SelectionError, load_plugins, runnable_adapters, split_list
    profile = profile or os.environ.get(ENV_PROFILE) or "default"
    if profile not in PROFILES:
        raise SweepError(f"--profile: unknown profile {profile!r}; expected one of {', '.join(PROFILES)}")
    try:
        plugin_names = load_plugins(adhoc)
        chosen = split_list(adapters, registry.list_adapters(), "adapter", "--adapters")
        device_list = split_list(devices, DEVICES, "device", "--devices")
        shard = shards.parse(shard) if shard is not None else None
    except SelectionError as exc:
        raise SweepError(str(exc)) from None
    try:
        machine = results.machine_name(machine) if machine is not None else None
    except ValueError as exc:
        raise SweepError(str(exc)) from None
    if chosen is None:  # the grid keeps every adapter, installed here or not: absent ones are skipped with the reason
        chosen = runnable_adapters(plugin_names, installed_only=False)
    if device_list is None:  # the default grids skip an absent GPU; one named explicitly must be there
        device_list = list(DEVICES if gpu_present() else ("cpu",))
    elif "cuda" in device_list and not gpu_present():
        raise SweepError("--devices cuda: no NVIDIA GPU on this machine (no driver in /proc/driver/nvidia)")
    if bench:
        try:
            re.compile(bench)
        except re.error as exc:
            raise SweepError(f"--bench {bench!r} is not a regular expression: {exc}") from None
    if memory_budget:
        try:
            parse_bytes(memory_budget)
        except ValueError:
            raise SweepError(f"--memory-budget {memory_budget!r}: expected bytes such as 12GiB, 500MB or 1e9") from None
    root = Path(results_dir).resolve()
    try:
        (root / "bench").mkdir(parents=True, exist_ok=True)
        probe = root / "bench" / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise SweepError(f"results directory {root} is not writable: {exc.strerror or exc}") from None
    if shutil.which("asv") is None and not _asv_module_available():
        raise SweepError('asv is not installed; install with: pip install "mhabench[bench]"')
    return Options(profile, chosen, device_list, root, bench, memory_budget, list(adhoc), shard, machine, budget,
                   bool(verify))


def _asv_module_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("asv") is not None


def commit_hash() -> str:
    return results.commit() or PLACEHOLDER_HASH


def checkout_branch(repo: Path) -> str:
    """The branch asv is told about: the checkout's own (asv refuses a branch the repository lacks, as a clone made
    with ``git clone -b other`` lacks ``main``), "HEAD" for a detached checkout, "main" where git cannot tell."""
    try:
        done = subprocess.run(["git", "-C", str(repo), "rev-parse", "--abbrev-ref", "HEAD"], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "main"
    name = done.stdout.strip()
    return name if done.returncode == 0 and name else "main"


def asv_config(layout: results.Layout) -> Path:
    """An asv.conf.json with results_dir/html_dir under the results directory (asv takes them only from a
    config) and this package's benchmark directory, which is there in a checkout and in a wheel alike."""
    repo = BENCHMARK_DIR.parent if (BENCHMARK_DIR.parent / ".git").exists() else BENCHMARK_DIR
    conf = {"version": 1, "project": "mhabench", "repo": str(repo), "dvcs": "git", "environment_type": "existing",
            "benchmark_dir": str(BENCHMARK_DIR), "results_dir": str(layout.asv), "html_dir": str(layout.asv_html),
            "branches": [checkout_branch(repo)], "default_benchmark_timeout": 600}
    results.atomic_write(layout.asv_config, json.dumps(conf, indent=2))
    return layout.asv_config


# ---- progress file for resume ---------------------------------------------------------------------
def finished_chunks(layout: results.Layout, run_key: dict) -> set[str]:
    if not layout.progress.exists():
        return set()
    done = set()
    for line in layout.progress.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if all(row.get(k) == v for k, v in run_key.items()):
            done.add(row["chunk"])
    return done


def mark_finished(layout: results.Layout, run_key: dict, chunk: str, seconds: float) -> None:
    results.append_jsonl(layout.progress, [{**run_key, "chunk": chunk, "seconds": round(seconds, 1)}])


# ---- asv's own files: a damaged one found and moved aside, a chunk's writes guarded -----------------------
DAMAGED_SUFFIX = ".damaged"


def damage(path: Path) -> str | None:
    """Why asv cannot read the JSON file ``path`` (empty, cut short, not an object), or None."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"
    if not data.strip():
        return f"{len(data)} bytes"
    try:
        parsed = json.loads(data)
    except ValueError as exc:
        return f"not valid JSON: {exc}"
    return None if isinstance(parsed, dict) else "not a JSON object"


def asv_files(layout: results.Layout, commit: str | None = None) -> list[Path]:
    """asv's JSON files under the results directory: benchmarks.json, each machine's machine.json and result
    files (only those of ``commit`` when given: asv names them after its first 8 characters)."""
    if not layout.asv.is_dir():
        return []
    found = [layout.asv / "benchmarks.json"] + sorted(layout.asv.glob("*/machine.json"))
    found += sorted(p for p in layout.asv.glob("*/*.json") if p.name != "machine.json"
                    and (commit is None or p.name.startswith(commit[:8])))
    return [p for p in found if p.is_file()]


def damaged_files(layout: results.Layout) -> list[tuple[Path, str]]:
    return [(path, why) for path in asv_files(layout) if (why := damage(path))]


def repair(layout: results.Layout, say=print) -> None:
    """Move each damaged asv file aside (``<name>.damaged``, kept for a look), and forget the finished chunks
    whose results a damaged result file held, so ``--resume`` measures them again."""
    for path, why in damaged_files(layout):
        aside = path.with_name(path.name + DAMAGED_SUFFIX)
        path.replace(aside)
        say(f"mhabench bench: {path} was damaged ({why}); moved aside to {aside}")
        if path.name not in ("benchmarks.json", "machine.json") and layout.progress.is_file():
            kept = [r for r in results.read_jsonl(layout.progress)[0]
                    if not str(r.get("commit", "")).startswith(path.name[:8])]
            results.atomic_write(layout.progress, "".join(json.dumps(r) + "\n" for r in kept))


def refuse_damaged(layout: results.Layout) -> None:
    """SweepError (one line) naming the first damaged asv file, and the way out: asv cannot run with one."""
    damaged = damaged_files(layout)
    if damaged:
        (path, why), more = damaged[0], len(damaged) - 1
        raise SweepError(f"{path} is damaged ({why}: a disk that filled up, or a run killed while asv wrote it)"
                         + (f", and {more} more asv file{'s' if more > 1 else ''}" if more else "")
                         + "; asv cannot run with it. Run again with --repair to move it aside (the benchmarks it "
                           "held are measured again with --resume)")


class GuardedChunk:
    """asv's files of one commit as they were before a chunk, kept in memory: asv writes its results file in
    place, so a disk that fills up while it writes would leave it empty and every earlier chunk's results
    lost. After the chunk, a file asv left damaged is put back as it was (one it created is removed), and
    SweepError says what happened."""

    def __init__(self, layout: results.Layout, commit: str):
        self.layout, self.commit = layout, commit
        self.before = {path: path.read_bytes() for path in asv_files(layout, commit)}

    def check(self) -> None:
        broken = [(path, why) for path in asv_files(self.layout, self.commit) if (why := damage(path))]
        if not broken:
            return
        unrestored = []
        for path, _ in broken:
            try:
                if path in self.before:
                    results.atomic_write(path, self.before[path])
                else:
                    path.unlink()
            except OSError:
                unrestored.append(path)
        path, why = broken[0]
        then = "could not be put back (run again with --repair once there is space)" if path in unrestored else \
            "was put back as it was before this chunk" if path in self.before else "was removed (it held nothing else)"
        raise SweepError(f"asv could not write {path} ({why}: is the disk full?); it {then}. Free space and run "
                         f"the same command with --resume: the chunks finished before are kept")


# ---- running ------------------------------------------------------------------------------------
def asv_command(config: Path, commit: str, regexes: list[str], verbose: bool = False,
                machine: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "asv", "run", "--config", str(config), "--python=same",
           "--set-commit-hash", commit, "--launch-method", "forkserver"]
    if machine:
        cmd += ["--machine", machine]
    if verbose:
        cmd.append("--show-stderr")
    for regex in regexes:
        cmd += ["--bench", regex]
    return cmd


def ensure_machine(config: Path, env, name: str | None = None) -> None:
    """asv asks interactively about an unknown machine; record this one's defaults once.

    ``name``: the machine is known to asv under that name (``--machine``): its entry in asv's machine
    file holds this host's facts under it (``asv machine`` cannot add a named entry without prompting)."""
    path = Path(os.path.expanduser("~/.asv-machine.json"))
    if name is None:
        if not path.exists():
            subprocess.run([sys.executable, "-m", "asv", "machine", "--yes", "--config", str(config)], env=env,
                           stdout=subprocess.DEVNULL, check=False)
        return
    from asv.machine import Machine
    known = json.loads(path.read_text()) if path.exists() else {"version": 1}
    if name not in known:
        known[name] = {**Machine.get_defaults(), "machine": name}
        results.atomic_write(path, json.dumps(known, indent=4))


_BORDER = re.compile(r"^[\s=\-·\[\]%.\d]*$")


def worth_showing(line: str) -> bool:
    """asv's progress lines and table rows that hold a value; not borders, unselected (n/a) rows
    or the per-case skip chatter asv echoes with --show-stderr."""
    text = line.strip()
    if not text or _BORDER.match(text) or text.endswith("n/a") or text.startswith(("asv: skipped", "For parameters")):
        return False
    return not set(text.split("···")[-1].strip()) <= set("=- ")


STOPPED = -1  # stream's answer when it stopped asv at the deadline


def stream(cmd: list[str], env, prefix: str, verbose: bool = False, say=print, deadline: float | None = None) -> int:
    """Run asv, echoing its progress with the chunk as prefix; stderr is merged. ``deadline`` (time.monotonic):
    asv is stopped there and STOPPED returned (its results of this run are lost: asv writes them at its end)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, cwd=BENCHMARK_DIR.parent, preexec_fn=dies_with_parent())
    timer = None
    if deadline is not None:
        import threading
        timer = threading.Timer(max(0.0, deadline - time.monotonic()), stop_tree, (proc,))
        timer.daemon = True
        timer.start()
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            if verbose or worth_showing(line):
                say(f"{prefix} {line}")
        code = proc.wait()
        if deadline is not None and time.monotonic() >= deadline and code != 0:
            return STOPPED
        return code
    except KeyboardInterrupt:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    finally:
        if timer is not None:
            timer.cancel()


def descendants(pid: int) -> list[int]:
    """The processes ``pid`` started, and theirs, read from /proc (empty where there is none)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def stop_tree(proc) -> None:
    """SIGTERM to asv and to every process it started (its forkserver and the benchmark running), which asv
    would otherwise leave behind."""
    import signal
    for pid in reversed(descendants(proc.pid)):
        try:
            os.kill(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    proc.terminate()


def measure_peak(layout: results.Layout, env, label: str, say, prefix: str, devices=("cpu",)) -> None:
    """The GEMM peak next to the benchmarks it divides (benchmarks.peak, in its own process)."""
    for device in devices:
        done = subprocess.run([sys.executable, "-m", "mhabench.benchmarks.peak", "--results", str(layout.root),
                               "--device", device, "--label", label], env=env, capture_output=True, text=True,
                              preexec_fn=dies_with_parent())
        line = (done.stdout.strip().splitlines() or [done.stderr.strip()[-200:]])[-1]
        if done.returncode == 2:  # it could not write bench/peaks.jsonl: the disk is full or read-only
            raise SweepError(line)
        say(f"{prefix} {line}")


# ---- the points journal -------------------------------------------------------------------------------
REMEASURE_SCALE = 4  # a point measured again takes this many times the samples (benchmarks.sampling)


def bench_of(record: dict) -> budget.Bench:
    """The benchmark a points.jsonl line measured, as the sweep selects it."""
    p = record["params"]
    return budget.Bench(record["benchmark"], tuple(repr(v) for v in (p["adapter"], p["mode"], int(p["seq_len"]),
                                                                     int(p["num_heads"]), p["device"])))


REMEMBERED_POINTS = "bench-points.jsonl"  # in the cache's costs/ folder: what this machine's earlier runs measured
REMEMBERED_MAX_BYTES = 4 << 20


def remembered_points() -> list[tuple[budget.Bench, dict]]:
    """The points earlier runs on this machine measured, into any results directory (the cache's ``costs/``), so a
    budget's plan starts from this machine's costs rather than from the static estimate."""
    from mhabench.impls import cache
    where = cache.folder("costs")
    return read_points(where / REMEMBERED_POINTS) if where is not None else []


def remember_points(measured: list[tuple[budget.Bench, dict]]) -> None:
    """Append what a budget's planner learns from (each point's quantity, median, setup and sampling seconds) to the
    cache's ``costs/``; past REMEMBERED_MAX_BYTES the older half is dropped. An unwritable cache costs planning
    accuracy, never a result."""
    from mhabench.impls import cache
    where = cache.folder("costs")
    if where is None or not measured:
        return
    path = where / REMEMBERED_POINTS
    keep = ("benchmark", "params", "quantity", "median", "setup_seconds", "sampling_seconds", "scale", "time")
    try:
        if path.is_file() and path.stat().st_size > REMEMBERED_MAX_BYTES:
            lines = path.read_text().splitlines()
            results.atomic_write(path, "".join(line + "\n" for line in lines[len(lines) // 2:]))
        results.append_jsonl(path, [{k: r[k] for k in keep if k in r} for _, r in measured])
    except OSError:
        pass


def read_points(source, since: float = 0.0) -> list[tuple[budget.Bench, dict]]:
    """The points measured since ``since`` (time.time()), oldest first, of a results directory (its Layout) or a
    points file; unreadable lines are left out."""
    check = lambda r: None if isinstance(r, dict) and {"benchmark", "params", "quantity"} <= set(r) else "not a point"
    path = source.points if isinstance(source, results.Layout) else Path(source)
    if not path.is_file():
        return []
    records, _ = results.read_jsonl(path, check)
    out = []
    for record in records:
        if float(record.get("time") or 0) < since:
            continue
        try:
            out.append((bench_of(record), record))
        except (KeyError, TypeError, ValueError):
            continue
    return out


def latest_points(layout: results.Layout, keep) -> dict[budget.Bench, dict]:
    """The newest line of each point ``keep`` (a set of Bench) holds."""
    return {bench: record for bench, record in read_points(layout) if bench in keep}


def point_value(record: dict) -> float:
    """The figure a point's line shows: its time's median; XLA's figure where the memory charts it, else the
    probe's median."""
    if record.get("quantity") == "memory":
        return float(record["program_bytes"] if record.get("charted") == "program" else record["probe_median"])
    return float(record["median"])


def implausible(points: dict[budget.Bench, dict]) -> dict[budget.Bench, plausibility.Breach]:
    """The points of lines that break a plausibility rule (``mhabench.plausibility``), each with the breach."""
    lines: dict[tuple, list[tuple[budget.Bench, dict]]] = {}
    for bench, record in points.items():
        lines.setdefault((bench.name, bench.line), []).append((bench, record))
    out = {}
    for (_, line), members in lines.items():
        quantity = members[0][1]["quantity"]
        if quantity not in ("time", "memory"):
            continue
        at = {bench.seq_len: bench for bench, _ in members}
        made = [plausibility.Point(bench.seq_len, point_value(r), float(r.get("q25") or math.nan),
                                   float(r.get("q75") or math.nan)) for bench, r in members]
        holds = registry.get_adapter(line[1]).score_buffers > 0 if line[1] in registry.list_adapters() else None
        _, breaches = plausibility.check(made, quantity, holds)
        for breach in breaches:
            for length in breach.lengths:
                out.setdefault(at[length], breach)
    return out


def verify_table(points: list[tuple[budget.Bench, dict]]) -> list[dict]:
    """Suite / plain timing per point timed with --verify (the newest of each point)."""
    newest = {bench: record for bench, record in points if record.get("verify")}
    rows = []
    for bench, record in newest.items():
        hand = record["verify"]["median"]
        rows.append({"benchmark": bench.name, "adapter": bench.adapter, "class": bench.line[0], "L": bench.seq_len,
                     "suite": record["median"], "hand": hand, "ratio": record["median"] / hand if hand else math.nan,
                     "paired": record["verify"].get("paired_ratio", math.nan)})
    return sorted(rows, key=lambda r: (r["adapter"], r["class"], r["L"]))



# ---- running ------------------------------------------------------------------------------------------
@dataclass
class Run:
    """What every asv run of one sweep shares, and what the sweep did."""

    options: Options
    layout: results.Layout
    config: Path
    commit: str
    run_key: dict
    done: set
    env: dict
    verbose: bool
    say: callable
    started: float = field(default_factory=time.monotonic)
    started_wall: float = field(default_factory=time.time)
    failures: int = 0
    steps: int = 0

    def step(self, key: str, group: Group, regexes: list[str], count: int, *, extra_env=None, peaks=True,
             deadline: float | None = None) -> str:
        """One asv run; "ran", "earlier" (finished by an earlier run, --resume) or "stopped" (at ``deadline``)."""
        self.steps += 1
        prefix = f"[{self.steps} {key}]"
        if key in self.done:
            self.say(f"{prefix} finished earlier, skipped (--resume)")
            return "earlier"
        chunk_env = dict(self.env, MHABENCH_PREIMPORT=",".join(group.modules), **dict(group.env), **(extra_env or {}))
        cmd = asv_command(self.config, self.commit, regexes, self.verbose, self.options.machine)
        t0 = time.monotonic()
        if peaks:
            measure_peak(self.layout, self.env, f"before {key}", self.say, prefix, self.options.devices)
        guard = GuardedChunk(self.layout, self.commit)
        code = stream(cmd, chunk_env, prefix, self.verbose, self.say, deadline)
        guard.check()
        if code == STOPPED:
            self.say(f"{prefix} stopped at the budget's deadline; its {count} benchmarks are not recorded")
            return "stopped"
        if peaks:
            measure_peak(self.layout, self.env, f"after {key}", self.say, prefix, self.options.devices)
        if code not in (0, 2):  # 2: some benchmark failed, the results are written all the same
            raise SweepError(f"asv stopped with exit status {code} in chunk {key}; see its output above")
        self.failures += code == 2
        mark_finished(self.layout, self.run_key, key, time.monotonic() - t0)
        return "ran"

    def remeasure(self, selected: set, budget_end: float | None = None, deadline: float | None = None,
                  model: budget.CostModel | None = None) -> int:
        """Measure again, with REMEASURE_SCALE times the samples and each in a fresh asv process, the points of
        every line that breaks a plausibility rule; bench/remeasured.jsonl records each, before and after.
        Under a budget, only the points whose predicted cost fits before ``budget_end``, and the asv runs are
        stopped at ``deadline`` (both time.monotonic()). Returns how many were measured again."""
        before = latest_points(self.layout, selected)
        breaches = implausible(before)
        if not breaches:
            return 0
        chosen = list(breaches)
        if budget_end is not None and model is not None:
            left, kept, opened = budget_end - time.monotonic(), [], set()
            for bench in chosen:
                group = group_of(bench.adapter).key
                cost = model.point_seconds(bench, group) * REMEASURE_SCALE + \
                    (0.0 if group in opened else model.step_seconds(group, []))  # an asv run's own start, once
                if cost <= left:
                    kept.append(bench)
                    opened.add(group)
                    left -= cost
            chosen = kept
        self.say(f"mhabench bench: {len(chosen)} of {len(breaches)} points of implausible lines measured again "
                 f"({REMEASURE_SCALE}x the samples, a fresh process each)")
        by_group: dict[str, list[budget.Bench]] = {}
        for bench in chosen:
            by_group.setdefault(group_of(bench.adapter).key, []).append(bench)
        for key, benches in by_group.items():
            outcome = self.step(f"remeasure:{key}", group_of(benches[0].adapter), exact_regexes(benches),
                                len(benches), extra_env={sampling.ENV_SCALE: str(REMEASURE_SCALE)}, peaks=False,
                                deadline=deadline)
            if outcome == "stopped":
                break
        after = latest_points(self.layout, set(chosen))
        records = []
        for bench in chosen:
            breach, old, new = breaches[bench], before[bench], after.get(bench)
            if new is None or new is old or new.get("time") == old.get("time"):
                continue
            records.append({"benchmark": bench.name, "params": bench.param_dict, "rule": breach.rule,
                            "detail": breach.detail, "before": point_value(old), "after": point_value(new),
                            "samples_before": old.get("samples"), "samples_after": new.get("samples"),
                            "time": time.time()})
        if records:
            with open(self.layout.remeasured, "a") as fh:
                fh.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
        return len(records)


def exact_regexes(benches: list[budget.Bench]) -> list[str]:
    """asv --bench regexes selecting exactly these benchmarks: one per benchmark and line, lengths alternated."""
    lines: dict[tuple, list[str]] = {}
    for bench in benches:
        adapter, mode, length, heads, device = bench.combo
        lines.setdefault((bench.name, adapter, mode, heads, device), []).append(length)
    out = []
    for (name, adapter, mode, heads, device), lengths in lines.items():
        alternatives = "|".join(re.escape(v) for v in sorted(set(lengths), key=int))
        out.append(f"^{re.escape(name)}\\({re.escape(adapter)}, {re.escape(mode)}, ({alternatives}), "
                   f"{re.escape(heads)}, {re.escape(device)}\\)$")
    return out


def run(options: Options, *, resume=False, verbose=False, dry_run=False, say=print, fix=False) -> int:
    """Run the sweep; 0 when every chunk ran clean, 1 when some benchmark failed (results written all the same).

    An asv file left damaged by an earlier run stops it (SweepError naming the file) unless ``fix``, which
    moves such files aside first (:func:`repair`)."""
    selected = selection(options.profile, options.adapters, options.devices, options.bench)
    if not selected:
        raise SweepError("no benchmark matches these --adapters/--devices/--bench")
    plan = chunk_plan(options.profile, options.adapters, options.devices, options.bench, options.shard)
    layout = results.Layout(options.results)
    commit = commit_hash()
    run_key = {"commit": commit, "profile": options.profile}
    if options.shard:
        run_key["shard"] = "{}/{}".format(*options.shard)
    if options.budget:
        run_key["budget"] = options.budget
    if not dry_run:
        results.write_json(layout.bench_plan, bench_plan(options, plan, len(selected), commit))
    if not plan:  # more shards than benchmarks: this one has none, which is not an error
        say(f"mhabench bench: shard {run_key['shard']} has none of the {len(selected)} selected benchmarks; "
            f"nothing to run")
        return 0
    if not dry_run:
        if fix:
            repair(layout, say)
        refuse_damaged(layout)
    config = asv_config(layout)
    done = finished_chunks(layout, run_key) if resume else set()
    env = dict(os.environ, MHABENCH_PROFILE=options.profile, MHABENCH_RESULTS=str(layout.root), PYTHONUNBUFFERED="1")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ log lines stay out of the sweep's output
    env.pop(sampling.ENV_SCALE, None)
    env[common.ENV_VERIFY] = "1" if options.verify else "0"
    env[common.ENV_SWEEP] = f"{commit[:12]}-{os.getpid()}-{time.time_ns()}"  # this run's accuracy records
    if options.adhoc:
        env[ENV_ADAPTERS] = plugins_env(options.adhoc)
    if options.memory_budget:
        env["MHABENCH_MEMORY_BUDGET"] = options.memory_budget
    # asv starts a process per case: the adapters' persistent compilation cache (impls.cache) lets JAX
    # compile each shape once, not once per process (only setup gets faster; the timed calls are the same)
    if dry_run:
        return _dry_run(plan, config, commit, options, say)
    ensure_machine(config, env, options.machine)
    sweep = Run(options, layout, config, commit, run_key, done, env, verbose, say)
    chosen = {budget.Bench(n, c) for chunk in plan for n, c in chunk.benchmarks if n.startswith("bench_attention")}
    if options.budget:
        status = _run_budgeted(sweep, plan, chosen)
    else:
        status = _run_chunks(sweep, plan, chosen)
    if options.verify:
        _say_verify(sweep, chosen)
    return status


def _dry_run(plan, config, commit, options, say) -> int:
    say(f"mhabench bench: profile {options.profile}, {sum(len(c.benchmarks) for c in plan)} benchmarks in "
        f"{len(plan)} chunks, commit {commit[:10]}" + (f", budget {options.budget:.0f} s (planned as it goes)"
                                                        if options.budget else ""))
    for number, chunk in enumerate(plan, 1):
        cmd = asv_command(config, commit, chunk.regexes, False, options.machine)
        say(f"[{number}/{len(plan)} {chunk.key}] {' '.join(cmd[:12])} ... ({len(chunk.regexes)} --bench regexes)")
    return 0


def skips_note(layout) -> str:
    """Where the skip reasons are, named only when the run wrote any (an empty log is never created)."""
    return f", skip reasons in {layout.skips}" if layout.skips.is_file() else ", nothing skipped"


def bench_plan(options: Options, plan: list[Chunk], selected: int, commit: str) -> dict:
    """What bench/plan.json records: the benchmarks this run set out to measure, and of how many in all."""
    out = {"profile": options.profile, "commit": commit, "machine": options.machine,
           "adapters": options.adapters, "devices": options.devices, "bench": options.bench,
           "benchmarks": sum(len(c.benchmarks) for c in plan), "chunks": [c.key for c in plan],
           "budget_seconds": options.budget, "verify": options.verify}
    if options.shard:
        out.update(shard=list(options.shard), benchmarks_all_shards=selected)
    return out


def _run_chunks(sweep: Run, plan: list[Chunk], chosen: set) -> int:
    options, say = sweep.options, sweep.say
    shard = f", shard {sweep.run_key['shard']}" if "shard" in sweep.run_key else ""
    say(f"mhabench bench: profile {options.profile}{shard}, {sum(len(c.benchmarks) for c in plan)} benchmarks "
        f"in {len(plan)} chunks, commit {sweep.commit[:10]}, results {sweep.layout.asv}"
        + (f" ({len(sweep.done & {c.key for c in plan})} already finished)" if sweep.done else ""))
    tally = Tally({c.key: len(c.benchmarks) for c in plan},
                  {c.key: sum(estimated_ms(options.profile, *b) for b in c.benchmarks) for c in plan},
                  {c.key: len(c.benchmarks) for c in plan if c.key in sweep.done}, unit="benchmarks")
    for chunk in plan:
        if sweep.step(chunk.key, chunk.group, chunk.regexes, len(chunk.benchmarks)) == "ran":
            tally.add(chunk.key, len(chunk.benchmarks))
            say(f"mhabench bench: {tally.line()}")
    sweep.remeasure(chosen)
    say(f"mhabench bench: done in {time.monotonic() - sweep.started:.0f} s; results in {sweep.layout.asv}"
        + skips_note(sweep.layout)
        + (f"; {sweep.failures} chunk(s) had failing benchmarks" if sweep.failures else ""))
    return 1 if sweep.failures else 0


def _run_budgeted(sweep: Run, plan: list[Chunk], chosen: set) -> int:
    """The sweep planned against ``--budget`` (``benchmarks.budget``): coverage first, each further length where
    its predicted cost fits, the re-measurement from the reserve; what does not fit is recorded as not run."""
    options, say, layout = sweep.options, sweep.say, sweep.layout
    profile = get_profile(options.profile)
    benches = sorted(chosen, key=lambda b: (options.adapters.index(b.adapter) if b.adapter in options.adapters
                                            else len(options.adapters), b.name, b.seq_len))
    model = budget.CostModel(profile.sampling, lambda b: estimated_ms(options.profile, b.name, b.combo) / 1000)
    # what earlier runs on this machine measured: into any results directory (the cache), then into this one
    for bench, record in remembered_points() + read_points(layout):
        if record.get("scale", 1) == 1:
            model.observe(bench, record)
    holds = lambda a: registry.get_adapter(a).score_buffers > 0
    planner = budget.Planner(benches, lambda a: group_of(a).key, holds, model, profile.coverage_lengths,
                             options.budget, started=sweep.started_wall)
    budget_end = sweep.started + options.budget - budget.CLOSING_SECONDS
    hard_stop = sweep.started + options.budget * budget.HARD_STOP - budget.CLOSING_SECONDS
    say(f"mhabench bench: profile {options.profile}, budget {options.budget:.0f} s for {len(benches)} benchmarks "
        f"(coverage first: {profile.coverage_lengths} lengths per adapter), commit {sweep.commit[:10]}, "
        f"results {layout.asv}")
    peak_started = time.monotonic()
    measure_peak(layout, sweep.env, "before the sweep", say, "[peak]", options.devices)
    peak_seconds = time.monotonic() - peak_started
    budget_end -= peak_seconds  # the GEMM peak is measured again at the end: its time is kept for it
    planner.closing += peak_seconds
    stopped: list[budget.Bench] = []
    while (step := planner.next_step(time.time())) is not None:
        say(f"mhabench bench: {step.key}: {len(step.benches)} benchmarks, predicted {step.predicted:.0f} s; "
            f"{planner.deadline - time.time():.0f} s of the budget left")
        t0 = time.time()
        outcome = sweep.step(step.key, group_of(step.benches[0].adapter), exact_regexes(step.benches),
                             len(step.benches), peaks=False, deadline=hard_stop)
        measured = [(b, r) for b, r in read_points(layout, since=t0)]
        for bench, record in measured:
            model.observe(bench, record)
        remember_points(measured)
        model.observe_step(step.group, t0, time.time(), measured)
        if outcome == "stopped":
            planner.stop(step)
            stopped = step.benches
            break
    for skipped in planner.skipped:
        for bench in skipped.benches:
            common.record([bench.name], bench.param_dict, "skipped", skipped.reason, path=layout.skips,
                          predicted_seconds=round(skipped.predicted, 1))
    if not stopped:
        sweep.remeasure(chosen, budget_end=budget_end, deadline=hard_stop, model=model)
    if time.monotonic() + peak_seconds <= sweep.started + options.budget:
        measure_peak(layout, sweep.env, "after the sweep", say, "[peak]", options.devices)
    not_run: dict[str, int] = {}
    for skipped in planner.skipped:
        for bench in skipped.benches:
            not_run[bench.adapter] = not_run.get(bench.adapter, 0) + 1
    spent = time.monotonic() - sweep.started
    plan_record = results.read_json(layout.bench_plan)
    plan_record.update(budget_spent_seconds=round(spent, 1), not_run_budget=not_run)
    results.write_json(layout.bench_plan, plan_record)
    say(f"mhabench bench: done in {spent:.0f} s of a {options.budget:.0f} s budget; "
        f"{sum(not_run.values())} benchmarks not run (budget)"
        + (": " + ", ".join(f"{a} {n}" for a, n in not_run.items()) if not_run else "")
        + f"; results in {layout.asv}" + skips_note(layout)
        + (f"; {sweep.failures} step(s) had failing benchmarks" if sweep.failures else ""))
    return 1 if sweep.failures else 0


def _say_verify(sweep: Run, chosen: set) -> None:
    rows = verify_table([(b, r) for b, r in read_points(sweep.layout, since=sweep.started_wall) if b in chosen])
    if not rows:
        return
    low, high = plausibility.VERIFY_RANGE
    sweep.say(f"mhabench bench --verify: suite / plain timing per point (the same call, timed plainly after each "
              f"of the suite's samples in the same process; outside [{low}, {high}] flagged)")
    for row in rows:
        flag = "" if low <= row["paired"] <= high else "  <-- outside"
        sweep.say(f"  {row['adapter']:<22} {row['class']:<20} L={row['L']:<5} suite {row['suite'] * 1e3:9.3f} ms  "
                  f"plain {row['hand'] * 1e3:9.3f} ms  ratio {row['ratio']:.3f}  paired {row['paired']:.3f}{flag}")
