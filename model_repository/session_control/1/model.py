"""Triton entry point of `session_control`; the logic lives in backend/serving/session_control.py."""

from backend.serving.session_control import SessionControlModel as TritonPythonModel

__all__ = ["TritonPythonModel"]
