"""A model's `config.json` from the Hugging Face Hub, for hub ids memplan does not ship.

Only the config is fetched (a few KB, no weights), once: it is cached under
`$MEMPLAN_CACHE` (default `~/.cache/memplan/configs`), so later estimates run offline. Honours
`HF_ENDPOINT` (mirrors) and `HF_TOKEN` (gated repositories such as meta-llama). Uses the
standard library only: nothing heavy joins the estimate's import path.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from memplan.errors import MemplanInputError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
TIMEOUT_S = 10


class HubUnavailable(Exception):
    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"{url}: {reason}")
        self.url, self.reason = url, reason


def looks_like_hub_id(name: str) -> bool:
    return bool(HUB_ID.match(name)) and not name.endswith(".json")


def cache_dir() -> Path:
    return Path(os.environ.get("MEMPLAN_CACHE") or Path.home() / ".cache" / "memplan" / "configs")


def _cache_file(hub_id: str) -> Path:
    return cache_dir() / (hub_id.replace("/", "--", 1) + ".json")


def config_url(hub_id: str, revision: str = "main") -> str:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    return f"{endpoint}/{hub_id}/resolve/{revision}/config.json"


def _download(url: str) -> bytes:
    import urllib.request

    request = urllib.request.Request(url, headers={"User-Agent": "memplan"})
    token = os.environ.get("HF_TOKEN")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        return response.read()


def fetch_config(hub_id: str) -> dict:
    """The hub repository's config.json: from the cache, else downloaded and cached."""
    cached = _cache_file(hub_id)
    if cached.is_file():
        return json.loads(cached.read_text())
    url = config_url(hub_id)
    try:
        raw = _download(url)
    except Exception as exc:  # offline, 401/404, timeout: the caller names the cause in one line
        reason = getattr(exc, "reason", None) or getattr(exc, "code", None) or type(exc).__name__
        raise HubUnavailable(url, str(reason)) from None
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError:
        raise MemplanInputError(f"{url} did not return a JSON config") from None
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(cfg, indent=2))
    return cfg
