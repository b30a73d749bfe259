"""Device memory outside torch's caching allocator: what pynvml counts beyond torch.cuda.memory_reserved().

pynvml's device used = torch reserved + the terms here (+ paged optimizer states in unified memory,
which the estimate adds itself, + other processes). Each term says where its bytes come from and
whether a committed GPU row measured them; docs/device-memory.md gives the sources and the rows.

Measured on Hopper (validate/results/H100-80GB-2026-11-24.jsonl, H200-2026-11-24-holdout.jsonl,
torch 2.11.0+cu130, driver 580.159.04, CUDA_MODULE_LOADING=LAZY, torch's default):
- `torch.empty(0, device="cuda")` leaves 548,995,072 B in use on both cards, every row alike;
- one training step adds 224 MiB on every row whose attention is not cuDNN's and that pages no
  optimizer state (kernels loaded lazily, cuBLAS/cuBLASLt handles, bitsandbytes: not separable);
- SDPA's cuDNN attention adds 16 MiB more (the rows where the probes saw the cuDNN kernel).
Other generations scale the init context's stack reservation by their SMs (documented, not measured).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from .architecture import ModelArch
from .gpu import GpuProfile
from .job import Job

MiB = 1024**2


# Every name a Term can take, for the estimate's row categories (estimate.ROW_CATEGORY)
TERM_NAMES = ("CUDA context at init", "kernels and libraries the step loads", "cuDNN attention (library and kernels)",
              "CUDA context (driver, whole)", "HIP runtime context (driver, whole)",
              *(f"{lib} buffers ({group} communicator)" for lib in ("NCCL", "RCCL")
                for group in ("world", "shard", "replicate", "tensor-parallel")))


# The terms that are the driver's context (whichever form the GPU profile gives it in): what exists once
# the process has touched the device, before any library or kernel loads
CONTEXT_TERMS = ("CUDA context at init", "CUDA context (driver, whole)", "HIP runtime context (driver, whole)")


def context_bytes(terms: list["Term"]) -> int:
    return sum(t.bytes for t in terms if t.name in CONTEXT_TERMS)


class Term(BaseModel):
    """One block of device memory outside torch's allocator."""

    model_config = ConfigDict(frozen=True)

    name: str
    bytes: int
    source: str
    measured: bool


# --- CUDA context -------------------------------------------------------------------------------
# pynvml used after `torch.empty(0, device="cuda")` minus before (validate/worker.py `measure`):
# 548,995,072 B on all 30 H100 rows and all 12 H200 rows.
HOPPER_INIT_CONTEXT = 548_995_072
# Profiles whose init context a committed row measured (their device names are in validate/results).
MEASURED_ON = ("H100-80GB", "H200")
# CUDA Runtime API, cudaDeviceSetLimit(cudaLimitStackSize): 1 KiB per thread by default; the driver
# reserves the stack of every thread the device can hold resident (threads per SM x SMs) with the
# context. Documented, not measured apart from the rest of the context.
DEFAULT_STACK_BYTES = 1024
# CUDA C++ Programming Guide, "Technical Specifications per Compute Capability": maximum resident
# threads per SM.
THREADS_PER_SM = {"7.0": 2048, "7.5": 1024, "8.0": 2048, "8.6": 1536, "8.7": 2048, "8.9": 1536,
                  "9.0": 2048, "10.0": 2048, "12.0": 1536}
_HOPPER_SMS = 132  # H100 SXM and H200 (profiles/gpus.json sm_count)


def stack_reservation(gpu: GpuProfile) -> int:
    return DEFAULT_STACK_BYTES * THREADS_PER_SM[gpu.compute_capability] * gpu.sm_count


# The rest of the Hopper init context (driver and runtime state, the modules torch loads at init):
# taken as the same on every NVIDIA generation, since it follows the driver and CUDA version,
# not the chip. 548,995,072 - 1 KiB x 2048 x 132 = 272,171,008 B (259.6 MiB).
RUNTIME_BASE = HOPPER_INIT_CONTEXT - DEFAULT_STACK_BYTES * THREADS_PER_SM["9.0"] * _HOPPER_SMS

# --- what the first training step loads -----------------------------------------------------------
# device used - peak reserved - init context on the 16 rows without cuDNN attention and without
# paged state tensors: 224 MiB on every one (QLoRA, LoRA and full; bitsandbytes or not; eager, SDPA
# math or efficient). The 7 rows with paged states add unified memory on top of it (docs/device-memory.md).
STEP_LOADED = 224 * MiB
# the same difference on the 19 rows whose SDPA runs cuDNN attention (uses_cudnn_attention, held to
# probes-H100-80GB-2026-11-24.jsonl): 240 MiB on every one, 16 MiB over the rest.
CUDNN_ATTENTION = 16 * MiB

# --- NCCL (documented, not measured: no multi-GPU row is committed) --------------------------------
# NCCL docs, environment variables: NCCL_BUFFSIZE (Simple protocol) 4 MiB; the LL and LL128
# protocols' buffers (NCCL_LL_BUFFSIZE, NCCL_LL128_BUFFSIZE) default to NCCL's src/include/device.h
# sizes as recalled: LL 8 lines x 512 threads x 8 steps x 16 B, LL128 120 x 640 threads x 8 steps x 8 B.
NCCL_SIMPLE_BUFFER = 4 * MiB
NCCL_LL_BUFFER = 8 * 512 * 8 * 16
NCCL_LL128_BUFFER = 120 * 640 * 8 * 8
NCCL_CONNECTION = NCCL_SIMPLE_BUFFER + NCCL_LL_BUFFER + NCCL_LL128_BUFFER
# NCCL picks its channel count from the topology (NCCL_MIN_NCHANNELS / NCCL_MAX_NCHANNELS bound it);
# 16 is what nccl-tests report on 8-GPU NVLink/NVSwitch nodes, as recalled. PCIe nodes use 2 to 4,
# so this over-counts there.
NCCL_CHANNELS = 16
# Connections each rank receives on per channel (a connection's buffers live on one GPU):
# the ring 1 (from its predecessor); the double binary tree, connected only when a job spans nodes
# (NCCL >= 2.22 connects an algorithm at its first use, NCCL_RUNTIME_CONNECT=1, and picks the ring
# inside one node), up to 3 (its parent and two children).
RING_PEERS = 1
TREE_PEERS = 3


def outside_torch(job: Job, arch: ModelArch, gpu: GpuProfile | None) -> list[Term]:
    """Device memory one GPU of `job` holds outside torch's caching allocator, term by term.

    Paged (unified-memory) optimizer states are not here: the estimate adds them itself."""
    terms = _context(job, gpu)
    attention = _cudnn_attention(job, arch, gpu)
    if attention:
        terms.append(attention)
    terms += nccl_buffers(job, gpu)
    return terms


def _context(job: Job, gpu: GpuProfile | None) -> list[Term]:
    from .overhead import DEFAULT_CONTEXT_BYTES

    if gpu is None or gpu.architecture == "unknown" or gpu.vendor == "amd":
        # no architecture to derive from (no --gpu, or a card named by its memory), or ROCm, whose
        # HIP runtime context is another program's: the profile's figure, whole
        total = gpu.cuda_context_bytes if gpu else DEFAULT_CONTEXT_BYTES
        source = gpu.cuda_context_source if gpu else "default (no GPU chosen)"
        what = "HIP runtime context" if gpu and gpu.vendor == "amd" else "CUDA context"
        return [Term(name=f"{what} (driver, whole)", bytes=total, source=source, measured=False)]
    measured = gpu.name in MEASURED_ON
    if measured:
        init = Term(name="CUDA context at init", bytes=HOPPER_INIT_CONTEXT, measured=True,
                    source=f"measured after torch.empty(0, device='cuda') on {gpu.name} (validate/results, 2026-11-24)")
    else:
        stack = stack_reservation(gpu)
        init = Term(name="CUDA context at init", bytes=RUNTIME_BASE + stack, measured=False,
                    source=f"derived, not measured: the Hopper-measured runtime part ({RUNTIME_BASE / MiB:.1f} MiB) + "
                           f"1 KiB stack x {THREADS_PER_SM[gpu.compute_capability]:,} threads/SM x {gpu.sm_count} SMs "
                           f"({stack / MiB:.0f} MiB; cudaLimitStackSize default, CUDA programming guide)")
    train = job.task == "train"
    step_measured = measured and train
    why = ("measured on the H100 and H200 training rows" if step_measured else
           "taken from the H100 and H200 training rows, not measured " +
           (f"on {gpu.name}" if train else "for generation (it loads no backward or optimizer kernels: an upper bound)"))
    step = Term(name="kernels and libraries the step loads", bytes=STEP_LOADED, measured=step_measured,
                source=f"CUDA_MODULE_LOADING=LAZY kernels, cuBLAS/cuBLASLt handles, bitsandbytes: {why}")
    return [init, step]


def uses_cudnn_attention(job: Job, arch: ModelArch, gpu: GpuProfile | None) -> bool:
    """SDPA dispatches to cuDNN attention for 16-bit inputs on Hopper (torch prefers it on sm90 since
    2.5; the probes saw it for every multi-head and grouped model in bf16, autocast included); fp32
    inputs (QLoRA's upcast stream without autocast) take the efficient or math kernel, and Falcon the
    math kernel always (planner/attention.py decides which)."""
    from .activations import make_ctx
    from .attention import Kernel, attention_kernel
    from .dtypes import float_bytes
    from .estimate import as_run  # imported here: estimate imports this module
    from .stacks import get
    from .training import resolve_targets

    if gpu is None or gpu.architecture != "hopper" or job.attention != "sdpa":
        return False
    stack = get(job.stack)
    if job.task != "train":
        # generation's SDPA sees the compute dtype (planner/inference.py picks its kernel the same way)
        sdpa_bytes = float_bytes(job.compute_dtype)
        return attention_kernel(job, arch, stack, grad=False, sdpa_bytes=sdpa_bytes) is Kernel.fused and sdpa_bytes == 2
    run = as_run(job)
    ctx = make_ctx(run, arch, resolve_targets(run, arch) if run.uses_lora else (), stack, grad_in=True)
    return ctx.attention is Kernel.fused and ctx.sdpa_bytes == 2


def _cudnn_attention(job: Job, arch: ModelArch, gpu: GpuProfile | None) -> Term | None:
    if not uses_cudnn_attention(job, arch, gpu):
        return None
    measured = job.task == "train" and gpu is not None and gpu.name in MEASURED_ON
    return Term(name="cuDNN attention (library and kernels)", bytes=CUDNN_ATTENTION, measured=measured,
                source="measured: the Hopper rows whose SDPA ran cuDNN attention hold 16 MiB more" if measured else
                "taken from the H100 and H200 training rows, not measured on this card or task")


def communicators(job: Job) -> dict[str, tuple[int, int]]:
    """NCCL communicators one rank opens: name -> (ranks, nodes they span). torch's ProcessGroupNCCL
    opens one per process group at its first collective: DDP, FSDP and ZeRO (DeepSpeed's data-parallel
    group is the world when there is no model parallelism, as recalled) run on the world group; HSDP
    over several nodes runs on its mesh's two groups (shard: the GPUs of one node, replicate: one
    rank per node), and the world group is opened as well by the first barrier (accelerate's
    wait_for_everyone)."""
    if job.num_gpus <= 1 or job.sharding == "device_map":
        return {}  # accelerate's layer split moves activations with .to(): no collective, no communicator
    nodes = -(-job.num_gpus // job.gpus_per_node)
    if job.sharding == "tp":
        return {"tensor-parallel": (job.num_gpus, nodes)}
    world = {"world": (job.num_gpus, nodes)}
    if job.sharding == "fsdp_hybrid" and nodes > 1:
        return world | {"shard": (job.gpus_per_node, 1), "replicate": (nodes, nodes)}
    return world


def nccl_connection_peers(nodes: int) -> int:
    """Connections per channel whose buffers one rank holds in a communicator spanning `nodes` nodes."""
    return RING_PEERS + (TREE_PEERS if nodes > 1 else 0)


def nccl_buffers(job: Job, gpu: GpuProfile | None) -> list[Term]:
    """NCCL's (RCCL's on ROCm) transport buffers: channels x connections x the three protocols'
    buffers, per communicator. Not counted: NVLS (NVLink SHARP) buffers on NVSwitch systems and
    NCCL's own kernels and device structures (docs/device-memory.md)."""
    lib = "RCCL" if gpu is not None and gpu.vendor == "amd" else "NCCL"
    terms = []
    for name, (ranks, nodes) in communicators(job).items():
        peers = nccl_connection_peers(nodes)
        algos = "ring" + (" + tree" if peers > RING_PEERS else "")
        terms.append(Term(
            name=f"{lib} buffers ({name} communicator)", bytes=NCCL_CHANNELS * peers * NCCL_CONNECTION,
            measured=False,
            source=f"documented, not measured: {ranks} ranks; {NCCL_CHANNELS} channels x {peers} connection(s) ({algos}, "
                   f"{nodes} node(s)) x {NCCL_CONNECTION / MiB:.2f} MiB (NCCL_BUFFSIZE 4 MiB + LL128 "
                   f"{NCCL_LL128_BUFFER / MiB:.2f} MiB + LL {NCCL_LL_BUFFER / MiB:.2f} MiB)"))
    return terms
