"""Classic from-scratch attention layers, written the way textbooks and tutorials teach them,
wrapped as adapters: worked examples of bringing your own implementation to mhabench.

``keras_textbook``: a Keras subclassed layer (separate Dense wq/wk/wv, split_heads, an
additive ``mask * -1e9``). ``torch_textbook``: an ``nn.Module`` with one fused
``qkv_proj`` whose output is interleaved per head. Neither module imports its
framework until a layer is built.

The textbook layers see one sequence axis; the adapters flatten the attended axes into it
and the non-attended axes into the batch (``validation.flatten``: a reshape that does not
change what is computed).
"""

# What the textbook layers were never taught: modern attention. Each takes one boolean mask (and, through it,
# causal); building a window, lengths or bottom-right alignment into that mask would test our mask, not the layer.
MODERN_REASONS = {
    "gqa": "the textbook layer splits its projections into num_heads equal heads for q, k and v: no shared "
           "key/value heads",
    "causal_bottom_right": "the textbook layer knows one causal triangle (a [T, T] self-attention mask), no alignment",
    "window": "the textbook layer has no sliding window",
    "bias": "the textbook layer takes a 0/1 mask it turns into -1e9, no additive float bias",
    "lengths": "the textbook layer takes padding only as a mask, no lengths",
    "query_offset": "the textbook layer knows one causal triangle, top-left: no query positions",
    "softcap": "the textbook layer applies softmax to q . k / sqrt(depth) as it is: no logit soft cap",
    "scale": "the textbook layer divides by sqrt(depth) and takes no scale",
}
