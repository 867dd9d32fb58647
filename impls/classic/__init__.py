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
