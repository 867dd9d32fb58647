"""Several results directories' benchmark results merged into one asv tree, for ``asv publish``.

asv keeps one folder per machine and one file per commit and environment in it, so the shards of one
machine (``mhabench bench --shard K/N`` on several hosts) each write a file of the same name, each holding
the measurements of its own parameters and empty slots for the others'. Copying them into one tree
would keep only one; merging keeps every measurement: per benchmark, each parameter slot comes from the
file that measured it (the later file where both did). Machines, nights and commits that do not collide
are copied as they are. The benchmark skip, peak and FLOP logs (``bench/*.jsonl``) are joined, each line
once.

    mhabench bench --merge night/cpu-1 night/cpu-2 night/gpu-1 --results merged
    asv publish --config merged/bench/asv.conf.json
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from mhabench import results

# asv's per-parameter columns (a list with one slot per parameter combination); the others are per benchmark
PER_PARAMETER = ("result", "stats_ci_99_a", "stats_ci_99_b", "stats_q_25", "stats_q_75", "stats_number",
                 "stats_repeat", "samples")


class MergeError(ValueError):
    """Results that cannot be merged; the message is one line."""


def asv_dir(root: Path) -> Path | None:
    """The asv results tree of a results directory (or the tree itself), or None."""
    for candidate in (Path(root) / "asv", Path(root)):
        if candidate.is_dir() and any(candidate.glob("*/machine.json")):
            return candidate
    return None


def _measured(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def merge_result_files(base: dict, extra: dict) -> dict:
    """``extra``'s measurements laid over ``base`` (two asv result files of one machine, commit and environment)."""
    if base.get("result_columns") != extra.get("result_columns"):
        raise MergeError(f"asv result files of {base.get('commit_hash')} / {base.get('env_name')} were written "
                         f"by different asv formats")
    columns = base["result_columns"]
    merged = dict(base, results=dict(base.get("results", {})), durations=dict(base.get("durations", {})))
    for name, entry in extra.get("results", {}).items():
        mine = merged["results"].get(name)
        theirs = dict(zip(columns, entry))
        if mine is None:
            merged["results"][name] = entry
            continue
        ours = dict(zip(columns, mine))
        if ours.get("version") != theirs.get("version") or ours.get("params") != theirs.get("params"):
            merged["results"][name] = entry  # the benchmark changed between the runs: the later one stands
            continue
        slots = theirs.get("result")
        if not isinstance(slots, list):
            merged["results"][name] = entry
            continue
        for column in PER_PARAMETER:
            values = ours.get(column)
            new = theirs.get(column)
            if not isinstance(new, list):
                continue
            values = list(values) if isinstance(values, list) else [None] * len(new)
            for j, value in enumerate(new):
                if j < len(slots) and _measured(slots[j]):
                    values[j] = value
            ours[column] = values
        for column in ("started_at", "duration"):
            if _measured(theirs.get(column)) and (not _measured(ours.get(column)) or theirs[column] > ours[column]):
                ours[column] = theirs[column]
        merged["results"][name] = [ours.get(column) for column in columns]
    merged["durations"].update(extra.get("durations", {}))
    merged["date"] = max(base.get("date") or 0, extra.get("date") or 0)
    return merged


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise MergeError(f"{path}: not a readable asv results file ({exc})") from None


def merge(sources, into) -> list[str]:
    """Merge the benchmark results of ``sources`` (results directories) into the results directory ``into``
    (whose own results are kept); one line per file written or merged."""
    layout = results.Layout(into)
    done = []
    found = False
    for source in sources:
        tree = asv_dir(source)
        src_layout = results.Layout(source)
        if tree is not None:
            found = True
            for machine_json in sorted(tree.glob("*/machine.json")):
                machine = machine_json.parent.name
                target = layout.asv / machine
                target.mkdir(parents=True, exist_ok=True)
                if not (target / "machine.json").exists():
                    shutil.copy2(machine_json, target / "machine.json")
                for file in sorted(machine_json.parent.glob("*.json")):
                    if file.name == "machine.json":
                        continue
                    existing = target / file.name
                    if existing.exists():
                        merged = merge_result_files(_read(existing), _read(file))
                        results.atomic_write(existing, json.dumps(merged))
                        done.append(f"merged {file} into {existing}")
                    else:
                        shutil.copy2(file, existing)
                        done.append(f"copied {file} to {existing}")
            if (tree / "benchmarks.json").exists() and not (layout.asv / "benchmarks.json").exists():
                shutil.copy2(tree / "benchmarks.json", layout.asv / "benchmarks.json")
        for log in (src_layout.skips, src_layout.peaks, src_layout.flops):
            if log.exists():
                found = True
                _join_lines(log, layout.bench / log.name)
    if not found:
        raise MergeError(f"--merge: no benchmark results in {', '.join(str(s) for s in sources)} "
                         f"(expected asv/<machine>/*.json)")
    return done


def _join_lines(source: Path, target: Path) -> None:
    """Append the lines of ``source`` that ``target`` lacks."""
    have = set(target.read_text().splitlines()) if target.exists() else set()
    new = [line for line in source.read_text().splitlines() if line.strip() and line not in have]
    if new:
        with results.Appender(target) as out:  # whole lines or none, on a full disk too
            out.write_lines(new)
