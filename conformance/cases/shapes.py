"""Sizes and precision: the areas ``shapes`` (lengths, heads, widths, output shapes, no key at all, dropout
that must be inactive outside training) and ``dtypes`` (logit magnitudes, long key axes, lengths across
kernel tiles)."""
from __future__ import annotations

from .case import Case, spec


def cases() -> list[Case]:
    return shape_cases() + dtype_cases()


def shape_cases() -> list[Case]:
    c = lambda id, **kw: Case(id=id, area="shapes", spec=kw.pop("spec", spec()), **kw)
    cases = [
        c("self_T8-heads2_kd4"),
        c("cross_T8_S4-heads2", k_shape=(4,)),
        c("cross_T4_S8-heads2", q_shape=(4,), k_shape=(8,)),
        c("cross_T8_S4-key_distinct", k_shape=(4,), key_distinct=True, quick=True),
        c("cross_T6_S5-dims_q8_k6_v5", q_shape=(6,), k_shape=(5,), key_dim=6, value_dim=5, key_distinct=True),
        c("self_T8-value_dim6", spec=spec(value_dim=6)),
        c("self_T8-output_shape5", spec=spec(output_shape=5)),
        c("self_T8-output_shape2x3", spec=spec(output_shape=(2, 3)), quick=True),
        c("self_T8-heads3_kd5", spec=spec(3, 5)),
        c("self_T8-no_bias", spec=spec(use_bias=False)),
        c("self_T8-batch1", batch=1),
        c("self_T1-len1", q_shape=(1,), k_shape=(1,)),
        c("cross_T1_S8-query_len1", q_shape=(1,)),
        c("cross_T8_S1-key_len1", k_shape=(1,)),
    ]
    for heads in (1, 2, 3, 8, 16):  # num_heads * key_dim == query width, as nn.MultiheadAttention needs
        cases.append(c(f"self_T8-heads{heads}", spec=spec(heads, 2), query_dim=2 * heads,
                       value_dim=2 * heads, key_dim=2 * heads, quick=heads == 3))
    cases.append(c("cross_T8_S4-heads3", spec=spec(3, 2), k_shape=(4,), query_dim=6, value_dim=6, key_dim=6))
    cases += [
        # x attends to itself through one array: what a fused qkv projection (the textbook layer) can express
        c("shared_input_T8-heads2", shared_input=True, quick=True),
        # found by the random cases: Keras's scores differ for two heads of key_dim 1 on one-wide inputs
        c("cross_T1_S2-heads2_kd1-width1", spec=spec(2, 1), batch=1, q_shape=(1,), k_shape=(2,), query_dim=1,
          key_dim=1, value_dim=1),
        # one head, key_dim 1
        c("self_T8-heads1_kd1", spec=spec(1, 1), query_dim=1, key_dim=1, value_dim=1),
        c("self_T8-heads1_kd4", spec=spec(1, 4), query_dim=4, key_dim=4, value_dim=4),
        c("cross_T6_S5-heads3_kd1", spec=spec(3, 1), q_shape=(6,), k_shape=(5,), query_dim=3, key_dim=3,
          value_dim=3),
        # a per-head bias [H, 1] on inputs whose first inner axis has length H: Keras's TensorFlow ops.add
        # takes its bias_add shortcut along the wrong axis there (the catalogue's keras_tf_bias_add_shortcut)
        c("cross_T4_S3-heads3_kd1", spec=spec(3, 1), q_shape=(4,), k_shape=(3,)),
        c("cross_T4_S2-heads2_kd1", spec=spec(2, 1), q_shape=(4,), k_shape=(2,)),
        # no key at all (S = 0): every query row is fully masked, the canonical output is the output bias
        c("cross_T4_S0", q_shape=(4,), k_shape=(0,)),
        # dropout must be inactive outside training
        c("self_T8-dropout0.3-not_training", spec=spec(dropout=0.3)),
        c("cross_T6_S4-dropout0.5-causal", spec=spec(dropout=0.5), q_shape=(6,), k_shape=(4,), causal=True),
        c("cross_T6_S4-output_shape3x2-mask_padding", spec=spec(output_shape=(3, 2)), q_shape=(6,), k_shape=(4,),
          mask="padding"),
    ]
    return cases


def dtype_cases() -> list[Case]:
    c = lambda id, **kw: Case(id=id, area="dtypes", spec=spec(), **kw)
    cases = [
        # inputs scaled so logits reach ~1e4: a softmax without max-subtraction overflows
        c("self_T8-large_logits", scale=60.0, quick=True),
        c("self_T8-large_logits-mask_padding", scale=60.0, mask="padding"),
        c("self_T8-small_inputs", scale=1e-3),
        c("cross_T16_S128-long_keys", q_shape=(16,), k_shape=(128,)),
        # float16 accumulation error grows with the number of keys summed; from ~256 keys a float16 running
        # sum no longer passes (the mutation check's float16 mutant escapes at 128)
        c("cross_T4_S512-long_keys", q_shape=(4,), k_shape=(512,)),
    ]
    # lengths either side of the tile sizes fused kernels use (64, 128, 256, 1024, 2048), T != S,
    # padding and causal, forward and gradients, in float32 and float16
    tiles = [(63, 65, "none", False), (65, 63, "padding", True), (127, 129, "padding", False), (129, 127, "none", True),
             (255, 257, "none", False), (257, 255, "padding", True), (1023, 1025, "padding", True),
             (1025, 1023, "none", True), (2049, 1025, "padding", False)]
    for t, s_len, mask, causal in tiles:
        name = f"tiles-cross_T{t}_S{s_len}" + ("-mask_padding" if mask == "padding" else "") + ("-causal" if causal else "")
        cases.append(c(name, batch=1 if t > 500 else 2, q_shape=(t,), k_shape=(s_len,), mask=mask, causal=causal,
                       dtypes=("float32", "float16")))
    return cases
