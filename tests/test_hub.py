"""Hub ids memplan does not ship: the config is fetched once, cached, and a failed fetch is one
line with the nearest shipped names. No test touches the network: the download is replaced, or
pointed at a closed local port."""

import json
import os
import subprocess
import sys

import pytest

from memplan.errors import MemplanInputError
from memplan.params import count_params
from memplan.profiles import MODELS_DIR, hub, load_model

PHI = (MODELS_DIR / "microsoft--phi-2.json").read_bytes()


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMPLAN_CACHE", str(tmp_path))
    return tmp_path


def test_fetched_once_then_cached(cache, monkeypatch):
    calls = []

    def download(url):
        calls.append(url)
        return PHI

    monkeypatch.setattr(hub, "_download", download)
    arch = load_model("someone/phi-2-finetune")
    assert calls == ["https://huggingface.co/someone/phi-2-finetune/resolve/main/config.json"]
    assert arch.name == "someone/phi-2-finetune"
    assert count_params(arch).total == count_params(load_model("phi-2")).total
    assert json.loads((cache / "someone--phi-2-finetune.json").read_text()) == json.loads(PHI)

    def offline(url):
        raise OSError("offline")

    monkeypatch.setattr(hub, "_download", offline)
    assert hub.fetch_config("someone/phi-2-finetune") == json.loads(PHI)  # from the cache


def test_endpoint_and_token(monkeypatch):
    seen = {}

    class Response:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read(self):
            return PHI

    def urlopen(request, timeout):
        seen["url"], seen["auth"], seen["timeout"] = request.full_url, request.get_header("Authorization"), timeout
        return Response()

    import urllib.request

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    monkeypatch.setenv("HF_ENDPOINT", "https://mirror.example/")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    hub.fetch_config("org/gated-model")
    assert seen == {"url": "https://mirror.example/org/gated-model/resolve/main/config.json",
                    "auth": "Bearer hf_secret", "timeout": hub.TIMEOUT_S}


def test_failed_fetch_names_the_cause_and_the_nearest_shipped(monkeypatch):
    def refused(url):
        import urllib.error

        raise urllib.error.URLError("connection refused")

    monkeypatch.setattr(hub, "_download", refused)
    with pytest.raises(MemplanInputError, match=r"could not be fetched \(connection refused\); did you mean "
                                                r"meta-llama/Llama-2-7b-hf"):
        load_model("meta-llama/Llama-2-7b")


def test_not_a_hub_id_stays_an_unknown_model():
    with pytest.raises(MemplanInputError, match="unknown model 'lama-2-7b'"):
        load_model("lama-2-7b")


def test_cli_offline_is_one_line_exit_2(cache):
    env = dict(os.environ, HF_ENDPOINT="http://127.0.0.1:9", MEMPLAN_CACHE=str(cache))
    out = subprocess.run([sys.executable, "-m", "memplan.cli", "estimate", "-m", "someorg/not-a-shipped-model"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "could not be fetched" in out.stderr and "Traceback" not in out.stderr
