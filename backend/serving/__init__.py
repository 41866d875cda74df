"""The logic behind the Triton models of ``model_repository/`` (one module per model).

Each ``model_repository/<name>/1/model.py`` only re-exports a class from here, so the
serving logic can be read, linted and unit-tested as ordinary Python. Modules that talk
to Triton import ``triton_python_backend_utils``, which exists only inside the Python
backend stub; :mod:`backend.serving.request`, :mod:`backend.serving.pump` and the state of
:mod:`backend.serving.reasoning_wire` do not. The shared parts: ``engine_model`` (the
skeleton), ``pump`` (per-stream grouping and metrics), ``handoff`` (prefill -> decode),
``reasoning_wire`` (decode <-> reasoning), ``tensors`` (Triton tensors <-> values).
"""
