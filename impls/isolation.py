"""A plugin's import and interface check, run in a worker process of its own before the process that asked
loads it: a plugin that hangs, crashes, exits or floods its output there costs one line (PluginLoadError),
not the process. Used for ``--adapter`` plugins (``impls.plugins``) and entry-point plugins
(``impls.registry``) alike; the worker runs the import and the check that ``impls.plugins`` defines,
named as the worker names all its code (a "module:function" string).
"""
from __future__ import annotations

from . import interface, worker as worker_mod

CHECK_TIMEOUT = 120.0  # seconds the interface check's calls may take (conform passes its --timeout)
IMPORT = "mhabench.impls.plugins:_import_in_worker"
CHECK = "mhabench.impls.plugins:_check_in_worker"


class PluginLoadError(ValueError):
    """An adapter named by the user (``--adapter``) could not be loaded; the message says why."""


def check_isolated(target: str, timeout: float = CHECK_TIMEOUT, shown: str | None = None) -> None:
    """Import ``target`` ("module:Class", or "file.py:Class" with the file's path absolute: it runs in another
    process) and check its interface in a worker process of its own (``mhabench.impls.worker``), which is
    then closed: the import may take the worker's build time (a framework's import), the check's calls
    ``timeout`` seconds. PluginLoadError, one line, for a
    plugin that fails, hangs, crashes or exits there; whatever it prints stays in that process."""
    shown = shown or interface.printable(target)
    child = worker_mod.Worker(name=f"interface check of {shown}")
    step = "import"
    try:
        child.run(IMPORT, target, shown, timeout=worker_mod.BUILD_TIMEOUT)
        step = "interface check"
        child.run(CHECK, shown, timeout=timeout)
    except PluginLoadError:
        raise
    except worker_mod.WorkerTimeout:
        limit = worker_mod.BUILD_TIMEOUT if step == "import" else timeout
        raise PluginLoadError(f"could not load {shown}: its {step} did not finish in {limit:g} s (it hangs?); the "
                              f"process running it was killed") from None
    except worker_mod.WorkerCrashed as exc:
        raise PluginLoadError(f"could not load {shown}: its {step} ended the process running it "
                              f"({_how_it_ended(exc)})") from None
    except worker_mod.WorkerError as exc:
        raise PluginLoadError(f"could not load {shown}: its {step} failed: "
                              f"{interface.printable(str(exc).splitlines()[0])}") from None
    finally:
        child.close()


def _how_it_ended(exc) -> str:
    """A crashed worker's end in words: the signal or exit status, and the fatal error it printed, if any."""
    import signal
    code = exc.returncode
    if code is not None and code < 0:
        try:
            how = f"killed by {signal.Signals(-code).name}"
        except ValueError:
            how = f"killed by signal {-code}"
    else:
        how = f"exit status {code}, without an answer"
    fatal = [line for line in exc.stderr_tail.splitlines() if line.startswith("Fatal Python error")]
    return how + (f": {interface.printable(fatal[0])[:160]}" if fatal else "")
