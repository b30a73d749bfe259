"""Shipped model and GPU profiles, and loaders that turn them into planner inputs.

Model profiles are the unmodified Hugging Face `config.json` of each supported model, stored as
`models/<org>--<name>.json`; the loader also takes a path to a local config.json, or fetches the
config of another hub id when online (profiles/hub.py).
"""

from __future__ import annotations

import difflib
import json
from functools import lru_cache
from pathlib import Path

from memplan.architecture import ModelArch, arch_from_hf_config
from memplan.errors import MemplanInputError
from memplan.gpu import GpuProfile

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
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "zephyr-7b": "HuggingFaceH4/zephyr-7b-beta",
    "gemma-2b": "google/gemma-2b",
    "gemma-7b": "google/gemma-7b",
    "phi-2": "microsoft/phi-2",
    "starcoder": "bigcode/starcoder",
    "mixtral-8x7b": "mistralai/Mixtral-8x7B-v0.1",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B",
    "qwen3-8b": "Qwen/Qwen3-8B",
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


def load_hf_config(name: str) -> tuple[str, dict]:
    """(display name, config dict) for a shipped model, an alias, a local config.json path, or any
    other hub id (`org/name`), whose config is fetched once and cached (profiles/hub.py)."""
    path = Path(name)
    if name.endswith(".json") or path.is_dir():
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise MemplanInputError(f"config file {str(file)!r} does not exist")
        try:
            return str(file), json.loads(file.read_text())
        except json.JSONDecodeError as exc:
            raise MemplanInputError(f"config file {str(file)!r} is not valid JSON: {exc.msg}") from None
    try:
        hub_id = resolve_model_id(name)
    except MemplanInputError:
        from . import hub

        if not hub.looks_like_hub_id(name):
            raise
        try:
            return name, hub.fetch_config(name)
        except hub.HubUnavailable as exc:
            hint = _suggest(name, shipped_models())
            raise MemplanInputError(
                f"model {name!r} is not shipped and its config could not be fetched ({exc.reason}); "
                f"{hint}{'' if hint.endswith('?') else ';'} or pass a path to a local config.json "
                "(HF_TOKEN for gated repositories)"
            ) from None
    return hub_id, json.loads((MODELS_DIR / (hub_id.replace("/", "--", 1) + ".json")).read_text())


@lru_cache(maxsize=64)
def load_model(name: str) -> ModelArch:
    display, cfg = load_hf_config(name)
    return arch_from_hf_config(cfg, display)


@lru_cache(maxsize=1)
def _gpu_table() -> dict[str, GpuProfile]:
    rows = json.loads((_HERE / "gpus.json").read_text())
    return {row["name"]: GpuProfile(**row) for row in rows}


def gpu_names() -> list[str]:
    return list(_gpu_table())


def gpu_profiles() -> list[GpuProfile]:
    return list(_gpu_table().values())


def load_gpu(name: str) -> GpuProfile:
    table = _gpu_table()
    key = {k.lower(): k for k in table}.get(name.lower())
    if key is None:
        for k, gpu in table.items():
            if name.lower() in (a.lower() for a in gpu.aliases):
                key = k
                break
    if key is None:
        aliases = {a: k for k, gpu in table.items() for a in gpu.aliases}
        raise MemplanInputError(f"unknown GPU {name!r}: {_suggest(name, list(table), aliases)}")
    return table[key]
