"""A model's `config.json` from the Hugging Face Hub, for hub ids memplan does not ship.

Only config.json is fetched (a few KB, no weights), through `huggingface_hub.hf_hub_download`, so
it lands in the user's Hugging Face cache (`HF_HOME`, `HF_HUB_CACHE`) beside what transformers
downloads: a config already there is found offline, `HF_HUB_OFFLINE=1` never touches the network,
`revision` pins a branch, tag or commit, and `HF_ENDPOINT` / `HF_TOKEN` (or `hf auth login`) apply
as they do for transformers. memplan keeps no cache of its own: one cache, one set of rules.

huggingface_hub is imported here, inside the fetch, only: estimating a shipped or local model
imports pydantic, typer and rich alone.
"""

from __future__ import annotations

import re
from pathlib import Path

from memplan.errors import MemplanInputError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_hub_id(name: str) -> bool:
    return bool(HUB_ID.match(name)) and not name.endswith(".json")


def _nearest(hub_id: str) -> str:
    """', did you mean ...?' or '; known: ...', from the shipped models."""
    from memplan.profiles import _suggest, shipped_models

    hint = _suggest(hub_id, shipped_models())
    return f"; {hint}" + ("" if hint.endswith("?") else ";")


def fetch_config_file(hub_id: str, revision: str | None = None) -> Path:
    """The path of the repository's config.json in the Hugging Face cache, downloaded first when
    it is not there (and the hub is allowed). Every failure is one MemplanInputError."""
    import huggingface_hub
    from huggingface_hub import constants, errors
    from huggingface_hub.utils import disable_progress_bars, logging

    disable_progress_bars()  # a bar on stderr for a few KB is noise
    at = f" at revision {revision!r}" if revision else ""
    local = "or pass a path to a local config.json"
    verbosity = logging.get_verbosity()
    # its retry warnings ("Retrying in 1s") would break the one-line error; the error says it all
    logging.set_verbosity_error()
    try:
        return Path(huggingface_hub.hf_hub_download(hub_id, "config.json", revision=revision, library_name="memplan"))
    # subclasses first: GatedRepoError is a RepositoryNotFoundError, LocalEntryNotFoundError an EntryNotFoundError
    except errors.GatedRepoError:
        raise MemplanInputError(
            f"model {hub_id!r} is a gated repository on the Hugging Face Hub: accept its terms on "
            f"https://huggingface.co/{hub_id} and set HF_TOKEN (or run `hf auth login`), {local}"
        ) from None
    except errors.RepositoryNotFoundError:
        raise MemplanInputError(
            f"model {hub_id!r} is not shipped and the Hugging Face Hub has no repository {hub_id!r} "
            f"(a private one needs HF_TOKEN){_nearest(hub_id)} {local}"
        ) from None
    except errors.RevisionNotFoundError:
        raise MemplanInputError(
            f"revision {revision!r} of {hub_id!r} was not found on the Hugging Face Hub: give a branch, tag or commit "
            "of that repository"
        ) from None
    except errors.LocalEntryNotFoundError:
        # not in the cache, and the hub was not asked (offline mode) or could not be reached
        where = constants.HF_HUB_CACHE
        if constants.HF_HUB_OFFLINE:
            cause = f"HF_HUB_OFFLINE is set and its config.json{at} is not in the Hugging Face cache ({where})"
        else:
            cause = f"the Hugging Face Hub could not be reached and its config.json{at} is not in the cache ({where})"
        raise MemplanInputError(
            f"model {hub_id!r} is not shipped and its config could not be fetched: {cause}{_nearest(hub_id)} {local}"
        ) from None
    except errors.EntryNotFoundError:
        raise MemplanInputError(
            f"repository {hub_id!r}{at} has no config.json: memplan reads the config.json of a transformers model"
        ) from None
    except errors.OfflineModeIsEnabled:
        raise MemplanInputError(
            f"model {hub_id!r} is not shipped and HF_HUB_OFFLINE is set{_nearest(hub_id)} {local}"
        ) from None
    except errors.HFValidationError as exc:
        raise MemplanInputError(f"{hub_id!r}{at} is not a valid Hugging Face repository id or revision: "
                                 f"{str(exc).splitlines()[0]}") from None
    except Exception as exc:  # HTTP 5xx or 401, timeouts, a proxy: name the cause in one line
        raise MemplanInputError(
            f"model {hub_id!r} is not shipped and its config could not be fetched ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}){_nearest(hub_id)} {local} (HF_TOKEN for gated "
            "repositories)"
        ) from None
    finally:
        logging.set_verbosity(verbosity)
