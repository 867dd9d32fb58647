"""The benchmark sweep: the asv suite run in the current environment, as ``mhabench bench`` drives it.

asv writes a results file only when a whole ``asv run`` ends, so the sweep is split into chunks (one
process group of adapters, or one adapter and one benchmark class), each its own
``asv run --python=same --set-commit-hash HASH``: an interrupted sweep keeps every finished chunk, and
``resume`` skips the chunks recorded in ``<results>/bench/progress.jsonl``. Each chunk runs under asv's
forkserver with its group's modules imported once in the server, so the many per-case processes asv
starts do not each pay the framework import. Groups, modes and FLOP and memory rules all come from the
adapters' own declarations, so a plugin adapter is benchmarked like a built-in one.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from mhabench import results
from mhabench.impls import registry

from .profiles import DEVICES, ENV_ADAPTERS, ENV_PROFILE, MODES, PROFILES, get_profile

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
    for cls in (bench_attention.SelfAttention, bench_attention.CausalSelfAttention, bench_attention.CrossAttention):
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


def chunk_plan(profile_name: str, adapters, devices, bench_regex) -> list[Chunk]:
    """The chunks in run order.

    The quick profile runs one chunk per process group; longer sweeps one chunk per adapter and class,
    so an interruption loses little. Combinations the profile leaves out (``keeps_mode``) are not
    selected at all.
    """
    profile = get_profile(profile_name)
    chunks: dict[str, Chunk] = {}
    for name, combos in grid(profile_name):
        machine = name.startswith("bench_machine")
        selected = []
        for combo in combos:
            if combo[-1].strip("'") not in devices:
                continue
            if not machine:
                adapter, mode = combo[0].strip("'"), combo[1].strip("'")
                if adapter not in adapters or not profile.keeps_mode(adapter, mode) \
                        or not profile.keeps(name, adapter, int(combo[2])):
                    continue
            if bench_regex and not re.search(bench_regex, f"{name}({', '.join(combo)})"):
                continue
            selected.append(combo)
        if machine:
            if selected:
                group = machine_group(adapters)
                key = group.key if profile.one_mode else "machine"
                chunks.setdefault(key, Chunk(key, group)).regexes.extend(
                    f"^{re.escape(name)}\\({re.escape(c[0])}\\)$" for c in selected)
            continue
        cls = name.split(".")[1]
        for adapter in adapters:
            mine = [c for c in selected if c[0] == repr(adapter)]
            if not mine:
                continue
            group = group_of(adapter)
            key = group.key if profile.one_mode else f"{adapter}:{cls}"
            regexes = chunks.setdefault(key, Chunk(key, group)).regexes
            if len(mine) == sum(c[0] == repr(adapter) for c in combos):
                regexes.append(f"^{re.escape(name)}\\({re.escape(repr(adapter))}, ")
            else:
                regexes.extend(f"^{re.escape(name)}\\({re.escape(', '.join(c))}\\)$" for c in mine)
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


def make_options(profile=None, adapters=None, devices=None, results_dir="results", bench=None, memory_budget=None,
                 adhoc=()) -> Options:
    """Checked options: ``adapters``/``devices`` comma-separated (the syntax of every list option)."""
    from mhabench.benchmarks.common import parse_bytes
    from mhabench.options import SelectionError, load_plugins, runnable_adapters, split_list
    profile = profile or os.environ.get(ENV_PROFILE) or "default"
    if profile not in PROFILES:
        raise SweepError(f"--profile: unknown profile {profile!r}; expected one of {', '.join(PROFILES)}")
    try:
        plugin_names = load_plugins(adhoc)
        chosen = split_list(adapters, registry.list_adapters(), "adapter", "--adapters")
        device_list = split_list(devices, DEVICES, "device", "--devices")
    except SelectionError as exc:
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
    return Options(profile, chosen, device_list, root, bench, memory_budget, list(adhoc))


def _asv_module_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("asv") is not None


def commit_hash() -> str:
    return results.commit() or PLACEHOLDER_HASH


def asv_config(layout: results.Layout) -> Path:
    """An asv.conf.json with results_dir/html_dir under the results directory (asv takes them only from a
    config) and this package's benchmark directory, which is there in a checkout and in a wheel alike."""
    repo = BENCHMARK_DIR.parent if (BENCHMARK_DIR.parent / ".git").exists() else BENCHMARK_DIR
    conf = {"version": 1, "project": "mhabench", "repo": str(repo), "dvcs": "git", "environment_type": "existing",
            "benchmark_dir": str(BENCHMARK_DIR), "results_dir": str(layout.asv), "html_dir": str(layout.asv_html),
            "branches": ["main"], "default_benchmark_timeout": 600}
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
    layout.progress.parent.mkdir(parents=True, exist_ok=True)
    with open(layout.progress, "a") as fh:
        fh.write(json.dumps({**run_key, "chunk": chunk, "seconds": round(seconds, 1)}) + "\n")


# ---- running ------------------------------------------------------------------------------------
def asv_command(config: Path, commit: str, regexes: list[str], verbose: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "asv", "run", "--config", str(config), "--python=same",
           "--set-commit-hash", commit, "--launch-method", "forkserver"]
    if verbose:
        cmd.append("--show-stderr")
    for regex in regexes:
        cmd += ["--bench", regex]
    return cmd


def ensure_machine(config: Path, env) -> None:
    """asv asks interactively about an unknown machine; record this one's defaults once."""
    if Path(env.get("ASV_MACHINE_FILE", Path.home() / ".asv-machine.json")).exists():
        return
    subprocess.run([sys.executable, "-m", "asv", "machine", "--yes", "--config", str(config)], env=env,
                   stdout=subprocess.DEVNULL, check=False)


_BORDER = re.compile(r"^[\s=\-·\[\]%.\d]*$")


def worth_showing(line: str) -> bool:
    """asv's progress lines and table rows that hold a value; not borders, unselected (n/a) rows
    or the per-case skip chatter asv echoes with --show-stderr."""
    text = line.strip()
    if not text or _BORDER.match(text) or text.endswith("n/a") or text.startswith(("asv: skipped", "For parameters")):
        return False
    return not set(text.split("···")[-1].strip()) <= set("=- ")


def stream(cmd: list[str], env, prefix: str, verbose: bool = False, say=print) -> int:
    """Run asv, echoing its progress with the chunk as prefix; stderr is merged."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, cwd=BENCHMARK_DIR.parent)
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            if verbose or worth_showing(line):
                say(f"{prefix} {line}")
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise


def measure_peak(layout: results.Layout, env, label: str, say, prefix: str, devices=("cpu",)) -> None:
    """The GEMM peak next to the benchmarks it divides (benchmarks.peak, in its own process)."""
    for device in devices:
        done = subprocess.run([sys.executable, "-m", "mhabench.benchmarks.peak", "--results", str(layout.root),
                               "--device", device, "--label", label], env=env, capture_output=True, text=True)
        line = (done.stdout.strip().splitlines() or [done.stderr.strip()[-200:]])[-1]
        say(f"{prefix} {line}")


def run(options: Options, *, resume=False, verbose=False, dry_run=False, say=print) -> int:
    """Run the sweep; 0 when every chunk ran clean, 1 when some benchmark failed (results written all the same)."""
    plan = chunk_plan(options.profile, options.adapters, options.devices, options.bench)
    if not plan:
        raise SweepError("no benchmark matches these --adapters/--devices/--bench")
    layout = results.Layout(options.results)
    config = asv_config(layout)
    commit = commit_hash()
    run_key = {"commit": commit, "profile": options.profile}
    done = finished_chunks(layout, run_key) if resume else set()
    env = dict(os.environ, MHABENCH_PROFILE=options.profile, MHABENCH_RESULTS=str(layout.root), PYTHONUNBUFFERED="1")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ log lines stay out of the sweep's output
    if options.adhoc:
        env[ENV_ADAPTERS] = os.pathsep.join(os.path.abspath(t.rpartition(":")[0]) + ":" + t.rpartition(":")[2]
                                            if t.rpartition(":")[0].endswith(".py") else t for t in options.adhoc)
    if options.memory_budget:
        env["MHABENCH_MEMORY_BUDGET"] = options.memory_budget
    # asv starts a process per case: the adapters' persistent compilation cache (impls.cache) lets JAX
    # compile each shape once, not once per process (only setup gets faster; the timed calls are the same)
    return _run_chunks(plan, config, commit, run_key, done, env, layout, verbose, dry_run, say, options.devices)


def _run_chunks(plan, config, commit, run_key, done, env, layout, verbose, dry_run, say, devices=("cpu",)) -> int:
    if not dry_run:
        ensure_machine(config, env)
    say(f"mhabench bench: profile {run_key['profile']}, {len(plan)} chunks, commit {commit[:10]}, "
        f"results {layout.asv}" + (f" ({len(done & {c.key for c in plan})} already finished)" if done else ""))
    failures, started = 0, time.monotonic()
    for number, chunk in enumerate(plan, 1):
        prefix = f"[{number}/{len(plan)} {chunk.key}]"
        if chunk.key in done:
            say(f"{prefix} finished earlier, skipped (--resume)")
            continue
        chunk_env = dict(env, MHABENCH_PREIMPORT=",".join(chunk.group.modules), **dict(chunk.group.env))
        cmd = asv_command(config, commit, chunk.regexes, verbose)
        if dry_run:
            say(f"{prefix} {' '.join(cmd[:12])} ... ({len(chunk.regexes)} --bench regexes)")
            continue
        t0 = time.monotonic()
        measure_peak(layout, env, f"before {chunk.key}", say, prefix, devices)
        code = stream(cmd, chunk_env, prefix, verbose, say)
        measure_peak(layout, env, f"after {chunk.key}", say, prefix, devices)
        if code not in (0, 2):  # 2: some benchmark failed, the results are written all the same
            raise SweepError(f"asv stopped with exit status {code} in chunk {chunk.key}; see its output above")
        failures += code == 2
        mark_finished(layout, run_key, chunk.key, time.monotonic() - t0)
    if not dry_run:
        say(f"mhabench bench: done in {time.monotonic() - started:.0f} s; results in {layout.asv}, "
            f"skip reasons in {layout.skips}" + (f"; {failures} chunk(s) had failing benchmarks" if failures else ""))
    return 1 if failures else 0
