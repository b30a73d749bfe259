"""The stack a user most likely runs: the installed transformers' major version, read from the
package metadata (importlib.metadata, never by importing transformers: it takes seconds), else the
newest. Only the CLI and memplan.estimate call this, so the core and the tests never depend on the
environment they run in."""

from __future__ import annotations

NEWEST = "transformers-5"


def default_stack() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        major = version("transformers").split(".", 1)[0]
    except PackageNotFoundError:
        return NEWEST
    return {"4": "transformers-4", "5": "transformers-5"}.get(major, NEWEST)
