"""Few-shot image classification: the Parquet task store and its episodes.

``distmaml prepare`` decodes a data set once (torchvision) and writes a
Parquet task store (pyarrow); ``ImageTasks`` loads a split of it into memory
as one uint8 tensor and samples N-way K-shot episodes from it.

Only this package imports pyarrow; ``core``, ``tasks`` and ``models`` do not,
and this ``__init__`` imports nothing heavy (the engine imports the data
modules lazily, when a config names an image family).
"""

from distmaml.data.errors import DataError

__all__ = ["DataError"]
