"""Starts tritonserver on the model repository (``python -m launcher``).

Why a package apart from ``backend/``: ``backend/`` is exactly what Triton loads into its
stubs; rendering configs, finding the server binary and running the demo client are the
operator's side and must not ride along into every stub (nor make the server depend on
the client). The launcher imports ``backend``; nothing under ``backend`` imports it.
"""
