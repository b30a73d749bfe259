"""Keep the libraries' own chatter (deprecation notices, bitsandbytes' missing optional `kernels`
package, peft and transformers advice) out of what `memplan trace` and `memplan validate` print:
their output is a table a user reads and a JSON line the harness parses, and the warnings are about
the libraries' futures, not about the measurement."""

from __future__ import annotations

import logging
import os
import warnings

LIBRARIES = ("transformers", "peft", "bitsandbytes", "accelerate", "torch", "huggingface_hub")


def quiet_libraries() -> None:
    """Call before the libraries are imported: transformers reads TRANSFORMERS_VERBOSITY once at
    import, and a warnings filter only catches what is raised after it is set."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for category in (FutureWarning, UserWarning, DeprecationWarning):
        for module in LIBRARIES:
            warnings.filterwarnings("ignore", category=category, module=module)
    # bitsandbytes and peft warn through warnings.warn from helper modules and through logging
    warnings.filterwarnings("ignore", message=r".*kernels.*")
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(logging.ERROR)
