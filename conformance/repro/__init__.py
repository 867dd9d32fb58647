"""Standalone reproducers: from a catalogue entry (or a row) to a script a framework developer can run as it is.

A reproducer imports only the framework(s) involved and NumPy. It draws its inputs from a seeded generator (the
mask and any NaN/Inf planted as literals), calls the framework the way the adapter does (``families``: one
template per call path), computes the canonical result in a few lines of float64 NumPy, prints both, and exits 1
while they differ, 0 once they agree.

How an entry becomes a script:

1. **Pick** the entry's smallest case of the default matrix that its adapter's template can express, in its
   dtype (float32 first) and quantity (the default call's output first), and keep the first whose script shows
   the behaviour here (exit 1).
2. **Shrink** greedily (delta debugging, one dimension at a time): try batch 1, fewer query and key positions,
   one attended axis fewer, fewer heads, a smaller key_dim and narrower inputs; keep a step when the case still
   has the properties the entry's ``when`` names and its script still exits 1, and stop when no step keeps it.
   Candidates run in one warm worker per entry (the framework imported once); the final script runs once more
   in a fresh interpreter with mhabench not importable, and only a script that exits 1 there is written.

Nothing here judges a row: the script is the evidence. Where the catalogue says an entry shows on this machine
(its facts hold for the adapter's kernels here, and it does not declare that it ``varies``) but every candidate
script exits 0, the entry is **stale**, as it is when a row it covers passes: its unshrunk script is written
all the same, as the evidence, and ``write_directory`` lists it under the stale entries (README.md and
``status.json``, which the report reads where the scripts travel with the results).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import select
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mhabench.results import REPRODUCER_STATUS, reproducer_name
from mhabench.schema import RowId

from ..cases import Case, default_cases
from ..catalogue import Catalogue, Entry, load
from ..behaviours import CASE_PROPERTIES
from .families import FAMILIES, Family

DTYPE_ORDER = ("float32", "float64", "float16", "bfloat16")
QUANTITY_ORDER = ("output", "output_with_scores", "scores", "grad_query", "grad_value", "grad_key")
CANDIDATES = 8            # cases tried, smallest first, before an entry is declared not reproduced by a script
RUN_TIMEOUT = 180         # seconds for one script run (a first TensorFlow import is slow on a shared machine)
# kernel switches an entry's facts can ask for, set in the script before the framework is imported
FACT_SWITCHES = {"tf_onednn": ("TF_ENABLE_ONEDNN_OPTS", {True: "1", False: "0"})}
FRAMEWORK_NAMES = {"torch": "PyTorch", "jax": "JAX", "flax": "Flax", "keras": "Keras", "tensorflow": "TensorFlow",
                   "tf_keras": "tf_keras"}


class ReproError(ValueError):
    """An id that names no entry or row, or an entry no template can express."""


@dataclass(frozen=True)
class Target:
    """One call to reproduce: the entry, the adapter whose call path the script writes out, the case, dtype and
    quantity."""

    entry: Entry
    adapter: str
    case: Case
    dtype: str
    quantity: str
    origin: Case | None = None  # the matrix case it was simplified or shrunk from (None: ``case`` itself)

    @property
    def original(self) -> Case:
        return self.origin or self.case

    @property
    def family(self) -> Family:
        return FAMILIES[self.adapter]

    @property
    def row_id(self) -> str:
        """The matrix row this call comes from."""
        return RowId(self.adapter, self.original.id, self.dtype, self.quantity).format()

    def switches(self) -> dict[str, str]:
        """The environment the entry's facts need, where a variable sets them (TensorFlow's oneDNN)."""
        out = dict(self.family.environment)
        for name, values in self.entry.facts:
            if name in FACT_SWITCHES and len(values) == 1:
                variable, settings = FACT_SWITCHES[name]
                out[variable] = settings[values[0]]
        return out


def input_elements(case: Case) -> int:
    """How big a case is: the elements of its query, key and value inputs."""
    return sum(math.prod(s) for s in (case.query_shape, case.value_shape, case.key_shape or (0,)))


def shape_text(case: Case) -> str:
    spec = case.attention_spec
    return (f"batch {case.batch}, query {list(case.q_shape)}, keys {list(case.k_shape)}, heads {spec.num_heads}, "
            f"key_dim {spec.key_dim}, widths {case.dims}, {input_elements(case)} input elements")


# ---- choosing what to reproduce ---------------------------------------------------------------------------
def _has_properties(entry: Entry, case: Case) -> bool:
    with np.errstate(all="ignore"):
        return all(CASE_PROPERTIES[name](case) for name in entry.when)


# Entries whose behaviour needs what the templates do not write yet (found by the slow test that runs every
# script): the reason is shown where their script would be.
TEMPLATE_GAPS = {
    "jax-unread_nonfinite_query-gradients-nan": "it shows in the projections' weight gradients, and the JAX "
                                                "templates compute the input gradients only",
    "ort_attention-float64-function_body-positive_bias_where_masked-nan": "it needs a +inf bias (a float "
        "attn_mask) together with causal or padding lengths, and the ONNX Attention template takes only the "
        "boolean mask",
    "torch_mha-positive_bias_at_padded_key-nan": "it needs a bias and padding lengths together, and the "
                                                 "nn.MultiheadAttention template takes neither",
}


def unscriptable(entry: Entry) -> str | None:
    """Why no script can show ``entry`` (None when one can): an entry judged by its error against a
    reference computed in the same low precision differs from float64 NumPy by rounding that a script's fixed
    tolerance cannot tell from the behaviour; an entry in TEMPLATE_GAPS needs what no template writes yet."""
    if entry.id in TEMPLATE_GAPS:
        return TEMPLATE_GAPS[entry.id]
    if entry.max_error_ratio is not None:
        return (f"a precision shortfall judged against a same-dtype reference (error ratio <= "
                f"{entry.max_error_ratio:g}): compared with float64 NumPy it looks like ordinary rounding")
    if entry.backward_form and not (entry.oracle_policy or entry.behaviour or entry.check or entry.precision):
        return ("gradients as accurate as a FlashAttention-form backward in the same dtype: compared with float64 "
                "NumPy they look like ordinary rounding")
    return None


def simplified(case: Case) -> Case | None:
    """``case`` without what a template cannot express: no causal, window, bias, lengths or shared input, all
    inner axes attended, value_dim = key_dim, the default output, biases on, no dropout, as many key/value heads
    as heads. None when that is ``case`` itself or no valid case."""
    spec = {**case.spec, "value_dim": None, "output_shape": None, "use_bias": True, "dropout": 0.0,
            "num_kv_heads": None, "attention_axes": None}
    try:
        plain = dataclasses.replace(case, id=case.id + "-simplified", spec=spec, causal=False, window=None,
                                    bias=None, lengths=None, shared_input=False, mask_lead=None)
        plain.call()
    except (ValueError, TypeError):
        return None
    return None if _key(dataclasses.replace(plain, id=case.id)) == _key(case) else plain


def targets(entry: Entry, catalogue: Catalogue | None = None) -> list[Target]:
    """The calls a script could reproduce ``entry`` with, smallest case first: its adapters that have a
    template, the default matrix's cases it covers (as they are, or ``simplified`` where the template cannot
    express them and the simpler case keeps the properties the entry's ``when`` names), its dtypes (float32
    first) and quantities (the default call's output first)."""
    catalogue = catalogue or Catalogue([entry])
    if unscriptable(entry):
        return []
    out = []
    cases = default_cases()
    for adapter in entry.adapters:
        if adapter not in FAMILIES:
            continue
        family = FAMILIES[adapter]
        for case in cases:
            if not isinstance(case, Case):
                continue
            dtypes = [d for d in DTYPE_ORDER if (entry.dtypes is None or d in entry.dtypes)
                      and (case.dtypes is None or d in case.dtypes)]
            quantities = [q for q in QUANTITY_ORDER if q in {x.value for x in case.quantities()}]
            for quantity in quantities:
                if not dtypes or not catalogue.covers(entry, adapter, case.id, dtypes[0], quantity):
                    continue
                # the first quantity of a case, or each input gradient: a behaviour can reach some inputs only
                if family.fits(case, quantity):
                    out.append(Target(entry, adapter, case, dtypes[0], quantity))
                    if not quantity.startswith("grad_"):
                        break
                    continue
                plain = simplified(case)
                if plain is not None and family.fits(plain, quantity) and _has_properties(entry, plain):
                    out.append(Target(entry, adapter, plain, dtypes[0], quantity, origin=case))
                    if not quantity.startswith("grad_"):
                        break
    return _varied(sorted(out, key=lambda t: (input_elements(t.case), QUANTITY_ORDER.index(t.quantity))))


def _varied(ordered: list[Target]) -> list[Target]:
    """``ordered`` with the smallest target of each key_dim, with one key or several, and quantity first: the few
    candidates tried then differ where a behaviour can hide (a scale rounded to float32 is exact for key_dim 1, a
    single key gets weight 1 whatever its logit, a NaN can reach the value gradient and not the query's)."""
    seen: dict = {}
    rank = []
    for t in ordered:
        kind = (t.case.attention_spec.key_dim, math.prod(t.case.k_shape) > 1, t.quantity)
        rank.append(seen.get(kind, 0))
        seen[kind] = rank[-1] + 1
    return [t for _, t in sorted(zip(rank, ordered), key=lambda pair: pair[0])]


def resolve(identifier: str, catalogue: Catalogue | None = None) -> tuple[Entry, list[Target]]:
    """The entry an id names (an entry id, or a row id: the entry covering that row) and the targets to try
    (for a row id, that row's own call first)."""
    catalogue = catalogue or load()
    entry = catalogue.get(identifier)
    if entry is not None:
        return entry, targets(entry, catalogue)
    from mhabench.impls import list_adapters
    row = RowId.parse(identifier, list_adapters())
    if row is None:
        raise ReproError(f"{identifier!r} is neither a catalogue entry id nor a row id "
                         f"(<adapter>-<case>-<dtype>-<quantity>)")
    covering = [e for e in catalogue if catalogue.covers(e, row.adapter, row.case, row.dtype, row.quantity)]
    if not covering:
        raise ReproError(f"row {identifier!r} is covered by no catalogue entry: nothing known to reproduce")
    entry = covering[0]
    case = next((c for c in default_cases() if c.id == row.case), None)
    first = []
    if isinstance(case, Case) and row.adapter in FAMILIES and FAMILIES[row.adapter].fits(case, row.quantity):
        first = [Target(entry, row.adapter, case, row.dtype, row.quantity)]
    rest = [t for t in targets(entry, catalogue) if not (t.adapter == row.adapter and t.original.id == row.case)]
    return entry, first + rest


def shows_here(target: Target) -> bool:
    """Whether the catalogue says ``target``'s entry shows on this machine: its facts hold for the kernels the
    adapter runs here (a fact the script sets itself, TensorFlow's oneDNN switch, holds by construction)."""
    from mhabench import impls
    facts = dict(impls.get_adapter(target.adapter).kernel_facts())
    facts.update({name: values[0] for name, values in target.entry.facts if name in FACT_SWITCHES})
    return target.entry.applies(facts)


# ---- the script -------------------------------------------------------------------------------------------
def behaviour_sentence(entry: Entry) -> str:
    """The entry's observed text up to its first full stop: the one-sentence behaviour."""
    text = entry.observed.strip()
    end = text.find(". ")
    return (text if end < 0 else text[:end]).rstrip(".") + "."


def _array(values: np.ndarray) -> str:
    return f"np.array({np.asarray(values).astype(int).tolist()}, bool)"


def _planted(name: str, given: np.ndarray) -> list[str]:
    """Assignments planting the case's NaN/Inf values at their positions."""
    lines = []
    for index in zip(*np.nonzero(~np.isfinite(given))):
        value = given[index]
        text = "np.nan" if np.isnan(value) else ("np.inf" if value > 0 else "-np.inf")
        lines.append(f"{name}[{', '.join(str(int(i)) for i in index)}] = {text}")
    return lines


REPRESENTABLE = '''def representable(x):
    """x rounded to DTYPE and back to float64 (bfloat16 by rounding float32 bits to nearest even)."""
    if DTYPE == "bfloat16":
        bits = x.astype(np.float32).view(np.uint32)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).view(np.float32).astype(np.float64)
    return x.astype(DTYPE).astype(np.float64)
'''

SCRIPT_TAIL = '''

def attention(inputs):
    """Canonical multi-head attention in float64: mask True = may attend, a masked position is never read, a
    query row with no allowed key gets zero weights (its output is the output bias)."""
    flat = lambda x: x.reshape(x.shape[0], -1, x.shape[-1])  # the attended axes as one
    allowed = np.ones((1, 1, 1, 1), bool) if mask is None else mask
    with np.errstate(all="ignore"):
        q = np.einsum("btd,dhk->bhtk", flat(inputs["query"]), W["Wq"]) + W["bq"][:, None]
        k = np.einsum("bsd,dhk->bhsk", flat(inputs.get("key", inputs["value"])), W["Wk"]) + W["bk"][:, None]
        v = np.einsum("bsd,dhk->bhsk", flat(inputs["value"]), W["Wv"]) + W["bv"][:, None]
        logits = np.where(allowed, np.einsum("bhtk,bhsk->bhts", q, k) / np.sqrt(KEY_DIM), -np.inf)
        top = logits.max(-1, keepdims=True)
        e = np.where(allowed, np.exp(logits - np.where(np.isneginf(top), 0, top)), 0)
        weights = e / np.where(allowed.any(-1, keepdims=True), e.sum(-1, keepdims=True), 1)
        heads = np.where(allowed[..., None], weights[..., None] * v[:, :, None], 0).sum(-2)
        out = np.einsum("bhtv,hvo->bto", heads, W["Wo"]) + W["bo"]
    return out.reshape(query.shape[0], *Q_SHAPE, -1), weights.reshape(query.shape[0], HEADS, *Q_SHAPE, *K_SHAPE)


def canonical(quantity):
    """The expected result; a gradient of sum(output * cotangent) by central differences (float64)."""
    if not quantity.startswith("grad_"):
        out, weights = attention(INPUTS)
        return weights if quantity == "scores" else out
    x, grad = INPUTS[quantity[5:]], np.zeros(INPUTS[quantity[5:]].shape)
    for i in np.ndindex(x.shape):
        sums = []
        for step in (1e-5, -1e-5):
            moved = x.copy()
            moved[i] += step
            sums.append(np.sum(attention(dict(INPUTS, **{quantity[5:]: moved}))[0] * cotangent))
        grad[i] = (sums[0] - sums[1]) / 2e-5
    return grad


def main():
    expected, actual = canonical(QUANTITY), framework(QUANTITY)
    expected = expected.reshape(actual.shape) if expected.size == actual.size else expected
    floor = {"float64": 1e-10, "float32": 1e-5, "float16": 1e-2, "bfloat16": 1e-1}[PRECISION]
    finite = np.abs(expected[np.isfinite(expected)])
    tolerance = floor * (32 if QUANTITY.startswith("grad_") else 1) * max(1.0, finite.max(initial=0.0))
    with np.errstate(invalid="ignore"):
        off = ~((expected == actual) | (np.isnan(expected) & np.isnan(actual))
                | (np.abs(expected - actual) <= tolerance)) if expected.shape == actual.shape else np.ones(1, bool)
    np.set_printoptions(precision=6, linewidth=110, threshold=80)
    print(f"{CALL}, {QUANTITY}, {DTYPE}\\n{BEHAVIOUR}")
    print(f"expected (canonical, float64 NumPy), shape {expected.shape}:\\n{expected}")
    print(f"actual, shape {actual.shape}:\\n{actual}")
    if off.any():
        with np.errstate(invalid="ignore"):
            gap = np.abs(expected - actual) if expected.shape == actual.shape else np.zeros(1)
        gap = gap[np.isfinite(gap)].max(initial=0.0)
        print(f"DIFFERS at {int(off.sum())} of {off.size} elements (largest finite difference {gap:.1e}, tolerance "
              f"{tolerance:.1e}): the behaviour is present")
        return 1
    print("matches the canonical result: the behaviour is gone")
    return 0


if __name__ == "__main__":
    sys.exit(main())
'''


def judged_precision(entry: Entry, dtype: str) -> str:
    """The dtype whose rounding a script's tolerance allows: the entry's ``precision`` where that only says how
    precisely another behaviour (a policy, a behaviour, a check) is judged, else the call's own dtype (where the
    lost precision is itself the behaviour)."""
    if entry.precision and (entry.oracle_policy or entry.behaviour or entry.check):
        return entry.precision
    return dtype


def render(target: Target) -> str:
    """The reproducer of ``target`` as Python source."""
    case, entry, family, original = target.case, target.entry, target.family, target.original
    inputs = case.inputs()
    spec = case.attention_spec
    call = case.call()
    mask = call.flat_mask()
    frameworks = ", ".join(FRAMEWORK_NAMES.get(m, m) for m in family.imports)
    header = [f"{entry.id}: a standalone reproducer ({frameworks} and NumPy only).", "",
              *textwrap.wrap(behaviour_sentence(entry), 100), "",
              f"Call: {family.call} (as the adapter {target.adapter} calls it), {target.quantity}, {target.dtype}.",
              f"Original row: {target.row_id}",
              *textwrap.wrap(f"({shape_text(original)}), {'simplified and ' if case.id.endswith('-simplified') else ''}"
                             f"shrunk greedily while the behaviour persisted to {shape_text(case)}.", 100),
              f"Upstream: {entry.upstream or 'none filed that we know of.'}",
              "Exit status: 1 while the framework's result differs from the canonical one computed below in NumPy,",
              "0 once it agrees. Written by `mhabench repro`; nothing here imports mhabench."]
    switches = target.switches()
    key_distinct = inputs.key is not None
    q_dim, k_dim, v_dim = case.dims
    H, kd = spec.num_heads, spec.key_dim
    out_dim = q_dim
    lines = ['"""' + "\n".join(header).rstrip() + '\n"""', "import os", "import sys", ""]
    if switches:
        lines += [f'os.environ["{name}"] = "{value}"' for name, value in switches.items()] + [""]
    lines += ["import numpy as np", "", "", REPRESENTABLE, ""]
    precision = judged_precision(entry, target.dtype)
    body = [f'DTYPE, QUANTITY, PRECISION = "{target.dtype}", "{target.quantity}", "{precision}"'
            + ("" if precision == target.dtype else
               f"  # judged at {precision} precision: the behaviour, not {precision} rounding"),
            f"HEADS, KEY_DIM = {H}, {kd}",
            f"Q_SHAPE, K_SHAPE = {tuple(case.q_shape)}, {tuple(case.k_shape)}  # the attended axes",
            f'CALL = "{family.call}"',
            f"BEHAVIOUR = {behaviour_sentence(entry)!r}",
            "rng = np.random.default_rng(0)",
            f"query = rng.uniform(-1, 1, {case.query_shape}).round(2)" + (f" * {case.scale:g}" if case.scale != 1
                                                                          else ""),
            "value = query  # self-attention: one input" if case.shared_input else
            f"value = rng.uniform(-1, 1, {case.value_shape}).round(2)"]
    if key_distinct:
        body.append(f"key = rng.uniform(-1, 1, {case.key_shape}).round(2)")
    weight_shapes = {"Wq": (q_dim, H, kd), "bq": (H, kd), "Wk": (k_dim, H, kd), "bk": (H, kd),
                     "Wv": (v_dim, H, kd), "bv": (H, kd), "Wo": (H, kd, out_dim), "bo": (out_dim,)}
    body.append("W = {name: rng.uniform(-1, 1, shape).round(2) for name, shape in "
                + repr(list(weight_shapes.items())) + "}")
    body.append(f"cotangent = rng.uniform(-1, 1, {tuple(call.output_shape)}).round(2)")
    body += _planted("query", inputs.query) + ([] if case.shared_input else _planted("value", inputs.value))
    if key_distinct:
        body += _planted("key", inputs.key)
    body.append("mask = None" if mask is None else
                f"mask = {_array(mask)}  # [N|1, H|1, T|1, S|1], True = may attend")
    body.append('INPUTS = {"query": query, "value": value' + (', "key": key}' if key_distinct else "}"))
    body += ["# the inputs as the framework holds them in DTYPE, so the expectation starts from the same numbers",
             "INPUTS = {name: representable(x) for name, x in INPUTS.items()}",
             "W = {name: representable(w) for name, w in W.items()}",
             'query, value = INPUTS["query"], INPUTS["value"]']
    return "\n".join(lines + body) + "\n" + family.template + SCRIPT_TAIL


# ---- running scripts ----------------------------------------------------------------------------------------
# A warm worker for shrinking: execs each candidate script (its framework imported once) and answers its status.
WORKER = r'''
import contextlib, io, json, sys
for line in sys.stdin:
    path = line.strip()
    try:
        namespace = {"__name__": "candidate", "__file__": path}
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compile(open(path).read(), path, "exec"), namespace)
            status = int(namespace["main"]())
    except BaseException as exc:
        status = "error: %s: %s" % (type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
    print(json.dumps(status), flush=True)
'''


def _isolated_env(extra: dict | None = None) -> dict:
    """The environment a script runs in: mhabench not importable (its directory off the path)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(extra or {})
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _blocker_dir() -> str:
    """A directory holding a ``mhabench`` that refuses to import: put first on the path, it proves the script
    never needs the package (an editable install would otherwise find it)."""
    path = Path(tempfile.gettempdir()) / "mhabench-repro-blocker"
    (path / "mhabench").mkdir(parents=True, exist_ok=True)
    (path / "mhabench" / "__init__.py").write_text("raise ImportError('a reproducer must not import mhabench')\n")
    return str(path)


def run_script(path, timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess:
    """Run a written script in a fresh interpreter with mhabench not importable; its status is the verdict."""
    env = _isolated_env({"PYTHONPATH": _blocker_dir()})
    return subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=str(Path(path).parent))


class Worker:
    """One warm interpreter that runs candidate scripts of one entry (one framework, one Keras backend). A
    candidate that crashes the interpreter or runs past ``timeout`` counts as not showing the behaviour, and
    the next one gets a fresh interpreter."""

    def __init__(self, switches: dict, timeout: float = RUN_TIMEOUT):
        self.dir = tempfile.TemporaryDirectory(prefix="mhabench-repro-")
        self.env = _isolated_env({**switches, "PYTHONPATH": _blocker_dir()})
        self.timeout = timeout
        self.process = None
        self.count = 0

    def _start(self):
        self.process = subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                        env=self.env, cwd=self.dir.name)

    def status(self, source: str):
        """The script's exit status (0 or 1), or an error text."""
        if self.process is None or self.process.poll() is not None:
            self._start()
        self.count += 1
        path = Path(self.dir.name) / f"candidate_{self.count}.py"
        path.write_text(source)
        try:
            self.process.stdin.write(f"{path}\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            self._stop()
            return "error: the interpreter exited"
        ready, _, _ = select.select([self.process.stdout], [], [], self.timeout)
        line = self.process.stdout.readline() if ready else ""
        if not line:
            self._stop()
            return "error: the interpreter crashed" if ready else f"error: no answer in {self.timeout:g} s"
        return json.loads(line)

    def _stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def close(self):
        if self.process is not None and self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._stop()
        self.dir.cleanup()


# ---- shrinking ---------------------------------------------------------------------------------------------
def _smaller(n: int) -> list[int]:
    return sorted({1, n // 2, n - 1} - {0, n}) if n > 1 else []


MIN_POSITIONS = 2  # query and key positions kept, so a row that shows it sits beside one that does not and a
                   # uniform row (1/S) differs from a one-hot one


def moves(case: Case) -> list[Case]:
    """One-step smaller versions of ``case`` (some invalid: the caller drops those), biggest reductions first;
    never fewer than MIN_POSITIONS query or key positions. A self-attention case (one input for query, key and
    value) shrinks its query and key positions, and its query and value widths, together."""
    spec = case.spec
    tied = {"q_shape": "k_shape", "k_shape": "q_shape", "query_dim": "value_dim", "value_dim": "query_dim"}

    def smaller(**changes):
        if case.shared_input:
            changes.update({tied[name]: value for name, value in list(changes.items()) if name in tied})
        try:
            return [dataclasses.replace(case, **changes)]
        except ValueError:
            return []

    out = [c for b in _smaller(case.batch) for c in smaller(batch=b)]
    for name in ("q_shape", "k_shape"):
        shape = getattr(case, name)
        for axis in range(len(shape)):
            for n in _smaller(shape[axis]):
                shorter = shape[:axis] + (n,) + shape[axis + 1:]
                if math.prod(shorter) >= min(MIN_POSITIONS, math.prod(shape)):
                    out += smaller(**{name: shorter})
    if len(case.q_shape) > 1 and spec.get("attention_axes") is None:  # one attended axis fewer
        out += smaller(q_shape=case.q_shape[:-1], k_shape=case.k_shape[:-1])
    for heads in _smaller(spec["num_heads"]):
        out += smaller(spec={**spec, "num_heads": heads})
    for key_dim in _smaller(spec["key_dim"]):
        out += smaller(spec={**spec, "key_dim": key_dim})
    for width in ("query_dim", "value_dim", "key_dim"):
        for n in _smaller(getattr(case, width)):
            out += smaller(**{width: n})
    return out


def _tie_widths(case: Case, family: Family) -> Case:
    """For a call path whose input widths are heads * key_dim (torch's embed_dim), keep them so."""
    if not family.tied_widths:
        return case
    E = case.attention_spec.num_heads * case.attention_spec.key_dim
    return dataclasses.replace(case, query_dim=E, value_dim=E, key_dim=E)


def _key(case: Case) -> str:
    return json.dumps(case.to_dict(), sort_keys=True, default=str)


@dataclass
class Shrunk:
    target: Target
    original: Case
    steps: int = 0
    tried: int = 0


def shrink(target: Target, worker: Worker, limit: int = 60) -> Shrunk:
    """Greedy delta debugging: take the first one-step smaller case that keeps the entry's properties, fits
    the template and whose script still exits 1; repeat until none does (or ``limit`` candidates ran)."""
    result = Shrunk(target, target.original)
    seen = {_key(target.case)}
    improved = True
    while improved and result.tried < limit:
        improved = False
        for candidate in moves(result.target.case):
            try:
                candidate = _tie_widths(candidate, target.family)
                if _key(candidate) in seen or input_elements(candidate) > input_elements(result.target.case):
                    continue
                seen.add(_key(candidate))
                if not (target.family.fits(candidate, target.quantity) and _has_properties(target.entry, candidate)):
                    continue
            except (ValueError, IndexError):
                continue
            step = dataclasses.replace(result.target, case=candidate, origin=target.original)
            result.tried += 1
            if worker.status(render(step)) == 1:
                result.target, result.steps, improved = step, result.steps + 1, True
                break
            if result.tried >= limit:
                break
    return result


# ---- one entry, end to end -------------------------------------------------------------------------------------
@dataclass
class Reproducer:
    """What ``build`` made of one entry: the script (None when none reproduces it here) and why not."""

    entry: Entry
    source: str | None = None
    target: Target | None = None
    original: Case | None = None
    reason: str = ""
    verified: subprocess.CompletedProcess | None = field(default=None, repr=False)
    stale: bool = False  # the catalogue says it shows here, yet every script tried exits 0 (``source``: one of them)

    @property
    def reproduces(self) -> bool:
        """A script that shows the behaviour here (exit 1 in a fresh interpreter)."""
        return bool(self.source) and not self.stale

    @property
    def status(self) -> str:
        return "stale" if self.stale else "reproduces" if self.source else "no script"

    @property
    def lines(self) -> int:
        return len(self.source.splitlines()) if self.source else 0


def build(entry: Entry, candidates: list[Target], shrinking: bool = True, log=None) -> Reproducer:
    """Find a target whose script exits 1 here, shrink it, write the script and verify it in a fresh
    interpreter. ``log``: a callable for progress lines."""
    log = log or (lambda text: None)
    if not candidates and unscriptable(entry):
        return Reproducer(entry, reason=unscriptable(entry))
    if not candidates:
        adapters = ", ".join(entry.adapters)
        templated = [a for a in entry.adapters if a in FAMILIES]
        why = ("no template for the call paths of " + adapters if not templated else
               "no case of the default matrix it covers fits the template of " + ", ".join(templated)
               + " (a causal, modern or per-head-mask case, a weight gradient, ...)")
        return Reproducer(entry, reason=why)
    by_switches: dict = {}
    gone = []  # the targets whose script exits 0 cleanly: the behaviour does not show there
    try:
        for target in candidates[:CANDIDATES]:
            switches = tuple(sorted(target.switches().items()))
            if switches not in by_switches:
                by_switches[switches] = Worker(dict(switches))
            worker = by_switches[switches]
            status = worker.status(render(target))
            log(f"{entry.id}: {target.row_id}: exit {status}")
            if status == 0:
                gone.append(target)
            if status != 1:
                continue
            shrunk = shrink(target, worker) if shrinking else Shrunk(target, target.original)
            source = render(shrunk.target)
            with tempfile.TemporaryDirectory(prefix="mhabench-repro-") as tmp:
                path = Path(tmp) / "repro.py"
                path.write_text(source)
                verified = run_script(path)
            log(f"{entry.id}: shrunk in {shrunk.steps} steps ({shrunk.tried} tried) to "
                f"{input_elements(shrunk.target.case)} elements; fresh run exit {verified.returncode}")
            if verified.returncode == 1:
                return Reproducer(entry, source, shrunk.target, shrunk.original, verified=verified)
        tried = ", ".join(t.row_id for t in candidates[:CANDIDATES])
        if gone and not entry.varies and shows_here(gone[0]):
            return Reproducer(entry, render(gone[0]), gone[0], gone[0].original, stale=True,
                              reason=f"the catalogue says it shows on this machine, yet its script exits 0 "
                                     f"(tried {tried}): the behaviour is gone or has moved; update the entry")
        return Reproducer(entry, reason=f"no script shows it here (tried {tried})")
    finally:
        for worker in by_switches.values():
            worker.close()


def script_name(entry_id: str) -> str:
    """The reproducer's file name, the one a results directory's reproducers/ uses (the report links it)."""
    return reproducer_name(entry_id)


def write_directory(reproducers: list[Reproducer], directory) -> Path:
    """One script per reproduced entry and a README.md table linking them; the stale entries first, each with the
    script that no longer shows it; the entries without one, with why. ``status.json`` says the same for
    programs: {entry id: {"status": reproduces | stale | no script, "script", "reason"}}."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    made = [r for r in reproducers if r.reproduces]
    stale = [r for r in reproducers if r.stale]
    rows = ["| entry | call | quantity, dtype | elements (original → shrunk) | lines | upstream |",
            "|---|---|---|---|---|---|"]
    for r in made:
        name = script_name(r.entry.id)
        (directory / name).write_text(r.source)
        rows.append(f"| [{r.entry.id}]({name}) | {r.target.adapter} | {r.target.quantity}, {r.target.dtype} | "
                    f"{input_elements(r.original)} → {input_elements(r.target.case)} | {r.lines} | "
                    f"{r.entry.upstream or 'none known'} |")
    for r in stale:
        (directory / script_name(r.entry.id)).write_text(r.source)
    missing = [f"- `{r.entry.id}`: {r.reason}" for r in reproducers if not r.source]
    summary = summarise(reproducers)
    text = ["# Standalone reproducers", "",
            "Each script imports only its framework and NumPy, computes the canonical result in NumPy, prints "
            "expected against actual, and exits 1 while the behaviour is present (0 once it is gone). Written by "
            "`mhabench repro`, each verified to exit 1 in a fresh interpreter on the machine that wrote it.", "",
            f"{summary['scripts']} scripts for {summary['entries']} entries; median script length "
            f"{summary['median_lines']} lines; median shrink {summary['median_original']} → "
            f"{summary['median_shrunk']} input elements.", ""]
    if stale:
        text += [f"## Stale entries ({len(stale)})", "",
                 "The catalogue says these show on this machine, yet their script exits 0 here: the behaviour is "
                 "gone or has moved. Update the entry (or the template). Each script is the one that no longer "
                 "shows it, unshrunk.", "",
                 *[f"- [{r.entry.id}]({script_name(r.entry.id)}): {r.reason}" for r in stale], ""]
    text += rows
    if missing:
        text += ["", f"## Entries without a script ({len(missing)})", "", *missing]
    (directory / "README.md").write_text("\n".join(text) + "\n")
    status = {r.entry.id: {"status": r.status, "script": script_name(r.entry.id) if r.source else None,
                           "reason": r.reason} for r in reproducers}
    (directory / REPRODUCER_STATUS).write_text(json.dumps(status, indent=1) + "\n")
    return directory


def summarise(reproducers: list[Reproducer]) -> dict:
    made = [r for r in reproducers if r.reproduces]
    med = lambda values: float(np.median(values)) if values else 0.0
    return {"entries": len(reproducers), "scripts": len(made), "stale": sum(r.stale for r in reproducers),
            "median_lines": med([r.lines for r in made]),
            "median_original": med([input_elements(r.original) for r in made]),
            "median_shrunk": med([input_elements(r.target.case) for r in made])}
