"""Reading a training config file for `--from`: YAML or JSON (PyYAML imported only here, only when
--from is used), the DeepSpeed / FSDP files it references resolved relative to its folder, and one
line for a file that is missing, unreadable or not a config; the command line's options on top
(`job_from_file`) and the report of how each key was read (`describe`). The mapping itself is
planner/from_config.py. An `accelerate launch` config file is read by `read_accelerate_file` (its
mapping: planner/accelerate_config.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Collection

from .accelerate_config import AccelerateRead, read_accelerate_config
from .architecture import ModelArch
from .errors import MemplanInputError
from .from_config import FORMAT_NAMES, FromConfig, job_fields, merge_reference, read_training_config
from .job import Job


def read_file(path: Path, shown: str | None = None, what: str = "training config") -> Any:
    """A YAML or JSON file's data (JSON is YAML, but a .json file is read as JSON for its messages);
    `what` names the file in the messages."""
    shown = shown or str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise MemplanInputError(f"{what} {shown!r} does not exist") from None
    except OSError as exc:  # a directory, permissions, an I/O error
        raise MemplanInputError(f"{what} {shown!r} cannot be read: {exc.strerror or type(exc).__name__}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise MemplanInputError(
            f"{what} {shown!r} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})") from None
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise MemplanInputError(
                f"{what} {shown!r} is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
        except (ValueError, RecursionError) as exc:
            raise MemplanInputError(f"{what} {shown!r} is not JSON memplan can read: {type(exc).__name__}") from None
    try:
        import yaml
    except ImportError:  # pragma: no cover - a dependency since --from
        raise MemplanInputError("reading a YAML config needs PyYAML: pip install 'pyyaml>=6'") from None
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise MemplanInputError(f"{what} {shown!r} is not valid YAML: {exc.problem}{where}") from None
    except (yaml.YAMLError, RecursionError) as exc:
        raise MemplanInputError(f"{what} {shown!r} is not YAML memplan can read: {type(exc).__name__}") from None


def load_training_config(path: str, fmt: str | None = None, overridden: Collection[str] = ()) -> FromConfig:
    """The config at `path` (and the DeepSpeed / FSDP files it names, relative to its folder) as a FromConfig."""
    file = Path(path)
    data = read_file(file, path)
    if data is None:
        raise MemplanInputError(f"training config {path!r} is empty")
    if not isinstance(data, dict):
        raise MemplanInputError(f"training config {path!r} must be a mapping of keys, got {type(data).__name__}")
    fc = read_training_config(data, fmt, path, overridden)
    for kind, ref in fc.references:
        ref_path = Path(ref)
        if not ref_path.is_absolute():
            ref_path = file.parent / ref_path
        shown = str(ref_path)
        if not ref_path.is_file():
            raise MemplanInputError(f"{path}: {kind}: {ref!r} does not exist (looked for {shown!r}, relative to the "
                                    "config's folder)")
        ref_data = read_file(ref_path, shown)
        fc = merge_reference(fc, kind, ref_data, shown, overridden)
    return fc


def job_from_file(path: str, fmt: str | None, model: str | None, cli: dict, searched: tuple[str, ...] = (),
                  why: str = "searched by this command") -> tuple[dict, dict]:
    """`--from FILE` for a command: the file's Job fields with the command line's `cli` (and `model`)
    on top, less `searched` (fields the command sets itself, `why` saying so), checked as a Job; and
    the report of how each key was read (the `"from_config"` of --json)."""
    given = {**cli, **({"model": model} if model is not None else {})}
    fc = load_training_config(path, fmt, overridden=set(given))
    fields, dropped = job_fields(fc, given)
    for name in searched:
        if name in fields and name not in given:
            dropped.append((name, why))
            del fields[name]
    if "model" not in fields:
        raise MemplanInputError(fc.model_missing)
    try:
        Job(**fields)
    except MemplanInputError as exc:
        also = " with the options given here" if given else ""
        raise MemplanInputError(f"{exc} (the job read from {path}{also})") from None
    report = {"file": path, "format": fc.format, "used": [list(u) for u in fc.used],
              "defaults": [list(d) for d in fc.defaults], "overridden": sorted(given),
              "not_passed": [list(d) for d in dropped], "ignored": [list(i) for i in fc.ignored], "notes": fc.notes}
    return fields, report


def describe(report: dict) -> str:
    """The report as the lines the CLI prints on stderr: keys used, the format's defaults, the
    command line's overrides, the ignored keys grouped by why, and the notes."""
    import textwrap

    def shown(value):
        return ",".join(value) if isinstance(value, (list, tuple)) else value

    lines = [f"read from {report['file']} ({FORMAT_NAMES[report['format']]}):"]
    for key, raw, field, value in report["used"]:
        lines.append(f"  {key}: {raw if isinstance(raw, str) else json.dumps(raw)} -> {field}={shown(value)}")
    for field, value, why in report["defaults"]:
        lines.append(f"  (not in the file) {field}={shown(value)}: {why}")
    if report["overridden"]:
        lines.append("  given on the command line: " + ", ".join(report["overridden"]))
    for field, why in report["not_passed"]:
        lines.append(f"  not passed on: {field} ({why})")
    by_reason: dict[str, list[str]] = {}
    for key, why in report["ignored"]:
        by_reason.setdefault(why, []).append(key)
    for why, keys in by_reason.items():
        lines.append(f"  ignored, {why}: {', '.join(keys)}")
    for note in report["notes"]:
        lines.append(f"  note: {note}")
    return "\n".join(textwrap.fill(line, 110, subsequent_indent="      ", break_on_hyphens=False,
                                   break_long_words=False) for line in lines)


def load_accelerate_config(path: str) -> dict:
    """The data of an accelerate config file (`accelerate config`'s YAML, or JSON): a mapping, or one line."""
    data = read_file(Path(path), path, what="accelerate config")
    if data is None:
        raise MemplanInputError(f"accelerate config {path!r} is empty")
    if not isinstance(data, dict):
        raise MemplanInputError(f"accelerate config {path!r} must be a mapping of keys, got {type(data).__name__}")
    return data


def read_accelerate_file(path: str, arch: ModelArch, for_trace: bool, method: str | None = None) -> AccelerateRead:
    """`--accelerate-config FILE`: the Job fields the file sets (and notes), each bad key in one line
    that names the file."""
    data = load_accelerate_config(path)
    try:
        return read_accelerate_config(data, arch, for_trace, method)
    except MemplanInputError as exc:
        raise MemplanInputError(f"accelerate config {path!r}: {str(exc).removeprefix('accelerate config: ')}") from None
