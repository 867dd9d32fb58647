"""A conformance session: what to run, running it into a results directory, and what came of it.

The CLI (``mhabench conform``) and the pytest view (``conformance/conftest.py``) both build their
session here, so an option means the same in both: the adapters (built-in and plugin alike), the
dtypes, the areas, the reduced matrix and the random cases.
"""
from __future__ import annotations

import math
import shlex
import time
from dataclasses import dataclass, field

from mhabench import impls, results, shards
from mhabench.impls import registry
from mhabench.options import SelectionError, broken_plugins, load_plugins, runnable_adapters, split_list  # noqa: F401
from mhabench.progress import Tally
from mhabench.schema import AREAS, DTYPES, Area, Row, RowId

from . import budget as budget_mod
from . import catalogue as catalogue_mod
from . import schedule
from .cases import AnyCase, default_cases, find_case, random_cases, select
from .runner import default_jobs, expected_row_ids, planned_tasks, run_rows

DEFAULT_EXAMPLES = 25
WRAP_UP_S = 5.0  # a budgeted run's last seconds: reading the journal back, the catalogue check, results.json/csv
SELECTABLE_AREAS = tuple(a for a in AREAS if a != Area.PLUGIN)


@dataclass
class Plan:
    """What a session runs: adapters x cases x dtypes, or one shard of that (``include``)."""

    adapters: list[str]
    cases: list[AnyCase]
    dtypes: list[str]
    adhoc: list[str] = field(default_factory=list)
    full_matrix: bool = False  # every default case in every dtype: only then can an entry be stale for absence
    shard: tuple[int, int] | None = None  # (K, N): this run is shard K of N
    include: set | None = None  # the (adapter, case id, dtype) tasks of that shard; None: every task
    reduced: dict = field(default_factory=dict)  # adapter -> why it runs only the reduced (quick) matrix
    switches: dict = field(default_factory=dict)  # kernel switch -> setting, set in the workers it reaches
    options: dict = field(default_factory=dict)  # the selection as given (make_plan's arguments): rest_command's
    budget: dict | None = None  # under a time budget: its seconds, projections and what was not run (plan.json)

    def tasks(self) -> list[tuple[str, AnyCase, str]]:
        """(adapter, case, dtype) of every task this plan runs."""
        return [(a, c, d) for a in self.adapters for c in self.cases for d in c.run_dtypes(self.dtypes)
                if self.include is None or (a, c.id, d) in self.include]

    def rows_by_adapter(self) -> dict[str, int]:
        """Rows planned per adapter (the progress display's totals)."""
        out = {a: 0 for a in self.adapters}
        for a, c, d in self.tasks():
            out[a] += len(c.quantities())
        return out

    @property
    def rows(self) -> int:
        return sum(self.rows_by_adapter().values())

    @property
    def rows_all_shards(self) -> int:
        return sum(len(expected_row_ids(a, c, self.dtypes)) for a in self.adapters for c in self.cases
                   if a not in self.reduced or c.quick)

    def to_dict(self) -> dict:
        out = {"adapters": self.adapters, "dtypes": self.dtypes, "cases": len(self.cases), "rows": self.rows,
               "full_matrix": self.full_matrix, "adhoc": self.adhoc}
        if self.shard is not None:  # the report names a missing shard from these
            out.update(shard=list(self.shard), rows_all_shards=self.rows_all_shards)
        if self.reduced:
            out["reduced"] = dict(self.reduced)
        if self.switches:
            out["switches"] = dict(self.switches)
        if self.budget is not None:
            out["budget"] = dict(self.budget)
        return out


def make_plan(adapters=None, dtypes=None, areas=None, *, quick=False, examples=DEFAULT_EXAMPLES, adhoc=(),
              default_dtypes=DTYPES, shard=None, every_case=False, switches=(), timeout: float | None = None) -> Plan:
    """The session to run. ``adapters``, ``dtypes`` and ``areas`` are comma-separated strings or None.

    ``--adapters`` selects among every registered adapter, built-in and ``--adapter`` plugins alike;
    without it, every installed adapter runs (plugins named with ``--adapter`` included). ``shard``
    ("K/N" or (K, N)) keeps part K of N of the tasks, split by their prior cost (``schedule``), the same
    on every machine given the same selection.

    An adapter that declares ``reduced_matrix`` (each new shape costs it a compilation or an export of
    seconds) runs only the reduced matrix's cases (``quick``) unless ``every_case``; the plan records why.
    ``switches`` ("name=setting" strings, ``--switch``) are kernel switches some selected adapter declares.
    ``timeout``: seconds the ``adhoc`` plugins' interface checks may take (``--timeout``), each in a worker.
    """
    if shard is not None and not isinstance(shard, tuple):
        shard = shards.parse(shard)
    if not isinstance(examples, int) or isinstance(examples, bool) or examples < 0:
        raise SelectionError(f"--examples must be an integer >= 0, got {examples!r}")
    plugin_names = load_plugins(adhoc, timeout)
    chosen = split_list(adapters, registry.list_adapters(), "adapter", "--adapters")
    if chosen is None:
        chosen = runnable_adapters(plugin_names)
    dtype_list = split_list(dtypes, DTYPES, "dtype", "--dtypes") or list(default_dtypes)
    area_list = split_list(areas, SELECTABLE_AREAS, "area", "--areas")
    matrix = default_cases() + (random_cases(examples) if area_list is None or "random" in area_list else [])
    matrix = select(matrix, area_list, quick=quick)
    full = not quick and area_list is None and set(dtype_list) == set(DTYPES)
    plan = Plan(chosen, matrix, dtype_list, list(adhoc), full, switches=parse_switches(switches, chosen),
                options={"adapters": adapters, "dtypes": dtypes, "areas": areas, "quick": quick, "examples": examples,
                         "every_case": every_case})
    if not quick and not every_case:
        plan.reduced = {a: why for a in chosen if (why := getattr(registry.get_adapter(a), "reduced_matrix", None))}
    if plan.reduced:
        plan.include = {(a, c.id, d) for a in chosen for c in matrix for d in c.run_dtypes(dtype_list)
                        if a not in plan.reduced or c.quick}
    if shard is not None:
        plan.shard = shard
        plan.include = shard_tasks(plan, shard) if plan.include is None else shard_tasks(plan, shard) & plan.include
    return plan


def declared_switches(adapters) -> list:
    """The kernel switches the adapters declare (``Adapter.switches``), each once, in order."""
    found: dict = {}
    for name in adapters:
        for switch in registry.get_adapter(name).switches():
            found.setdefault(switch.name, switch)
    return list(found.values())


def parse_switches(texts, adapters) -> dict[str, str]:
    """{switch: setting} from "name=setting" strings; SelectionError naming what the adapters declare."""
    from mhabench.impls import facts
    out: dict[str, str] = {}
    for text in texts or ():
        try:
            switch, setting = facts.parse_setting(text, declared_switches(adapters))
        except ValueError as exc:
            raise SelectionError(str(exc)) from None
        if switch.name in out and out[switch.name] != setting:
            raise SelectionError(f"--switch {switch.name} given twice ({out[switch.name]} and {setting})")
        out[switch.name] = setting
    return out


def switch_warnings(plan: Plan, rows) -> list[str]:
    """A line for every forced setting the rows' facts do not show (the framework ignored it, or this CPU
    cannot run it and the framework fell back to what it can)."""
    lines = []
    for switch in declared_switches(plan.adapters):
        setting = plan.switches.get(switch.name)
        if setting is None:
            continue
        seen = {(r.adapter, repr(r.facts.get(switch.fact))) for r in rows if r.facts
                and switch in registry.get_adapter(r.adapter).switches()}
        expected = repr(switch.expect[setting])
        for adapter, got in sorted(seen):
            if got != expected:
                lines.append(f"--switch {switch.name}={setting} ({switch.variable}={switch.value(setting)}): "
                             f"{adapter} reports {switch.fact} = {got}, not {expected}")
    return lines


def rest_command(plan: Plan, results_dir) -> str:
    """The command that runs what a budgeted run of ``plan`` left out: the same selection, resumed."""
    o = plan.options
    words = ["mhabench", "conform", "--resume", "--results", str(results_dir)]
    for option, value in (("--adapters", o.get("adapters")), ("--dtypes", o.get("dtypes")), ("--areas", o.get("areas"))):
        if value:
            words += [option, ",".join(v.strip() for v in str(value).split(",") if v.strip())]
    words += ["--quick"] if o.get("quick") else []
    words += ["--every-case"] if o.get("every_case") else []
    if o.get("examples", DEFAULT_EXAMPLES) != DEFAULT_EXAMPLES and not o.get("quick"):
        words += ["--examples", str(o["examples"])]
    words += [f"--adapter={target}" for target in plan.adhoc]
    if plan.shard is not None:
        words += ["--shard", "{}/{}".format(*plan.shard)]
    return " ".join(shlex.quote(w) for w in words)


def shard_tasks(plan: Plan, shard: tuple[int, int]) -> set[tuple[str, str, str]]:
    """The (adapter, case id, dtype) tasks of shard (K, N) of ``plan``."""
    costs = schedule.prior_costs(plan.adapters, plan.cases, plan.dtypes)
    keys = {"\t".join(task): task for task in costs}
    chosen = shards.select({key: costs[task] for key, task in keys.items()}, shard)
    return {keys[key] for key in chosen}


def machine_facts(adapters) -> dict:
    """The machine's facts (``impls.facts.machine_facts``), with the kernel variables the adapters declare."""
    from mhabench.impls import facts
    names = [v for name in adapters for v in registry.get_adapter(name).kernel_environment()]
    return facts.machine_facts(names)


def versions(adapters) -> dict[str, str]:
    """Installed versions of every distribution the adapters report (package metadata, nothing imported)."""
    out = {"numpy": None, "ml_dtypes": None}
    for name in adapters:
        out.update(registry.get_adapter(name).versions())
    import importlib.metadata
    for dist in ("numpy", "ml_dtypes"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out.pop(dist)
    return {k: v for k, v in out.items() if v is not None}


# ---- running into a results directory ----------------------------------------------------------------

@dataclass
class Outcome:
    rows: list[Row]
    checks: list                       # catalogue verdicts (catalogue.EntryCheck)
    elapsed: float
    problems: list[str]                # lines of the journal that could not be read
    layout: results.Layout
    plan: Plan

    @property
    def failing(self) -> list[Row]:
        return [r for r in self.rows if r.status.failing]

    @property
    def stale(self) -> list:
        return [c for c in self.checks if c.status == "stale"]

    def summary(self) -> dict:
        return results.summarise(self.rows)


def rerun_target(row_id: str, layout: results.Layout, plan: Plan) -> tuple[str, AnyCase, str]:
    """(adapter, case, dtype) behind a row id, from the journal or by parsing it against the registry."""
    previous = {r.row_id: r for r in results.read_rows(layout.rows).rows}
    registered = registry.list_adapters()
    if row_id in previous:
        adapter, case_id, dtype = previous[row_id].task
    else:
        parsed = RowId.parse(row_id, registered)
        if parsed is None:
            raise SelectionError(f"--rerun {impls.interface.printable(row_id)}: not a row id of the form "
                                 f"adapter-case-dtype-quantity (adapters: {', '.join(registered)})")
        adapter, case_id, dtype = parsed.adapter, parsed.case, parsed.dtype
    if adapter not in registered:
        raise SelectionError(f"--rerun {row_id}: adapter {adapter!r} is not registered (pass --adapter MODULE:CLASS)")
    case = find_case(case_id, extra=plan.cases)
    if case is None:
        raise SelectionError(f"--rerun {row_id}: no case {case_id!r} in the matrix")
    return adapter, case, dtype


def run(plan: Plan, results_dir, *, resume: bool = False, rerun: str | None = None,
        timeout: float = 120.0, jobs: int | None = None, memory_budget: int | None = None,
        on_start=None, on_rows=None, warn=lambda text: None, machine: str | None = None,
        budget: float | None = None, started: float | None = None) -> Outcome:
    """Run ``plan`` into ``results_dir``: the journal as rows come, then results.json/csv and catalogue.json.

    ``resume`` keeps the journal's finished rows and runs the rest; ``rerun`` runs exactly the case
    behind one row id again (its new rows are appended and win). Otherwise the old journal is kept
    aside as rows.jsonl.prev. The durations this machine measured before (``schedule.learned_costs``) and
    the previous journal's order this run's work; this run's are kept for the next.
    ``budget``: seconds the run may take from ``started`` (a ``time.monotonic()``; default now), planned
    coverage first (``budget``); what it leaves out is recorded in plan.json's ``budget`` with the command
    that runs the rest. ``on_start(tally)`` sees the progress tally (``mhabench.progress.Tally``, whose
    ``plan`` is the plan it counts) before anything runs, ``on_rows(rows)`` each batch once the tally
    counts it, ``warn(text)`` each problem. ``machine`` names the machine in the results' meta (default:
    the host name).
    """
    started = time.monotonic() if started is None else started
    layout = results.Layout(results_dir)
    layout.conformance.mkdir(parents=True, exist_ok=True)
    try:
        entries = catalogue_mod.load()
    except ValueError as exc:
        raise SelectionError(f"divergence catalogue: {exc}") from None
    skip: set[str] = set()
    previous: list[dict] = []
    if rerun or resume:  # the rows already there were computed under the run's kernel switches: so are the new
        plan.switches = recorded_switches(layout, plan.switches)
    if rerun:
        adapter, case, dtype = rerun_target(rerun, layout, plan)
        plan = Plan([adapter], [case], [dtype], plan.adhoc, False, switches=plan.switches)
    elif resume:
        journal = results.read_rows(layout.rows)
        for problem in journal.problems:
            warn(problem)
        skip = {r.row_id for r in journal.rows}
        previous = journal.rows
    elif layout.rows.exists():
        if layout.rows.stat().st_size:  # a fresh run: the old journal is kept aside
            layout.rows.replace(layout.rows.with_suffix(".jsonl.prev"))
        else:  # a run killed before its first row: nothing to keep, and an older journal stays kept
            layout.rows.unlink()
    if not rerun and not resume:
        previous = results.read_rows(layout.rows.with_suffix(".jsonl.prev")).rows
    learned, startup = schedule.learned_costs()
    history = {**learned, **schedule.measured_costs(previous)}
    jobs = jobs or default_jobs()
    rounds, deadline, left_out = None, None, set()
    if budget and not rerun:
        chosen = plan_budget(plan, budget - (time.monotonic() - started) - WRAP_UP_S, history, startup, skip, jobs)
        rounds, deadline, left_out = chosen.rounds, started + budget - WRAP_UP_S, set(chosen.left_out)
        plan.budget.update(seconds=budget, not_run=budget_mod.not_run_rows(left_out, rows_of(plan)),
                           rest=rest_command(plan, results_dir))
    run_meta = results.meta(versions(plan.adapters), machine=machine)
    if rerun:  # the rows join the run the journal holds
        try:
            run_id = (results.read_json(layout.plan) if layout.plan.is_file() else {}).get("run")
        except (ValueError, AttributeError):
            run_id = None
    else:
        run_id = results.new_run_id()
    write_plan = lambda: results.write_json(layout.plan, {**plan.to_dict(), "run": run_id,
                                                          "meta": {**run_meta, "run": run_id}})
    if not rerun:
        write_plan()
    tally = progress_tally(plan, history, skip)
    if on_start is not None:
        on_start(tally)
    tasks = lambda include: planned_tasks(plan.adapters, plan.cases, plan.dtypes, skip, include, history, rounds)
    scheduler = schedule.Scheduler(
        tasks(plan.include), deadline=deadline, grace=budget_grace(budget), jobs=jobs, startup_ms=startup,
        extra=tasks(left_out) if left_out else [],
        on_drop=lambda task: tally.drop(task.adapter, sum(len(expected_row_ids(task.adapter, task.case, [d]))
                                                         for d in task.dtypes)))

    writer = results.RowWriter(layout.rows)

    def write(rows):
        writer.write(rows)
        for row in rows:
            tally.add(row.adapter)
        if on_rows is not None:
            on_rows(rows)
    clock_started = time.perf_counter()
    try:
        new_rows = run_rows(plan.adapters, plan.cases, plan.dtypes, timeout=timeout, jobs=jobs,
                            memory_budget=memory_budget, on_rows=write, skip=skip, adhoc=plan.adhoc,
                            include=plan.include, switches=plan.switches, scheduler=scheduler)
    finally:
        writer.close()
    elapsed = time.perf_counter() - clock_started
    schedule.remember_costs(schedule.measured_costs(new_rows), scheduler.measured_startup)
    if plan.budget is not None and not rerun:  # what ran: planned, or planned out and run after all; the rest is not
        ran = {(r.adapter, r.case, str(r.dtype)) for r in new_rows}
        offered = plan.include | left_out
        plan.include = {key for key in offered if key in ran or key not in left_out and key not in dropped_keys(
            scheduler)}
        plan.budget["not_run"] = budget_mod.not_run_rows(offered - plan.include, rows_of(plan))
        write_plan()

    journal = results.read_rows(layout.rows)
    for problem in journal.problems:
        warn(problem)
    rows = journal.latest()
    adapters_run = sorted({r.adapter for r in rows}) if rerun else plan.adapters
    # a shard holds part of the matrix: an entry showing in none of its rows may show in another shard's
    full = plan.full_matrix and plan.shard is None and not rerun
    # an adapter held to the reduced matrix cannot show every entry: its absences are not stale
    checks = entries.check(rows, [a for a in adapters_run if a not in plan.reduced], full_matrix=full)
    for line in switch_warnings(plan, rows):
        warn(line)
    results.write_results(layout.root, rows, {**results.meta(versions(adapters_run), machine=machine,
                                                             facts=machine_facts(adapters_run),
                                                             switches=plan.switches), "run": run_id})
    results.write_json(layout.catalogue, catalogue_mod.export(entries, checks))
    return Outcome(rows, checks, elapsed, journal.problems, layout, plan)


def recorded_switches(layout: results.Layout, given: dict) -> dict:
    """The kernel switches the run in ``layout`` was made with (its plan.json), which a resumed run or a rerun
    must use too; SelectionError when ``given`` (``--switch``) names others."""
    try:
        recorded = dict((results.read_json(layout.plan) or {}).get("switches") or {}) if layout.plan.is_file() else {}
    except (ValueError, TypeError, AttributeError):
        recorded = {}
    if given and recorded and given != recorded:
        raise SelectionError(f"{layout.root} was run with --switch {_switch_text(recorded)}, not "
                             f"{_switch_text(given)}: its rows would mix two machines' kernels")
    return dict(given or recorded)


def _switch_text(switches: dict) -> str:
    return " --switch ".join(f"{k}={v}" for k, v in sorted(switches.items()))


def dropped_keys(scheduler: schedule.Scheduler) -> set:
    return {(t.adapter, t.case.id, d) for t in scheduler.dropped for d in t.dtypes}


def budget_grace(budget: float | None) -> float:
    """How far past a budget's deadline a running task may go before it is stopped (and not run): a
    twentieth of the budget, so the run ends within a tenth of it."""
    return 0.05 * budget if budget else 0.0


def rows_of(plan: Plan):
    """(adapter, case id, dtype) -> the number of rows that task writes, for ``plan``'s cases."""
    cases = {c.id: c for c in plan.cases}
    return lambda key: len(expected_row_ids(key[0], cases[key[1]], [key[2]]))


def cost_model(history: dict, startup: dict):
    """(estimate_ms(adapter, case, dtype), startup_ms(adapter)): the scheduler's estimates, with what was measured."""
    memo: dict = {}
    return (lambda a, c, d: schedule.estimate_ms(a, c, d, history, _compiles=memo),
            lambda a: startup.get(a, schedule.STARTUP_MS))


def needs(plan: Plan, jobs: int | None = None) -> tuple[float, float]:
    """Seconds ``plan`` needs on this machine, by what it measured before: for its coverage (a task per adapter x
    area x dtype), and for all of it (``budget.plan``'s projections, the wrap-up included)."""
    learned, startup = schedule.learned_costs()
    chosen = budget_mod.plan(plan.tasks(), math.inf, *cost_model(learned, startup), jobs or default_jobs())
    return chosen.coverage_s + WRAP_UP_S, chosen.all_s + WRAP_UP_S


def plan_budget(plan: Plan, seconds: float, history: dict, startup: dict, skip: set,
                jobs: int) -> budget_mod.BudgetPlan:
    """Narrow ``plan`` to the tasks that fit ``seconds``, coverage first (``budget.plan``), and record the
    projections in ``plan.budget``."""
    tasks = plan.tasks()
    done = {(a, c.id, d) for a, c, d in tasks if all(r in skip for r in expected_row_ids(a, c, [d]))}
    chosen = budget_mod.plan(tasks, max(0.0, seconds), *cost_model(history, startup), jobs, done)
    plan.include = set(chosen.selected) | done
    plan.budget = {"estimated_s": round(chosen.estimated_s, 1), "coverage_s": round(chosen.coverage_s, 1),
                   "all_s": round(chosen.all_s, 1), "coverage_complete": chosen.complete_coverage}
    return chosen


def progress_tally(plan: Plan, history: dict, skip=()) -> Tally:
    """Rows planned and already done per adapter, each adapter weighted by its estimated work left."""
    planned = plan.rows_by_adapter()
    done = {a: 0 for a in planned}
    weights = {a: 0.0 for a in planned}
    memo: dict = {}
    for adapter, case, dtype in plan.tasks():
        ids = expected_row_ids(adapter, case, [dtype])
        present = sum(r in skip for r in ids)
        done[adapter] += present
        if present < len(ids):
            weights[adapter] += schedule.estimate_ms(adapter, case, dtype, history, _compiles=memo)
    return Tally(planned, weights, done, plan=plan)
