"""Beam's RunInference API (``apache_beam.ml.inference.base``), imported without its ModelManager.

That module imports ``apache_beam.ml.inference.model_manager`` when it can, for
``RunInference(..., use_model_manager=True)``, and the manager imports torch and scipy.optimize at
import time: 1.4 s of CPU in a job's driver, which runs no model, while the worker processes wait
for it to start them (and 0.2 s of scipy in each worker). mbm never asks for the manager; Beam
imports it on demand for a pipeline that does, and otherwise never reads it. The same failed import
leaves the module without ``resource`` (both sit in one ``try``), which Beam reads for the memory a
model load took: it is put back, or every model load logs that memory usage cannot be fetched.
"""

from __future__ import annotations

import contextlib
import sys

_BASE = "apache_beam.ml.inference.base"
_MANAGER = "apache_beam.ml.inference.model_manager"

if _BASE not in sys.modules and _MANAGER not in sys.modules:
    sys.modules[_MANAGER] = None  # type: ignore[assignment]  # makes base's optional import fail
    try:
        import apache_beam.ml.inference.base as _base
    finally:
        del sys.modules[_MANAGER]
    if _base.resource is None:
        with contextlib.suppress(ImportError):  # not on this platform: Beam's own fallback stands
            import resource as _resource

            _base.resource = _resource

from apache_beam.ml.inference.base import ModelHandler, RunInference  # noqa: E402

__all__ = ["ModelHandler", "RunInference"]
