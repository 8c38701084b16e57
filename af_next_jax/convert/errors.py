"""The one exception for bad input to the converter.

`python -m af_next_jax.convert` reports a `BadInputError` as a one-line `error: ...` and exit status 2,
with nothing written. Every other exception, a `ValueError` from a bug included, is not the user's
input: it keeps its traceback and Python's exit status 1. So raise `BadInputError` only where the
input has been checked and found wrong, with a message that names the file, key, shape or value
and what would be valid.
"""

from __future__ import annotations


class BadInputError(ValueError):
    """Bad input to a conversion: a path, flag, file, key, shape or value that the user can fix."""


def config_from_fields(build, where: str):
    """`build()` constructs a ModelConfig from a file's fields, and does nothing else: so its errors are
    the file's fault (ValueError: the config's own validation, e.g. heads that do not divide the width;
    TypeError: unknown or missing fields; KeyError: a missing section), reported as bad input."""
    try:
        return build()
    except BadInputError:
        raise
    except (ValueError, TypeError, KeyError) as error:
        raise BadInputError(f"{where}: not a valid model config ({type(error).__name__}: {error})") from None
