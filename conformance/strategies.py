"""Random cases as a hypothesis strategy, over the same space as ``cases.random_case`` (so failing
examples shrink); each case carries its own input seed."""
from __future__ import annotations

from .cases import describe_random


def cases():
    """The hypothesis strategy: the same space as ``random_case``, drawn (and shrunk) by hypothesis."""
    from hypothesis import strategies as st

    @st.composite
    def build(draw):
        seed = draw(st.integers(0, 2**31 - 1), label="seed")
        return describe_random(lambda name, options: draw(st.sampled_from(options), label=name), seed, "hyp")
    return build()
