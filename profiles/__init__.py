"""Shipped model and GPU profiles, and loaders that turn them into planner inputs.

Model profiles are the unmodified Hugging Face `config.json` of each supported model, stored as
`models/<org>--<name>.json`; the loader also takes a path to a local config.json, or fetches the
config.json of another hub id through huggingface_hub and its cache (profiles/hub.py).
"""

from __future__ import annotations

import difflib
import json
import re
from functools import lru_cache
from pathlib import Path

from memplan.architecture import ConfigReader, ModelArch, arch_from_hf_config, config_source
from memplan.errors import MemplanInputError
from memplan.gpu import GpuProfile, gpu_by_memory, looks_like_memory

_HERE = Path(__file__).parent
MODELS_DIR = _HERE / "models"
# tiny configs of each family (a few layers, hidden 256): memplan validate --matrix quick and the tests
TINY_DIR = _HERE / "tiny"

ALIASES: dict[str, str] = {
    "falcon-7b": "tiiuae/falcon-7b",
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "llama-2-13b": "meta-llama/Llama-2-13b-hf",
    "llama-2-70b": "meta-llama/Llama-2-70b-hf",
    "llama-3-8b": "meta-llama/Meta-Llama-3-8B",
    "llama-3-70b": "meta-llama/Meta-Llama-3-70B",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "llama-3.1-70b": "meta-llama/Llama-3.1-70B",
    "llama-3.1-405b": "meta-llama/Llama-3.1-405B",
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B",
    "llama-3.2-3b": "meta-llama/Llama-3.2-3B",
    "llama-3.3-70b": "meta-llama/Llama-3.3-70B-Instruct",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "zephyr-7b": "HuggingFaceH4/zephyr-7b-beta",
    "gemma-2b": "google/gemma-2b",
    "gemma-7b": "google/gemma-7b",
    "phi-2": "microsoft/phi-2",
    "starcoder": "bigcode/starcoder",
    "mixtral-8x7b": "mistralai/Mixtral-8x7B-v0.1",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B",
    "qwen3-8b": "Qwen/Qwen3-8B",
    # pre-quantized checkpoints (planner/prequantized.py)
    "llama-2-7b-gptq": "TheBloke/Llama-2-7B-GPTQ",
    "llama-2-7b-awq": "TheBloke/Llama-2-7B-AWQ",
    "llama-3.1-8b-instruct-awq": "hugging-quants/Meta-Llama-3.1-8B-Instruct-AWQ-INT4",
    "qwen1.5-moe-a2.7b": "Qwen/Qwen1.5-MoE-A2.7B",
    "qwen3-30b-a3b": "Qwen/Qwen3-30B-A3B",
    "qwen3-235b-a22b": "Qwen/Qwen3-235B-A22B",
    "gpt-oss-20b": "openai/gpt-oss-20b",
    "gpt-oss-120b": "openai/gpt-oss-120b",
    "pythia-6.9b": "EleutherAI/pythia-6.9b",
    "pythia-1.4b": "EleutherAI/pythia-1.4b",
    "bloom-7b1": "bigscience/bloom-7b1",
    "bloom-560m": "bigscience/bloom-560m",
    "falcon-40b": "tiiuae/falcon-40b",
    "falcon-180b": "tiiuae/falcon-180B",
    "gemma-2-2b": "google/gemma-2-2b",
    "gemma-2-9b": "google/gemma-2-9b",
    "gemma-2-27b": "google/gemma-2-27b",
    "gemma-3-1b": "google/gemma-3-1b-pt",
    "phi-3-mini": "microsoft/Phi-3-mini-4k-instruct",
    "phi-4": "microsoft/phi-4",
    "olmo-2-7b": "allenai/OLMo-2-1124-7B",
    "deepseek-v2-lite": "deepseek-ai/DeepSeek-V2-Lite",
    "deepseek-v3": "deepseek-ai/DeepSeek-V3",
}


def shipped_models() -> list[str]:
    """Hub ids of every shipped model profile."""
    return sorted(p.stem.replace("--", "/", 1) for p in MODELS_DIR.glob("*.json"))


def _suggest(name: str, choices: list[str], aliases: dict[str, str] | None = None) -> str:
    """The nearest names, matched against the names and their aliases (`aliases`: alias -> name)."""
    lookup = {c.lower(): c for c in choices} | {a.lower(): c for a, c in (aliases or {}).items()}
    near = difflib.get_close_matches(name.lower(), list(lookup), n=6, cutoff=0.4)
    names = list(dict.fromkeys(lookup[n] for n in near))[:3]
    if names:
        return "did you mean " + ", ".join(names) + "?"
    return "known: " + ", ".join(choices)


def resolve_model_id(name: str) -> str:
    if name in ALIASES:
        return ALIASES[name]
    lowered = {m.lower(): m for m in shipped_models()}
    if name.lower() in lowered:
        return lowered[name.lower()]
    for hub_id in shipped_models():
        if hub_id.split("/", 1)[1].lower() == name.lower():
            return hub_id
    raise MemplanInputError(
        f"unknown model {name!r}: {_suggest(name, list(ALIASES) + shipped_models())} "
        "(or give a path to a config.json)"
    )


def read_config_file(file: Path, name: str | None = None) -> dict:
    """A config.json's dict; a file that is missing, unreadable, not UTF-8, not JSON or not a JSON
    object is one MemplanInputError naming it (as `name`, a hub id, when given; else by path)."""
    name = name or str(file)
    where = config_source(name)
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        raise MemplanInputError(f"{where} does not exist") from None
    except OSError as exc:  # permissions, a directory, an I/O error
        raise MemplanInputError(f"{where} cannot be read: {exc.strerror or type(exc).__name__}") from None
    try:
        text = raw.decode("utf-8-sig")  # a BOM, as some Windows editors write, is not an error
    except UnicodeDecodeError as exc:
        raise MemplanInputError(
            f"{where} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); config.json is UTF-8 JSON"
        ) from None
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MemplanInputError(f"{where} is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    except (ValueError, RecursionError) as exc:  # a number past Python's digit limit, nesting past the stack
        raise MemplanInputError(f"{where} is not a JSON config memplan can read: {type(exc).__name__}") from None
    ConfigReader(cfg, name)  # a JSON object, or one line saying what it is
    return cfg


def load_hf_config(name: str, revision: str | None = None) -> tuple[str, dict]:
    """(display name, config dict) for a shipped model, an alias, a local config.json path (or a
    directory holding one), or any other hub id (`org/name`), whose config.json is fetched through
    huggingface_hub into the Hugging Face cache (profiles/hub.py). `revision` (a branch, tag or
    commit) fetches that snapshot from the hub, for a shipped id too (a shipped profile is one
    snapshot, the one memplan was checked on); a local file has no revision."""
    path = Path(name)
    if name.endswith(".json") or path.is_dir():
        if revision is not None:
            raise MemplanInputError(f"revision {revision!r} applies to hub ids only, not to the local config {name!r}")
        if path.is_dir() and not (path / "config.json").exists():
            raise MemplanInputError(f"directory {name!r} has no config.json")
        file = path / "config.json" if path.is_dir() else path
        return str(file), read_config_file(file)
    try:
        hub_id = resolve_model_id(name)
    except MemplanInputError:
        from . import hub

        if not hub.looks_like_hub_id(name):
            raise
        return _hub_config(name, revision)
    if revision is not None:  # a shipped model at another revision: that snapshot of its repository
        return _hub_config(hub_id, revision)
    return hub_id, json.loads((MODELS_DIR / (hub_id.replace("/", "--", 1) + ".json")).read_text())


def _hub_config(hub_id: str, revision: str | None) -> tuple[str, dict]:
    from . import hub

    display = f"{hub_id}@{revision}" if revision else hub_id
    return display, read_config_file(hub.fetch_config_file(hub_id, revision), display)


@lru_cache(maxsize=64)
def load_model(name: str, revision: str | None = None) -> ModelArch:
    """The ModelArch of `name` (as load_hf_config takes it) at `revision` (hub ids only)."""
    display, cfg = load_hf_config(name, revision)
    return arch_from_hf_config(cfg, display)


@lru_cache(maxsize=1)
def _gpu_table() -> dict[str, GpuProfile]:
    rows = json.loads((_HERE / "gpus.json").read_text())
    return {row["name"]: GpuProfile(**row) for row in rows}


def gpu_names() -> list[str]:
    return list(_gpu_table())


def gpu_profiles() -> list[GpuProfile]:
    return list(_gpu_table().values())


def _gpu_key(name: str) -> str:
    """GPU names compared without case, and with '-', '_' and runs of spaces alike: 'RTX-3090',
    'rtx 3090' and 'NVIDIA A100-SXM4-80GB' / 'nvidia a100 sxm4 80gb' are the same name."""
    return " ".join(re.sub(r"[-_]", " ", name.lower()).split())


@lru_cache(maxsize=1)
def _gpu_names() -> tuple[dict[str, GpuProfile], dict[str, list[str]], list[tuple[str, GpuProfile | None]]]:
    """The one table GPU names are looked up in: (name -> profile for profile names, aliases and
    device names; shared name -> the profiles sharing it; device-name tokens, longest first, with
    None for cards known to be no profile)."""
    exact: dict[str, GpuProfile] = {}
    shared: dict[str, list[str]] = {}
    devices: dict[str, GpuProfile | None] = {}
    for gpu in _gpu_table().values():
        for token in (gpu.name, *gpu.aliases, *gpu.device_names):
            key = _gpu_key(token)
            if exact.get(key, gpu) is not gpu:
                raise ValueError(f"gpus.json: {token!r} names both {exact[key].name} and {gpu.name}; list it in shared_names")
            exact[key] = devices[key] = gpu
        for token in gpu.shared_names:
            shared.setdefault(_gpu_key(token), []).append(gpu.name)
        for token in gpu.similar_devices:
            devices.setdefault(_gpu_key(token), None)
    longest_first = sorted(devices.items(), key=lambda kv: -len(kv[0]))
    return exact, shared, longest_first


def load_gpu(name: str) -> GpuProfile:
    """The profile a user named: a profile name, an alias or a device name (any case). A name
    several profiles share (`A100`) and an unknown name are one MemplanInputError. A memory size
    (`48GiB`, `80GB`) is any card with that much memory (gpu.gpu_by_memory)."""
    if looks_like_memory(name):
        from memplan.overhead import DEFAULT_CONTEXT_BYTES, DEFAULT_WORKSPACE_BYTES

        return gpu_by_memory(name, DEFAULT_CONTEXT_BYTES, DEFAULT_WORKSPACE_BYTES)
    exact, shared, _ = _gpu_names()
    key = _gpu_key(name)
    if key in exact:
        return exact[key]
    if key in shared:
        raise MemplanInputError(f"GPU {name!r} is ambiguous: {' or '.join(shared[key])}")
    table = _gpu_table()
    aliases = {a: k for k, gpu in table.items() for a in gpu.aliases}
    raise MemplanInputError(f"unknown GPU {name!r}: {_suggest(name, list(table), aliases)}")


def match_device(name: str | None) -> GpuProfile | None:
    """The shipped profile of a device as torch.cuda.get_device_name() or pynvml names it
    ('NVIDIA A100-SXM4-80GB' -> A100-80GB), or None when no profile describes it. The longest
    profile name, alias or recorded device name found in it as whole words wins, so 'NVIDIA L40S'
    is L40S (not L4) and 'NVIDIA H100 NVL' is no profile (not the 80 GB H100)."""
    if not name:
        return None
    key = _gpu_key(name)
    if re.search(r"\bmig\b", key):  # a MIG slice has a fraction of the card's memory: no profile describes it
        return None
    for token, gpu in _gpu_names()[2]:
        if re.search(rf"(?<![a-z0-9]){re.escape(token)}(?![a-z0-9])", key):
            return gpu
    return None
