"""Live web playground for the ``multistream`` model: ``python -m client.web --triton HOST:PORT``.

The answer and every reasoning stream fill their own panes token by token;
the user can type into the running session and stop it (see ``app.py``).
"""

from .app import Playground, create_app, parse_params

__all__ = ["Playground", "create_app", "parse_params"]
