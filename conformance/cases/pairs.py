"""The pairwise covering design: the area ``pairs``.

Every pair of levels of any two factors (:data:`PAIR_FACTORS`) appears together in at least one case, for
the forward and the gradient quantities alike (every case has both), so a bug that needs two features at
once is met. The design is data, ``pair_design.txt``: one case per line, its columns named by the factors,
read into named records (:data:`PAIR_DESIGN`); :func:`case_factors` reads the levels back from any case's
own fields, so :func:`pair_coverage` measures what the cases exercise, not what the table says.
"""
from __future__ import annotations

import itertools
from collections import namedtuple
from pathlib import Path

from .case import Case, spec as make_spec

PAIR_FACTORS = {
    "lengths": ("T=S", "T<S", "T>S", "T=1"),
    "mask": ("none", "padding", "broadcast", "full", "per_head", "fully_masked_row"),
    "causal": (False, True, "bottom_right"),
    "heads": (1, 2, 3),
    "key_dim": (1, 4),
    "value_dim": ("same", "other"),
    "output": ("default", "width5", "2x3"),
    "axes": ("rank3", "rank4_axis2", "rank4_axes12", "rank5_axes23"),
    "key": ("value", "distinct"),
    "bias": (True, False),
    "widths": ("equal", "mixed"),
    # modern attention: key/value heads ("one": multi-query; "grouped": 4 query heads over 2 key/value heads, where
    # "h // group" and "h % Hkv" differ), the window ((1, 2), or (2, 0)), the additive bias (BIAS_KINDS) and lengths
    # (LENGTHS_KINDS)
    "kv_heads": ("all", "one", "grouped"),
    "window": ("none", "band", "left"),
    "logit_bias": ("none", "TS", "BHTS", "neg_inf_row"),
    "padding_lengths": ("none", "key_value", "query", "both"),
    # inference attention: the query positions (one offset for the batch, as an internal cache or bottom-right
    # gives; or one per sequence, as an external cache gives: ONNX's past_key and nonpad_kv_seqlen), and the logits'
    # soft cap or scale
    "query_offset": ("none", "shared", "per_sequence"),
    "logits": ("default", "softcap", "scale"),
}
# Pairs no case can have: one head has no fewer key/value heads, and grouping needs more heads than 2 (the heads
# level 3 means "3 or more": 4 with grouped key/value heads); bottom-right causal fixes the query offset at S - T.
PAIR_EXCLUDED = {("heads", 1, "kv_heads", "one"), ("heads", 1, "kv_heads", "grouped"), ("heads", 2, "kv_heads", "grouped"),
                 ("causal", "bottom_right", "query_offset", "shared"),
                 ("causal", "bottom_right", "query_offset", "per_sequence")}
PairLevels = namedtuple("PairLevels", PAIR_FACTORS)  # one case of the design: a level per factor, by name


def read_design(text: str) -> tuple[PairLevels, ...]:
    """The design's lines as named records: the header names the factors, each cell is a level of its column's
    factor (written as Python prints it); ValueError naming the line for anything else."""
    lines = [line.split() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    header, rows = lines[0], lines[1:]
    if sorted(header) != sorted(PAIR_FACTORS):
        raise ValueError(f"pair design: the header names {header}, expected the factors {list(PAIR_FACTORS)}")
    levels = {factor: {str(level): level for level in PAIR_FACTORS[factor]} for factor in header}
    design = []
    for number, cells in enumerate(rows, start=1):
        if len(cells) != len(header) or any(cell not in levels[f] for f, cell in zip(header, cells)):
            raise ValueError(f"pair design line {number}: {' '.join(cells)!r} is not one level of each factor")
        design.append(PairLevels(**{f: levels[f][cell] for f, cell in zip(header, cells)}))
    return tuple(design)


PAIR_DESIGN = read_design((Path(__file__).parent / "pair_design.txt").read_text())

_LENGTHS = {"T=S": (6, 6), "T<S": (4, 7), "T>S": (7, 4), "T=1": (1, 6)}
_SHAPES = {  # axes level -> (attention_axes, batch, lengths level -> (q_shape, k_shape))
    "rank3": (None, 2, lambda t, s: ((t,), (s,))),
    "rank4_axis2": ((2,), 3, lambda t, s: ((3, t), (3, s))),
    "rank4_axes12": (None, 2, lambda t, s: ({6: (2, 3), 4: (2, 2), 7: (1, 7), 1: (1, 1)}[t],
                                            {6: (2, 3), 7: (1, 7), 4: (2, 2)}[s])),
    "rank5_axes23": ((2, 3), 2, lambda t, s: ((2,) + {6: (2, 3), 4: (2, 2), 7: (7, 1), 1: (1, 1)}[t],
                                              (2,) + {6: (3, 2), 7: (1, 7), 4: (1, 4)}[s])),
}
_PAIR_WINDOWS = {"none": None, "band": (1, 2), "left": (2, 0)}
_PAIR_CAUSAL = {False: "", True: "-causal", "bottom_right": "-causal_bottom_right"}
# the query offsets per lengths level (T, S): one for the batch, or one per sequence (cycled over the batch), each in
# -T..S; negative ones leave the first rows nothing under causal (ONNX's "structurally empty" rows)
_PAIR_OFFSETS = {"shared": {"T=S": 2, "T<S": 1, "T>S": -2, "T=1": 3},
                 "per_sequence": {"T=S": (0, 3, -2), "T<S": (3, 0, 2), "T>S": (-3, 0, -1), "T=1": (5, 0, 2)}}
_PAIR_LOGITS = {"default": {}, "softcap": {"softcap": 1.5}, "scale": {"logit_scale": 0.35}}


def pair_case(index: int, level: PairLevels) -> Case:
    """The case of line ``index`` of the design."""
    axes, batch, shape = _SHAPES[level.axes]
    q_shape, k_shape = shape(*_LENGTHS[level.lengths])
    heads, key_dim = 4 if level.kv_heads == "grouped" else level.heads, level.key_dim
    spec = make_spec(heads, key_dim, attention_axes=axes, use_bias=level.bias,
                     value_dim=key_dim + 2 if level.value_dim == "other" else None,
                     output_shape={"default": None, "width5": 5, "2x3": (2, 3)}[level.output],
                     num_kv_heads={"all": None, "one": 1, "grouped": 2}[level.kv_heads])
    offset = _PAIR_OFFSETS.get(level.query_offset, {}).get(level.lengths)
    if isinstance(offset, tuple):
        offset = tuple(offset[b % len(offset)] for b in range(batch))
    window = _PAIR_WINDOWS[level.window]
    bias, lengths = (None if kind == "none" else kind for kind in (level.logit_bias, level.padding_lengths))
    distinct = level.key == "distinct"
    width = heads * key_dim
    widths = dict(query_dim=width, value_dim=width, key_dim=width) if level.widths == "equal" else \
        dict(query_dim=8, value_dim=5, key_dim=6 if distinct else 5)
    name = (f"pairs{index:02d}-{level.axes}-{level.lengths.replace('=', 'eq').replace('<', 'lt').replace('>', 'gt')}"
            f"-mask_{level.mask}{_PAIR_CAUSAL[level.causal]}-heads{heads}_kd{key_dim}"
            f"{'-value_dim' if level.value_dim == 'other' else ''}-out_{level.output}"
            f"{'-key_distinct' if distinct else ''}{'' if level.bias else '-no_bias'}-widths_{level.widths}"
            f"{ {'all': '', 'one': '-mqa', 'grouped': '-gqa'}[level.kv_heads]}"
            f"{'' if window is None else '-window_' + '_'.join(str(w).lower() for w in window)}"
            f"{'' if bias is None else '-bias_' + bias}{'' if lengths is None else '-lengths_' + lengths}"
            f"{'' if offset is None else '-offset_' + level.query_offset}"
            f"{'' if level.logits == 'default' else '-' + level.logits}")
    return Case(id=name, area="pairs", spec=spec, batch=batch, q_shape=q_shape, k_shape=k_shape, key_distinct=distinct,
                mask=level.mask, causal=level.causal, quick=index < 3, window=window, bias=bias, lengths=lengths,
                query_offset=offset, **_PAIR_LOGITS[level.logits], **widths)


def cases() -> list[Case]:
    return [pair_case(i, level) for i, level in enumerate(PAIR_DESIGN)]


def case_factors(case: Case) -> dict:
    """The levels of PAIR_FACTORS a case exercises, read from its fields (not from the design table)."""
    spec = case.attention_spec
    call = case.call() if case.query_offset is not None else case.shape_call()
    t, s = call.q_len, call.k_len
    n_att = len(call.attention_axes)
    axes = "rank3" if case.query_shape.__len__() == 3 else (
        "rank4_axis2" if n_att == 1 else "rank4_axes12") if len(case.query_shape) == 4 else "rank5_axes23"
    lead = case.mask_lead if case.mask_lead is not None else None
    mask = {"all_allowed": "full"}.get(case.mask, case.mask)
    if case.mask in ("full", "all_allowed") and lead == 0:
        mask = "broadcast"
    elif case.mask == "full" and lead == call.n_batch + 1:
        mask = "per_head"
    q_dim, k_dim, v_dim = case.dims
    return {
        "lengths": "T=1" if t == 1 else "T=S" if t == s else "T<S" if t < s else "T>S",
        "mask": mask, "causal": case.causal, "heads": spec.num_heads if spec.num_heads <= 3 else 3,
        "key_dim": 1 if spec.key_dim == 1 else 4,
        "value_dim": "same" if spec.value_dim in (None, spec.key_dim) else "other",
        "output": "default" if spec.output_shape is None else "width5" if len(spec.output_shape) == 1 else "2x3",
        "axes": axes, "key": "distinct" if case.key_distinct else "value", "bias": spec.use_bias,
        "widths": "equal" if q_dim == k_dim == v_dim == spec.num_heads * spec.key_dim else "mixed",
        "kv_heads": "all" if spec.kv_heads == spec.num_heads else "one" if spec.kv_heads == 1 else "grouped",
        "window": "none" if case.window is None else "left" if case.window[1] == 0 else "band",
        "logit_bias": case.bias or "none", "padding_lengths": case.lengths or "none",
        "query_offset": "none" if call.query_offset is None else "per_sequence" if call.offsets_vary else "shared",
        "logits": "softcap" if case.softcap is not None else "scale" if case.logit_scale is not None else "default",
    }


def pair_coverage(cases) -> tuple[int, int, list]:
    """(pairs met, pairs possible, the pairs missing) over the cases, by PAIR_FACTORS."""
    names = list(PAIR_FACTORS)
    met = set()
    for case in cases:
        levels = case_factors(case)
        for a, b in itertools.combinations(names, 2):
            met.add((a, levels[a], b, levels[b]))
    possible = {(a, x, b, y) for a, b in itertools.combinations(names, 2)
                for x in PAIR_FACTORS[a] for y in PAIR_FACTORS[b]} - PAIR_EXCLUDED
    missing = sorted(possible - met, key=str)
    return len(possible & met), len(possible), missing
