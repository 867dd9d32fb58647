"""The tidy tables a report is made of, computed from the loaded results."""
from __future__ import annotations

import json
import math
import re
import shlex
from collections import Counter

import numpy as np
import pandas as pd

from mhabench import plausibility, results
from mhabench.results import AREAS, PROBLEM_STATUSES, STATUSES

from .load import Benchmarks, Conformance
from .units import format_value


# --- environment --------------------------------------------------------------------------------

def environment(conformance: Conformance | None, benchmarks: Benchmarks | None) -> pd.DataFrame:
    """Framework versions, machine, date and commit, one row per fact with where it came from."""
    rows = []

    def add(item, value, source):
        if value not in (None, "", {}, []):
            rows.append({"item": item, "value": _text(value), "source": source})

    parts = (conformance.parts or [conformance]) if conformance is not None else []
    for part in parts:
        where = "conformance" if len(parts) == 1 else f"conformance ({part.machine}: {part.source.parent.parent})"
        meta = part.meta
        add("machine", part.machine, where)
        for key in ("created", "commit", "mhabench_version", "python", "platform", "cpu", "gpu"):
            add(key, meta.get(key), where)
        versions = meta.get("versions") or {}
        if isinstance(versions, dict):
            for name, version in sorted(versions.items()):
                add(f"version: {name}", version, where)
        if part.shard is not None:
            add("shard", f"{part.shard[0]}/{part.shard[1]}", where)
    if benchmarks is not None:
        for name, machine in sorted(benchmarks.machines.items()):
            if not isinstance(machine, dict):
                continue
            for key in ("machine", "cpu", "num_cpu", "arch", "os", "ram", "gpu"):
                add(f"bench {key}", machine.get(key), f"asv machine.json ({name})")
        for run in benchmarks.runs.to_dict("records"):
            add("bench commit", run.get("commit"), "asv results")
            add("bench environment", run.get("env"), "asv results")
            if run.get("date"):
                add("bench date", pd.Timestamp(run["date"], unit="ms", tz="UTC").isoformat(timespec="seconds"),
                    "asv results")
            requirements = run.get("requirements") or {}
            if isinstance(requirements, dict):
                for name, version in sorted(requirements.items()):
                    add(f"bench requirement: {name}", version or "(unpinned)", "asv results")
    return pd.DataFrame(rows, columns=["item", "value", "source"])


def _text(value) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


# --- conformance --------------------------------------------------------------------------------

def conformance_matrix(rows: pd.DataFrame) -> pd.DataFrame:
    """Adapter x area: a count per status and the worst meaningful error ratio, as a long table.

    The cells are ``mhabench.results.summarise``'s, the same the terminal summary of ``conform`` shows."""
    columns = ["adapter", "area", *STATUSES, "total", "worst_error_ratio", "kernel"]
    if rows.empty:
        return pd.DataFrame(columns=columns)
    fields = ["adapter", "area", "status", "error_ratio", "tolerance_source"]
    # one record at a time: the same summary as the terminal's, without a million dicts at once
    summary = results.summarise(dict(zip(fields, values)) for values in zip(*(rows[f] for f in fields)))
    kernels = _kernels(rows)
    order = {area: i for i, area in enumerate(AREAS)}
    out = []
    for (adapter, area), cell in sorted(summary.items(), key=lambda kv: (kv[0][0], order.get(kv[0][1], len(order)),
                                                                          kv[0][1])):
        out.append({"adapter": adapter, "kernel": kernels.get(adapter), "area": area, **{s: cell[s] for s in STATUSES},
                    "total": sum(cell[s] for s in STATUSES),
                    "worst_error_ratio": math.nan if cell["worst_ratio"] is None else cell["worst_ratio"]})
    return pd.DataFrame(out, columns=columns)


def matrix_areas(matrix: pd.DataFrame) -> list[str]:
    """The areas to show as columns: the known ones in order, then any others found."""
    seen = list(dict.fromkeys(matrix["area"]))
    return [a for a in AREAS if a in seen] + [a for a in seen if a not in AREAS]


cell_state = results.worst_status  # the worst status present in one matrix cell (drives its colour)


def _kernels(rows: pd.DataFrame) -> dict:
    """adapter -> the kernel its rows recorded (one per adapter: a kernel variant is its own adapter)."""
    if "kernel" not in rows:
        return {a: results.DEFAULT_KERNEL for a in rows["adapter"].unique()}
    return dict(zip(rows["adapter"], rows["kernel"]))


FEATURE_ORDER = ("classic", "gqa", "causal_bottom_right", "window", "bias", "lengths")


def kernel_matrix(rows: pd.DataFrame) -> pd.DataFrame:
    """Framework x kernel x modern feature: the status counts of the rows that use the feature, one row per
    (adapter, kernel, feature); ``classic`` for the rows that use none. How each kernel agrees, feature by feature."""
    columns = ["adapter", "kernel", "feature", *STATUSES, "total"]
    if rows.empty:
        return pd.DataFrame(columns=columns)
    kernels = _kernels(rows)
    part = rows.loc[rows["quantity"] != "raises", ["adapter", "status", "spec", "causal", "window", "bias", "lengths"]]
    uses = {"gqa": once_per_value(part["spec"], _gqa),
            "causal_bottom_right": once_per_value(part["causal"], lambda c: c == "bottom_right"),
            **{name: once_per_value(part[name], _given) for name in ("window", "bias", "lengths")}}
    uses = {"classic": ~np.logical_or.reduce(list(uses.values())), **uses}
    counted = []
    for feature, used in uses.items():
        counts = part.loc[used].groupby(["adapter", "status"]).size()
        counted += [(adapter, feature, status, int(n)) for (adapter, status), n in counts.items() if n]
    cells: dict = {}
    for adapter, feature, status, n in counted:
        cells.setdefault((adapter, feature), {})[status] = n
    out = [{"adapter": adapter, "kernel": kernels.get(adapter), "feature": feature,
            **{s: cell.get(s, 0) for s in STATUSES}, "total": sum(cell.values())}
           for (adapter, feature), cell in sorted(cells.items(),
                                                  key=lambda kv: (kv[0][0], FEATURE_ORDER.index(kv[0][1])))]
    return pd.DataFrame(out, columns=columns)


def once_per_value(values: pd.Series, test) -> np.ndarray:
    """``test`` of each value, as a boolean array, asked once per distinct object: the loaded rows share
    one object per distinct spec, window, bias or lengths (``load``), so a million rows ask a few hundred
    times."""
    objects = values.to_numpy(object)
    codes, uniques = pd.factorize(np.fromiter(map(id, objects), dtype=np.uint64, count=len(objects)))
    first = np.empty(len(uniques), dtype=np.int64)
    first[codes[::-1]] = np.arange(len(codes) - 1, -1, -1)  # where each object is first met
    answers = np.array([bool(test(objects[i])) for i in first], dtype=bool)
    return answers[codes] if len(codes) else np.zeros(0, dtype=bool)


def _given(value) -> bool:
    return value is not None and value == value and value != "" and value != []


def _gqa(spec) -> bool:
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except ValueError:
            return False
    return isinstance(spec, dict) and spec.get("num_kv_heads") not in (None, spec.get("num_heads"))


def adapter_summary(rows: pd.DataFrame) -> pd.DataFrame:
    """Per adapter and the framework version its rows recorded (a merge of runs with different versions keeps
    each version's rows: one line each, oldest run first): counts, the pass rate over the rows that ran to a
    verdict, and the machines the rows come from."""
    columns = ["adapter", "framework", "framework_version", *STATUSES, "total", "pass_rate", "divergences", "kernel",
               "opset", "machines"]
    if rows.empty:
        return pd.DataFrame(columns=columns)
    out = []
    kernels = _kernels(rows)
    version = rows["framework_version"] if "framework_version" in rows else pd.Series(None, index=rows.index)
    groups = rows.groupby([rows["adapter"], version.rename("_version")], sort=False, dropna=False)
    for (adapter, _), group in sorted(groups, key=lambda kv: kv[0][0]):  # stable: versions in the rows' order
        counts = group["status"].value_counts()
        record = {"adapter": adapter, "kernel": kernels.get(adapter),
                  "framework": _first(group.get("framework")),
                  "framework_version": _first(group.get("framework_version")),
                  "machines": join_values(group["machine"]) if "machine" in group else ""}
        for status in STATUSES:
            record[status] = int(counts.get(status, 0))
        record["total"] = len(group)
        judged = sum(record[s] for s in ("pass", "fail", "divergence", "error"))
        record["pass_rate"] = record["pass"] / judged if judged else math.nan
        record["divergences"] = int(group["divergence"].dropna().nunique())
        record["opset"] = _first(group["opset"].astype("Int64")) if "opset" in group else None
        out.append(record)
    return pd.DataFrame(out, columns=columns)


def _first(series):
    if series is None:
        return None
    values = series.dropna()
    return None if values.empty else str(values.iloc[0])


def non_passing(rows: pd.DataFrame) -> pd.DataFrame:
    """The drill-down: every row that did not pass, worst status first, then worst error ratio."""
    columns = ["row_id", "adapter", "area", "case", "dtype", "quantity", "status", "error_ratio",
               "max_abs_err", "tolerance", "divergence", "message"]
    if rows.empty:
        return pd.DataFrame(columns=columns)
    bad = rows[rows["status"] != "pass"].copy()
    for column in columns:
        if column not in bad:
            bad[column] = None
    rank = {s: i for i, s in enumerate(PROBLEM_STATUSES)}
    bad["_rank"] = bad["status"].map(lambda s: rank.get(s, -1))
    bad = bad.sort_values(["_rank", "error_ratio", "adapter", "row_id"], ascending=[True, False, True, True],
                          na_position="last")
    return bad[columns].reset_index(drop=True)


OPTIONAL = ("path", "kernel", "mode")  # row fields shown where a run recorded them


def present(rows: pd.DataFrame, names) -> list[str]:
    """The columns among ``names`` that hold a value in some row (fields a newer harness adds)."""
    return [n for n in names if n in rows and rows[n].notna().any() and (rows[n].astype(str) != "").any()]


def rerun_command(row_id: str, results_dir: str, plugins=()) -> str:
    """The command that runs exactly this row again into its own results directory."""
    adapters = "".join(f"--adapter {shlex.quote(str(t))} " for t in plugins)
    return f"mhabench conform {adapters}--rerun {shlex.quote(str(row_id))} --results {shlex.quote(str(results_dir))}"


def failures(rows: pd.DataFrame, plugins: dict | None = None) -> pd.DataFrame:
    """Every ``error`` and ``fail`` row, errors first, each with the command that reruns it.

    ``plugins``: results directory -> the ``--adapter`` targets its run loaded (plan.json's "adhoc"),
    so the command also works for a plugin adapter."""
    columns = ["status", "row_id", "machine", "device", "adapter", "area", "case", "dtype", "quantity",
               *present(rows, OPTIONAL), "error_ratio", "max_abs_err", "tolerance", "message", "rerun"]
    if rows.empty:
        return pd.DataFrame(columns=columns)
    bad = rows[rows["status"].isin(["error", "fail"])].copy()
    bad["_rank"] = bad["status"].map({"error": 0, "fail": 1})
    bad = bad.sort_values(["_rank", "adapter", "row_id"])
    bad["rerun"] = [rerun_command(r, d, (plugins or {}).get(d, ())) for r, d in zip(bad["row_id"], bad["results"])]
    return bad[columns].reset_index(drop=True)


def join_values(values, limit=None) -> str:
    """Distinct values, sorted and comma-separated (blanks left out; past ``limit``, a count of the rest)."""
    values = sorted({str(v) for v in values if v is not None and v == v and v != ""})
    if limit and len(values) > limit:
        return ", ".join(values[:limit]) + f" (+{len(values) - limit} more)"
    return ", ".join(values)


def divergence_catalogue(rows: pd.DataFrame, catalogue: dict, scripts: dict | None = None) -> pd.DataFrame:
    """One line per divergence entry: the ones the rows show, stale entries first, then those not shown here.

    ``rows`` counts the rows that carry the id, so an entry's line and its expanded rows agree. ``scripts``: what
    ``repro --all`` found per entry (``results.read_reproducer_status``); an entry whose standalone script exits
    0 where the catalogue says it shows is stale, as it is when a row it covers passes."""
    scripts = scripts or {}
    columns = ["id", "framework", "kind", "adapters", "dtypes", "quantities", "machines", "rows", "cases",
               "largest_err", "largest_nonfinite", "affected", "observed", "how", "upstream", "status", "message"]
    seen = rows[rows["divergence"].notna()] if not rows.empty else rows
    ids = list(dict.fromkeys(seen["divergence"].astype(str))) if not seen.empty else []
    ids += [i for i in catalogue if i not in ids]
    out = []
    for div_id in ids:
        entry = catalogue.get(div_id, {})
        group = seen[seen["divergence"].astype(str) == div_id] if not seen.empty else seen
        shown = not group.empty
        largest, nonfinite = largest_error(group)
        out.append({
            "id": div_id,
            "framework": entry.get("framework") or (_first(group["framework"]) if shown else "") or "",
            "kind": entry.get("kind") or "",
            "largest_err": largest,
            "largest_nonfinite": nonfinite,
            "affected": affected(entry, group),
            "adapters": join_values(group["adapter"] if shown else entry.get("adapters") or []),
            "dtypes": join_values(group["dtype"] if shown else entry.get("dtypes") or []),
            "quantities": join_values(group["quantity"] if shown else entry.get("quantities") or []),
            "machines": join_values(group["machine"]) if shown and "machine" in group else "",
            "rows": len(group),
            "cases": join_values(group["case"], limit=8) if shown else join_values(entry.get("cases") or []),
            "observed": entry.get("observed") or (_first(group["message"]) if shown else "") or "",
            "how": entry.get("how") or "",
            "upstream": entry.get("upstream") or "",
            "status": entry.get("status") or ("ok" if shown else "not in this run"),
            "message": entry.get("message") or "",
        })
        script, record = scripts.get(div_id) or {}, out[-1]
        if script.get("status") == "stale":
            said = f"standalone script: {script.get('reason') or 'exits 0 here'}"
            record["message"] = f"{record['message']}; {said}" if record["status"] == "stale" else said
            record["status"] = "stale"
    table = pd.DataFrame(out, columns=columns)
    if table.empty:
        return table
    order = table["status"].map(lambda s: 0 if s == "stale" else 1) * 2 + (table["rows"] == 0).astype(int)
    return table.assign(_o=order).sort_values(["_o", "framework", "id"], kind="stable") \
        .drop(columns="_o").reset_index(drop=True)


# how a quantity is reached, in a porter's words: the call path it comes from
CALL_PATHS = {"output": "default call", "output_with_scores": "with scores", "scores": "with scores"}
KIND_ORDER = {kind.value: place for place, kind in enumerate(results.DivergenceKind)}


def largest_error(group: pd.DataFrame) -> tuple[float, bool]:
    """The largest distance from the canonical golden among an entry's rows, max|golden - impl| / max(1,
    max|golden|) over the elements finite in both (NaN where no row recorded it: results of earlier versions),
    and whether any row has NaN or Inf where the golden has none (or none where it has)."""
    if group.empty or "canonical_err" not in group:
        return float("nan"), False
    errors = pd.to_numeric(group["canonical_err"], errors="coerce")
    nonfinite = group["canonical_nonfinite"].map(lambda v: v is True or v in ("True", "true", 1)) \
        if "canonical_nonfinite" in group else pd.Series(False, index=group.index)
    return (float(errors.max()) if errors.notna().any() else float("nan")), bool(nonfinite.any())


def error_text(largest: float, nonfinite: bool) -> str:
    """The largest error as the page prints it."""
    finite = "" if largest != largest else f"{largest:.3g}"
    if nonfinite:
        return "NaN/Inf" + (f"; {finite} elsewhere" if finite else "")
    return finite or "not recorded"


def affected(entry: dict, group: pd.DataFrame) -> str:
    """Who meets an entry, in one line: the call paths (default call, with scores, gradients), the dtypes and
    the inputs (the case properties its ``when`` names and the areas of its rows), from the rows where it
    showed, else from the entry."""
    quantities = list(group["quantity"]) if not group.empty else list(entry.get("quantities") or [])
    paths = list(dict.fromkeys(CALL_PATHS.get(str(q), "gradients") for q in
                               sorted(quantities, key=lambda q: (str(q).startswith("grad_"), str(q)))))
    dtypes = join_values(group["dtype"]) if not group.empty else join_values(entry.get("dtypes") or []) or "every dtype"
    when = [str(p).replace("_", " ") for p in entry.get("when") or []]
    areas = join_values(group["area"]) if not group.empty and "area" in group else ""
    inputs = ", ".join(when) or "any input"
    return (f"{', '.join(paths) or 'every call'} · {dtypes} · {inputs}" + (f" (areas: {areas})" if areas else ""))


def by_kind(table: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame]]:
    """Entries grouped by kind, most urgent kind first (``DivergenceKind``'s order; an entry of no known kind, from
    an earlier version's catalogue.json, last), largest error first within a kind (NaN/Inf above every finite
    error; an error not recorded last): (kind, its title, its entries)."""
    if table.empty:
        return []
    order = table.assign(
        _kind=table["kind"].map(lambda k: KIND_ORDER.get(k, len(KIND_ORDER))),
        _nonfinite=~table["largest_nonfinite"].astype(bool),
        _err=-pd.to_numeric(table["largest_err"], errors="coerce").fillna(-np.inf))
    order = order.sort_values(["_kind", "_nonfinite", "_err", "id"], kind="stable")
    out = []
    for place, part in order.groupby("_kind", sort=True):
        kind = str(part["kind"].iloc[0]) if place < len(KIND_ORDER) else ""
        title = results.DivergenceKind(kind).title if kind else "Of no recorded kind"
        out.append((kind, title, part.drop(columns=["_kind", "_nonfinite", "_err"]).reset_index(drop=True)))
    return out


NOT_RUN = ("unsupported", "skip")


def not_run_groups(rows: pd.DataFrame) -> pd.DataFrame:
    """``unsupported`` and ``skip`` rows grouped by reason (the row's message), largest group first."""
    columns = ["status", "reason", "rows", "adapters", "areas", "dtypes", "cases"]
    part = rows[rows["status"].isin(NOT_RUN)] if not rows.empty else rows
    if part.empty:
        return pd.DataFrame(columns=columns)
    out = []
    for (status, reason), group in part.groupby(["status", part["message"].fillna("").astype(str)], sort=False):
        out.append({"status": status, "reason": reason, "rows": len(group),
                    "adapters": join_values(group["adapter"]), "areas": join_values(group["area"]),
                    "dtypes": join_values(group["dtype"]), "cases": group["case"].nunique()})
    table = pd.DataFrame(out, columns=columns)
    return table.sort_values(["status", "rows", "reason"], ascending=[False, False, True]).reset_index(drop=True)


# --- frameworks side by side ------------------------------------------------------------------------

JUDGED = ("pass", "fail")  # rows whose figures are against the canonical golden (a divergence's are not)


def pair_key(rows: pd.DataFrame) -> list[str]:
    """What makes two adapters' rows the same computation: machine, device, case, dtype, quantity, call path."""
    return [c for c in ("machine", "device", "case", "dtype", "quantity", "path") if c in rows]


def _explain(div_id, catalogue: dict) -> str:
    if div_id is None or div_id != div_id:
        return "canonical"
    entry = catalogue.get(str(div_id), {})
    return str(entry.get("how") or div_id)


AGREEMENT_CHUNK_ROWS = 50_000  # rows whose pairs are formed at once: bounds the memory of a million-row report


def agreement(rows: pd.DataFrame, catalogue: dict | None = None, chunk_rows: int = AGREEMENT_CHUNK_ROWS) -> pd.DataFrame:
    """Adapter x adapter: how far apart two adapters' outputs can be, from their rows alone.

    A row holds e = max|impl - golden| over the finite elements, not the output, so for adapters a and b
    on the same computation the triangle inequality bounds max|a - b| to [|e_a - e_b|, e_a + e_b]. Both
    ends are given relative to the row's tolerance (the error a faithful implementation in that dtype
    may have; both rows share it), maximised over every computation both judged against the golden.
    Upper <= 1: they agree within the tolerance; lower > 1: they certainly differ. Divergence rows are
    measured against the catalogued behaviour, not the golden, so they are named instead of bounded.

    The pairs of rows are formed for a chunk of computations at a time (about ``chunk_rows`` rows) and
    folded into running totals, so memory stays bounded however many rows and adapters there are. The
    result does not depend on the chunking: the worst pair, and the order of the divergences named, are
    decided by the pairs' places in the rows (row a's, then row b's), as one merge of every row gives them.
    """
    columns = ["adapter_a", "adapter_b", "compared", "cases", "dtypes", "upper_tol", "lower_tol", "upper_abs",
               "worst_case", "worst_dtype", "worst_quantity", "worst_machine", "worst_device", "worst_row_a",
               "worst_row_b", "fails", "divergent", "divergences", "not_compared", "kernel_a", "kernel_b"]
    if rows.empty:
        return pd.DataFrame(columns=columns)
    catalogue = catalogue or {}
    key = pair_key(rows)
    considered = np.flatnonzero((rows["status"].isin(STATUSES) & (rows["quantity"] != "raises")).to_numpy())
    computation = np.zeros(len(considered), dtype=np.int64)
    for name in key:  # one code per computation, column by column (kept below the row count, never overflowing)
        codes, uniques = pd.factorize(rows[name].to_numpy(object)[considered], use_na_sentinel=False)
        computation = pd.factorize(computation * len(uniques) + codes)[0]
    order = np.argsort(computation, kind="stable")  # each computation's rows together, in their order
    at, computation = considered[order], computation[order]  # at: the rows, as positions in ``rows``

    def field(name: str, chosen) -> np.ndarray:
        return rows[name].to_numpy(object)[at[chosen]] if name in rows else np.full(len(chosen), None, object)
    adapter, names = pd.factorize(rows["adapter"].to_numpy(object)[at], sort=True)  # codes in name order
    status = rows["status"].to_numpy(object)[at]
    facts = {"adapter": adapter, "position": order.astype(np.int64), "computation": computation,
             "judged": np.isin(status, JUDGED), "divergence": status == "divergence", "fail": status == "fail",
             "error": rows["max_abs_err"].to_numpy(float)[at], "tolerance": rows["tolerance"].to_numpy(float)[at],
             "divergence_id": pd.factorize(rows["divergence"].to_numpy(object)[at], use_na_sentinel=True)[0]}
    for name in ("case", "dtype"):  # what each pair judged, counted as codes
        facts[name], facts[f"{name}s"] = pd.factorize(field(name, np.arange(len(at))), use_na_sentinel=False)
    ends = np.flatnonzero(np.diff(computation)) + 1  # where one computation's rows end
    starts = [0]
    for end in ends:
        if end - starts[-1] >= chunk_rows:
            starts.append(int(end))
    starts.append(len(at))
    folded = [_agreement_pairs(facts, lo, hi, len(names)) for lo, hi in zip(starts[:-1], starts[1:])]
    folded = [f for f in folded if f is not None]
    if not folded:
        return pd.DataFrame(columns=columns)
    totals, worst, judged, named = (pd.concat(parts, ignore_index=True) for parts in zip(*folded))
    summary = totals.groupby("pair").agg(
        compared=("compared", "sum"), upper_tol=("upper_tol", "max"), lower_tol=("lower_tol", "max"),
        upper_abs=("upper_abs", "max"), fails=("fails", "sum"), not_compared=("not_compared", "sum"),
        divergent=("divergent", "sum"))
    judged = judged.drop_duplicates()
    cases = judged[judged["what"] == "case"].groupby("pair")["code"].nunique()
    dtypes = judged[judged["what"] == "dtype"].groupby("pair")["code"].agg(
        lambda codes: join_values(facts["dtypes"][codes]))
    worst = worst.sort_values(["upper", "order"], ascending=[False, True], kind="stable").drop_duplicates("pair") \
        .set_index("pair")
    named["text"] = [f"{_explain(x, catalogue)} vs {_explain(y, catalogue)}"
                     for x, y in zip(field("divergence", named["first_a"].to_numpy()),
                                     field("divergence", named["first_b"].to_numpy()))]
    named = named.groupby(["pair", "text"], sort=False).agg(count=("count", "sum"), order=("order", "min")) \
        .sort_values(["count", "order"], ascending=[False, True], kind="stable").reset_index()
    texts = named.groupby("pair", sort=False).apply(
        lambda group: "; ".join(f"{t} ({int(c)})" for t, c in zip(group["text"], group["count"])))
    kernels = _kernels(rows)
    out = []
    for pair, record in summary.iterrows():
        a, b = names[pair // len(names)], names[pair % len(names)]
        found = {}
        if pair in worst.index:
            row_a, row_b = int(worst.at[pair, "row_a"]), int(worst.at[pair, "row_b"])
            found = {f"worst_{k}": field(k, [row_a])[0] if k in key else None
                     for k in ("case", "dtype", "quantity", "machine", "device")}
            found.update(worst_row_a=field("row_id", [row_a])[0], worst_row_b=field("row_id", [row_b])[0])
        out.append({"adapter_a": a, "kernel_a": kernels.get(a), "adapter_b": b, "kernel_b": kernels.get(b),
                    "compared": int(record["compared"]), "cases": int(cases.get(pair, 0)),
                    "dtypes": dtypes.get(pair, ""), "upper_tol": record["upper_tol"],
                    "lower_tol": record["lower_tol"], "upper_abs": record["upper_abs"],
                    **{k: int(record[k]) for k in ("fails", "not_compared", "divergent")},
                    "divergences": texts.get(pair, ""), **found})
    return pd.DataFrame(out, columns=columns)


def _agreement_pairs(facts: dict, lo: int, hi: int, adapters: int):
    """The pairs of rows lo:hi (whole computations) folded: (totals per adapter pair; the worst judged pair
    of each; the cases and dtypes each judged, as codes; the divergences met, per adapter pair and pair of divergence ids, with
    how often and first where). An adapter pair is ``a * adapters + b`` (codes in name order, a < b)."""
    side = pd.DataFrame({"computation": facts["computation"][lo:hi], "row": np.arange(lo, hi)})
    both = side.merge(side, on="computation", suffixes=("_a", "_b"))
    a, b = both["row_a"].to_numpy(), both["row_b"].to_numpy()
    keep = facts["adapter"][a] < facts["adapter"][b]
    a, b = a[keep], b[keep]
    if not len(a):
        return None
    judged_a, judged_b = facts["judged"][a], facts["judged"][b]
    ea, eb, ta, tb = facts["error"][a], facts["error"][b], facts["tolerance"][a], facts["tolerance"][b]
    with np.errstate(invalid="ignore", divide="ignore"):
        judged = judged_a & judged_b & np.isfinite(ea) & np.isfinite(eb) & (ta > 0) & (tb > 0)
        upper_abs = np.where(judged, ea + eb, np.nan)
        upper = upper_abs / np.minimum(ta, tb)  # conservative both ways, should two tolerances ever differ
        lower = np.where(judged, np.abs(ea - eb) / np.maximum(ta, tb), np.nan)
    diverges_a, diverges_b = facts["divergence"][a], facts["divergence"][b]
    ran_both = (judged_a | diverges_a) & (judged_b | diverges_b)
    divergent = ran_both & (diverges_a | diverges_b)
    pair = facts["adapter"][a] * adapters + facts["adapter"][b]
    place = facts["position"][a] * len(facts["position"]) + facts["position"][b]
    folded = pd.DataFrame({"pair": pair, "upper": upper, "lower": lower, "upper_abs": upper_abs,
                           "fail": judged & (facts["fail"][a] | facts["fail"][b]), "not_compared": ~ran_both,
                           "divergent": divergent})
    totals = folded.groupby("pair").agg(
        compared=("upper", "count"), upper_tol=("upper", "max"), lower_tol=("lower", "max"),
        upper_abs=("upper_abs", "max"), fails=("fail", "sum"), not_compared=("not_compared", "sum"),
        divergent=("divergent", "sum")).reset_index()
    worst = pd.DataFrame({"pair": pair[judged], "upper": upper[judged], "order": place[judged], "row_a": a[judged],
                          "row_b": b[judged]}) \
        .sort_values(["upper", "order"], ascending=[False, True], kind="stable").drop_duplicates("pair")
    judged_rows = pd.concat([pd.DataFrame({"pair": pair[judged], "what": name, "code": facts[name][a[judged]]})
                             .drop_duplicates() for name in ("case", "dtype")], ignore_index=True)
    met = pd.DataFrame({"pair": pair[divergent], "order": place[divergent], "row_a": a[divergent],
                        "row_b": b[divergent]})
    return totals, worst, judged_rows, _divergences_met(met, facts)


def _divergences_met(met: pd.DataFrame, facts: dict) -> pd.DataFrame:
    """Per adapter pair and pair of divergence ids: how many pairs met it, the first place, and one pair of
    rows that carries the ids (their text is made once per group)."""
    ids = facts["divergence_id"]
    met = met.assign(id_a=ids[met["row_a"].to_numpy()], id_b=ids[met["row_b"].to_numpy()])
    return met.groupby(["pair", "id_a", "id_b"], sort=False).agg(
        count=("order", "size"), order=("order", "min"), first_a=("row_a", "first"),
        first_b=("row_b", "first")).reset_index()


# --- machines -------------------------------------------------------------------------------------

def machine_matrix(rows: pd.DataFrame) -> pd.DataFrame:
    """Per machine x device x adapter: a count per status (conformance per machine)."""
    columns = ["machine", "device", "adapter", *STATUSES, "total"]
    if rows.empty:
        return pd.DataFrame(columns=columns)
    counts = rows.groupby(["machine", rows["device"].fillna(""), "adapter", "status"]).size().unstack(fill_value=0)
    counts = counts.reindex(columns=list(STATUSES), fill_value=0)
    counts["total"] = counts.sum(axis=1)
    return counts.reset_index()[columns]


def cross_machine(rows: pd.DataFrame, machine_facts: dict | None = None) -> pd.DataFrame:
    """Rows of the same adapter on the same case, dtype and quantity whose verdict differs between machines
    (or devices): one line each, the outcome per machine / device side by side, and ``differs``: the framework
    version and the facts that chose the kernels (the rows' own, then the machines', ``machine_facts``
    {machine: meta machine_facts}) whose values differ between them, the likely reason. Where one machine and
    device holds several framework versions, its newest run's row is the one compared (``version_changes``
    sets the versions side by side)."""
    key = ["row_id", "adapter", "case", "dtype", "quantity", *(["path"] if "path" in rows else [])]
    if rows.empty or rows.groupby(["machine", rows["device"].fillna("")]).ngroups < 2:
        return pd.DataFrame(columns=[*key, "differs"])
    rows = rows.assign(**{k: rows[k].fillna("") for k in key if k == "path"})  # pivot_table drops NaN keys
    where = rows["machine"].astype(str) + " / " + rows["device"].fillna("").astype(str)
    outcome = rows["status"] + rows["divergence"].map(lambda d: f" ({d})" if isinstance(d, str) else "")
    rows = rows.assign(_where=where, _outcome=outcome)
    wide = rows.pivot_table(index=key, columns="_where", values="_outcome", aggfunc="last")
    differs = wide.apply(lambda r: r.dropna().nunique() > 1, axis=1)
    wide = wide[differs].fillna("(not run)").reset_index().rename_axis(columns=None)
    if wide.empty:
        return wide.assign(differs=[])
    facts = {}
    for record in rows[rows["row_id"].isin(set(wide["row_id"]))].to_dict("records"):
        place = record["_where"]
        machine = (machine_facts or {}).get(record["machine"]) or {}
        facts.setdefault(record["row_id"], {})[place] = {"framework_version": record.get("framework_version"),
                                                          **flat_machine_facts(machine), **_facts(record.get("facts"))}
    wide["differs"] = [fact_differences(facts.get(r, {})) for r in wide["row_id"]]
    return wide


def version_changes(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows of the same adapter on the same case, dtype and quantity, machine and device whose verdict differs
    between the framework versions that computed them (a merge of runs before and after an upgrade keeps each
    version's rows): one line each, the versions and their outcomes in run order, oldest first."""
    columns = ["machine", "device", "adapter", "row_id", "case", "dtype", "quantity", "versions", "outcomes"]
    if rows.empty or "framework_version" not in rows:
        return pd.DataFrame(columns=columns)
    place = ["machine", "device", "row_id"]
    again = rows[rows.duplicated(place, keep=False)]  # a merge keeps a row id twice on a place only per version
    if again.empty:
        return pd.DataFrame(columns=columns)
    named = again["divergence"].notna()
    again = again.assign(device=again["device"].fillna(""), _version=again["framework_version"].fillna("not recorded"),
                         _outcome=again["status"].where(~named, again["status"] + " (" + again["divergence"] + ")"))
    changed = again[again.groupby(place, sort=False)["_outcome"].transform("nunique") > 1]
    joined = lambda values: " → ".join(values)  # in the rows' order: the runs', oldest first
    table = changed.groupby(place, sort=False).agg(
        adapter=("adapter", "last"), case=("case", "last"), dtype=("dtype", "last"), quantity=("quantity", "last"),
        versions=("_version", joined), outcomes=("_outcome", joined))
    return table.reset_index()[columns]


def _facts(value) -> dict:
    return dict(value) if isinstance(value, dict) else {}


def flat_machine_facts(facts: dict) -> dict:
    """A run's machine facts as flat name -> value (the kernel variables one by one, as ``env NAME``)."""
    out = {k: v for k, v in (facts or {}).items() if k != "environment"}
    if isinstance(out.get("isa"), list):
        out["isa"] = frozenset(out["isa"])
    out.update({f"env {k}": v for k, v in ((facts or {}).get("environment") or {}).items()})
    return out


def fact_differences(by_place: dict[str, dict]) -> str:
    """The facts whose values differ between places, named: "tf_onednn: a true, b false"; an ISA set as what
    each place lacks; "" when none differ (or only one place recorded facts)."""
    if len(by_place) < 2:
        return ""
    names = sorted(set().union(*by_place.values()),
                   key=lambda n: (n != "framework_version", n != "tf_onednn", n.startswith("env "), n))
    out = []
    for name in names:
        values = {place: facts.get(name) for place, facts in by_place.items()}
        if len({repr(sorted(v) if isinstance(v, frozenset) else v) for v in values.values()}) < 2:
            continue
        if all(isinstance(v, frozenset) for v in values.values()):
            union = frozenset().union(*values.values())
            out.append(f"{name}: " + "; ".join(f"{p} lacks {' '.join(sorted(union - v))}" for p, v in values.items()
                                               if union - v))
        else:
            unset = "unset" if name.isupper() or name.startswith("env ") else "not recorded"
            out.append(f"{name}: " + ", ".join(f"{p} {unset if v is None else _fact_value(v)}"
                                               for p, v in values.items()))
    return "; ".join(out)


def facts_text(facts) -> str:
    """A row's facts as "name=value, ..." (booleans in lower case)."""
    return ", ".join(f"{k}={_fact_value(v)}" for k, v in sorted(_facts(facts).items()))


def _fact_value(value) -> str:
    return "not recorded" if value is None else str(value).lower() if isinstance(value, bool) else _text(value)


def machine_facts_table(conformance: Conformance | None) -> pd.DataFrame:
    """Per machine, the facts its run recorded that choose kernels: CPU, ISA set, vector width, numpy's BLAS,
    threads, the kernel variables set and the kernel switches forced."""
    columns = ["machine", "cpu_model", "isa", "vector_bits", "numpy_blas", "cpu_threads", "environment", "switches"]
    parts = (conformance.parts or [conformance]) if conformance is not None else []
    out = []
    for part in parts:
        facts = part.meta.get("machine_facts") or {}
        if not facts:
            continue
        out.append({"machine": part.machine, "cpu_model": facts.get("cpu_model"), "isa": " ".join(facts.get("isa") or []),
                    "vector_bits": facts.get("vector_bits"), "numpy_blas": facts.get("numpy_blas"),
                    "cpu_threads": facts.get("cpu_threads"),
                    "environment": ", ".join(f"{k}={v}" for k, v in (facts.get("environment") or {}).items()),
                    "switches": ", ".join(f"{k}={v}" for k, v in (part.meta.get("switches") or {}).items())})
    return pd.DataFrame(out, columns=columns).drop_duplicates().reset_index(drop=True)


def machine_facts_map(conformance: Conformance | None) -> dict:
    """{machine: the machine facts its run recorded}."""
    parts = (conformance.parts or [conformance]) if conformance is not None else []
    return {part.machine: part.meta.get("machine_facts") or {} for part in parts}


def kernel_facts(rows: pd.DataFrame) -> pd.DataFrame:
    """Per machine and adapter, the kernel facts its rows were computed under (one line per distinct set)."""
    columns = ["machine", "adapter", "facts", "rows"]
    if rows.empty or "facts" not in rows:
        return pd.DataFrame(columns=columns)
    text = rows["facts"].map(facts_text)
    found = rows.assign(facts=text)[text != ""]
    if found.empty:
        return pd.DataFrame(columns=columns)
    return found.groupby(["machine", "adapter", "facts"]).size().rename("rows").reset_index()[columns]


def portability(conformance: Conformance | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per machine and switch setting: rows, changed, fail, error, stale; every row whose verdict changed) from
    the portability tables ``conform --switches`` wrote."""
    settings_columns = ["machine", "switch", "setting", "variable", "value", "adapters", "rows", "changed", "fail",
                        "error", "stale", "changed_by_adapter", "warnings"]
    change_columns = ["machine", "switch", "setting", "adapter", "row_id", "area", "dtype", "quantity", "own_choice",
                      "switched", "facts"]
    parts = (conformance.parts or [conformance]) if conformance is not None else []
    settings, changes = [], []
    for part in parts:
        table = part.portability or {}
        found = table.get("changes") or []
        for s in table.get("settings") or []:
            per = Counter(c.get("adapter") for c in found if (c.get("switch"), c.get("setting")) ==
                          (s.get("switch"), s.get("setting")))
            settings.append({**{k: s.get(k) for k in settings_columns}, "machine": part.machine,
                             "adapters": ", ".join(s.get("adapters") or []), "stale": ", ".join(s.get("stale") or []),
                             "changed_by_adapter": ", ".join(f"{a} {n}" for a, n in sorted(per.items())),
                             "warnings": "; ".join(s.get("warnings") or [])})
        changes += [{**{k: c.get(k) for k in change_columns}, "machine": part.machine} for c in found]
    return pd.DataFrame(settings, columns=settings_columns), pd.DataFrame(changes, columns=change_columns)


# --- benchmarks ---------------------------------------------------------------------------------

def fit_exponent(lengths, values) -> float:
    """The exponent of the power law fitted over the largest lengths (``mhabench.plausibility.power_fit``)."""
    return plausibility.power_fit(lengths, values).exponent


def series_label(record) -> str:
    """One line per adapter (+ mode when it is not the plain eager one)."""
    adapter, mode = str(record["adapter"]), record.get("mode")
    return adapter if mode in (None, "", "eager") or (isinstance(mode, float) and math.isnan(mode)) \
        else f"{adapter} ({mode})"


def attention_results(benchmarks: Benchmarks | None) -> pd.DataFrame:
    """The measured attention benchmarks (those parametrised by adapter), with a line label.

    asv keeps a slot for every combination of the grid; the ones not run here, skipped or failed
    are NaN and left out (the skip log says why).
    """
    if benchmarks is None or benchmarks.results.empty:
        return pd.DataFrame()
    frame = benchmarks.results
    frame = frame[frame["adapter"].notna() & frame["seq_len"].notna() & np.isfinite(frame["value"])
                  & ~frame["class"].map(results.is_accuracy)].copy()  # accuracy has a section of its own
    if frame.empty:
        return frame
    frame["series"] = frame.apply(series_label, axis=1)
    if frame["machine"].nunique() > 1:  # one line per machine x adapter
        frame["series"] = frame["machine"].astype(str) + ": " + frame["series"]
    frame["seq_len"] = pd.to_numeric(frame["seq_len"], errors="coerce")
    frame["num_heads"] = pd.to_numeric(frame["num_heads"], errors="coerce")
    return frame


def default_heads(frame: pd.DataFrame) -> float:
    """The head count of the L sweep: the one measured at the most sequence lengths."""
    finite = frame[np.isfinite(frame["value"])]
    source = finite if not finite.empty else frame
    per_heads = source.groupby("num_heads")["seq_len"].nunique()
    if per_heads.empty:
        return math.nan
    best = per_heads.max()
    return float(min(h for h, n in per_heads.items() if n == best))


def sweep(frame: pd.DataFrame, klass: str, method: str, device: str | None = None) -> pd.DataFrame:
    """The L sweep of one benchmark: rows at the default head count."""
    part = frame[(frame["class"] == klass) & (frame["method"] == method)]
    if device is not None:
        part = part[part["device"] == device]
    if part.empty:
        return part
    heads = default_heads(part)
    return part[part["num_heads"] == heads].sort_values(["series", "seq_len"])


def heads_sweep(frame: pd.DataFrame, klass: str, method: str) -> pd.DataFrame:
    """Rows at the largest L measured with more than one head count."""
    part = frame[(frame["class"] == klass) & (frame["method"] == method) & np.isfinite(frame["value"])]
    if part.empty:
        return part
    per_length = part.groupby("seq_len")["num_heads"].nunique()
    lengths = per_length[per_length > 1]
    if lengths.empty:
        return part.iloc[0:0]
    return part[part["seq_len"] == lengths.index.max()].sort_values(["series", "num_heads"])


QUANTITY = {"time_forward": "time", "time_forward_backward": "time", "track_peakmem_forward": "memory",
            "track_peakmem_forward_backward": "memory"}


def _points(line: pd.DataFrame) -> list:
    """The line's finite points, each with its samples' quartiles where asv gives them."""
    cols = [line[c] if c in line else pd.Series([math.nan] * len(line), index=line.index)
            for c in ("q25", "q75")]
    return [plausibility.Point(int(L), float(v), float(lo) if lo == lo else math.nan, float(hi) if hi == hi else math.nan)
            for L, v, lo, hi in zip(line["seq_len"], line["value"], *cols) if v == v and v > 0]


def _holds_scores(line: pd.DataFrame):
    if "holds_scores" not in line:
        return None
    known = [v for v in line["holds_scores"] if isinstance(v, (bool, np.bool_))]
    return bool(known[0]) if known else None


def scaling_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per benchmark and line: the power law fitted over its largest lengths (exponent, residual, how well it
    fits), the value at the largest L, and the plausibility rules the line breaks (``mhabench.plausibility``),
    with the numbers and whether its points were measured again before."""
    columns = ["class", "method", "device", "machine", "series", "adapter", "mode", "num_heads", "points", "L_min",
               "L_max", "exponent", "fit_residual", "fit", "widest_spread", "value_at_L_max", "unit", "kernel",
               "family", "implausible", "remeasured"]
    if frame.empty:
        return pd.DataFrame(columns=columns)
    out = []
    for (klass, method), part in frame.groupby(["class", "method"], sort=True):
        if method.startswith("track_gflops"):
            continue
        for device, by_device in part.groupby("device", dropna=False):
            rows = sweep(by_device, klass, method)
            for series, line in rows.groupby("series", sort=True):
                finite = line[np.isfinite(line["value"])]
                largest = finite.loc[finite["seq_len"].idxmax()] if not finite.empty else None
                quantity = QUANTITY.get(method)
                if quantity:
                    fit, breaches = plausibility.check(_points(finite), quantity, _holds_scores(line))
                else:
                    fit, breaches = plausibility.power_fit(finite["seq_len"], finite["value"]), []
                again = line[line["remeasured_rule"].notna()] if "remeasured_rule" in line else line.iloc[0:0]
                out.append({
                    "class": klass, "method": method, "device": device, "machine": line["machine"].iloc[0],
                    "series": series, "adapter": line["adapter"].iloc[0],
                    "kernel": line["kernel"].iloc[0] if "kernel" in line else results.DEFAULT_KERNEL,
                    "family": line["family"].iloc[0] if "family" in line else None,
                    "mode": line["mode"].iloc[0],
                    "num_heads": line["num_heads"].iloc[0], "points": len(finite),
                    "L_min": finite["seq_len"].min() if len(finite) else math.nan,
                    "L_max": finite["seq_len"].max() if len(finite) else math.nan,
                    "exponent": fit.exponent, "fit_residual": fit.residual, "fit": fit.quality,
                    "widest_spread": widest_spread(finite),
                    "value_at_L_max": largest["value"] if largest is not None else math.nan,
                    "unit": line["unit"].iloc[0],
                    "implausible": "; ".join(f"{b.rule}: {b.detail}" for b in breaches),
                    "remeasured": ", ".join(f"L={int(r['seq_len'])} (was {format_value(r['remeasured_before'], r['unit'])})"
                                            for r in again.to_dict("records")),
                })
    return pd.DataFrame(out, columns=columns)


def verify_ratios(frame: pd.DataFrame) -> pd.DataFrame:
    """Per time point measured with ``mhabench bench --verify``: the suite's figure over the median of the plain
    timings of the same call (one after each of the suite's samples, in the same process), and the median of
    the ratios of each sample to the plain call right after it, which a shared machine's changing load does not
    move; flagged outside ``plausibility.VERIFY_RANGE`` (the paired ratio where recorded)."""
    columns = ["class", "device", "series", "L", "suite", "plain", "ratio", "paired_ratio", "samples",
               "plain_samples", "flag"]
    if frame.empty or "verify_median" not in frame:
        return pd.DataFrame(columns=columns)
    timed = frame[frame["method"].isin(["time_forward", "time_forward_backward"]) & frame["verify_median"].notna()]
    low, high = plausibility.VERIFY_RANGE
    out = []
    for record in timed.to_dict("records"):
        hand = float(record["verify_median"])
        ratio = record["value"] / hand if hand > 0 else math.nan
        paired = record.get("verify_paired_ratio")
        paired = float(paired) if paired is not None and paired == paired else math.nan
        judged = paired if math.isfinite(paired) else ratio
        out.append({"class": record["class"], "device": record["device"], "series": record["series"],
                    "L": int(record["seq_len"]), "suite": record["value"], "plain": hand, "ratio": ratio,
                    "paired_ratio": paired, "samples": record.get("repeat"),
                    "plain_samples": record.get("verify_samples"),
                    "flag": "" if low <= judged <= high else f"outside [{low}, {high}]",
                    "method": record["method"]})
    table = pd.DataFrame(out, columns=columns + ["method"])
    if table.empty:
        return table
    return table.assign(_o=table["class"].map(class_rank)).sort_values(["_o", "series", "method", "L"]) \
        .drop(columns="_o").reset_index(drop=True)


def widest_spread(line: pd.DataFrame) -> float:
    """The line's noisiest point: its interquartile range over its median (nan where no point has one)."""
    if not {"q25", "q75"} <= set(line) or line.empty:
        return math.nan
    spread = (line["q75"].astype(float) - line["q25"].astype(float)) / line["value"].astype(float)
    spread = spread[np.isfinite(spread)]
    return float(spread.max()) if not spread.empty else math.nan


def flagged_lines(scaling: pd.DataFrame) -> set:
    """(class, method, device, series) of every line that breaks a plausibility rule."""
    if scaling.empty:
        return set()
    bad = scaling[scaling["implausible"].astype(str) != ""]
    return set(zip(bad["class"], bad["method"], bad["device"], bad["series"]))


def without_flagged(frame: pd.DataFrame, flagged: set) -> pd.DataFrame:
    """The rows of lines that break no plausibility rule (what a verdict may quote)."""
    if frame.empty or not flagged:
        return frame
    keep = [(c, m, d, s) not in flagged for c, m, d, s in zip(frame["class"], frame["method"], frame["device"],
                                                               frame["series"])]
    return frame[keep]


def gemm_peaks(benchmarks: Benchmarks | None) -> dict:
    """(machine, device) -> that machine's GEMM GFLOP/s: the best of Machine.track_gemm_gflops and the peaks
    measured before and after each benchmark chunk (background work only ever lowers a GEMM rate)."""
    if benchmarks is None or benchmarks.results.empty:
        return {}
    frame = benchmarks.results
    peak = frame[(frame["method"] == "track_gemm_gflops") & np.isfinite(frame["value"])]
    result = {}
    measured = [{"machine": r["machine"], "device": r.get("device") or r.get("param0") or "cpu", "gflops": r["value"]}
                for r in peak.to_dict("records")] + list(getattr(benchmarks, "peaks", []))
    for record in measured:
        key = (str(record["machine"]), str(record["device"]))
        result[key] = max(result.get(key, 0.0), float(record["gflops"]))
    return result


def peak_label(key: tuple[str, str], peaks: dict) -> str:
    """A peak's name: the device alone on one machine, "machine device" across several."""
    return key[1] if len({m for m, _ in peaks}) <= 1 else f"{key[0]} {key[1]}"


FAULT = "measurement fault: {value:.0%} of the GEMM peak (the peak was measured low); not a result"


def peak_fraction(frame: pd.DataFrame, peaks: dict) -> pd.DataFrame:
    """Per GFLOP/s benchmark and line: best and largest-L GFLOP/s, and their fraction of its machine's GEMM peak.

    A fraction above 1 cannot be a result (nothing beats the machine's GEMM); it is blanked and named a
    measurement fault in ``fault``."""
    columns = ["class", "method", "device", "machine", "series", "adapter", "mode", "num_heads", "L_max",
               "gflops_at_L_max", "best_gflops", "gemm_peak_gflops", "fraction_at_L_max", "best_fraction", "fault"]
    if frame.empty:
        return pd.DataFrame(columns=columns)
    out = []
    flops = frame[frame["method"].str.startswith("track_gflops")]
    for (klass, method), part in flops.groupby(["class", "method"], sort=True):
        for device, by_device in part.groupby("device", dropna=False):
            rows = sweep(by_device, klass, method)
            for series, line in rows.groupby("series", sort=True):
                finite = line[np.isfinite(line["value"])]
                if finite.empty:
                    continue
                machine = str(line["machine"].iloc[0])
                peak = peaks.get((machine, str(device)), math.nan)
                largest = finite.loc[finite["seq_len"].idxmax()]
                best = float(finite["value"].max())
                at_max = float(largest["value"]) / peak if peak and peak > 0 else math.nan
                best_fraction = best / peak if peak and peak > 0 else math.nan
                fault = FAULT.format(value=best_fraction) if best_fraction > 1 else ""
                out.append({
                    "class": klass, "method": method, "device": device, "machine": machine, "series": series,
                    "adapter": line["adapter"].iloc[0], "mode": line["mode"].iloc[0],
                    "num_heads": line["num_heads"].iloc[0], "L_max": largest["seq_len"],
                    "gflops_at_L_max": float(largest["value"]), "best_gflops": best, "gemm_peak_gflops": peak,
                    "fraction_at_L_max": math.nan if fault else at_max,
                    "best_fraction": math.nan if fault else best_fraction, "fault": fault,
                })
    return pd.DataFrame(out, columns=columns)


def chart_id(klass: str, device, what: str) -> str:
    """The page anchor of one chart, so a summary row can link to it."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", f"chart-{klass}-{device}-{what}")


def scaling_winners(frame: pd.DataFrame, flagged: set = frozenset()) -> pd.DataFrame:
    """Per class, device and L of the forward sweep: the fastest and the leanest line, among those measured that
    break no plausibility rule (``flagged``)."""
    columns = ["class", "device", "L", "fastest", "time", "leanest", "memory", "lines", "chart"]
    if frame.empty:
        return pd.DataFrame(columns=columns)
    out = {}
    for what, method in (("time", "time_forward"), ("memory", "track_peakmem_forward")):
        for (klass, device), part in frame.groupby(["class", "device"], sort=False, dropna=False):
            rows = without_flagged(sweep(part, klass, method), flagged)
            rows = rows[np.isfinite(rows["value"])] if not rows.empty else rows
            for length, at_length in rows.groupby("seq_len"):
                best = at_length.loc[at_length["value"].idxmin()]
                record = out.setdefault((klass, device, length), {
                    "class": klass, "device": device, "L": int(length), "fastest": "", "time": math.nan,
                    "leanest": "", "memory": math.nan, "lines": 0, "chart": chart_id(klass, device, "time")})
                record["fastest" if what == "time" else "leanest"] = best["series"]
                record[what] = float(best["value"])
                record["lines"] = max(record["lines"], int(at_length["series"].nunique()))
    table = pd.DataFrame(list(out.values()), columns=columns)
    return table.assign(_o=table["class"].map(class_rank)).sort_values(["_o", "class", "device", "L"]) \
        .drop(columns="_o").reset_index(drop=True)


def class_rank(klass: str) -> int:
    """Self, causal, cross: the order a reader meets them in; any other class after."""
    order = ("SelfAttention", "CausalSelfAttention", "CrossAttention")
    return order.index(klass) if klass in order else len(order)


def scaling_lines(scaling: pd.DataFrame, fraction: pd.DataFrame) -> pd.DataFrame:
    """Per class, device and line: fitted time and memory exponents with the residual of each fit and how well a
    power law fits, the fraction of peak at the largest L, and the plausibility rules the line breaks."""
    columns = ["class", "device", "series", "L_max", "time_exponent", "time_fit_residual", "time_fit",
               "time_widest_spread", "memory_exponent", "memory_fit_residual", "memory_fit", "memory_widest_spread",
               "fraction_of_peak_at_L_max", "fault", "implausible", "remeasured", "chart", "kernel", "family"]
    if scaling.empty:
        return pd.DataFrame(columns=columns)
    out = {}
    for record in scaling.to_dict("records"):
        what = {"time_forward": "time", "track_peakmem_forward": "memory"}.get(record["method"])
        if what is None:
            continue
        line = out.setdefault((record["class"], record["device"], record["series"]), {
            "class": record["class"], "device": record["device"], "series": record["series"],
            "kernel": record.get("kernel"), "family": record.get("family"), "L_max": math.nan,
            "time_exponent": math.nan, "time_fit_residual": math.nan, "time_fit": "", "time_widest_spread": math.nan,
            "memory_exponent": math.nan, "memory_fit_residual": math.nan, "memory_fit": "",
            "memory_widest_spread": math.nan,
            "fraction_of_peak_at_L_max": math.nan, "fault": "", "implausible": "", "remeasured": "",
            "chart": chart_id(record["class"], record["device"], "time")})
        line[f"{what}_exponent"] = record["exponent"]
        line[f"{what}_fit_residual"] = record["fit_residual"]
        line[f"{what}_fit"] = record["fit"]
        line[f"{what}_widest_spread"] = record["widest_spread"]
        for column in ("implausible", "remeasured"):
            if record.get(column):
                line[column] = "; ".join(filter(None, [line[column], f"{what}: {record[column]}"]))
        line["L_max"] = np.nanmax([line["L_max"], record["L_max"]])
    for record in fraction[fraction["method"] == "track_gflops_forward"].to_dict("records") if not fraction.empty \
            else []:
        line = out.get((record["class"], record["device"], record["series"]))
        if line is not None:
            line["fraction_of_peak_at_L_max"] = record["fraction_at_L_max"]
            line["fault"] = record["fault"]
    table = pd.DataFrame(list(out.values()), columns=columns)
    return table.assign(_o=table["class"].map(class_rank)).sort_values(["_o", "class", "device", "series"]) \
        .drop(columns="_o").reset_index(drop=True)


def headline(frame: pd.DataFrame, klass: str = "SelfAttention", flagged: set = frozenset()) -> dict:
    """The fastest and leanest line at the largest L of the forward sweep, among the lines measured there that
    break no plausibility rule (``flagged``: see :func:`flagged_lines`); ``excluded`` counts the others."""
    result = {}
    for key, method in (("fastest", "time_forward"), ("leanest", "track_peakmem_forward")):
        rows = sweep(frame, klass, method) if not frame.empty else frame
        rows = rows[np.isfinite(rows["value"])] if not rows.empty else rows
        if rows.empty:
            continue
        largest = rows["seq_len"].max()
        at_largest = rows[rows["seq_len"] == largest]
        plausible = without_flagged(at_largest, flagged)
        if plausible.empty:
            continue
        best = plausible.loc[plausible["value"].idxmin()]
        result[key] = {"series": best["series"], "seq_len": int(largest), "value": float(best["value"]),
                       "unit": best["unit"], "num_heads": best["num_heads"],
                       "lines": int(plausible["series"].nunique()),
                       "excluded": int(at_largest["series"].nunique() - plausible["series"].nunique())}
    return result


# ---- accuracy: error against L (benchmarks.accuracy) ---------------------------------------------------
DTYPE_ORDER = ("float32", "float16", "bfloat16")
FASTER_GROWTH = 0.2  # an error exponent this far above the reference's grows faster than a plain implementation


def accuracy_class_rank(klass: str) -> int:
    """Self, causal, then their peaky twins (``results.ACCURACY_CLASSES``); any other class after."""
    order = results.ACCURACY_CLASSES
    return order.index(klass) if klass in order else len(order)


def accuracy_series(record) -> str:
    return f"{series_label(record)} {record['dtype']}"


def accuracy_lines(accuracy: pd.DataFrame) -> pd.DataFrame:
    """Per class, device and line (adapter x mode x dtype), at the line's largest L: the three figures, the
    same-precision reference's RMS error and the ratios to it, and the power laws fitted to the RMS error and to
    the reference's (``plausibility.power_fit``: over the three largest lengths), ranked by RMS error within
    each class and dtype. ``grows_faster``: the error's exponent exceeds the reference's by ``FASTER_GROWTH``."""
    columns = ["class", "device", "dtype", "rank", "series", "adapter", "mode", "kernel", "family", "points",
               "L_max", "max_rel_error", "rms_error", "sum_error", "reference_rms_error", "ratio_rms_error",
               "ratio_max_rel_error", "exponent", "reference_exponent", "ratio_exponent", "grows_faster",
               "grad_L_max", "grad_rel_rms_error", "ratio_grad_rel_rms_error"]
    ok = accuracy[(accuracy["status"] == "ok") & np.isfinite(accuracy["rms_error"].astype(float))] \
        if not accuracy.empty else accuracy
    if ok.empty:
        return pd.DataFrame(columns=columns)
    out = []
    for (klass, device, adapter, mode, dtype), line in ok.groupby(["class", "device", "adapter", "mode", "dtype"],
                                                                  sort=True, dropna=False):
        line = line.sort_values("seq_len")
        last = line.iloc[-1]
        fit = plausibility.power_fit(line["seq_len"], line["rms_error"])
        reference = plausibility.power_fit(line["seq_len"], line["reference_rms_error"])
        ratio = plausibility.power_fit(line["seq_len"], line["ratio_rms_error"])
        faster = math.isfinite(fit.exponent) and math.isfinite(reference.exponent) and \
            fit.exponent - reference.exponent > FASTER_GROWTH
        graded = line[np.isfinite(line["grad_rel_rms_error"].astype(float))] if "grad_rel_rms_error" in line \
            else line.iloc[0:0]
        grad = graded.iloc[-1] if not graded.empty else None
        out.append({"class": klass, "device": device, "dtype": dtype, "series": accuracy_series(last),
                    "adapter": adapter, "mode": mode, "kernel": last["kernel"], "family": last["family"],
                    "points": len(line), "L_max": int(last["seq_len"]),
                    **{k: float(last[k]) for k in ("max_rel_error", "rms_error", "sum_error", "reference_rms_error",
                                                    "ratio_rms_error", "ratio_max_rel_error")},
                    "exponent": fit.exponent, "reference_exponent": reference.exponent,
                    "ratio_exponent": ratio.exponent, "grows_faster": "yes" if faster else "",
                    "grad_L_max": int(grad["seq_len"]) if grad is not None else math.nan,
                    "grad_rel_rms_error": float(grad["grad_rel_rms_error"]) if grad is not None else math.nan,
                    "ratio_grad_rel_rms_error": float(grad["ratio_grad_rel_rms_error"]) if grad is not None
                    else math.nan})
    frame = pd.DataFrame(out)
    frame["_class"] = frame["class"].map(accuracy_class_rank)
    frame["_dtype"] = frame["dtype"].map(lambda d: DTYPE_ORDER.index(d) if d in DTYPE_ORDER else len(DTYPE_ORDER))
    frame = frame.sort_values(["_class", "device", "_dtype", "L_max", "rms_error"], ascending=[True, True, True, False,
                                                                                               True])
    frame["rank"] = frame.groupby(["_class", "device", "_dtype", "L_max"]).cumcount() + 1
    return frame.drop(columns=["_class", "_dtype"])[columns].reset_index(drop=True)


def accuracy_skips(accuracy: pd.DataFrame) -> pd.DataFrame:
    """The dtypes an adapter did not run, and the measurements that failed, once per adapter, dtype and reason."""
    columns = ["adapter", "mode", "dtype", "status", "reason", "classes", "lengths"]
    if accuracy.empty:
        return pd.DataFrame(columns=columns)
    rest = accuracy[accuracy["status"] != "ok"]
    if rest.empty:
        return pd.DataFrame(columns=columns)
    grouped = rest.groupby(["adapter", "mode", "dtype", "status", "reason"], dropna=False)
    return grouped.agg(classes=("class", lambda c: ", ".join(sorted(set(c)))),
                       lengths=("seq_len", "nunique")).reset_index()[columns]
