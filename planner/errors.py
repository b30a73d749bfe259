"""The one exception for bad input, in the library and the CLI alike, and the one place that turns
pydantic's ValidationError into its one-line message."""

from __future__ import annotations

from pydantic import ValidationError


class MemplanInputError(ValueError):
    """Bad user input: the message names the bad value and what is allowed.

    The CLI prints it as `memplan: error: <message>` and exits 2; the library raises it as is."""


def validation_message(exc: ValidationError) -> str:
    """The first error of a ValidationError as one line naming the field (as its CLI option) and the
    allowed values. Our own validators already word their message in full; pydantic's own (a wrong
    literal, a non-integer) get the option name and the bad value in front."""
    err = exc.errors()[0]
    msg = err["msg"].removeprefix("Value error, ")
    field = ".".join(str(p) for p in err.get("loc", ()))
    if err.get("type") == "value_error" or not field:
        return msg
    return f"invalid {field.replace('_', '-')} {err.get('input')!r}: {msg}"


def input_error(exc: ValidationError) -> MemplanInputError:
    """A ValidationError as the library's one bad-input exception (the pydantic error kept as its cause)."""
    err = MemplanInputError(validation_message(exc))
    err.__cause__ = exc
    return err
