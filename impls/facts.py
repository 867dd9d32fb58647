"""The facts that choose kernels, so a verdict says on what it was reached.

Frameworks pick kernels by the machine: TensorFlow turns its oneDNN kernels on by default only on CPUs with
AVX512_VNNI, AVX512_BF16, AVX_VNNI or AMX (``DefaultOneDnnPolicy`` in tensorflow/core/util/port.cc), torch's
vectorised kernels run 16 float lanes under AVX-512 and 8 under AVX2, and the same commit can pass on one
machine and fail on another. Two kinds of facts are recorded:

* the machine's, once per run (:func:`machine_facts`): CPU model, a short normalised ISA set, the vector
  width, numpy's BLAS, thread counts and the environment variables that change kernels;
* each framework's, in the process that runs an adapter (``Adapter.kernel_facts``, declared by the
  adapter): TensorFlow's oneDNN state as TensorFlow reports it, torch's CPU capability, ... Those go on every
  row, because one run's adapters can differ in them.

A :class:`Switch` is an environment variable that changes a framework's kernels and that one machine can set
to reproduce another machine's choice (``TF_ENABLE_ONEDNN_OPTS``, ``ATEN_CPU_CAPABILITY``). The adapters
declare the switches that reach them; the conformance runner sets a chosen setting in their worker processes.
Nothing here imports a framework.
"""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field

# The ISA extensions that decide kernels, as Linux's /proc/cpuinfo names them (x86, then Arm).
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512_vnni",
             "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16", "asimd", "sve", "sve2")
# Variables that change how many threads a kernel splits its work over (summation order can follow).
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TF_NUM_INTRAOP_THREADS",
              "TF_NUM_INTEROP_THREADS")
# Variables that change numpy's BLAS kernels (the oracle's float64 matmuls).
NUMPY_KERNEL_ENV = ("OPENBLAS_CORETYPE", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR")
# oneDNN's ISA cap: a crash switch, not a reproduction switch. Under ONEDNN_MAX_CPU_ISA=AVX2, TensorFlow 2.21
# segfaults in every float16/bfloat16 matmul on an AVX-512 CPU (float32 and float64 run).
ONEDNN_ISA_CAP = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")


# The kernel facts adapters report (``Adapter.kernel_facts``), by name: the vocabulary rows carry and catalogue
# entries condition on.
KERNEL_FACTS = {
    "tf_onednn": "TensorFlow's oneDNN kernels are on (tensorflow.python.util._pywrap_util_port.IsMklEnabled())",
    "torch_cpu_capability": "the vectorised kernels torch runs (torch.backends.cpu.get_cpu_capability(), lower case)",
    "torch_vector_bits": "the width of torch's at::vec::Vectorized under that capability (512 or 256)",
    "torch_mkldnn": "torch's oneDNN (mkldnn) backend is available and enabled",
    "torch_threads": "torch's intra-op threads (torch.get_num_threads())",
    "inductor_vector_bits": "the vector width Inductor compiles CPU kernels for (None: scalar code)",
    "keras_backend": "the Keras backend running the layer",
    "xla_cpu_flags": "the --xla_cpu_* flags of XLA_FLAGS (None: XLA targets the CPU's own ISA)",
    "jax_backend": "jax.default_backend()",
    "ort_provider": "the onnxruntime execution provider",
    "facts_error": "why the framework could not report its facts",
}


@dataclass(frozen=True)
class Switch:
    """An environment variable that changes a framework's kernels, with the settings worth reproducing.

    ``settings`` maps a setting's name to the variable's value; ``fact`` is the kernel fact through which the
    framework reports the setting in effect, and ``expect`` what that fact reads under each setting (so a
    setting the framework ignored, or one the CPU cannot run, shows). ``requires`` lists, per setting, the ISA
    flags the CPU needs for it (torch falls back silently to what the CPU has)."""

    name: str
    variable: str
    settings: dict
    fact: str
    expect: dict
    description: str
    requires: dict = field(default_factory=dict)

    def value(self, setting: str) -> str:
        if setting not in self.settings:
            raise ValueError(f"switch {self.name}: unknown setting {setting!r}; expected one of "
                             f"{', '.join(self.settings)}")
        return self.settings[setting]

    def runnable(self, isa=None) -> list[str]:
        """The settings this machine's CPU can run (all of them when its ISA is unknown)."""
        isa = isa_flags() if isa is None else set(isa)
        if not isa:
            return list(self.settings)
        return [s for s in self.settings if set(self.requires.get(s, ())) <= isa]

    def environment(self, setting: str) -> dict[str, str]:
        return {self.variable: self.value(setting)}


def parse_setting(text: str, known) -> tuple[Switch, str]:
    """``"name=setting"`` -> (the switch, the setting); ValueError naming what is known for anything else."""
    switches = {s.name: s for s in known}
    name, eq, setting = str(text).partition("=")
    if not eq or name not in switches:
        raise ValueError(f"--switch {text!r}: expected NAME=SETTING with NAME one of "
                         f"{', '.join(sorted(switches)) or '(none: no selected adapter declares a switch)'}")
    switch = switches[name]
    switch.value(setting)
    return switch, setting


def label(settings: dict) -> str | None:
    """``{"tf_onednn": "off"}`` -> ``"tf_onednn=off"`` (None for the machine's own choice)."""
    return ",".join(f"{k}={v}" for k, v in sorted(settings.items())) or None


# ---- the machine --------------------------------------------------------------------------------

def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    if fields:
                        break
                    continue
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_model() -> str:
    info = _cpuinfo()
    return info.get("model name") or info.get("Model") or platform.processor() or platform.machine() or "unknown"


def isa_flags() -> set[str]:
    """The ISA extensions of :data:`ISA_FLAGS` this CPU reports (empty where the OS does not say)."""
    info = _cpuinfo()
    flags = set((info.get("flags") or info.get("Features") or "").split())
    return {f for f in ISA_FLAGS if f in flags}


def vector_bits(isa) -> int | None:
    """The widest SIMD register the CPU offers to the kernels here: 512 (AVX-512), 256 (AVX), 128 (SSE, NEON)."""
    isa = set(isa)
    if "avx512f" in isa:
        return 512
    if "avx" in isa or "avx2" in isa:
        return 256
    if isa & {"sse4_2", "asimd"}:
        return 128
    return None


def numpy_blas() -> str | None:
    """numpy's BLAS as its build reports it (name, version, configuration): the oracle's float64 matmuls."""
    try:
        import numpy as np
        blas = (np.show_config(mode="dicts") or {}).get("Build Dependencies", {}).get("blas", {})
    except Exception:  # an older numpy without mode="dicts"
        return None
    parts = [blas.get("name"), blas.get("version"), blas.get("openblas configuration")]
    return " ".join(str(p) for p in parts if p) or None


def cpu_threads() -> int | None:
    """The CPUs this process may run on (its affinity), which is what thread pools size themselves by."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()


def kernel_environment(names=()) -> dict[str, str]:
    """The variables among ``names`` (and the thread and numpy ones) that are set, with their values."""
    wanted = dict.fromkeys((*names, *ONEDNN_ISA_CAP, *NUMPY_KERNEL_ENV, *THREAD_ENV))
    return {n: os.environ[n] for n in wanted if n in os.environ}


def machine_facts(environment_names=()) -> dict:
    """The machine's facts for a run's meta: what every row of the run shares."""
    isa = isa_flags()
    return {"cpu_model": cpu_model(), "logical_cores": os.cpu_count(), "cpu_threads": cpu_threads(),
            "isa": sorted(isa, key=ISA_FLAGS.index), "vector_bits": vector_bits(isa),
            "numpy_blas": numpy_blas(), "environment": kernel_environment(environment_names)}


def isa_cap_warning(environ=None) -> str | None:
    """A warning when oneDNN's ISA cap is set: it is not a way to reproduce another machine's TensorFlow."""
    environ = os.environ if environ is None else environ
    for name in ONEDNN_ISA_CAP:
        if environ.get(name):
            return (f"{name}={environ[name]} is set: oneDNN caps its kernels' ISA, and TensorFlow 2.21 crashes "
                    f"(SIGSEGV) in float16 and bfloat16 matmuls under a cap below the CPU's own ISA, so those rows "
                    f"become errors. To reproduce a machine without oneDNN use --switch tf_onednn=off; unset "
                    f"{name} for rows that mean what users run")
    return None


def adapter_facts(target: str) -> dict:
    """``kernel_facts`` of the adapter ``target`` names, computed in this process (a worker's request)."""
    from .registry import resolve
    return resolve(target).kernel_facts()
