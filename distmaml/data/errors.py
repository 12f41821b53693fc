"""The one exception of the data layer: bad input, told in one line."""

from __future__ import annotations

from distmaml.errors import DistmamlError


class DataError(DistmamlError, ValueError):
    """A bad data set, store or data setting; the message says what to change.

    The CLI prints it as ``distmaml: error: ...`` without a traceback.
    """
