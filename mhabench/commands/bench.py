"""``mhabench bench``: the asv benchmark suite, run in the current environment.

asv writes a results file only when a whole ``asv run`` ends, so the sweep is
split into chunks (one adapter, or one adapter and one benchmark class), each
its own ``asv run --python=same --set-commit-hash HASH``: an interrupted sweep
keeps every finished chunk, and ``--resume`` skips the chunks recorded in
``<results>/bench/progress.jsonl``. Each chunk runs under asv's forkserver with
the adapter's framework imported once in the server, so the many per-case
processes asv starts do not each pay the framework import.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..cli import CLIError

HELP = "run the asv benchmarks (time, per-call peak memory, GFLOP/s) here; results in <results>/asv"

ROOT = Path(__file__).resolve().parents[2]
PLACEHOLDER_HASH = "0" * 40  # recorded when the sources are not a git checkout
# Adapters that share a forkserver: its modules are imported once per chunk (and Keras, which
# picks its backend at import, is imported with that group's backend).
GROUPS = {"numpy_oracle": "torch", "torch_sdpa": "torch", "torch_mha": "torch", "keras_mha@torch": "torch",
          "machine": "torch", "keras_mha": "tensorflow", "keras_mha@jax": "jax", "jax_dpa": "jax",
          "flax_mha": "jax"}
PREIMPORT = {"torch": ("torch,keras", "torch"), "tensorflow": ("tensorflow", "tensorflow"),
             "jax": ("jax,flax,keras", "jax"), "other": ("", None)}  # group -> (modules, KERAS_BACKEND)

def register(parser):
    parser.add_argument("--profile", default=None, help="benchmark grid: quick, default or full "
                        "(default: $MHABENCH_PROFILE or 'default')")
    parser.add_argument("--quick", action="store_true", help="shorthand for --profile quick")
    parser.add_argument("--adapters", nargs="+", metavar="NAME", help="only these adapters (default: every one)")
    parser.add_argument("--devices", nargs="+", metavar="DEVICE", help="only these devices: cpu, cuda "
                        "(default: cpu, and cuda where an NVIDIA driver is loaded)")
    parser.add_argument("--results", default="results", help="results directory (default: ./results); "
                        "asv results go to <results>/asv, skip reasons to <results>/bench/skips.jsonl")
    parser.add_argument("--bench", metavar="REGEX", help="only benchmarks whose asv name "
                        "'bench_attention.SelfAttention.time_forward(...params)' matches")
    parser.add_argument("--resume", action="store_true", help="skip the chunks an earlier interrupted run "
                        "of the same commit, profile and machine finished")
    parser.add_argument("--memory-budget", metavar="BYTES", help="skip cases estimated above this "
                        "(e.g. 12GiB; default: half the RAM)")
    parser.add_argument("-v", "--verbose", action="store_true", help="all of asv's output, with the "
                        "benchmarks' stderr")
    parser.add_argument("--dry-run", action="store_true", help="print the asv commands, run nothing")


# ---- the grid, as asv will see it ---------------------------------------------------------------
def grid(profile_name: str) -> list[tuple[str, list[tuple[str, ...]]]]:
    """[(benchmark name, [param tuples as asv formats them])], without importing any framework."""
    from benchmarks import bench_attention, bench_machine
    from benchmarks.profiles import MODES, get_profile
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


def chunk_plan(profile_name: str, adapters, devices, bench_regex) -> list[tuple[str, str, list[str]]]:
    """[(chunk id, forkserver group, [asv --bench regexes])] in run order.

    The quick profile runs one chunk per group of adapters sharing a framework; longer sweeps one
    chunk per adapter and class, so an interruption loses little. Combinations the profile leaves
    out (modes_for) are not selected at all.
    """
    from benchmarks.profiles import get_profile
    profile = get_profile(profile_name)
    chunks: dict[str, tuple[str, list[str]]] = {}
    for name, combos in grid(profile_name):
        machine = name.startswith("bench_machine")
        selected = []
        for combo in combos:
            if combo[-1].strip("'") not in devices:
                continue
            if not machine:
                adapter, mode = combo[0].strip("'"), combo[1].strip("'")
                if adapter not in adapters or not profile.keeps_mode(adapter, mode):
                    continue
            if bench_regex and not re.search(bench_regex, f"{name}({', '.join(combo)})"):
                continue
            selected.append(combo)
        if machine:
            if selected:
                group = GROUPS["machine"]
                key = group if profile_name == "quick" else "machine"
                chunks.setdefault(key, (group, []))[1].extend(
                    f"^{re.escape(name)}\\({re.escape(c[0])}\\)$" for c in selected)
            continue
        cls = name.split(".")[1]
        for adapter in adapters:
            mine = [c for c in selected if c[0] == repr(adapter)]
            if not mine:
                continue
            group = GROUPS.get(adapter, "other")
            key = group if profile_name == "quick" else f"{adapter}:{cls}"
            regexes = chunks.setdefault(key, (group, []))[1]
            if len(mine) == sum(c[0] == repr(adapter) for c in combos):
                regexes.append(f"^{re.escape(name)}\\({re.escape(repr(adapter))}, ")
            else:
                regexes.extend(f"^{re.escape(name)}\\({re.escape(', '.join(c))}\\)$" for c in mine)
    return [(key, group, regexes) for key, (group, regexes) in chunks.items()]


# ---- checks ---------------------------------------------------------------------------------------
def check_options(args) -> tuple[str, list[str], list[str], Path]:
    from benchmarks.common import parse_bytes
    from benchmarks.profiles import ADAPTERS, DEVICES, PROFILES
    profile = "quick" if args.quick else (args.profile or os.environ.get("MHABENCH_PROFILE") or "default")
    if args.quick and args.profile not in (None, "quick"):
        raise CLIError(f"--quick contradicts --profile {args.profile}")
    if profile not in PROFILES:
        raise CLIError(f"unknown profile {profile!r}; expected one of {', '.join(PROFILES)}")
    adapters = list(args.adapters or ADAPTERS)
    unknown = [a for a in adapters if a not in ADAPTERS]
    if unknown:
        raise CLIError(f"unknown adapter(s) {', '.join(unknown)}; the benchmark grid has {', '.join(ADAPTERS)}")
    devices = list(args.devices or (DEVICES if gpu_present() else ("cpu",)))
    unknown = [d for d in devices if d not in DEVICES]
    if unknown:
        raise CLIError(f"unknown device(s) {', '.join(unknown)}; expected {', '.join(DEVICES)}")
    if args.bench:
        try:
            re.compile(args.bench)
        except re.error as exc:
            raise CLIError(f"--bench {args.bench!r} is not a regular expression: {exc}") from None
    if args.memory_budget:
        try:
            parse_bytes(args.memory_budget)
        except ValueError:
            raise CLIError(f"--memory-budget {args.memory_budget!r}: expected bytes such as 12GiB, "
                           f"500MB or 1e9") from None
    results = Path(args.results).resolve()
    try:
        (results / "bench").mkdir(parents=True, exist_ok=True)
        probe = results / "bench" / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise CLIError(f"results directory {results} is not writable: {exc.strerror or exc}") from None
    if shutil.which("asv") is None and not _asv_module_available():
        raise CLIError('asv is not installed; install with: pip install "mhabench[bench]"')
    return profile, adapters, devices, results


def _asv_module_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("asv") is not None


def commit_hash() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return PLACEHOLDER_HASH
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else PLACEHOLDER_HASH


def asv_config(results: Path) -> Path:
    """asv.conf.json with results_dir/html_dir under ``results`` (asv takes them only from a config)."""
    conf = json.loads((ROOT / "asv.conf.json").read_text())
    conf["results_dir"] = str(results / "asv")
    conf["html_dir"] = str(results / "asv-html")
    conf["benchmark_dir"] = str(ROOT / "benchmarks")
    conf["repo"] = str(ROOT)
    path = results / "bench" / "asv.conf.json"
    path.write_text(json.dumps(conf, indent=2))
    return path


# ---- progress file for --resume -------------------------------------------------------------------
def progress_path(results: Path) -> Path:
    return results / "bench" / "progress.jsonl"


def finished_chunks(results: Path, run_key: dict) -> set[str]:
    path = progress_path(results)
    if not path.exists():
        return set()
    done = set()
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if all(row.get(k) == v for k, v in run_key.items()):
            done.add(row["chunk"])
    return done


def mark_finished(results: Path, run_key: dict, chunk: str, seconds: float) -> None:
    with open(progress_path(results), "a") as fh:
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


def stream(cmd: list[str], env, prefix: str, verbose: bool = False) -> int:
    """Run asv, echoing its progress with the chunk as prefix; stderr is merged."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, cwd=ROOT)
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            if verbose or worth_showing(line):
                print(f"{prefix} {line}", flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise


def main(args) -> int:
    profile, adapters, devices, results = check_options(args)
    plan = chunk_plan(profile, adapters, devices, args.bench)
    if not plan:
        raise CLIError("no benchmark matches these --adapters/--devices/--bench")
    config = asv_config(results)
    commit = commit_hash()
    run_key = {"commit": commit, "profile": profile}
    done = finished_chunks(results, run_key) if args.resume else set()
    env = dict(os.environ, MHABENCH_PROFILE=profile, MHABENCH_RESULTS=str(results), PYTHONUNBUFFERED="1")
    if args.memory_budget:
        env["MHABENCH_MEMORY_BUDGET"] = args.memory_budget
    # asv starts a process per case: a shared on-disk cache lets JAX compile each shape once per
    # sweep instead of once per process (only setup gets faster; the timed calls are the same)
    jax_cache = None
    if "JAX_COMPILATION_CACHE_DIR" not in env:
        jax_cache = tempfile.mkdtemp(prefix="mhabench-jax-cache-")
        env.update(JAX_COMPILATION_CACHE_DIR=jax_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    try:
        return run_chunks(args, plan, config, commit, run_key, done, env, results)
    finally:
        if jax_cache:
            shutil.rmtree(jax_cache, ignore_errors=True)


def run_chunks(args, plan, config, commit, run_key, done, env, results) -> int:
    if not args.dry_run:
        ensure_machine(config, env)
    print(f"mhabench bench: profile {run_key['profile']}, {len(plan)} chunks, commit {commit[:10]}, results {results / 'asv'}"
          + (f" ({len(done & {c for c, _, _ in plan})} already finished)" if done else ""), flush=True)
    failures, started = 0, time.monotonic()
    for number, (chunk, target, regexes) in enumerate(plan, 1):
        prefix = f"[{number}/{len(plan)} {chunk}]"
        if chunk in done:
            print(f"{prefix} finished earlier, skipped (--resume)", flush=True)
            continue
        modules, keras_backend = PREIMPORT[target]
        chunk_env = dict(env, MHABENCH_PREIMPORT=modules)
        if keras_backend:
            chunk_env["KERAS_BACKEND"] = keras_backend
        cmd = asv_command(config, commit, regexes, args.verbose)
        if args.dry_run:
            print(prefix, " ".join(cmd[:12]), f"... ({len(regexes)} --bench regexes)")
            continue
        t0 = time.monotonic()
        code = stream(cmd, chunk_env, prefix, args.verbose)
        if code not in (0, 2):  # 2: some benchmark failed, the results are written all the same
            raise CLIError(f"asv stopped with exit status {code} in chunk {chunk}; see its output above")
        failures += code == 2
        mark_finished(results, run_key, chunk, time.monotonic() - t0)
    if not args.dry_run:
        print(f"mhabench bench: done in {time.monotonic() - started:.0f} s; results in {results / 'asv'}, "
              f"skip reasons in {results / 'bench' / 'skips.jsonl'}"
              + (f"; {failures} chunk(s) had failing benchmarks" if failures else ""), flush=True)
    return 1 if failures else 0
