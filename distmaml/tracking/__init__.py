"""MLflow tracking, from the driver only: params, per-step metrics, artifacts, the model.

Importing this package loads neither MLflow nor matplotlib; ``MlflowCallback``
does, when a run starts.
"""

from distmaml.tracking.callback import MlflowCallback
from distmaml.tracking.uri import absolute_uri

__all__ = ["MlflowCallback", "absolute_uri"]
