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

# The CLI's tables wrap at the terminal's width, COLUMNS first (planner/textable.py). pytest-xdist's
# workers export the width of the terminal pytest runs in, which the `memplan` subprocesses the tests
# start would inherit: they render at the piped width instead, whatever pytest runs under.
for _var in ("COLUMNS", "LINES"):
    os.environ.pop(_var, None)

# the tiny configs ship in the package (memplan validate --matrix quick reads them from a wheel too)
DATA = TINY_DIR


def needs(module: str):
    """Skip a test when an optional extra is not installed (CI installs them all)."""
    return pytest.importorskip(module)
