"""Python stacks in the server log when a stub dies, for every model of the repository.

A file of its own, without torch, so that the light stubs (preprocessing, the BLS model,
a prefill that passes prompts on) enable it as the engine models do.
"""

from __future__ import annotations

import ctypes
import faulthandler
import os


def enable_crash_traces() -> None:
    """On SIGSEGV / SIGABRT, print every Python thread's stack into the server log.

    Why in code: a dying stub is otherwise silent (tritonserver only sees it gone), and
    ``PYTHONFAULTHANDLER`` does nothing here: the stub embeds an *isolated* interpreter
    that ignores every ``PYTHON*`` variable (checked with gdb on a live stub).
    """
    if not faulthandler.is_enabled():
        faulthandler.enable(all_threads=True)
    # Debugging aid (the test suite sets it): abort at the first Python allocation made off
    # the GIL, with its C stack in the server log. See tests/support/gil_check.c.
    check = os.environ.get("MULTISTREAM_GIL_CHECK")
    if check:
        ctypes.PyDLL(check).install()  # PyDLL: called with the GIL held
