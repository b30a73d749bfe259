"""A config.json memplan cannot estimate is one line naming the file and the key, exit code 2; one
it accepts gives non-negative components and positive phases, whatever its numbers (property)."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from contextlib import contextmanager
from unittest import mock

import pytest
from hypothesis import given
from hypothesis import strategies as st

from memplan import estimate_memory
from memplan.architecture import MAX_CONFIG_INT, arch_from_hf_config
from memplan.errors import MemplanInputError
from memplan.job import Job
from memplan.profiles import MODELS_DIR, TINY_DIR, read_config_file

MEMPLAN = [sys.executable, "-m", "memplan.cli"]
# the module (memplan.estimate the attribute is the estimate() function)
estimate_module = importlib.import_module("memplan.estimate")
TINY = {p.stem.removeprefix("tiny-"): json.loads(p.read_text()) for p in sorted(TINY_DIR.glob("tiny-*.json"))}


def _cli(path) -> subprocess.CompletedProcess:
    return subprocess.run([*MEMPLAN, "estimate", "-m", str(path)], capture_output=True, text=True, timeout=60)


def _one_line(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("memplan: error: ")
    return lines[0]


def _with(family: str, **changes) -> dict:
    cfg = dict(TINY[family])
    for key, value in changes.items():
        if value is ...:
            cfg.pop(key)
        else:
            cfg[key] = value
    return cfg


BAD_CONFIGS = [
    # (config, words the line must contain)
    ([1, 2, 3], "must be a JSON object of config keys, got a JSON array"),
    ("llama", "must be a JSON object of config keys, got a JSON string"),
    ({"model_type": "llama"}, "hidden_size is missing; it must be a positive integer"),
    ({"hidden_size": 256}, "model_type is missing"),
    ({"model_type": "gpt2", "hidden_size": 256}, "model_type 'gpt2'"),
    (_with("llama", vocab_size=...), "vocab_size is missing"),
    (_with("llama", hidden_size="big"), "hidden_size must be a positive integer, got 'big'"),
    (_with("llama", hidden_size=256.0), "hidden_size must be a positive integer, got 256.0"),
    (_with("llama", hidden_size=1e30), "hidden_size must be a positive integer, got 1e+30"),
    (_with("llama", hidden_size=2**40), f"hidden_size must be a positive integer up to {MAX_CONFIG_INT}"),
    (_with("llama", hidden_size=0), "hidden_size must be a positive integer, got 0"),
    (_with("llama", num_hidden_layers=-2), "num_hidden_layers must be a positive integer, got -2"),
    (_with("llama", num_hidden_layers=True), "num_hidden_layers must be a positive integer, got True"),
    # the estimate follows layers one by one: a config of millions is refused, not walked
    (_with("llama", num_hidden_layers=10_001), "num_hidden_layers must be a positive integer up to 10,000, got 10001"),
    (_with("starcoder", n_layer=2**31 - 1), "n_layer must be a positive integer up to 10,000"),
    (_with("llama", num_attention_heads=0), "num_attention_heads must be a positive integer, got 0"),
    (_with("llama", num_attention_heads=-8), "num_attention_heads must be a positive integer, got -8"),
    (_with("llama", num_key_value_heads=3), "num_key_value_heads must divide num_attention_heads (8), got 3"),
    (_with("llama", num_key_value_heads=0), "num_key_value_heads must be a positive integer, got 0"),
    (_with("llama", num_attention_heads=7), "num_attention_heads (7) must divide hidden_size (256)"),
    (_with("llama", vocab_size=0), "vocab_size must be a positive integer, got 0"),
    (_with("llama", intermediate_size=-1), "intermediate_size must be a positive integer, got -1"),
    (_with("llama", max_position_embeddings=0), "max_position_embeddings must be a positive integer, got 0"),
    (_with("llama", tie_word_embeddings="yes"), "tie_word_embeddings must be true or false, got 'yes'"),
    (_with("llama", attention_bias=1), "attention_bias must be true or false, got 1"),
    (_with("llama", attention_dropout=-0.1), "attention_dropout must be a number from 0 to 1, got -0.1"),
    (_with("gemma", head_dim=0), "head_dim must be a positive integer, got 0"),
    (_with("mistral", sliding_window=-1), "sliding_window must be a positive integer, got -1"),
    (_with("mixtral", num_local_experts=0), "num_local_experts must be a positive integer, got 0"),
    (_with("mixtral", num_experts_per_tok=9), "num_experts_per_tok must be at most num_local_experts"),
    (_with("phi", partial_rotary_factor=0), "partial_rotary_factor must be a number in (0, 1], got 0"),
    (_with("phi", partial_rotary_factor=1.5), "partial_rotary_factor must be a number in (0, 1], got 1.5"),
    (_with("phi", resid_pdrop=-0.5), "resid_pdrop must be a number from 0 to 1, got -0.5"),
    (_with("phi", hidden_size=250), "num_attention_heads (8) must divide hidden_size (250)"),
    (_with("falcon", multi_query="false"), "multi_query must be true or false, got 'false'"),
    (_with("falcon", hidden_dropout=2), "hidden_dropout must be a number from 0 to 1, got 2"),
    (_with("starcoder", n_embd=None, hidden_size=None), "n_embd or hidden_size is missing"),
    (_with("starcoder", n_layer=[3]), "n_layer must be a positive integer, got [3]"),
    (_with("starcoder", n_inner=0), "n_inner must be a positive integer, got 0"),
]


@pytest.mark.parametrize("cfg, words", BAD_CONFIGS, ids=[w.split(" must")[0].split(" is ")[0][:40] for _, w in BAD_CONFIGS])
def test_bad_config_is_one_line_naming_file_and_key(tmp_path, cfg, words):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    line = _one_line(_cli(path))
    assert f"config file '{path}'" in line
    assert words in line


def test_nan_dropout_is_refused(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY["llama"])[:-1] + ', "attention_dropout": NaN}')  # json.dumps writes NaN too
    assert "attention_dropout must be a number from 0 to 1, got nan" in _one_line(_cli(path))


@pytest.mark.parametrize(
    "content, words",
    [
        (b'{"model_type": "llama",', "is not valid JSON: Expecting property name enclosed in double quotes (line 1"),
        (b"", "is not valid JSON: Expecting value (line 1, column 1)"),
        (b'{"model_type": "llama\xff"}', "is not UTF-8 text (byte 0xff at offset 21)"),
        (b"\xff\xfe{\x00}\x00", "is not UTF-8 text (byte 0xff at offset 0)"),  # UTF-16
        (b"[" * 100_000, "is not a JSON config memplan can read: RecursionError"),
        (b'{"hidden_size": ' + b"9" * 5000 + b"}", "is not a JSON config memplan can read: ValueError"),
    ],
    ids=["truncated", "empty", "latin-1", "utf-16", "nested", "digits"],
)
def test_unreadable_content_is_one_line(tmp_path, content, words):
    path = tmp_path / "config.json"
    path.write_bytes(content)
    line = _one_line(_cli(path))
    assert f"config file '{path}'" in line and words in line


def test_utf8_bom_is_read(tmp_path):
    path = tmp_path / "config.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(TINY["llama"]).encode())
    assert read_config_file(path) == TINY["llama"]


def test_missing_file_and_directory_without_config(tmp_path):
    assert "does not exist" in _one_line(_cli(tmp_path / "nope.json"))
    assert f"directory '{tmp_path}' has no config.json" in _one_line(_cli(tmp_path))
    (tmp_path / "config.json").mkdir()  # a directory named config.json
    assert f"directory '{tmp_path / 'config.json'}' has no config.json" in _one_line(_cli(tmp_path / "config.json"))


def test_a_directory_with_config_json_is_read(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY["llama"]))
    out = subprocess.run([*MEMPLAN, "estimate", "-m", str(tmp_path), "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_unreadable_file_is_one_line(tmp_path):
    # tests run as root, which reads a chmod 000 file: the CLI runs with read_bytes raising what
    # an unreadable file raises
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY["llama"]))
    code = (
        "import pathlib, sys\n"
        "def denied(self): raise PermissionError(13, 'Permission denied', str(self))\n"
        "pathlib.Path.read_bytes = denied\n"
        f"sys.argv = ['memplan', 'estimate', '-m', {str(path)!r}]\n"
        "from memplan.cli import main\n"
        "main()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert f"config file '{path}' cannot be read: Permission denied" in _one_line(out)


def test_every_shipped_and_tiny_config_is_accepted():
    for path in [*MODELS_DIR.glob("*.json"), *TINY_DIR.glob("*.json")]:
        arch_from_hf_config(read_config_file(path), str(path))


# ---------------------------------------------------------------------------------------------
# Property: overwrite 1-3 numeric fields of a real config with any integer. Either memplan
# refuses the config (MemplanInputError), or every estimate of it is a sane set of integers.

CONFIGS = {f"tiny-{k}": v for k, v in TINY.items()} | {
    p.stem: json.loads(p.read_text()) for p in sorted(MODELS_DIR.glob("*.json"))
}
# keys a family reads with a default, so absent from some configs: overwriting them matters too
OPTIONAL_NUMERIC = ("num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window")
INTS = st.one_of(
    st.integers(-3, 8),
    st.integers(-(2**70), 2**70),
    st.sampled_from([MAX_CONFIG_INT, MAX_CONFIG_INT + 1, 2**63, -(2**63), 1, 2, 64, 256]),
)
JOBS = st.sampled_from([
    dict(task="train", method="full"),
    dict(task="train", method="full", weight_dtype="fp32", optimizer="adamw_8bit"),
    dict(task="train", method="lora", lora_targets="all-linear"),
    dict(task="train", method="qlora"),
    dict(task="infer", method="full", new_tokens=7),
])
BYTE_FIELDS = {"Component": ("bytes",), "Phase": ("allocated_bytes",),
               "Estimate": ("peak_allocated_bytes", "peak_reserved_bytes", "device_used_bytes", "host_bytes",
                            "gpu_memory_bytes")}


@contextmanager
def _integer_bytes_only():
    """pydantic's lax int fields take 3.0 silently and reject 2.5: check the type before they see it."""
    def checked(cls):
        def make(*args, **kwargs):
            for field in BYTE_FIELDS[cls.__name__]:
                value = kwargs.get(field)
                assert value is None or type(value) is int, f"{cls.__name__} {kwargs.get('name', '')} {field}={value!r}"
            return cls(*args, **kwargs)
        return make

    with mock.patch.multiple(estimate_module, **{name: checked(getattr(estimate_module, name)) for name in BYTE_FIELDS}):
        yield


def _numeric_keys(cfg: dict) -> list[str]:
    present = [k for k, v in cfg.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return sorted(set(present) | set(OPTIONAL_NUMERIC))


@pytest.mark.parametrize("name", list(CONFIGS))
@given(data=st.data())
def test_any_numbers_are_refused_or_estimated_sanely(name, data):
    cfg = dict(CONFIGS[name])
    keys = data.draw(st.lists(st.sampled_from(_numeric_keys(cfg)), min_size=1, max_size=3, unique=True), label="keys")
    for key in keys:
        cfg[key] = data.draw(INTS, label=key)
    try:
        arch = arch_from_hf_config(cfg, f"{name}.json")
    except MemplanInputError as exc:
        assert str(exc).startswith(f"config file '{name}.json': ")
        return
    job_fields = data.draw(JOBS, label="job")
    job = Job(model=name, micro_batch=data.draw(st.integers(1, 4), label="b"),
              seq_len=data.draw(st.sampled_from([1, 7, 128]), label="s"), **job_fields)
    try:
        with _integer_bytes_only():
            est = estimate_memory(job, arch)
    except MemplanInputError as exc:  # seq-len past the (overwritten) max_position_embeddings
        if arch.quantization is not None and "quantiz" in str(exc):
            return  # a job a pre-quantized checkpoint cannot run (planner/prequantized.py check_job)
        assert arch.max_positions < job.seq_len + job.new_tokens
        return
    # a zero-byte row is not listed: every row that is listed holds something
    assert all(c.bytes > 0 for c in est.components), [(c.name, c.bytes) for c in est.components if c.bytes <= 0]
    assert all(p.allocated_bytes > 0 for p in est.phases), est.phases
    assert est.peak_allocated_bytes > 0 and est.peak_reserved_bytes > 0 and est.device_used_bytes > 0
