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

TORCH_FLEX = '''
import torch
from torch.nn.attention.flex_attention import flex_attention


def framework(quantity):
    """torch.einsum projections around torch.compile(flex_attention, dynamic=True), compiled as for a call
    without a mask (Inductor's fused CPU template)."""
    dtype = getattr(torch, DTYPE)
    x = {name: torch.tensor(a, dtype=dtype) for name, a in INPUTS.items()}
    P = {name: torch.tensor(w, dtype=dtype) for name, w in W.items()}
    q = torch.einsum("btd,dhk->bhtk", x["query"], P["Wq"]) + P["bq"][:, None]
    k = torch.einsum("bsd,dhk->bhsk", x.get("key", x["value"]), P["Wk"]) + P["bk"][:, None]
    v = torch.einsum("bsd,dhk->bhsk", x["value"], P["Wv"]) + P["bv"][:, None]
    o = torch.compile(flex_attention, dynamic=True)(q, k, v)
    return (torch.einsum("bhtv,hvo->bto", o, P["Wo"]) + P["bo"]).double().numpy()
'''

# nn.MultiheadAttention holding the canonical weights, and its masks (True = masked), as torch_mha passes them
TORCH_MHA_LAYER = '''
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
    masks = {}
    if mask is not None and mask.shape[1:3] == (1, 1):  # a padding mask: key_padding_mask [B, S]
        masks["key_padding_mask"] = torch.tensor(~np.broadcast_to(mask[:, 0, 0], (query.shape[0], mask.shape[-1])))
    elif mask is not None and mask.shape[:2] == (1, 1):  # one [T, S] for every batch element and head
        masks["attn_mask"] = torch.tensor(~mask[0, 0])
    elif mask is not None:  # [B * H, T, S]
        full = np.broadcast_to(mask, (query.shape[0], HEADS, query.shape[1], value.shape[1]))
        masks["attn_mask"] = torch.tensor(~full.reshape(-1, *full.shape[2:]))
'''

TORCH_MHA = '''
import torch


def framework(quantity):
    """nn.MultiheadAttention(batch_first=True) holding the canonical weights; its masks say True = masked."""
    # TORCH_MHA_LAYER
    leaves = {name: torch.tensor(x, dtype=dtype, requires_grad=True) for name, x in INPUTS.items()}
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

TORCH_MHA_ORT = '''
import contextlib
import io

import onnxruntime as ort
import torch


def framework(quantity):
    """nn.MultiheadAttention(batch_first=True) holding the canonical weights, its call exported by
    torch.onnx.export (dynamo, opset 25, the batch and sequence axes dynamic) and run by onnxruntime."""
    # TORCH_MHA_LAYER
    need_weights = quantity in ("output_with_scores", "scores")
    args = {"query": query, "key": INPUTS.get("key", value), "value": value}
    args = {**{name: torch.tensor(x, dtype=dtype) for name, x in args.items()}, **masks}

    class Call(torch.nn.Module):  # the module with the call's keyword arguments, as the exporter takes it
        def forward(self, query, key, value, attn_mask=None, key_padding_mask=None):
            given = {"attn_mask": attn_mask, "key_padding_mask": key_padding_mask}
            return self.mha(query, key, value, need_weights=need_weights, average_attn_weights=False,
                            **{name: m for name, m in given.items() if m is not None})

    call = Call()
    call.mha = layer
    dynamic = {name: {axis: torch.export.Dim.AUTO for axis in range(t.ndim - (name in ("query", "key", "value")))}
               for name, t in args.items()}
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
        program = torch.onnx.export(call.eval(), (), kwargs=args, dynamo=True, opset_version=25,
                                    dynamic_shapes=dynamic, verbose=False)
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    results = session.run(None, {i.name: args[i.name].numpy() for i in session.get_inputs()})
    return results[1 if quantity == "scores" else 0].astype(np.float64)
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
    layer = keras.layers.MultiHeadAttention(num_heads=HEADS, key_dim=KEY_DIM, dtype=DTYPE,
                                            attention_axes=tuple(range(1, 1 + len(Q_SHAPE))))
    ops = keras.ops
    tensor = lambda x: ops.convert_to_tensor(x, dtype=DTYPE)
    args = (tensor(query), tensor(value))
    kwargs = {"key": tensor(INPUTS["key"])} if "key" in INPUTS else {}
    # KERAS_SETUP
    if quantity.startswith("grad_"):  # of sum(output * cotangent), by the backend's autodiff (gradient below)
        inputs, name = {"query": args[0], "value": args[1], **kwargs}, quantity[5:]

        def loss(x):
            given = {**inputs, name: x}
            return ops.sum(layer(given.pop("query"), given.pop("value"), **given) * tensor(cotangent))
        return gradient(loss, inputs[name]).astype(np.float64)
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

TORCH_MHA, TORCH_MHA_ORT = (t.replace("    # TORCH_MHA_LAYER\n", TORCH_MHA_LAYER.lstrip("\n")) for t in (TORCH_MHA, TORCH_MHA_ORT))
KERAS_MHA, TF_KERAS_MHA = (t.replace("    # KERAS_SETUP\n", KERAS_SETUP.lstrip("\n")) for t in (KERAS_MHA, TF_KERAS_MHA))

# keras.layers.GroupQueryAttention, called as MultiHeadAttention is from "    ops = keras.ops" on
KERAS_GQA = '''
import keras


def framework(quantity):
    """keras.layers.GroupQueryAttention (as many key/value heads as query heads) holding the canonical weights
    (its own layout, which is ours); attention_mask [B, T, S], True = may attend (Keras inserts the head axis)."""
    layer = keras.layers.GroupQueryAttention(head_dim=KEY_DIM, num_query_heads=HEADS, num_key_value_heads=HEADS,
                                             dtype=DTYPE)
''' + KERAS_MHA[KERAS_MHA.index("    ops = keras.ops"):]


ORT_ATTENTION = '''
import onnxruntime as ort
from onnx import helper, numpy_helper


def framework(quantity):
    """An ONNX graph, MatMul + Add projections around the Attention operator (opset 24; attn_mask True = may
    attend, as [T, S], [H, T, S] or [N, H, T, S]: ORT broadcasts its batch and head axes only), run by ORT."""
    scores = quantity in ("output_with_scores", "scores")
    flat = lambda x: np.ascontiguousarray(x.reshape(x.shape[0], -1, x.shape[-1]).astype(DTYPE))  # [N, L, D]
    feeds = {name: flat(x) for name, x in INPUTS.items()}
    if mask is not None:
        full = np.broadcast_to(mask, mask.shape[:2] + (feeds["query"].shape[1], feeds["value"].shape[1]))
        feeds["mask"] = np.ascontiguousarray(full if len(full) > 1 else full[0] if full.shape[1] > 1 else full[0, 0])
    dense = lambda x, p, out: [helper.make_node("MatMul", [x, "W" + p], [out + "0"]),
                               helper.make_node("Add", [out + "0", "b" + p], [out])]
    nodes = dense("query", "q", "q") + dense("key" if "key" in feeds else "value", "k", "k") + dense("value", "v", "v")
    nodes.append(helper.make_node("Attention", ["q", "k", "v"] + ["mask"] * (mask is not None),
                                  ["y", "", "", "probs"] if scores else ["y"], q_num_heads=HEADS, kv_num_heads=HEADS,
                                  is_causal=0, **({"qk_matmul_output_mode": 3} if scores else {})))
    nodes += dense("y", "o", "output")
    weights = [numpy_helper.from_array(np.ascontiguousarray(
        w.reshape(-1) if name[0] == "b" else w.reshape(-1, w.shape[-1]) if name == "Wo" else w.reshape(w.shape[0], -1)
    ).astype(DTYPE), name) for name, w in W.items()]
    info = lambda name: helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(feeds[name].dtype), None)
    outputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(np.dtype(DTYPE)), None)
               for n in ["output", "probs"][:1 + scores]]
    graph = helper.make_graph(nodes, "attention", [info(name) for name in feeds], outputs, weights)
    opsets = [helper.make_opsetid("", 24)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets))
    results = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    if quantity == "scores":
        return results[1].astype(np.float64).reshape(query.shape[0], HEADS, *Q_SHAPE, *K_SHAPE)
    return results[0].astype(np.float64).reshape(query.shape[0], *Q_SHAPE, -1)
'''


# The textbook layers (impls/classic/) are the user's own code: the script carries the layer as written there
CLASSIC_KERAS = '''
import keras
import tensorflow as tf


class TextbookMultiHeadAttention(keras.layers.Layer):
    """The tutorial layer: Dense wq, wk, wv and dense, split_heads, and an additive mask (1 = masked) * -1e9."""

    def __init__(self, d_model, num_heads, **kwargs):
        super().__init__(**kwargs)
        self.d_model, self.num_heads, self.depth = d_model, num_heads, d_model // num_heads
        self.wq, self.wk, self.wv, self.dense = (keras.layers.Dense(d_model, dtype=self.dtype_policy) for _ in "qkvo")

    def split_heads(self, x, batch_size):
        return tf.transpose(tf.reshape(x, (batch_size, -1, self.num_heads, self.depth)), perm=[0, 2, 1, 3])

    def call(self, v, k, q, attention_mask=None):
        batch_size = tf.shape(q)[0]
        q, k, v = (self.split_heads(dense(x), batch_size) for dense, x in ((self.wq, q), (self.wk, k), (self.wv, v)))
        logits = tf.matmul(q, k, transpose_b=True) / tf.math.sqrt(tf.cast(tf.shape(k)[-1], q.dtype))
        if attention_mask is not None:
            logits += tf.cast(attention_mask, logits.dtype) * -1e9
        attention_weights = tf.nn.softmax(logits, axis=-1)
        attended = tf.transpose(tf.matmul(attention_weights, v), perm=[0, 2, 1, 3])
        return self.dense(tf.reshape(attended, (batch_size, -1, self.d_model))), attention_weights


def framework(quantity):
    """The textbook layer holding the canonical weights (head h owns columns h*depth:(h+1)*depth of wq, wk, wv;
    rows of dense); its mask is 1.0 where masked."""
    layer = TextbookMultiHeadAttention(HEADS * KEY_DIM, HEADS, dtype=DTYPE)
    for dense, p in ((layer.wq, "q"), (layer.wk, "k"), (layer.wv, "v"), (layer.dense, "o")):
        kernel = W["W" + p].reshape(-1, W["W" + p].shape[-1]) if p == "o" else W["W" + p].reshape(len(W["W" + p]), -1)
        dense.build((None, None, kernel.shape[0]))
        dense.kernel.assign(tf.cast(kernel, DTYPE))
        dense.bias.assign(tf.cast(W["b" + p].ravel(), DTYPE))
    leaves = {name: tf.cast(x, DTYPE) for name, x in INPUTS.items()}
    with tf.GradientTape() as tape:
        tape.watch(list(leaves.values()))
        out, weights = layer(leaves["value"], leaves.get("key", leaves["value"]), leaves["query"],
                             attention_mask=None if mask is None else tf.cast(~mask, DTYPE))
    if quantity.startswith("grad_"):
        return tf.cast(tape.gradient(out, leaves[quantity[5:]], output_gradients=tf.cast(cotangent, DTYPE)),
                       "float64").numpy()
    return tf.cast(weights if quantity == "scores" else out, "float64").numpy()
'''

CLASSIC_TORCH = '''
import math

import torch
from torch import nn


def scaled_dot_product(q, k, v, mask=None):
    logits = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if mask is not None:
        logits = logits.masked_fill(mask == 0, -1e9)
    attention = torch.softmax(logits, dim=-1)
    return torch.matmul(attention, v), attention


class TextbookMultiheadAttention(nn.Module):
    """The tutorial module: one fused qkv_proj, interleaved per head by its reshape; mask 1 = keep."""

    def __init__(self, input_dim, embed_dim, num_heads):
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.qkv_proj = nn.Linear(input_dim, 3 * embed_dim)
        self.o_proj = nn.Linear(embed_dim, input_dim)

    def forward(self, x, mask=None):
        batch_size, seq_length, _ = x.shape
        qkv = self.qkv_proj(x).reshape(batch_size, seq_length, self.num_heads, 3 * self.head_dim)
        q, k, v = qkv.permute(0, 2, 1, 3).chunk(3, dim=-1)
        values, attention = scaled_dot_product(q, k, v, mask=mask)
        values = values.permute(0, 2, 1, 3).reshape(batch_size, seq_length, self.embed_dim)
        return self.o_proj(values), attention


def framework(quantity):
    """The textbook module holding the canonical weights (qkv_proj's rows: per head, its q, k, then v rows)."""
    dtype = getattr(torch, DTYPE)
    module = TextbookMultiheadAttention(query.shape[-1], HEADS * KEY_DIM, HEADS).to(dtype).eval()
    state = {"qkv_proj.weight": np.stack([W["Wq"], W["Wk"], W["Wv"]], axis=2).reshape(len(W["Wq"]), -1).T,
             "qkv_proj.bias": np.stack([W["bq"], W["bk"], W["bv"]], axis=1).ravel(),
             "o_proj.weight": W["Wo"].reshape(-1, W["Wo"].shape[-1]).T, "o_proj.bias": W["bo"]}
    module.load_state_dict({name: torch.tensor(w, dtype=dtype) for name, w in state.items()})
    with torch.no_grad():
        out, attention = module(torch.tensor(query, dtype=dtype), mask=None if mask is None else torch.tensor(mask))
    return (attention if quantity == "scores" else out).double().numpy()
'''


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
    self_attention: bool = False     # one input is query, key and value (a shared_input case), never another
    masks: bool = True               # the template passes a mask (False: only calls without one)

    def fits(self, case, quantity: str) -> bool:
        """Whether the template expresses this case and quantity as the adapter does."""
        spec = case.attention_spec
        rank = len(case.q_shape)
        plain = (spec.use_bias and not spec.dropout and spec.output_shape is None
                 and spec.value_dim in (None, spec.key_dim) and spec.kv_heads == spec.num_heads
                 and not case.causal and case.window is None and case.bias is None and case.lengths is None
                 and case.shared_input == self.self_attention and case.scale > 0)
        axes = spec.resolve_axes(rank + 2)
        all_inner = tuple(axes) == tuple(range(1, rank + 1))
        if not plain or not all_inner or (rank > 1 and not self.multi_axis) or len(case.k_shape) != rank:
            return False
        if quantity.startswith("grad_") and (not self.gradients or quantity not in GRADIENTS):
            return False
        if not (self.head_masks and self.masks):
            mask = case.call().flat_mask()
            if mask is not None and (not self.masks or mask.shape[1] != 1):
                return False
        if self.tied_widths and not (case.query_dim == case.value_dim == spec.num_heads * spec.key_dim
                                     and (not case.key_distinct or case.key_dim == case.query_dim)):
            return False
        if self.same_kv_width and case.key_distinct and case.key_dim != case.value_dim:
            return False
        return True


GRADIENTS = ("grad_query", "grad_key", "grad_value")


# d loss(x) / dx (float32 or float64 NumPy) by each Keras backend's own autodiff
KERAS_GRADIENT = {
    "tensorflow": '''

def gradient(loss, x):
    import tensorflow as tf
    with tf.GradientTape() as tape:
        tape.watch(x)
        value = loss(x)
    return tf.cast(tape.gradient(value, x), "float32" if DTYPE != "float64" else DTYPE).numpy()
''',
    "jax": '''

def gradient(loss, x):
    import jax
    return np.asarray(jax.grad(loss)(x).astype("float32" if DTYPE != "float64" else DTYPE))
''',
    "torch": '''

def gradient(loss, x):
    import torch
    x = x.detach().requires_grad_()
    return torch.autograd.grad(loss(x), x)[0].to(torch.float32 if DTYPE != "float64" else torch.float64).numpy()
'''}


def _keras(adapter: str, backend: str, layer: str = "MultiHeadAttention") -> Family:
    """A Keras 3 layer on one backend; MultiHeadAttention attends over several axes, GroupQueryAttention over one."""
    template = KERAS_MHA if layer == "MultiHeadAttention" else KERAS_GQA
    return Family(adapter, f"keras.layers.{layer} on the {backend} backend", template + KERAS_GRADIENT[backend],
                  ("keras", backend), environment=(("KERAS_BACKEND", backend),),
                  multi_axis=layer == "MultiHeadAttention", head_masks=False)


FAMILIES = {
    "torch_sdpa": Family("torch_sdpa", "torch.nn.functional.scaled_dot_product_attention", TORCH_SDPA, ("torch",)),
    "torch_flex": Family("torch_flex", "torch.compile(flex_attention)", TORCH_FLEX, ("torch",), gradients=False,
                         masks=False),
    "torch_mha": Family("torch_mha", "torch.nn.MultiheadAttention", TORCH_MHA, ("torch",), tied_widths=True),
    "jax_dpa": Family("jax_dpa", "jax.nn.dot_product_attention", JAX_DPA, ("jax",)),
    "flax_mha": Family("flax_mha", "flax.nnx.MultiHeadAttention", FLAX_MHA, ("flax", "jax"), same_kv_width=True),
    "keras_mha": _keras("keras_mha", "tensorflow"),
    "keras_mha@jax": _keras("keras_mha@jax", "jax"),
    "keras_mha@torch": _keras("keras_mha@torch", "torch"),
    "ort_attention": Family("ort_attention", "the ONNX Attention operator in onnxruntime", ORT_ATTENTION,
                            ("onnxruntime", "onnx"), gradients=False, multi_axis=True),
    "torch_mha@ort": Family("torch_mha@ort", "torch.nn.MultiheadAttention exported to ONNX, in onnxruntime", TORCH_MHA_ORT,
                            ("torch", "onnxscript", "onnxruntime", "onnx"), gradients=False, tied_widths=True),
    "keras_gqa": _keras("keras_gqa", "tensorflow", "GroupQueryAttention"),
    "keras_gqa@jax": _keras("keras_gqa@jax", "jax", "GroupQueryAttention"),
    "keras_gqa@torch": _keras("keras_gqa@torch", "torch", "GroupQueryAttention"),
    "classic_keras": Family("classic_keras", "the textbook Keras layer (its code below) on TensorFlow", CLASSIC_KERAS,
                            ("keras", "tensorflow"), environment=(("KERAS_BACKEND", "tensorflow"),), tied_widths=True),
    "classic_torch": Family("classic_torch", "the textbook PyTorch module (its code below)", CLASSIC_TORCH, ("torch",),
                            gradients=False, self_attention=True),
    "tf_keras_mha": Family("tf_keras_mha", "tf_keras.layers.MultiHeadAttention", TF_KERAS_MHA, ("tensorflow", "tf_keras"), multi_axis=True,
                           head_masks=False),
}
# adapter -> the family whose template is its call: the plain adapters only (a kernel variant such as
# torch_sdpa+flash forces a kernel the user did not choose; the plain adapter is what users run)


def family_of(adapter: str) -> Family | None:
    return FAMILIES.get(adapter)
