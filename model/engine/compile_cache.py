"""What a process sets up before it compiles, and what it keeps of a compile for the next process: where compiled
kernels persist, the one FX trace that must not overlap threads running modules, and each compiled function's whole
compiled form (Dynamo's trace and guards with Inductor's code) on disk.

Inductor's cache spares a warm process the kernels' builds but not Dynamo's trace of each function, nor AOTAutograd's
work on the traced graph: 7.0 s of an engine's warm build at 512 slots on an H100, most of a second `dr infer`
process's wait for its first rows (benchmarks/results/2026-12-07-h100-verify-rest/). `Precompiled` keeps the form
torch's AOT compile makes (torch.compile(...).aot_compile, torch 2.10 on) and loads it instead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from model.io.files import write_atomically

log = logging.getLogger(__name__)
# False: every process traces its compiled functions again (Inductor's cache still holds their kernels), as before
# 2026-12-07's ninth session; for comparing the two on a device (benchmarks/pending_gpu.sh `stored`)
STORE_FORMS = True
_WARNED: set[tuple[str, str]] = set()  # (function, what failed) already warned of in this process


def compile_cache_dir() -> Path:
    """$TORCHINDUCTOR_CACHE_DIR if set, else the user's cache directory (a second `dr infer` then loads the compiled
    step instead of compiling it again)."""
    if "TORCHINDUCTOR_CACHE_DIR" in os.environ:
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "dr" / "inductor"


def trace_once() -> None:
    """Runs, now and on this thread, the FX symbolic trace that Inductor's first lowering in a process makes (of a
    placeholder function, kept for the process). While an FX trace runs, nn.Module.__call__ is patched for every
    thread (pytorch/pytorch#126024; torch 2.11 and 2.14 alike), and a leaf module called meanwhile on another thread
    fails with "module is not installed as a submodule": the media encoder in a job's loader thread did, while the
    engine compiled (benchmarks/results/2026-12-07-h100-verify-rest/phases_catalog.txt). Call it before threads that
    run modules start beside a compile; a torch without that placeholder has nothing to do here."""
    try:
        from torch._inductor.loop_body import InterpreterShim
    except ImportError:
        return
    InterpreterShim._dummy_gm()


def _warn_once(fn: Callable, what: str, message: str, *args: Any) -> None:
    """`fn`'s name and `message`, warned once a process for each function and failure: every width of every engine
    has its own form of the same function, and a `dr bench job` on torch 2.11 printed one failure's warning 24
    times."""
    if (fn.__qualname__, what) not in _WARNED:
        _WARNED.add((fn.__qualname__, what))
        log.warning("%s" + message, fn.__qualname__, *args)


def _described(value: Any) -> Any:
    """What of one argument a compile depends on, as plain values: a tensor's layout, a module's class and
    parameters' layouts, a dataclass's fields, a number's value."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.stride(), str(value.dtype), value.device.type, value.requires_grad)
    if isinstance(value, torch.nn.Module):
        tensors = [(n, _described(t)) for n, t in (*value.named_parameters(), *value.named_buffers())]
        return ("module", type(value).__qualname__, tensors)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return (
            type(value).__qualname__,
            [(f.name, _described(getattr(value, f.name))) for f in dataclasses.fields(value)],
        )
    if value is None or isinstance(value, bool | int | float | str):
        return repr(value)
    return type(value).__qualname__


def _global_state() -> str:
    """The process-wide settings every compiled form's guards check (grad mode, autocast, TF32 and reduced-precision
    matmuls, deterministic algorithms, threads, the default dtype), as torch's own guard words them."""
    try:
        return json.dumps(torch._C._dynamo.guards.GlobalStateGuard().__getstate__(), sort_keys=True)
    except (AttributeError, TypeError, ValueError):  # a torch without it: the guards alone keep forms apart
        return ""


def _key(fn: Callable, args: tuple, dynamic: bool, settings: str) -> str:
    """The stored form's name: the function, how it compiles, torch, Python, the card, the process-wide `settings`
    (_global_state) and its arguments' layouts (a form is loaded only where its guards also pass, so the name needs
    only to keep apart forms that both stay valid: an H100's and an H200's in one cache folder would otherwise
    replace each other, and so would two forms of one call made under different settings, each process compiling
    again the other's)."""
    leaves, spec = tree_flatten(args)
    cards = sorted({torch.cuda.get_device_name(v.device) for v in leaves if isinstance(v, torch.Tensor) and v.is_cuda})
    described = (fn.__module__, fn.__qualname__, dynamic, torch.__version__, sys.version, str(spec), cards, settings)
    digest = hashlib.sha256(repr((described, [_described(v) for v in leaves])).encode()).hexdigest()[:24]
    return f"{fn.__qualname__}-{digest}"


def _sources_unchanged(compiled: Any) -> bool:
    """Whether every module whose code the stored trace went through is as it was then, whole (its functions and
    its module-level constants alike): Dynamo's guards check the arguments, not the code."""
    then = {source.module: source.content for source in compiled.source_info().inlined_sources}  # one per module
    for name, content in then.items():
        module = sys.modules.get(name) or importlib.import_module(name)
        if inspect.getsource(module) != content:
            return False
    return True


def _refusal(compiled: Any, args: tuple) -> str | None:
    """Why a loaded form cannot serve `args` (None: it can): a source it traced has changed, or a guard fails (the
    failing guards as Dynamo words them, so a form refused on one machine only can be told apart)."""
    if not _sources_unchanged(compiled):
        return "a traced source changed"
    if compiled.guard_check(*args):
        return None
    try:  # torch's private words for it, where this torch has them
        failed = compiled._artifacts.guard_manager.check_verbose(compiled.prepare_f_locals(*args))
        return "guards: " + "; ".join(part.strip() for part in failed.verbose_code_parts)
    except AttributeError:
        return "guards: refused its arguments"


class Precompiled:
    """`fn` compiled (torch.compile, fullgraph) for the arguments of its first call, its compiled form stored under
    `folder` and loaded from there by a later process in place of Dynamo's trace. A stored form serves only where
    its torch, Python and device match (torch checks), every source it traced is unchanged and its guards pass the
    arguments; else, or where it cannot be read or written, `fn` compiles as before. A later call whose arguments
    the compiled form's guards refuse goes through plain torch.compile, which traces `fn` again for them. A stored
    form is a pickle with code in it, trusted as Inductor trusts the code it keeps in the same folder."""

    def __init__(self, fn: Callable, dynamic: bool, folder: Path | None = None) -> None:
        self.fn, self.dynamic = fn, dynamic
        self.folder = folder or compile_cache_dir() / "dr-precompiled"
        self.compiled: Any = None
        self.loaded = False  # the compiled form came from disk
        self.stored = False  # the compiled form is on disk (loaded, or written after its compile)
        self.refused: str | None = None  # why a form stored under this one's name was not loaded
        self.settings: str | None = None  # the process-wide settings its form was loaded or compiled under
        self._plain: Callable | None = None

    def __call__(self, *args: Any) -> Any:
        if self.compiled is None:
            self.compiled = self._load_or_compile(args) if STORE_FORMS else self._plain_compile()
        elif self.compiled is not self._plain and not self.compiled.guard_check(*args):
            return self._plain_compile()(*args)
        return self.compiled(*args)

    def _plain_compile(self) -> Callable:
        if self._plain is None:
            self._plain = torch.compile(self.fn, fullgraph=True, dynamic=self.dynamic)
        return self._plain

    def _load_or_compile(self, args: tuple) -> Callable:
        self.settings = _global_state()
        path = self.folder / f"{_key(self.fn, args, self.dynamic, self.settings)}.bin"
        if path.exists():
            try:
                with open(path, "rb") as file:
                    compiled = torch.compiler.load_compiled_function(file)
                self.refused = _refusal(compiled, args)
                if self.refused is None:
                    compiled.disable_guard_check()  # __call__ checks them, once
                    self.loaded = self.stored = True
                    return compiled
            except Exception as err:  # a stored form from another torch, cut short or unreadable: compiled afresh
                self.refused = f"unreadable: {err!r}"
            log.info("compiling %s afresh: stored form %s refused (%s)", self.fn.__qualname__, path, self.refused)
        try:
            # enable_aot_compile: torch 2.10-2.11 give torch.compile's wrapper its aot_compile only where it is set
            # (off by default there; on from 2.14); without it an H100's every form compiled for its process only
            # (benchmarks/results/2026-12-07-h100-stored-forms/)
            with torch._dynamo.config.patch(specialize_float=True, enable_aot_compile=True):
                compiled = torch.compile(self.fn, fullgraph=True, dynamic=self.dynamic).aot_compile((args, {}))
        except Exception as err:  # a torch without AOT compiles, or a graph it cannot keep: as before
            _warn_once(self.fn, "aot", " compiles for this process only (no AOT compile: %r)", err)
            return self._plain_compile()
        try:
            write_atomically(path, type(compiled).serialize(compiled).serialized_data, fsync=False)
            self.stored = True
        except Exception as err:  # a full disk or a form torch cannot write: the next process compiles again
            _warn_once(self.fn, "store", "'s compiled form was not stored at %s: %r", path, err)
        compiled.disable_guard_check()
        return compiled
