"""The project's own errors: what a user can cause, told in one line.

Every error distmaml raises on purpose for a bad input, or for a run or a
cluster that cannot go on, is a ``DistmamlError``. ``distmaml.cli.main``
prints these as ``distmaml: error: <message>`` and exits with the error's
``exit_code``; any other exception is a bug (in distmaml, torch, pyarrow...)
and keeps its traceback.

| class | where | exit |
| --- | --- | --- |
| ``ConfigError`` (also a ``ValueError``) | ``config`` | 2 |
| ``DataError`` (also a ``ValueError``) | ``data`` | 2 |
| ``StorageError`` (also an ``OSError``) | ``storage`` | 2 |
| ``CheckpointError`` (also a ``FileNotFoundError``) | ``checkpoint`` | 2 |
| ``UserError`` | ``cli`` | 2 |
| ``UserCodeError`` (also a ``ValueError``) | ``usercode`` | 2 |
| ``TrainError`` | ``api`` | 2 |
| ``EngineError`` (also a ``RuntimeError``) | ``engine`` | 3 |
| ``ClusterError`` (also a ``ConnectionError``) | ``cluster.connect`` | 3 |
| ``NonFiniteError`` (also a ``RuntimeError``) | ``trainer`` | 3 |
| ``TrackingError`` (also a ``ConnectionError``) | ``tracking.probe`` | 3 |
| ``MemoryFitError`` (also a ``RuntimeError``) | ``memory`` | 3 |
"""

from __future__ import annotations

BAD_INPUT = 2
"""Exit code of a bad input: the message says what to change."""
CANNOT_GO_ON = 3
"""Exit code of a run or cluster that cannot go on (numbers that diverged, workers lost, no cluster)."""


class DistmamlError(Exception):
    """An error the user can act on; the message is one line that says what to change."""

    exit_code: int = BAD_INPUT
