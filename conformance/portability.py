"""Which verdicts depend on the machine: the same selection run under each setting of each kernel switch.

A framework that chooses its kernels by the CPU gives one commit a green run on one machine and a red one on
another. ``run`` reproduces the other machines on this one: the selection once with the machine's own choice
(the results directory itself), then, for every kernel switch the selected adapters declare
(``impls.facts.Switch``: TensorFlow's oneDNN on and off, torch's CPU capabilities this CPU can run), once per
setting with only the adapters that switch reaches, each into ``switches/<name>-<setting>/`` of the results
directory. The portability table (``conformance/portability.json``) lists, per setting, every row whose
verdict (status and divergence) differs from the machine's own choice, with the facts that differ between the
two rows, and per setting the counts that decide a run: rows, changed, fail, error, stale entries.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from mhabench import results
from mhabench.schema import Status

from . import session


@dataclass
class Setting:
    switch: object  # impls.facts.Switch
    setting: str
    adapters: list[str]

    @property
    def label(self) -> str:
        return f"{self.switch.name}={self.setting}"

    @property
    def folder(self) -> str:
        return f"{self.switch.name}-{self.setting}"


def settings(plan: session.Plan, names=None, isa=None) -> list[Setting]:
    """Every setting this CPU can run of every switch the plan's adapters declare (``names``: only those
    switches), with the adapters each reaches."""
    out = []
    for switch in session.declared_switches(plan.adapters):
        if names and switch.name not in names:
            continue
        reached = [a for a in plan.adapters if switch in session.registry.get_adapter(a).switches()]
        out += [Setting(switch, setting, reached) for setting in switch.runnable(isa)]
    return out


def verdict(row) -> str:
    return row.status.value + (f" ({row.divergence})" if row.divergence else "")


def differing_facts(a: dict | None, b: dict | None) -> str:
    """The facts two rows were computed under that differ, as "name: a -> b" ("" when none do)."""
    a, b = a or {}, b or {}
    return "; ".join(f"{k}: {a.get(k)} -> {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))


def changes(base_rows, switched_rows, setting: Setting) -> list[dict]:
    """The rows whose verdict differs between the machine's own choice and ``setting``."""
    base = {r.row_id: r for r in base_rows}
    out = []
    for row in switched_rows:
        before = base.get(row.row_id)
        if before is None or (before.status, before.divergence) == (row.status, row.divergence):
            continue
        out.append({"switch": setting.switch.name, "setting": setting.setting, "adapter": row.adapter,
                    "row_id": row.row_id, "case": row.case, "area": row.area.value, "dtype": row.dtype.value,
                    "quantity": row.quantity.value, "own_choice": verdict(before), "switched": verdict(row),
                    "facts": differing_facts(before.facts, row.facts)})
    return out


def summary(setting: Setting, outcome, changed: list[dict]) -> dict:
    rows = outcome.rows
    count = lambda status: sum(r.status is status for r in rows)
    return {"switch": setting.switch.name, "setting": setting.setting, "variable": setting.switch.variable,
            "value": setting.switch.value(setting.setting), "adapters": setting.adapters, "rows": len(rows),
            "changed": len(changed), "fail": count(Status.FAIL), "error": count(Status.ERROR),
            "stale": [c.id for c in outcome.stale], "results": f"switches/{setting.folder}",
            "warnings": session.switch_warnings(outcome.plan, rows)}


def run(plan: session.Plan, results_dir, names=None, *, on_setting=lambda label, root: None, **options):
    """The selection under the machine's own choice, then under each switch setting; the portability table
    written to ``conformance/portability.json``. ``on_setting(label, results directory)`` hears of each run
    before it starts. Returns (the own-choice outcome, [(setting, outcome)], table)."""
    layout = results.Layout(results_dir)
    on_setting("the machine's own choice", layout.root)
    own = session.run(plan, layout.root, **options)
    table = {"own_choice": {"rows": len(own.rows), "fail": len(own.failing), "stale": [c.id for c in own.stale],
                            "facts": own_facts(own.rows)},
             "settings": [], "changes": []}
    done = []
    for setting in settings(plan, names):
        on_setting(setting.label, layout.switch_root(setting.folder))
        sub = replace(plan, adapters=setting.adapters, switches={setting.switch.name: setting.setting},
                      include=None if plan.include is None else {t for t in plan.include if t[0] in setting.adapters})
        outcome = session.run(sub, layout.switch_root(setting.folder), **options)
        changed = changes(own.rows, outcome.rows, setting)
        table["settings"].append(summary(setting, outcome, changed))
        table["changes"] += changed
        done.append((setting, outcome))
    results.write_json(layout.portability, table)
    return own, done, table


def own_facts(rows) -> dict:
    """Per adapter, the facts its rows were computed under (the first row's; one process's)."""
    out: dict = {}
    for row in rows:
        if row.facts and row.adapter not in out:
            out[row.adapter] = row.facts
    return out
