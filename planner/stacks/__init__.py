"""The software a job runs on: one Stack per framework and version (docs/architecture.md).

`get(name)` gives the Stack for `Job.stack`. The core never looks at the environment; the CLI and
`memplan.estimate` resolve the default with `memplan.stacks.installed.default_stack()`.
"""

from __future__ import annotations

from ..errors import MemplanInputError
from .base import Kernels, LossTerms, Stack
from .litgpt import Litgpt
from .torchtune import Torchtune
from .transformers import Transformers4, Transformers5

# every stack memplan models (job.StackName lists their names)
_STACKS: dict[str, Stack] = {s.name: s for s in (Transformers5(), Transformers4(), Litgpt(), Torchtune())}


def get(name: str) -> Stack:
    try:
        return _STACKS[name]
    except KeyError:
        raise MemplanInputError(f"unknown stack {name!r}; allowed: {', '.join(names())}") from None


def cpu_trace_stack(job) -> Stack:
    """The job's stack on the CPU trace's kernels: what `memplan trace` compares against."""
    return get(job.stack).on_cpu()


def registered() -> list[Stack]:
    """Every stack with rules of its own, on CUDA's kernels."""
    return list(_STACKS.values())


def names() -> list[str]:
    from ..job import STACK_NAMES

    return list(STACK_NAMES)


__all__ = ["Kernels", "LossTerms", "Stack", "cpu_trace_stack", "get", "names", "registered"]
