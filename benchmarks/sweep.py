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
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from mhabench import results, shards
from mhabench.impls import registry
from mhabench.impls.worker import dies_with_parent
from mhabench.progress import Tally

from .profiles import DEVICES, ENV_ADAPTERS, ENV_PROFILE, MODES, PROFILES, get_profile, plugins_env

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
                if adapter not in adapters or not profile.keeps_mode(adapter, mode) \
                        or not profile.keeps(name, adapter, int(combo[2])):
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


def estimated_ms(profile_name: str, name: str, combo: tuple[str, ...]) -> int:
    """A benchmark's estimated cost in whole milliseconds, from its parameters alone (the same on every
    machine). Time methods take asv's samples (its ``repeat``: at least min, at most max samples, or
    max seconds), tracked figures a few calls; forward and backward cost about three forward calls."""
    from .flops import attention_flops
    if name.startswith("bench_machine"):
        return MACHINE_MS
    profile = get_profile(profile_name)
    _, cls, method = name.split(".")
    adapter, mode, seq_len, heads, _device = (ast.literal_eval(v) for v in combo)
    kv_len = max(1, int(seq_len * profile.cross_kv_ratio)) if cls == "CrossAttention" else seq_len
    backward = method.endswith("forward_backward")
    call = attention_flops(profile.batch, seq_len, kv_len, profile.model_dim, heads, profile.model_dim // heads,
                           causal=cls == "CausalSelfAttention", backward=backward) / FLOPS_PER_MS
    min_samples, max_samples, max_seconds = profile.repeat
    if method.startswith("time_"):
        calls = profile.rounds * min(max_samples * call, max(min_samples * call, 1000 * max_seconds)) / max(call, 1e-9)
    else:
        calls = profile.memory_samples
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


def make_options(profile=None, adapters=None, devices=None, results_dir="results", bench=None, memory_budget=None,
                 adhoc=(), shard=None, machine=None) -> Options:
    """Checked options: ``adapters``/``devices`` comma-separated (the syntax of every list option),
    ``shard`` "K/N", ``machine`` a name for asv's results of this machine."""
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
    return Options(profile, chosen, device_list, root, bench, memory_budget, list(adhoc), shard, machine)


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


def stream(cmd: list[str], env, prefix: str, verbose: bool = False, say=print) -> int:
    """Run asv, echoing its progress with the chunk as prefix; stderr is merged."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, cwd=BENCHMARK_DIR.parent, preexec_fn=dies_with_parent())
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
                               "--device", device, "--label", label], env=env, capture_output=True, text=True,
                              preexec_fn=dies_with_parent())
        line = (done.stdout.strip().splitlines() or [done.stderr.strip()[-200:]])[-1]
        if done.returncode == 2:  # it could not write bench/peaks.jsonl: the disk is full or read-only
            raise SweepError(line)
        say(f"{prefix} {line}")


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
    if options.adhoc:
        env[ENV_ADAPTERS] = plugins_env(options.adhoc)
    if options.memory_budget:
        env["MHABENCH_MEMORY_BUDGET"] = options.memory_budget
    # asv starts a process per case: the adapters' persistent compilation cache (impls.cache) lets JAX
    # compile each shape once, not once per process (only setup gets faster; the timed calls are the same)
    return _run_chunks(plan, config, commit, run_key, done, env, layout, verbose, dry_run, say, options)


def bench_plan(options: Options, plan: list[Chunk], selected: int, commit: str) -> dict:
    """What bench/plan.json records: the benchmarks this run set out to measure, and of how many in all."""
    out = {"profile": options.profile, "commit": commit, "machine": options.machine,
           "adapters": options.adapters, "devices": options.devices, "bench": options.bench,
           "benchmarks": sum(len(c.benchmarks) for c in plan), "chunks": [c.key for c in plan]}
    if options.shard:
        out.update(shard=list(options.shard), benchmarks_all_shards=selected)
    return out


def _run_chunks(plan, config, commit, run_key, done, env, layout, verbose, dry_run, say, options) -> int:
    if not dry_run:
        ensure_machine(config, env, options.machine)
    shard = f", shard {run_key['shard']}" if "shard" in run_key else ""
    say(f"mhabench bench: profile {run_key['profile']}{shard}, {sum(len(c.benchmarks) for c in plan)} benchmarks "
        f"in {len(plan)} chunks, commit {commit[:10]}, results {layout.asv}"
        + (f" ({len(done & {c.key for c in plan})} already finished)" if done else ""))
    tally = Tally({c.key: len(c.benchmarks) for c in plan},
                  {c.key: sum(estimated_ms(options.profile, *b) for b in c.benchmarks) for c in plan},
                  {c.key: len(c.benchmarks) for c in plan if c.key in done}, unit="benchmarks")
    failures, started = 0, time.monotonic()
    for number, chunk in enumerate(plan, 1):
        prefix = f"[{number}/{len(plan)} {chunk.key}]"
        if chunk.key in done:
            say(f"{prefix} finished earlier, skipped (--resume)")
            continue
        chunk_env = dict(env, MHABENCH_PREIMPORT=",".join(chunk.group.modules), **dict(chunk.group.env))
        cmd = asv_command(config, commit, chunk.regexes, verbose, options.machine)
        if dry_run:
            say(f"{prefix} {' '.join(cmd[:12])} ... ({len(chunk.regexes)} --bench regexes)")
            continue
        t0 = time.monotonic()
        measure_peak(layout, env, f"before {chunk.key}", say, prefix, options.devices)
        guard = GuardedChunk(layout, commit)
        code = stream(cmd, chunk_env, prefix, verbose, say)
        guard.check()
        measure_peak(layout, env, f"after {chunk.key}", say, prefix, options.devices)
        if code not in (0, 2):  # 2: some benchmark failed, the results are written all the same
            raise SweepError(f"asv stopped with exit status {code} in chunk {chunk.key}; see its output above")
        failures += code == 2
        mark_finished(layout, run_key, chunk.key, time.monotonic() - t0)
        tally.add(chunk.key, len(chunk.benchmarks))
        say(f"mhabench bench: {tally.line()}")
    if not dry_run:
        say(f"mhabench bench: done in {time.monotonic() - started:.0f} s; results in {layout.asv}, "
            f"skip reasons in {layout.skips}" + (f"; {failures} chunk(s) had failing benchmarks" if failures else ""))
    return 1 if failures else 0
