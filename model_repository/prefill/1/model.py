"""Triton entry point of `prefill`; the logic lives in backend/serving/prefill.py."""

from backend.serving.prefill import PrefillModel as TritonPythonModel

__all__ = ["TritonPythonModel"]
