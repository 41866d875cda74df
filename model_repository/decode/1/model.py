"""Triton entry point of `decode`; the logic lives in backend/serving/decode.py."""

from backend.serving.decode import DecodeModel as TritonPythonModel

__all__ = ["TritonPythonModel"]
