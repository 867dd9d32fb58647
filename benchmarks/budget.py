"""A benchmark sweep planned against a time budget (``mhabench bench --budget SECONDS``).

What the budget means: SECONDS of wall-clock time for the whole ``mhabench bench`` command, from its start to
its exit: asv's processes, the layers' builds and compiles, the GEMM peak and the second measurement of the
points whose line broke a plausibility rule included. The run aims at the budget and ends within 10% of it:
an asv run still going at ``HARD_STOP`` times the budget is stopped, and its points recorded as not run.

The work, in order:

1. **coverage**: every adapter gets its ``coverage_lengths`` (4) shortest lengths of every selected benchmark
   (time and memory, self and causal self-attention in the quick profile) before any adapter goes longer;
2. the accuracy benchmarks (``SelfAccuracy``, ...) at those lengths, once every adapter has its time and memory
   there (an adapter's accuracy costs a layer built per dtype, which must not cost another adapter its
   coverage);
3. the adapters whose kernel never holds the [B, H, T, S] scores go to their longest lengths;
4. every other adapter, one length at a time for all of them (each reaches 2048 before any reaches 4096);
5. the points of lines that broke a plausibility rule are measured again, from a reserve kept for it
   (``REMEASURE_RESERVE``).

Before each length the planner predicts what an adapter's points there will cost, from what has been
measured (this run's points, and those of earlier runs into the same results directory): the power law fitted
to the line's per-call times so far gives a call's time at the new length, the sampling rules
(``benchmarks.sampling``) how many calls a point makes, and the adapter's earlier points its setup and
process overhead. A compiled adapter nothing is known of yet gets its coverage in an asv run of its own. An adapter whose predicted cost would break its share of the budget (what is left,
shared equally among the adapters still growing in its tier: the kernels that never hold the scores, then the
others) is not run at that length nor longer, and each point left out is recorded in ``bench/skips.jsonl`` as
"not run: budget", with the prediction. Before anything is measured the prediction is the static estimate
(``sweep.estimated_ms``), scaled by how far off it was for the points measured so far.
"""
from __future__ import annotations

import ast
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field

from mhabench import plausibility
from mhabench.results import is_accuracy

from .accuracy import DTYPES, ORACLE_CALLS
from .sampling import calls_per_point

HARD_STOP = 1.08            # an asv run still going at this multiple of the budget is stopped
REMEASURE_RESERVE = 0.10    # of the budget, kept for measuring implausible points again
SPLIT_FRACTION = 0.4       # a group's asv run predicted to take more of what is left is split by adapter
CLOSING_SECONDS = 5.0       # the final GEMM peak and the bookkeeping
FIXED_PRIOR_SECONDS = 15.0  # an asv run's own start (discovery, the forkserver's framework import) before any is seen
BUDGET_REASON = "not run: budget"


@dataclass(frozen=True)
class Bench:
    """One asv benchmark at one parameter combination, as the sweep selects it."""

    name: str                  # "bench_attention.SelfAttention.track_time_forward"
    combo: tuple[str, ...]     # asv's formatted parameters: ("'torch_sdpa'", "'eager'", "512", "8", "'cpu'")

    @property
    def params(self) -> tuple:
        return tuple(ast.literal_eval(v) for v in self.combo)

    @property
    def adapter(self) -> str:
        return self.params[0]

    @property
    def seq_len(self) -> int:
        return int(self.params[2])

    @property
    def line(self) -> tuple:
        """What a line of the report is: class, adapter, mode, heads, device (the length varies along it)."""
        adapter, mode, _, heads, device = self.params
        return (self.name.split(".")[1], adapter, mode, int(heads), device)

    @property
    def accuracy(self) -> bool:
        return is_accuracy(self.name.split(".")[1])

    @property
    def case(self) -> tuple:
        """The measurement a benchmark reads: an accuracy case's methods all read one (``common.accuracy_records``)."""
        return (self.name.split(".")[1],) + tuple(self.params)

    @property
    def param_dict(self) -> dict:
        return dict(zip(("adapter", "mode", "seq_len", "num_heads", "device"), self.params))


@dataclass
class Step:
    """One asv run: a phase's points of one process group."""

    key: str
    group: str
    benches: list[Bench]
    predicted: float = 0.0


@dataclass
class Skipped:
    benches: list[Bench]
    reason: str
    predicted: float


class CostModel:
    """Seconds a point will take, learned from measured points (``bench/points.jsonl`` records: this run's, and
    the earlier runs' the results directory keeps) and the wall time of each asv run, with the static estimate
    as the prior."""

    def __init__(self, rules, prior_seconds):
        self.rules = rules
        self.prior_seconds = prior_seconds     # Bench -> static estimate (seconds)
        self.times: dict[tuple, dict[int, float]] = defaultdict(dict)  # line -> {L: median seconds per call}
        self.setup: dict[str, list[float]] = defaultdict(list)         # adapter -> setup seconds of its points
        self.point_wall: dict[Bench, float] = {}
        self.fixed: dict[str, float] = {}      # group -> an asv run's own start
        self.per_process: dict[str, float] = {}  # group -> overhead per point beyond its setup and sampling
        self.case_methods: dict[tuple, int] = {}  # Bench.case -> how many selected methods read it

    def observe(self, bench: Bench, record: dict) -> None:
        """A point's line in points.jsonl."""
        if record.get("quantity") == "time" and record.get("median"):
            self.times[bench.line][bench.seq_len] = float(record["median"])
        if record.get("setup_seconds") is not None:
            self.setup[bench.adapter].append(float(record["setup_seconds"]))
        self.point_wall[bench] = float(record.get("setup_seconds") or 0) + float(record.get("sampling_seconds") or 0)

    def observe_step(self, group: str, started: float, ended: float, records: list[tuple[Bench, dict]]) -> None:
        """An asv run of ``group`` from ``started`` to ``ended`` (time.time()) and the points it measured."""
        if not records:
            return
        walls = [(float(r["time"]), self.point_wall.get(b, 0.0)) for b, r in records if r.get("time")]
        if not walls:
            return
        first_end, first_wall = min(walls)
        fixed = max(0.0, first_end - first_wall - started)
        residual = (ended - started) - fixed - sum(w for _, w in walls)
        self.fixed[group] = fixed
        self.per_process[group] = max(0.0, residual / len(walls))

    def knows(self, adapter: str) -> bool:
        """Whether a point of ``adapter`` was measured (in this run or, from the journal, an earlier one)."""
        return bool(self.setup.get(adapter))

    def call_seconds(self, bench: Bench) -> float | None:
        """A call's predicted time at the bench's length, from its line's times (the other class's if its own
        has none yet); None when nothing of the adapter was timed."""
        cls, adapter, mode, heads, device = bench.line
        for line in [bench.line] + [k for k in self.times if k[1:] == (adapter, mode, heads, device) and k[0] != cls]:
            measured = self.times.get(line)
            if not measured:
                continue
            if bench.seq_len in measured:
                return measured[bench.seq_len]
            fit = plausibility.power_fit(list(measured), list(measured.values()))
            longest = max(measured)
            # a line measured at one length, or with a noisy slope: assume between linear and a little over L²
            exponent = min(2.2, max(1.0, fit.exponent)) if math.isfinite(fit.exponent) else 2.0
            return measured[longest] * (bench.seq_len / longest) ** exponent
        return None

    def calibration(self) -> float:
        """How far the static estimate was off for the points measured so far (actual / estimated)."""
        ratios = [wall / self.prior_seconds(b) for b, wall in self.point_wall.items() if self.prior_seconds(b) > 0]
        return statistics.median(ratios) if ratios else 1.0

    def point_seconds(self, bench: Bench, group: str) -> float:
        call = self.call_seconds(bench)
        if call is None or not self.setup.get(bench.adapter):
            return self.prior_seconds(bench) * self.calibration() + self.per_process.get(group, 0.0)
        if is_accuracy(bench.name.split(".")[1]):  # a layer built and called per dtype, and the oracle's golden,
            work = len(DTYPES) * (statistics.median(self.setup[bench.adapter]) + call) + ORACLE_CALLS * call
            return work / max(1, self.case_methods.get(bench.case, 1)) + self.per_process.get(group, 0.0)
        setup = statistics.median(self.setup[bench.adapter]) + call  # its first call, at this length
        return setup + calls_per_point(self.rules, bench.name.split(".")[-1], call) * call + \
            self.per_process.get(group, 0.0)

    def step_seconds(self, group: str, benches: list[Bench]) -> float:
        fixed = self.fixed.get(group, max(self.fixed.values(), default=FIXED_PRIOR_SECONDS))
        return fixed + sum(self.point_seconds(b, group) for b in benches)


@dataclass
class Planner:
    """The budget's plan, one step at a time: ``next_step(now)`` after each asv run, until it returns None.

    ``benches``: the selected attention benchmarks; ``group_of``: adapter -> its process group's key;
    ``holds_scores``: adapter -> whether its kernel holds the scores; ``coverage_lengths``: the lengths every
    adapter gets first; ``budget``: seconds; ``started``: when the run began (the clock ``now`` is read on)."""

    benches: list[Bench]
    group_of: callable
    holds_scores: callable
    model: CostModel
    coverage_lengths: int
    budget: float
    started: float
    closing: float = CLOSING_SECONDS  # kept back at the end: the bookkeeping, and the GEMM peak measured again
    skipped: list[Skipped] = field(default_factory=list)
    uncovered: dict = field(default_factory=dict)  # adapter -> (its coverage, predicted cost, seconds left then)
    _queue: list = field(default_factory=list)
    _given: set = field(default_factory=set)  # the benchmarks of every step handed out
    _units: list = field(default_factory=list)
    _phase: float = 0
    _group: int = 0
    _accuracy_group: int = 0

    def __post_init__(self):
        self.by_adapter: dict[str, dict[int, list[Bench]]] = defaultdict(lambda: defaultdict(list))
        for bench in self.benches:
            self.by_adapter[bench.adapter][bench.seq_len].append(bench)
        self.adapters = list(dict.fromkeys(b.adapter for b in self.benches))
        shared = getattr(self.model, "case_methods", None)  # the accuracy methods of a case share one measurement
        for bench in self.benches if shared is not None else ():
            shared[bench.case] = shared.get(bench.case, 0) + 1
        self.growing: dict[str, list[int]] = {}  # adapter -> the lengths past its coverage still to decide
        self.accuracy_waiting: dict[str, list[Bench]] = {}  # adapter -> its accuracy at the coverage lengths

    @property
    def deadline(self) -> float:
        return self.started + self.budget

    def left(self, now: float) -> float:
        """Seconds left for sweeping (the re-measurement reserve and the closing kept back)."""
        return self.deadline - now - REMEASURE_RESERVE * self.budget - self.closing

    def _steps_of(self, phase: str, benches: list[Bench], left: float | None = None) -> list[Step]:
        """One asv run per process group; per adapter instead where a group's run is predicted to take more than
        ``SPLIT_FRACTION`` of the ``left`` seconds: asv writes its results only when a run ends, so a run stopped at
        the deadline loses all it measured, and a smaller run loses less (each pays the run's own start)."""
        groups: dict[str, list[Bench]] = {}
        for bench in benches:
            groups.setdefault(self.group_of(bench.adapter), []).append(bench)
        steps = []
        for group, members in groups.items():
            adapters = list(dict.fromkeys(b.adapter for b in members))
            if left is not None and len(adapters) > 1 and \
                    self.model.step_seconds(group, members) > SPLIT_FRACTION * max(left, 0.0):
                steps += [Step(f"{phase}:{group}:{a}", group, [b for b in members if b.adapter == a]) for a in adapters]
            else:
                steps.append(Step(f"{phase}:{group}", group, members))
        return steps

    def _skip(self, benches: list[Bench], why: str, predicted: float) -> None:
        if benches:
            self.skipped.append(Skipped(benches, f"{BUDGET_REASON}: {why}", predicted))

    def coverage_units(self) -> list[list[str]]:
        """The coverage's asv runs: per process group, its adapters together, except that a compiled adapter
        nothing is known of yet runs alone, after them: its compile cost is what no estimate foresees, and
        an asv run stopped at the deadline loses all it measured."""
        units = []
        for group in dict.fromkeys(self.group_of(a) for a in self.adapters):
            members = [a for a in self.adapters if self.group_of(a) == group]
            unknown = [a for a in members if not self.model.knows(a) and self._compiled(a)]
            known = [a for a in members if a not in unknown]
            units += ([known] if known else []) + [[a] for a in unknown]
        return units

    def _compiled(self, adapter: str) -> bool:
        return any(b.params[1] == "compiled" for length in self.by_adapter[adapter].values() for b in length)

    def _coverage_of(self, adapter: str) -> list[Bench]:
        """The time and memory benchmarks of the adapter's shortest lengths; its accuracy there waits in
        ``accuracy_waiting`` for the accuracy coverage, which comes after every adapter's time and memory."""
        lengths = sorted(self.by_adapter[adapter])
        self.growing[adapter] = lengths[self.coverage_lengths:]
        shortest = [b for length in lengths[:self.coverage_lengths] for b in self.by_adapter[adapter][length]]
        self.accuracy_waiting[adapter] = [b for b in shortest if b.accuracy]
        return [b for b in shortest if not b.accuracy]

    def accuracy_coverage(self, now: float, adapters: list[str]) -> list[Step]:
        """The accuracy of ``adapters`` (one process group) at their shortest lengths, each where its predicted
        cost fits what is left (an adapter nothing is known of is tried); the rest is not run. Decided one group
        at a time, just before its run, as the coverage is: each decision reads what the runs before it cost."""
        chosen, left = [], self.left(now)
        for adapter in adapters:
            benches = self.accuracy_waiting.pop(adapter, [])
            if not benches or adapter in self.uncovered:
                continue
            group = self.group_of(adapter)
            cost = sum(self.model.point_seconds(b, group) for b in benches)
            if all(self.group_of(b.adapter) != group for b in chosen):
                cost += self.model.step_seconds(group, [])
            if cost > left and (self.model.knows(adapter) or left <= 0):
                self._skip(benches, f"its accuracy at the coverage lengths was predicted at {cost:.0f} s with "
                                    f"{max(left, 0):.0f} s of the budget left", cost)
                continue
            chosen.extend(benches)
            left -= cost
        return self._steps_of("accuracy", chosen, self.left(now))

    def coverage(self, now: float, adapters: list[str]) -> list[Step]:
        """The shortest lengths of ``adapters`` (one process group, or the ones left over), each where its
        predicted cost fits what is left; the others wait in ``uncovered``."""
        chosen, left = [], self.left(now)
        for adapter in adapters:
            benches = self._coverage_of(adapter)
            group = self.group_of(adapter)
            cost = sum(self.model.point_seconds(b, group) for b in benches)
            if all(self.group_of(b.adapter) != group for b in chosen):
                cost += self.model.step_seconds(group, [])
            # an adapter nothing is known of is tried while time is left: its prediction is the static estimate,
            # which is no measurement of this machine (12 times too dear for NumPy's coverage on a 2-core
            # machine), and a run stopped at the deadline is recorded as not run all the same
            if cost > left and (self.model.knows(adapter) or left <= 0):
                self.uncovered[adapter] = (benches, cost, max(left, 0.0))
                continue
            self.uncovered.pop(adapter, None)
            chosen.extend(benches)
            left -= cost
        return self._steps_of("coverage", chosen, self.left(now))

    def _drop_uncovered(self) -> None:
        """What still does not fit after every group had its turn is not run, nor anything longer."""
        for adapter, (benches, cost, left) in self.uncovered.items():
            longer = [b for length in self.growing.pop(adapter, []) for b in self.by_adapter[adapter][length]]
            waiting = self.accuracy_waiting.pop(adapter, [])
            self._skip(benches + waiting + longer, f"its coverage was predicted at {cost:.0f} s with {left:.0f} s "
                                                   f"of the budget left", cost)

    def _no_longer_sweeps(self) -> None:
        """An adapter went without its coverage: no sweep goes longer (coverage comes first)."""
        missing = ", ".join(self.uncovered)
        for adapter in list(self.growing):
            rest = self.growing.pop(adapter)
            group = self.group_of(adapter)
            for length in rest:
                more = self.by_adapter[adapter][length]
                predicted = sum(self.model.point_seconds(b, group) for b in more)
                self._skip(more, f"L={length} not run: {missing} did not get its coverage within the budget, and "
                                 f"no sweep goes longer before every adapter has it", predicted)

    def grow(self, now: float, tier: list[str]) -> list[Step]:
        """The next length of each adapter of ``tier`` still growing, where it fits the adapter's share."""
        active = [a for a in tier if self.growing.get(a)]
        if not active:
            return []
        left, chosen, length_of = self.left(now), [], {}
        for position, adapter in enumerate(active):
            share = max(0.0, left) / (len(active) - position)
            length = self.growing[adapter][0]
            benches = self.by_adapter[adapter][length]
            group = self.group_of(adapter)
            cost = sum(self.model.point_seconds(b, group) for b in benches)
            if all(self.group_of(b.adapter) != group for b in chosen):
                cost += self.model.step_seconds(group, [])
            if cost > share:
                rest = self.growing.pop(adapter)
                self._skip(benches, f"L={length} predicted at {cost:.0f} s, beyond {adapter}'s share of the budget "
                                    f"({share:.0f} s of {max(left, 0):.0f} s left)", cost)
                for longer in rest[1:]:
                    more = self.by_adapter[adapter][longer]
                    predicted = sum(self.model.point_seconds(b, group) for b in more)
                    self._skip(more, f"L={longer} predicted at {predicted:.0f} s; L={length} already did not fit "
                                     f"{adapter}'s share of the budget", predicted)
                continue
            self.growing[adapter] = self.growing[adapter][1:]
            chosen.extend(benches)
            length_of[adapter] = length
            left -= cost
        lengths = sorted(set(length_of.values()))
        return self._steps_of("L" + "+".join(map(str, lengths)), chosen, self.left(now))

    def next_step(self, now: float) -> Step | None:
        """The next asv run, or None when the sweep is done (the re-measurement is the sweep's own).

        Coverage is decided one process group at a time, just before its run, so each decision reads the
        costs the runs before it measured; an adapter left over is tried once more after every group."""
        while not self._queue:
            if self._phase == 0:
                if not self._units:
                    self._units = self.coverage_units()
                if self._group < len(self._units):
                    self._group += 1
                    self._queue = self.coverage(now, self._units[self._group - 1])
                    continue
                self._queue = self.coverage(now, list(self.uncovered)) if self.uncovered else []
                self._phase = 0.5
            elif self._phase == 0.5:  # accuracy after every adapter's time and memory, before any goes longer
                if self._accuracy_group < len(self._units):
                    self._accuracy_group += 1
                    self._queue = self.accuracy_coverage(now, self._units[self._accuracy_group - 1])
                    continue
                self._queue = self.accuracy_coverage(now, list(self.accuracy_waiting))
                self._phase = 1
            elif self._phase == 1:
                self._drop_uncovered()
                if self.uncovered:
                    self._no_longer_sweeps()
                    self._phase = 4
                    continue
                fused = [a for a in self.adapters if not self.holds_scores(a)]
                self._queue = self.grow(now, fused)
                if not self._queue:
                    self._phase = 2
            elif self._phase == 2:
                others = [a for a in self.adapters if self.holds_scores(a)]
                self._queue = self.grow(now, others)
                if not self._queue:
                    self._phase = 3
            else:
                return None
        step = self._queue.pop(0)
        step.predicted = self.model.step_seconds(step.group, step.benches)
        self._given.update(step.benches)
        return step

    def stop(self, step: Step) -> None:
        """The sweep ends at the deadline, ``step``'s asv run stopped there (asv writes its results at its end, so
        none of its points is kept): its benchmarks, and every one the plan had not reached, are not run, each
        recorded with why, so nothing selected goes missing without a word."""
        self._skip(step.benches, "its asv run was stopped at the budget's deadline", step.predicted)
        done = self._given | {b for s in self.skipped for b in s.benches}
        for adapter in self.adapters:
            left = [b for b in self.benches if b.adapter == adapter and b not in done]
            predicted = sum(self.model.point_seconds(b, self.group_of(adapter)) for b in left)
            self._skip(left, "the budget ran out before its turn (an asv run before it was stopped at the "
                             "deadline)", predicted)
        self._queue, self._phase = [], 4

    def skipped_benches(self) -> int:
        return sum(len(s.benches) for s in self.skipped)
