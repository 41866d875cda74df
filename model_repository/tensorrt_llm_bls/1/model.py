"""Triton entry point of `tensorrt_llm_bls`; the logic lives in backend/serving/tensorrt_llm_bls.py."""

from backend.serving.tensorrt_llm_bls import TensorrtLlmBlsModel as TritonPythonModel

__all__ = ["TritonPythonModel"]
