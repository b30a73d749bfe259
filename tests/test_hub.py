"""Hub ids memplan does not ship: config.json comes through huggingface_hub and the user's Hugging
Face cache. No test touches the network: the cache is written in the layout huggingface_hub reads
(models--org--name/refs/<ref>, snapshots/<commit>/config.json) under a temporary HF_HOME, the hub
is forbidden (HF_HUB_OFFLINE=1) or pointed at a closed local port, or `hf_hub_download` raises
the error under test. The CLI runs in a subprocess, because huggingface_hub reads its environment
when it is imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from memplan.errors import MemplanInputError
from memplan.profiles import MODELS_DIR, TINY_DIR, load_model

pytest.importorskip("huggingface_hub")

PHI = json.loads((MODELS_DIR / "microsoft--phi-2.json").read_text())
PHI_PARAMS = 2_779_683_840
TINY_LLAMA = json.loads((TINY_DIR / "tiny-llama.json").read_text())
HUB_ID = "someone/phi-2-finetune"  # not shipped: memplan must go to the hub (cache) for it
MAIN, OLD = "a" * 40, "b" * 40  # commit hashes


def _cache(home, hub_id=HUB_ID, snapshots=None, refs=None):
    """Write a Hugging Face cache entry: {commit: config} snapshots and {ref: commit} refs."""
    repo = home / "hub" / ("models--" + hub_id.replace("/", "--"))
    for commit, cfg in (snapshots or {MAIN: PHI}).items():
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text(json.dumps(cfg))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for ref, commit in (refs or {"main": MAIN}).items():
        (repo / "refs" / ref).write_text(commit)


def _env(home, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return env | {"HF_HOME": str(home), "HF_HUB_DISABLE_TELEMETRY": "1"} | extra


def _python(code: str, env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)


def _cli(*args, env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "memplan.cli", *args], capture_output=True, text=True, timeout=60,
                          env=env)


def _one_line(out) -> str:
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr and out.stderr.count("\n") == 1, out.stderr
    return out.stderr.strip()


def test_cached_config_is_found_offline(tmp_path):
    _cache(tmp_path)
    out = _cli("estimate", "-m", HUB_ID, "--json", env=_env(tmp_path, HF_HUB_OFFLINE="1"))
    assert out.returncode == 0, out.stderr
    est = json.loads(out.stdout)
    assert est["params"]["total"] == PHI_PARAMS and est["model_name"] == HUB_ID


def test_revision_picks_that_snapshot(tmp_path):
    _cache(tmp_path, snapshots={MAIN: PHI, OLD: TINY_LLAMA}, refs={"main": MAIN, "v0": OLD})
    code = (
        "from memplan.profiles import load_model\n"
        f"for rev in (None, 'v0', {OLD!r}):\n"
        f"    arch = load_model({HUB_ID!r}, revision=rev)\n"
        "    print(arch.name, arch.family)\n"
    )
    out = _python(code, _env(tmp_path, HF_HUB_OFFLINE="1"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [f"{HUB_ID} phi", f"{HUB_ID}@v0 llama", f"{HUB_ID}@{OLD} llama"]


def test_offline_cache_miss_is_one_line_with_nearest_shipped(tmp_path):
    line = _one_line(_cli("estimate", "-m", "meta-llama/Llama-2-7b", env=_env(tmp_path, HF_HUB_OFFLINE="1")))
    assert "model 'meta-llama/Llama-2-7b' is not shipped and its config could not be fetched: HF_HUB_OFFLINE is set" in line
    assert str(tmp_path / "hub") in line and "did you mean meta-llama/Llama-2-7b-hf" in line


def test_offline_unknown_revision_names_it(tmp_path):
    _cache(tmp_path)
    code = f"from memplan.profiles import load_model\nload_model({HUB_ID!r}, revision='v9')"
    out = _python(code, _env(tmp_path, HF_HUB_OFFLINE="1"))
    assert "config.json at revision 'v9' is not in the Hugging Face cache" in out.stderr


def test_unreachable_hub_is_one_line(tmp_path):
    # a closed local port: the connection is refused at once, nothing leaves the machine
    env = _env(tmp_path, HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_ETAG_TIMEOUT="2", HF_HUB_DOWNLOAD_TIMEOUT="2")
    line = _one_line(_cli("estimate", "-m", "someorg/not-a-shipped-model", env=env))
    assert "could not be fetched" in line and "not-a-shipped-model" in line


def test_a_cached_config_that_is_not_a_config_is_one_line(tmp_path):
    _cache(tmp_path, snapshots={MAIN: [1, 2, 3]})
    line = _one_line(_cli("estimate", "-m", HUB_ID, env=_env(tmp_path, HF_HUB_OFFLINE="1")))
    assert f"config of '{HUB_ID}': must be a JSON object" in line


# each hub error hf_hub_download raises -> (words of the one line)
RAISED = {
    "GatedRepoError": f"model '{HUB_ID}' is a gated repository on the Hugging Face Hub: accept its terms on "
                      f"https://huggingface.co/{HUB_ID} and set HF_TOKEN",
    "RepositoryNotFoundError": f"the Hugging Face Hub has no repository '{HUB_ID}' (a private one needs HF_TOKEN); "
                               "did you mean microsoft/phi-2",  # (and the nearest others shipped)
    "RevisionNotFoundError": f"revision 'v9' of '{HUB_ID}' was not found on the Hugging Face Hub",
    "RemoteEntryNotFoundError": f"repository '{HUB_ID}' at revision 'v9' has no config.json",
}


@pytest.mark.parametrize("error", list(RAISED))
def test_hub_errors_are_one_line(tmp_path, error):
    # The error classes' constructors differ between huggingface_hub releases (an HTTP response is
    # required from 1.0): build the instance without one; memplan only looks at its class.
    code = (
        "import sys, huggingface_hub\n"
        "from huggingface_hub import errors\n"
        f"cls = getattr(errors, {error!r}, errors.EntryNotFoundError)\n"
        "def raising(*args, **kwargs):\n"
        "    exc = cls.__new__(cls)\n"
        "    Exception.__init__(exc, 'from the test')\n"
        "    raise exc\n"
        "huggingface_hub.hf_hub_download = raising\n"
        f"sys.argv = ['memplan', 'estimate', '-m', {HUB_ID!r}]\n"
        "from memplan import profiles\n"
        f"profiles.load_model = lambda name, revision=None, _load=profiles.load_model: _load(name, revision='v9')\n"
        "from memplan.cli import main\n"
        "main()\n"
    )
    line = _one_line(_python(code, _env(tmp_path)))
    assert RAISED[error] in line


def test_not_a_hub_id_stays_an_unknown_model():
    with pytest.raises(MemplanInputError, match="unknown model 'lama-2-7b'"):
        load_model("lama-2-7b")


def test_revision_of_a_local_file_is_refused():
    with pytest.raises(MemplanInputError, match="revision 'v1' applies to hub ids only"):
        load_model(str(TINY_DIR / "tiny-llama.json"), revision="v1")


def test_shipped_model_without_revision_never_imports_huggingface_hub():
    code = ("import sys\nfrom memplan.profiles import load_model\nload_model('phi-2')\n"
            f"load_model({str(TINY_DIR / 'tiny-llama.json')!r})\nprint('huggingface_hub' in sys.modules)")
    out = _python(code, dict(os.environ))
    assert out.stdout.strip() == "False", out.stderr
