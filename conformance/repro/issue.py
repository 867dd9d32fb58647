"""An upstream issue body for a reproducer, in the sections of the framework's own bug template.

The sections are data (``TEMPLATES``), read from each tracker's template: PyTorch's
``.github/ISSUE_TEMPLATE/bug-report.yml`` ("Describe the bug", "Versions"), JAX's ``bug-report.yml``
("Description", the jax/jaxlib version, the accelerator, system info; Flax's behaviours here are
jax.nn's, so they go there too) and Keras's ``00-bug-issue.md`` (system information, the problem, current and
expected behaviour, standalone code, logs; tf_keras shares it).
"""
from __future__ import annotations

import platform
from importlib import metadata

TRACKERS = {"torch_sdpa": "pytorch", "torch_mha": "pytorch", "jax_dpa": "jax", "flax_mha": "jax",
            "keras_mha": "keras", "keras_mha@jax": "keras", "keras_mha@torch": "keras", "tf_keras_mha": "keras"}
# the tracker's sections, in its order: (heading, what goes there); the parts are named below
TEMPLATES = {
    "pytorch": (("### 🐛 Describe the bug", ("summary", "code", "output", "cause")), ("### Versions", ("environment",))),
    "jax": (("### Description", ("summary", "code", "output", "cause")),
            ("### What jax/jaxlib version are you using?", ("versions",)),
            ("### Which accelerator(s) are you using?", ("accelerator",)),
            ("### Additional System Info", ("environment",))),
    "keras": (("**System information**", ("environment",)), ("**Describe the problem**", ("summary", "cause")),
              ("**Describe the current behavior**", ("actual",)), ("**Describe the expected behavior**", ("expected",)),
              ("**Standalone code to reproduce the issue**", ("code",)), ("**Source code / logs**", ("output",))),
}


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment(reproducer) -> list[str]:
    """What the script ran on: versions, Python, OS, the CPU facts that choose kernels, the switches set."""
    from mhabench.impls import facts
    family = reproducer.target.family
    distributions = {"jax": ("jax", "jaxlib"), "flax": ("flax", "jax", "jaxlib"), "tf_keras": ("tf_keras",),
                     "tensorflow": ("tensorflow",)}
    names = [d for m in family.imports for d in distributions.get(m, (m,))]
    isa = facts.isa_flags()
    shown = sorted(f for f in isa if f in ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "fma"))
    lines = [f"- {name} {_version(name)}" for name in dict.fromkeys(names)]
    lines += [f"- numpy {_version('numpy')}", f"- Python {platform.python_version()}, {platform.platform()}",
              f"- CPU: {facts.cpu_model()}; vector width {facts.vector_bits(isa)} bits; {', '.join(shown) or 'no AVX'}"
              " (no GPU)"]
    switches = reproducer.target.switches()
    if switches:
        lines.append("- environment set by the script: " + ", ".join(f"{k}={v}" for k, v in switches.items()))
    return lines


def _printed(output: str):
    """(part, text) of what a reproducer prints: its expected and actual arrays and its verdict line."""
    part, lines = None, {}
    for line in output.splitlines():
        if line.startswith(("expected (", "actual,")):
            part = line.split(" ", 1)[0].rstrip(",")
            lines[part] = [line.split(":", 1)[0]]
        elif line.startswith(("DIFFERS", "matches")):
            yield "verdict", line
            part = None
        elif part:
            lines[part].append(line)
    yield from ((name, "\n".join(text)) for name, text in lines.items())


def issue_body(reproducer) -> str:
    """A ready issue body in Markdown for a reproducer that was verified here."""
    from . import behaviour_sentence
    target, entry = reproducer.target, reproducer.entry
    output = reproducer.verified.stdout.strip() if reproducer.verified else ""
    printed = dict(_printed(output))
    tracker = TRACKERS[target.adapter]
    sentence = behaviour_sentence(entry)
    cause = entry.observed.strip()[len(sentence):].strip(" .;:")
    parts = {
        "summary": [f"{target.family.call}: {sentence}", "",
                    "The script below imports only the framework and NumPy, computes the expected result in "
                    "float64 NumPy, and exits 1 while the two differ.", ""],
        "code": ["```python", reproducer.source.rstrip(), "```"],
        "output": ["Output here:", "", "```", output, "```"],
        "expected": [f"`{target.quantity}`, computed in float64 NumPy by the script:", "", "```",
                     printed.get("expected", ""), "```"],
        "actual": [f"`{target.quantity}` from {target.family.call}:", "", "```", printed.get("actual", ""), "```",
                   "", printed.get("verdict", "")],
        "cause": ["More of what we found (entry `{}` of our catalogue of divergences): {}.".format(entry.id, cause)]
        if cause else [],
        "environment": environment(reproducer),
        "versions": [", ".join(line[2:] for line in environment(reproducer)[:2])],
        "accelerator": ["- [x] CPU"],
    }
    title = sentence.split(":")[0].split(", so ")[0].rstrip(".")
    lines = [f"<!-- title: {target.family.call}: {title} -->", ""]
    for heading, names in TEMPLATES[tracker]:
        lines += [heading, ""]
        for name in names:
            lines += parts[name]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
