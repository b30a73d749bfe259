"""The software a job runs on: one Stack per framework and version (docs/architecture.md).

`get(name)` gives the Stack for `Job.stack`. The core never looks at the environment; the CLI and
`memplan.estimate` resolve the default with `memplan.stacks.installed.default_stack()`.
"""

from __future__ import annotations

from ..errors import MemplanInputError
from .base import Kernels, LossTerms, Stack
from .transformers import Transformers4, Transformers5

_STACKS: dict[str, Stack] = {s.name: s for s in (Transformers5(), Transformers4())}


def register(stack: Stack) -> None:
    _STACKS[stack.name] = stack


def _load_optional() -> None:
    """Stacks with modules of their own register themselves on import."""
    import importlib

    for module in ("litgpt", "torchtune"):
        try:
            importlib.import_module(f"{__name__}.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{module}":
                raise


def get(name: str) -> Stack:
    if name not in _STACKS:
        _load_optional()
    try:
        return _STACKS[name]
    except KeyError:
        raise MemplanInputError(f"unknown stack {name!r}; allowed: {', '.join(names())}") from None


def cpu_trace_stack(job) -> Stack:
    """The job's stack on the CPU trace's kernels: what `memplan trace` compares against."""
    return get(job.stack).on_cpu()


def registered() -> list[Stack]:
    """Every stack with rules of its own, on CUDA's kernels."""
    _load_optional()
    return list(_STACKS.values())


def names() -> list[str]:
    from ..job import STACK_NAMES

    return list(STACK_NAMES)


__all__ = ["Kernels", "LossTerms", "Stack", "cpu_trace_stack", "get", "names", "register"]
