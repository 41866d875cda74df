"""The logic behind the Triton models of ``model_repository/`` (one module per model).

Each ``model_repository/<name>/1/model.py`` only re-exports a class from here, so the
serving logic can be read, linted and unit-tested as ordinary Python. Modules that talk
to Triton import ``triton_python_backend_utils``, which exists only inside the Python
backend stub; :mod:`backend.serving.request` and :mod:`backend.serving.mailbox` do not.
"""
