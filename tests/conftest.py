import os

import pytest
from hypothesis import settings

from memplan.profiles import TINY_DIR

# Property tests run the same 150 examples on every CI run (derandomized: a red CI is a change's
# fault, not the draw's); HYPOTHESIS_PROFILE=stress runs 5,000 fresh random ones to hunt for
# counterexamples (add what it finds as an @example).
settings.register_profile("ci", max_examples=150, deadline=None, derandomize=True)
settings.register_profile("stress", max_examples=5000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# the tiny configs ship in the package (memplan validate --matrix quick reads them from a wheel too)
DATA = TINY_DIR


def needs(module: str):
    """Skip a test when an optional extra is not installed (CI installs them all)."""
    return pytest.importorskip(module)
