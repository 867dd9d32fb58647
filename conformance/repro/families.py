"""The framework call paths a standalone reproducer can be written for, as data: one template per path.

A template is Python source that defines ``framework(quantity) -> numpy.ndarray`` in a reproducer, after the
script has defined its inputs (``query``, ``value``, ``INPUTS``: the arrays given, ``key`` among them only when
distinct; ``W``: the canonical weights, Keras's einsum layout; ``mask``: the boolean may-attend mask in the
compact ``[N|1, H|1, T|1, S|1]`` form, or None; ``cotangent``; ``DTYPE``, ``HEADS``, ``KEY_DIM``, ``Q_SHAPE``,
``K_SHAPE``). Each writes out what the adapter of that path does (``impls/<adapter>.py``), in the form a user of
the framework writes it, so the script needs neither mhabench nor the adapter.

``Family.fits`` says which cases a template can express; the generator picks and shrinks only among those.
"""
from __future__ import annotations

from dataclasses import dataclass

TORCH_SDPA = '''
import torch
import torch.nn.functional as F


def framework(quantity):
    """torch.einsum projections around F.scaled_dot_product_attention (attn_mask: True = may attend)."""
    dtype = getattr(torch, DTYPE)
    leaves = {name: torch.tensor(x, dtype=dtype, requires_grad=True) for name, x in INPUTS.items()}
    P = {name: torch.tensor(w, dtype=dtype) for name, w in W.items()}
    q = torch.einsum("btd,dhk->bhtk", leaves["query"], P["Wq"]) + P["bq"][:, None]
    k = torch.einsum("bsd,dhk->bhsk", leaves.get("key", leaves["value"]), P["Wk"]) + P["bk"][:, None]
    v = torch.einsum("bsd,dhk->bhsk", leaves["value"], P["Wv"]) + P["bv"][:, None]
    attn_mask = None if mask is None else torch.tensor(mask[0, 0] if mask.shape[:2] == (1, 1) else mask)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    out = torch.einsum("bhtv,hvo->bto", o, P["Wo"]) + P["bo"]
    if not quantity.startswith("grad_"):
        return out.detach().double().numpy()
    grad, = torch.autograd.grad((out * torch.tensor(cotangent, dtype=dtype)).sum(), leaves[quantity[5:]])
    return grad.double().numpy()
'''

TORCH_MHA = '''
import torch


def framework(quantity):
    """nn.MultiheadAttention(batch_first=True) holding the canonical weights; its masks say True = masked."""
    dtype = getattr(torch, DTYPE)
    key_input = INPUTS.get("key", value)
    layer = torch.nn.MultiheadAttention(query.shape[-1], HEADS, batch_first=True, kdim=key_input.shape[-1],
                                        vdim=value.shape[-1], dtype=dtype)
    rows = lambda w: torch.tensor(w.reshape(w.shape[0], -1).T)  # [D, H, k] -> torch's [H * k, D]
    with torch.no_grad():
        if layer._qkv_same_embed_dim:
            layer.in_proj_weight.copy_(torch.cat([rows(W["Wq"]), rows(W["Wk"]), rows(W["Wv"])]))
        else:
            layer.q_proj_weight.copy_(rows(W["Wq"]))
            layer.k_proj_weight.copy_(rows(W["Wk"]))
            layer.v_proj_weight.copy_(rows(W["Wv"]))
        layer.in_proj_bias.copy_(torch.tensor(np.concatenate([W["bq"].ravel(), W["bk"].ravel(), W["bv"].ravel()])))
        layer.out_proj.weight.copy_(torch.tensor(W["Wo"].reshape(-1, W["Wo"].shape[-1]).T))
        layer.out_proj.bias.copy_(torch.tensor(W["bo"]))
    leaves = {name: torch.tensor(x, dtype=dtype, requires_grad=True) for name, x in INPUTS.items()}
    masks = {}
    if mask is not None and mask.shape[1:3] == (1, 1):  # a padding mask: key_padding_mask [B, S]
        masks["key_padding_mask"] = torch.tensor(~np.broadcast_to(mask[:, 0, 0], (query.shape[0], mask.shape[-1])))
    elif mask is not None and mask.shape[:2] == (1, 1):  # one [T, S] for every batch element and head
        masks["attn_mask"] = torch.tensor(~mask[0, 0])
    elif mask is not None:  # [B * H, T, S]
        full = np.broadcast_to(mask, (query.shape[0], HEADS, query.shape[1], value.shape[1]))
        masks["attn_mask"] = torch.tensor(~full.reshape(-1, *full.shape[2:]))
    need_weights = quantity in ("output_with_scores", "scores")
    out, weights = layer(leaves["query"], leaves.get("key", leaves["value"]), leaves["value"],
                         need_weights=need_weights, average_attn_weights=False, **masks)
    if quantity == "scores":
        return weights.detach().double().numpy()
    if not quantity.startswith("grad_"):
        return out.detach().double().numpy()
    grad, = torch.autograd.grad((out * torch.tensor(cotangent, dtype=dtype)).sum(), leaves[quantity[5:]])
    return grad.double().numpy()
'''

JAX_DPA = '''
import jax
import jax.numpy as jnp

if DTYPE == "float64":
    jax.config.update("jax_enable_x64", True)  # JAX computes in float32 without it


def framework(quantity):
    """jnp.einsum projections around jax.nn.dot_product_attention ([B, T, H, head_dim]; mask True = may attend)."""
    dtype = jnp.dtype(DTYPE)
    P = {name: jnp.asarray(w, dtype) for name, w in W.items()}

    def forward(inputs):
        q = jnp.einsum("btd,dhk->bthk", inputs["query"], P["Wq"]) + P["bq"]
        k = jnp.einsum("bsd,dhk->bshk", inputs.get("key", inputs["value"]), P["Wk"]) + P["bk"]
        v = jnp.einsum("bsd,dhk->bshk", inputs["value"], P["Wv"]) + P["bv"]
        o = jax.nn.dot_product_attention(q, k, v, mask=None if mask is None else jnp.asarray(mask))
        return jnp.einsum("bthv,hvo->bto", o, P["Wo"]) + P["bo"]

    inputs = {name: jnp.asarray(x, dtype) for name, x in INPUTS.items()}
    if not quantity.startswith("grad_"):
        return np.asarray(forward(inputs).astype(jnp.float32 if DTYPE != "float64" else dtype), np.float64)
    grads = jax.grad(lambda i: jnp.sum(forward(i) * jnp.asarray(cotangent, dtype)))(inputs)
    return np.asarray(grads[quantity[5:]].astype(jnp.float32 if DTYPE != "float64" else dtype), np.float64)
'''

FLAX_MHA = '''
import jax
import jax.numpy as jnp
from flax import nnx

if DTYPE == "float64":
    jax.config.update("jax_enable_x64", True)  # JAX computes in float32 without it


def framework(quantity):
    """flax.nnx.MultiHeadAttention holding the canonical weights (the same layout); mask True = may attend.
    The weights come from the call that sows them (sow_weights=True), as Flax users get them."""
    dtype = jnp.dtype(DTYPE)
    key_input = INPUTS.get("key", value)
    module = nnx.MultiHeadAttention(num_heads=HEADS, in_features=query.shape[-1], qkv_features=HEADS * KEY_DIM,
                                    out_features=W["bo"].shape[-1], in_kv_features=key_input.shape[-1],
                                    dtype=dtype, param_dtype=dtype, decode=False, rngs=nnx.Rngs(0))
    for part, kernel, bias in (("query", "Wq", "bq"), ("key", "Wk", "bk"), ("value", "Wv", "bv"), ("out", "Wo", "bo")):
        getattr(module, part).kernel.value = jnp.asarray(W[kernel], dtype)
        getattr(module, part).bias.value = jnp.asarray(W[bias], dtype)
    given = None if mask is None else jnp.asarray(mask)
    as64 = lambda x: np.asarray(x.astype(jnp.float32 if DTYPE != "float64" else dtype), np.float64)

    def forward(inputs):
        return module(inputs["query"], inputs.get("key", inputs["value"]), inputs["value"], mask=given)

    inputs = {name: jnp.asarray(x, dtype) for name, x in INPUTS.items()}
    if quantity in ("output_with_scores", "scores"):
        out, sown = nnx.capture(module, nnx.Intermediate)(inputs["query"], inputs.get("key", inputs["value"]),
                                                          inputs["value"], mask=given, sow_weights=True)
        return as64(out if quantity == "output_with_scores" else jax.tree.leaves(sown)[0])
    if not quantity.startswith("grad_"):
        return as64(forward(inputs))
    grads = jax.grad(lambda i: jnp.sum(forward(i) * jnp.asarray(cotangent, dtype)))(inputs)
    return as64(grads[quantity[5:]])
'''

# Keras 3 and Keras 2 (tf_keras) take the weights and the mask alike
KERAS_SETUP = '''
    layer(*args, **kwargs)  # builds the layer for these shapes
    layer.set_weights([W[name] for name in ("Wq", "bq", "Wk", "bk", "Wv", "bv", "Wo", "bo")])
    if mask is not None:
        kwargs["attention_mask"] = np.broadcast_to(mask[:, 0], (query.shape[0], np.prod(Q_SHAPE), np.prod(K_SHAPE))
                                                   ).reshape(query.shape[0], *Q_SHAPE, *K_SHAPE)
'''

KERAS_MHA = '''
import keras


def framework(quantity):
    """keras.layers.MultiHeadAttention holding the canonical weights (its own layout); attention_mask
    [B, *query axes, *key axes], True = may attend (Keras inserts the head axis)."""
    ops = keras.ops
    layer = keras.layers.MultiHeadAttention(num_heads=HEADS, key_dim=KEY_DIM, dtype=DTYPE,
                                            attention_axes=tuple(range(1, 1 + len(Q_SHAPE))))
    tensor = lambda x: ops.convert_to_tensor(x, dtype=DTYPE)
    args = (tensor(query), tensor(value))
    kwargs = {"key": tensor(INPUTS["key"])} if "key" in INPUTS else {}
    # KERAS_SETUP
    with_scores = quantity in ("output_with_scores", "scores")
    result = layer(*args, return_attention_scores=with_scores, **kwargs)
    if with_scores:
        out, scores = result
        result = scores if quantity == "scores" else out
    return ops.convert_to_numpy(ops.cast(result, "float32" if DTYPE != "float64" else DTYPE)).astype(np.float64)
'''

TF_KERAS_MHA = '''
import tensorflow as tf
import tf_keras


def framework(quantity):
    """tf_keras.layers.MultiHeadAttention (Keras 2) holding the canonical weights (its own layout);
    attention_mask [B, *query axes, *key axes], True = may attend (Keras inserts the head axis)."""
    layer = tf_keras.layers.MultiHeadAttention(num_heads=HEADS, key_dim=KEY_DIM, dtype=DTYPE,
                                               attention_axes=tuple(range(1, 1 + len(Q_SHAPE))))
    leaves = {name: tf.Variable(tf.cast(x, DTYPE)) for name, x in INPUTS.items()}
    args = (leaves["query"], leaves["value"])
    kwargs = {"key": leaves["key"]} if "key" in leaves else {}
    # KERAS_SETUP
    with_scores = quantity in ("output_with_scores", "scores")
    with tf.GradientTape() as tape:
        result = layer(*args, return_attention_scores=with_scores, **kwargs)
        if with_scores:
            result = result[1] if quantity == "scores" else result[0]
        if quantity.startswith("grad_"):
            result = tape.gradient(tf.reduce_sum(tf.cast(result, "float64") * cotangent), leaves[quantity[5:]])
    return tf.cast(result, "float64").numpy()
'''

KERAS_MHA, TF_KERAS_MHA = (t.replace("    # KERAS_SETUP\n", KERAS_SETUP.lstrip("\n")) for t in (KERAS_MHA, TF_KERAS_MHA))


@dataclass(frozen=True)
class Family:
    """One framework call path: the adapters that take it, what its script imports, and what it can express."""

    name: str
    call: str                        # the call, in words
    template: str
    imports: tuple[str, ...]         # the distributions the script needs besides NumPy
    environment: tuple[tuple[str, str], ...] = ()  # set before the framework is imported
    gradients: bool = True           # the template differentiates its call
    multi_axis: bool = False         # attention over several axes (all the inner ones)
    head_masks: bool = True          # a mask with a head axis
    tied_widths: bool = False        # query width = value width = key width = heads * key_dim (torch's E)
    same_kv_width: bool = False      # a distinct key has the value's width

    def fits(self, case, quantity: str) -> bool:
        """Whether the template expresses this case and quantity as the adapter does."""
        spec = case.attention_spec
        rank = len(case.q_shape)
        plain = (spec.use_bias and not spec.dropout and spec.output_shape is None
                 and spec.value_dim in (None, spec.key_dim) and spec.kv_heads == spec.num_heads
                 and not case.causal and case.window is None and case.bias is None and case.lengths is None
                 and not case.shared_input and case.scale > 0)
        axes = spec.resolve_axes(rank + 2)
        all_inner = tuple(axes) == tuple(range(1, rank + 1))
        if not plain or not all_inner or (rank > 1 and not self.multi_axis) or len(case.k_shape) != rank:
            return False
        if quantity.startswith("grad_") and (not self.gradients or quantity not in GRADIENTS):
            return False
        if not self.head_masks:
            mask = case.call().flat_mask()
            if mask is not None and mask.shape[1] != 1:
                return False
        if self.tied_widths and not (case.query_dim == case.value_dim == spec.num_heads * spec.key_dim
                                     and (not case.key_distinct or case.key_dim == case.query_dim)):
            return False
        if self.same_kv_width and case.key_distinct and case.key_dim != case.value_dim:
            return False
        return True


GRADIENTS = ("grad_query", "grad_key", "grad_value")


def _keras(adapter: str, backend: str) -> Family:
    return Family(adapter, f"keras.layers.MultiHeadAttention on the {backend} backend", KERAS_MHA, ("keras", {"tensorflow": "tensorflow", "jax": "jax",
                                                                "torch": "torch"}[backend]),
                  environment=(("KERAS_BACKEND", backend),), gradients=False, multi_axis=True, head_masks=False)


FAMILIES = {
    "torch_sdpa": Family("torch_sdpa", "torch.nn.functional.scaled_dot_product_attention", TORCH_SDPA, ("torch",)),
    "torch_mha": Family("torch_mha", "torch.nn.MultiheadAttention", TORCH_MHA, ("torch",), tied_widths=True),
    "jax_dpa": Family("jax_dpa", "jax.nn.dot_product_attention", JAX_DPA, ("jax",)),
    "flax_mha": Family("flax_mha", "flax.nnx.MultiHeadAttention", FLAX_MHA, ("flax", "jax"), same_kv_width=True),
    "keras_mha": _keras("keras_mha", "tensorflow"),
    "keras_mha@jax": _keras("keras_mha@jax", "jax"),
    "keras_mha@torch": _keras("keras_mha@torch", "torch"),
    "tf_keras_mha": Family("tf_keras_mha", "tf_keras.layers.MultiHeadAttention", TF_KERAS_MHA, ("tensorflow", "tf_keras"), multi_axis=True,
                           head_masks=False),
}
# adapter -> the family whose template is its call: the plain adapters only (a kernel variant such as
# torch_sdpa+flash forces a kernel the user did not choose; the plain adapter is what users run)


def family_of(adapter: str) -> Family | None:
    return FAMILIES.get(adapter)
