"""Triton entry point of `reasoning`; the logic lives in backend/serving/reasoning.py."""

from backend.serving.reasoning import ReasoningModel as TritonPythonModel

__all__ = ["TritonPythonModel"]
