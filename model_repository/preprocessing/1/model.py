"""Triton entry point of `preprocessing`; the logic lives in backend/serving/preprocessing.py."""

from backend.serving.preprocessing import PreprocessingModel as TritonPythonModel

__all__ = ["TritonPythonModel"]
