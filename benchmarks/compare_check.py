"""How well ``mhabench report --compare`` tells a real change from noise, measured on this machine.

Two benchmark runs of the same code, A and B, except for one plugin adapter (``slowed_sdpa``: torch_sdpa, whose
native forward in B does busy work for ``--slowdown`` (30%) of each call's own time after it). Then
``mhabench report --compare A B``:

- false-positive rate: the share of the other adapters' benchmarks (the same code run twice) flagged as a
  regression or an improvement;
- detection: the share of the slowed adapter's time benchmarks flagged as a regression.

On a machine shared with other work both figures are upper and lower bounds: load that shifts between the
runs is what the compare must see through. Every command is printed, so the measurement can be repeated by
hand::

    python -m mhabench.benchmarks.compare_check --root /tmp/compare-check --adapters torch_sdpa,jax_dpa,keras_mha
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

PLUGIN_NAME = "slowed_sdpa"
ENV_SLOWDOWN = "MHABENCH_CHECK_SLOWDOWN"
PLUGIN = f'''"""torch_sdpa, slowed: after each native forward call, busy work for ${ENV_SLOWDOWN} times the call's time."""
import os
import time

from mhabench.impls.torch_sdpa import TorchSDPAAdapter, TorchSDPALayer

SLOWDOWN = float(os.environ.get("{ENV_SLOWDOWN}", "0"))


class SlowedLayer(TorchSDPALayer):
    def native_forward(self, inputs):
        started = time.perf_counter()
        out = super().native_forward(inputs)
        until = time.perf_counter() + SLOWDOWN * (time.perf_counter() - started)
        while time.perf_counter() < until:
            pass
        return out


class SlowedSDPA(TorchSDPAAdapter):
    name = "{PLUGIN_NAME}"
    description = "torch_sdpa with busy work after each forward call (mhabench.benchmarks.compare_check)"
    layer_class = SlowedLayer
'''
FLAGGED = ("regression", "improvement")


def command(argv: list[str], env_note: str = "") -> str:
    return (env_note + " " if env_note else "") + " ".join(shlex.quote(a) for a in argv)


def run(argv: list[str], env: dict, say) -> None:
    say(f"$ {command(argv, ' '.join(f'{k}={v}' for k, v in env.items()))}")
    done = subprocess.run(argv, env=dict(os.environ, **env))
    if done.returncode not in (0, 1):  # 1: some benchmark failed; the rest is written
        raise SystemExit(f"compare_check: {argv[0]} {argv[1:3]} stopped with exit status {done.returncode}")


def asv_rule(row: dict, worse_only: bool = False) -> bool:
    """Whether the rule ``asv compare`` applies, and ``report --compare`` applied before it weighed the runs'
    noise, flags this row: past a factor of 1.1, unless both sides' 99% intervals overlap."""
    interval = lambda text: tuple(float(v) for v in text.strip("[]").split(",")) if text else None
    ratio = float(row["ratio"])
    if not (ratio > 0 and ratio < float("inf")):
        return False
    worse = ratio if row["better"] == "lower" else 1 / ratio
    a, b = interval(row["a_ci"]), interval(row["b_ci"])
    overlap = a is not None and b is not None and a[1] >= b[0] and a[0] <= b[1]
    return (worse > 1.1 or (not worse_only and worse < 1 / 1.1)) and not overlap


def rates(comparison_csv: Path) -> dict:
    """False-positive rate over the unchanged adapters' benchmarks, detection over the slowed one's time."""
    rows = list(csv.DictReader(open(comparison_csv, newline="")))
    # a point measured in one run only (a budget may cover different lengths) is not the same code run twice
    judged = [r for r in rows if not r["change"].startswith("follows time") and r["change"] not in
              ("not comparable", "n/a in both", "fixed in B", "failed in B")]
    slowed = [r for r in judged if f"'{PLUGIN_NAME}'" in r["params"] or r["params"].startswith(PLUGIN_NAME)]
    others = [r for r in judged if r not in slowed]
    slowed_time = [r for r in slowed if "time" in r["method"]]
    count = lambda rs, changes: sum(r["change"] in changes for r in rs)
    asv_flags = lambda rs, worse_only=False: sum(asv_rule(r, worse_only) for r in rs)
    return {"asv_rule_false_positives": asv_flags(others), "asv_rule_detected": asv_flags(slowed_time, True),"other_benchmarks": len(others), "false_positives": count(others, FLAGGED),
            "false_positive_rate": count(others, FLAGGED) / len(others) if others else None,
            "false_positives_time": count([r for r in others if "time" in r["method"]], FLAGGED),
            "other_time_benchmarks": sum("time" in r["method"] for r in others),
            "slowed_time_benchmarks": len(slowed_time), "detected": count(slowed_time, ("regression",)),
            "detection_rate": count(slowed_time, ("regression",)) / len(slowed_time) if slowed_time else None,
            "slowed_memory_flagged": count([r for r in slowed if "time" not in r["method"]], FLAGGED)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="a folder for the plugin, both runs and the comparison")
    parser.add_argument("--adapters", default="torch_sdpa,torch_mha,jax_dpa,keras_mha,numpy_oracle",
                        help="the adapters run twice unchanged, comma-separated (the slowed plugin is added)")
    parser.add_argument("--slowdown", type=float, default=0.30, help="the plugin's slowdown in B (default 0.30)")
    parser.add_argument("--budget", default=None, help="mhabench bench --budget for each run (seconds)")
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--threshold", default="10", help="mhabench report --threshold (percent)")
    parser.add_argument("--compare-only", action="store_true", help="compare the runs already in --root")
    args = parser.parse_args(argv)
    say = lambda line: print(line, flush=True)
    root = Path(args.root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    plugin = root / "slowed_adapter.py"
    plugin.write_text(PLUGIN)
    mhabench = [sys.executable, "-m", "mhabench"]
    for side, slowdown in (("a", 0.0), ("b", args.slowdown)):
        if args.compare_only:
            break
        argv = mhabench + ["bench", "--profile", args.profile, "--adapters", f"{args.adapters},{PLUGIN_NAME}",
                           "--adapter", f"{plugin}:SlowedSDPA", "--results", str(root / side)]
        run(argv + (["--budget", str(args.budget)] if args.budget else []), {ENV_SLOWDOWN: str(slowdown)}, say)
    out = root / "compare"
    run(mhabench + ["report", "--compare", str(root / "a"), str(root / "b"), "--threshold", str(args.threshold),
                    "--out", str(out)], {}, say)
    found = rates(out / "comparison.csv")
    found.update(slowdown=args.slowdown, adapters=args.adapters, threshold_percent=float(args.threshold))
    (root / "compare_check.json").write_text(json.dumps(found, indent=1))
    say(f"false positives: {found['false_positives']} of {found['other_benchmarks']} unchanged benchmarks "
        f"({found['false_positives_time']} of {found['other_time_benchmarks']} times); detected: "
        f"{found['detected']} of {found['slowed_time_benchmarks']} times of the {args.slowdown:.0%} slower "
        f"{PLUGIN_NAME} (asv compare's rule on the same runs: {found['asv_rule_false_positives']} false positives, "
        f"{found['asv_rule_detected']} detected); written to {root / 'compare_check.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
