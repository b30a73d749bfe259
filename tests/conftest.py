from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"


def needs(module: str):
    """Skip a test when an optional extra is not installed (CI installs them all)."""
    return pytest.importorskip(module)
