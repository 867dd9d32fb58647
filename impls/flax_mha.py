"""Flax: ``flax.nnx.MultiHeadAttention``, its conventions translated here.

Why NNX and not Linen's ``MultiHeadDotProductAttention``: Flax's documentation
presents NNX as its core API and asks new users to start there (Linen stays
supported but is the older API); NNX's module expresses everything Linen's
does for this suite (separate q/kv widths, free ``qkv_features``, tuple
``out_features``, masks, ``is_causal``, dropout, sowing the weights).
https://flax.readthedocs.io/en/latest/why.html

* Inputs are ``[batch..., length, features]``: attended axes are flattened
  into ``length`` and non-attended axes into the batch, here.
* ``mask``: boolean, True = may attend (our polarity), broadcastable to
  ``[batch..., num_heads, T, S]``: passed as ``[N, H, T, S]`` with each axis of
  size 1 where the mask does not vary along it. ``is_causal=True`` (its mask is
  ``tril(ones(T, S))``, top-left aligned as ours; ``nnx.make_causal_mask``
  builds the same for self-attention) is combined with it by the module.
* Weights: the ``query``/``key``/``value`` ``LinearGeneral`` kernels are
  ``[D, H, head_dim]`` with biases ``[H, head_dim]``, and ``out`` is
  ``[H, head_dim, *out]`` with bias ``[*out]``: the canonical layout itself.
* Scores: the module returns none; with ``sow_weights=True`` it sows them into
  ``nnx.Intermediate``, collected here with ``nnx.capture``. That switches the module to another
  code path (``dot_product_attention_weights``: softmax in the layer's dtype,
  ``finfo(dtype).min`` fill) instead of ``jax.nn.dot_product_attention``
  (float32 softmax). So the output always comes from a normal call, and the
  scores, when asked, from a second call that sows them.
* Modern attention: grouped-query attention is the module's own
  ``num_kv_heads`` (its key/value kernels ``[D, num_kv_heads, head_dim]``, the
  canonical layout). ``__call__`` takes only ``mask`` and ``is_causal`` (top-left):
  bottom-right causal, query positions, the window and lengths are built into
  the mask (recorded on the row as emulated), and there is no bias argument (the
  attention function takes one, but the module never passes it). Its
  ``decode=True`` cache keeps one index for the whole batch and one query at a
  time, so per-sequence positions are not its own either. The module divides the
  query by sqrt(head_dim) in its attention function and takes no scale or soft
  cap (an ``attention_fn`` of one's own would be one's own attention).
* Dropout: ``broadcast_dropout=False`` (Flax's default shares one dropout
  pattern over batch and heads; the canonical layer drops each weight
  independently). Any ``dropout_rate > 0`` also moves the module to the
  weights path, even when not training.

Modes: "compiled" is Flax's functional API (``nnx.split`` once, ``nnx.merge``
inside a ``jax.jit``-ed pure function), the form Flax's performance guide
recommends over ``nnx.jit`` to avoid re-walking the module graph on every
call (https://flax.readthedocs.io/en/latest/guides/performance.html);
"eager" runs the same function without the jit.
"""
from __future__ import annotations

from . import _jax
from .base import Capabilities, emulated

# canonical name -> (submodule, parameter) in nnx.MultiHeadAttention
MODULE_NAMES = {
    "Wq": ("query", "kernel"), "bq": ("query", "bias"), "Wk": ("key", "kernel"), "bk": ("key", "bias"),
    "Wv": ("value", "kernel"), "bv": ("value", "bias"), "Wo": ("out", "kernel"), "bo": ("out", "bias"),
}


def canonical_to_module(arrays: dict) -> dict:
    """Canonical arrays -> the module's parameter tree (a pure dict)."""
    tree: dict = {}
    for name, value in arrays.items():
        sub, param = MODULE_NAMES[name]
        tree.setdefault(sub, {})[param] = value
    return tree


def module_to_canonical(tree: dict) -> dict:
    """The module's parameter tree (or its gradients) -> canonical names."""
    return {name: tree[sub][param] for name, (sub, param) in MODULE_NAMES.items()
            if sub in tree and param in tree[sub]}


class FlaxMHALayer(_jax.JaxLayer):
    def __init__(self, adapter, spec, weights, dtype, device, mode="eager", **options):
        super().__init__(adapter, spec, weights, dtype, device, mode, **options)
        from flax import nnx
        self.nnx = nnx
        out = spec.out_shape(weights.query_dim)
        with _jax.precision_scope(dtype):
            jdtype = _jax.jnp_dtype(dtype)
            # Abstract construction (nnx.eval_shape): no random initialisation to run, our weights replace it.
            module = nnx.eval_shape(lambda: nnx.MultiHeadAttention(
                num_heads=spec.num_heads, in_features=weights.query_dim, qkv_features=spec.num_heads * spec.key_dim,
                out_features=out[0] if len(out) == 1 else out, in_kv_features=weights.key_input_dim,
                num_kv_heads=spec.kv_heads,
                dtype=jdtype, param_dtype=jdtype, use_bias=spec.use_bias, dropout_rate=spec.dropout,
                broadcast_dropout=False, deterministic=True, decode=False, keep_rngs=False, rngs=nnx.Rngs(0)))
            self.graphdef, params, self.rest = nnx.split(module, nnx.Param, ...)
            wanted = canonical_to_module({k: _jax.array(v, dtype, self.jax_device)
                                          for k, v in weights.as_dict().items()})
            own = nnx.to_pure_dict(params)
            shapes = lambda t: {s: {p: tuple(a.shape) for p, a in d.items()} for s, d in t.items()}
            if shapes(own) != shapes(wanted):  # the module's layout changed under us: say so, never load half
                raise RuntimeError(f"flax_mha: unexpected parameters {shapes(own)}; expected {shapes(wanted)}")
            nnx.replace_by_pure_dict(params, wanted)
            self.params = params
        self._training_fn = self._compile(self._training_call)
        self._with_scores_fn = self._compile(self._with_scores_training)

    # ---- what the module takes: mask and is_causal (top-left); the rest is folded into the mask -------------
    @staticmethod
    def _causal_in_mask(call) -> bool:
        """Causal on any diagonal but the top-left (bottom-right with T != S, query positions): the module's
        is_causal cannot say it."""
        return call.causal and not call.top_left_causal

    def _flags(self, call):
        return _jax.Flags(causal=call.causal and not self._causal_in_mask(call))

    def _mask(self, call):
        return _jax.mask_array(call.flat_mask(with_causal=self._causal_in_mask(call), window=True, lengths=True),
                               self.jax_device)

    def emulations(self, call):
        return emulated(call, causal=self._causal_in_mask(call), window=True, lengths=True)

    # ---- the computation (pure functions of jax arrays) ---------------------
    def _module_call(self, params, query, value, key, extras, dropout_key, layout, flags, sow=False):
        nnx = self.nnx
        allowed, causal = extras["mask"], flags.causal
        module = nnx.merge(self.graphdef, params, self.rest)
        flat = lambda x: _jax.flatten(x, layout)
        key = value if key is None else key
        training = {} if dropout_key is None else dict(deterministic=False, rngs=nnx.Rngs(dropout=dropout_key))
        args = (flat(query), flat(key), flat(value))
        kwargs = dict(mask=allowed, is_causal=causal, decode=False, **training)
        weights = None
        if sow and causal and allowed is not None:
            # with sow_weights, Flax broadcasts its causal [T, S] to the mask's own shape, so a mask that
            # broadcasts along the query axis (a padding mask [N, 1, 1, S]) raises there although the default
            # call accepts it: give that call the query axis it documents ([..., heads, T, S])
            t, s = args[0].shape[-2], args[1].shape[-2]
            kwargs["mask"] = self.jax.numpy.broadcast_to(allowed, allowed.shape[:-2] + (t, s))
        if sow:  # nnx.capture collects what the module sows into nnx.Intermediate
            out, sown = nnx.capture(module, nnx.Intermediate)(*args, sow_weights=True, **kwargs)
            weights = self.jax.tree.leaves(sown)[0]
        else:
            out = module(*args, **kwargs)
        return _jax.unflatten_query(out, query.shape, layout), weights

    def _apply(self, params, query, value, key, extras, layout, flags):
        return self._module_call(params, query, value, key, extras, None, layout, flags)[0]

    def _with_scores(self, params, query, value, key, extras, scores_allowed, layout, flags):
        return self._with_scores_training(params, query, value, key, extras, None, layout, flags)

    def _with_scores_training(self, params, query, value, key, extras, dropout_key, layout, flags):
        """The output and the weights of the call a Flax user makes to get the weights (``sow_weights=True``,
        which takes nnx's explicit softmax path rather than jax.nn.dot_product_attention)."""
        return self._module_call(params, query, value, key, extras, dropout_key, layout, flags, sow=True)

    def _canonical(self, tree):
        return module_to_canonical(self.nnx.to_pure_dict(tree))

    def _training_call(self, params, query, value, key, extras, dropout_key, layout, flags):
        return self._module_call(params, query, value, key, extras, dropout_key, layout, flags)[0]

    def _run(self, inputs, return_scores, training, seed):
        call = inputs["call"]
        with _jax.precision_scope(self.dtype):
            dropout_key = None
            if training and self.spec.dropout > 0:
                # rbg (XLA RngBitGenerator) compiles in a fraction of the time threefry takes on CPU;
                # dropout is judged by its statistics, so the generator does not matter
                dropout_key = self.jax.random.key(0 if seed is None else seed, impl="rbg")
            args = (self.params, inputs["query"], inputs["value"], inputs["key"], inputs["extras"], dropout_key)
            static = dict(layout=inputs["layout"], flags=inputs["flags"])
            if not return_scores:
                return self._training_fn(*args, **static), None
            out, weights = self._with_scores_fn(*args, **static)
            return out, weights.reshape(call.scores_shape)


class FlaxMHAAdapter(_jax.JaxAdapter):
    name = "flax_mha"
    framework = "Flax"
    requires = ("jax", "flax.nnx")
    distributions = ("flax", "jax", "jaxlib")
    description = "flax.nnx.MultiHeadAttention (jax.jit over nnx.split/merge)"
    layer_class = FlaxMHALayer

    def capabilities(self):
        return Capabilities(
            unsupported_features={
                "value_dim": "nnx.MultiHeadAttention uses one head_dim = qkv_features // num_heads for the query, "
                             "key and value projections",
                "bias": "nnx.MultiHeadAttention.__call__ takes a mask and is_causal only; its attention function "
                        "has a bias argument that the module never passes",
                "softcap": "nnx.MultiHeadAttention has no logit soft cap",
                "scale": "nnx.MultiHeadAttention's attention function divides the query by sqrt(head_dim) and takes "
                         "no scale",
            },
            devices=("cpu", "cuda"), modes=("eager", "compiled"),
            supported_extensions=frozenset({"gqa", "causal_bottom_right", "window", "lengths", "query_offset"}))

    def extra_constraints(self, spec, dims, call):
        q_dim, k_dim, v_dim = dims
        if k_dim != v_dim:
            return (f"key input width {k_dim} != value input width {v_dim}: nnx.MultiHeadAttention has one "
                    f"in_kv_features for both the key and value projections")
        return None
