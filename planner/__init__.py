"""memplan: GPU memory planner for LLM training and inference.

`import memplan` loads only pydantic and the analytic core; torch and friends are imported by
`memplan.validate` when a trace or a GPU run needs them.
"""

from .api import estimate, kv_budget
from .architecture import ModelArch
from .dtypes import DType
from .errors import MemplanInputError
from .estimate import estimate_memory
from .gpu import GpuProfile
from .job import Job
from .params import ParamCounts, count_params
from .results import Component, Estimate, Phase

__all__ = [
    "Component",
    "DType",
    "Estimate",
    "GpuProfile",
    "Job",
    "MemplanInputError",
    "ModelArch",
    "ParamCounts",
    "Phase",
    "count_params",
    "estimate",
    "estimate_memory",
    "kv_budget",
]
__version__ = "0.1.0"
