"""The project's C++ CPU kernels as one extension, built once per machine (``backend.kernels.build``).

Sources beside this file (``cpu_kernels.h`` says what each holds). They need AVX512-BF16;
where it is missing, or the build fails (no compiler, no ninja), ``module()`` is None and
every caller keeps its torch fallback. ``MULTISTREAM_INT4_KERNEL=torch`` forces that too.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from types import ModuleType

from backend.kernels import build

log = logging.getLogger(__name__)

NAME = "multistream_cpu_kernels"
HERE = Path(__file__).parent
SOURCES = [
    HERE / "int4_bf16dp.cpp",
    HERE / "int8_bf16dp.cpp",
    HERE / "decode_step.cpp",
    HERE / "bindings.cpp",
]
#: Hashed with the sources: a change to the header rebuilds too.
HEADERS = [HERE / "cpu_kernels.h"]
#: Named instruction sets only, never -march=native: some VMs advertise AMX and trap on it.
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma", "-fopenmp"]
LDFLAGS = ["-fopenmp"]


def cpu_has_avx512_bf16() -> bool:
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def _wanted() -> bool:
    return os.environ.get("MULTISTREAM_INT4_KERNEL", "auto") != "torch" and cpu_has_avx512_bf16()


@functools.cache
def module() -> ModuleType | None:
    """The compiled extension, or None (logged once) when it cannot be built here."""
    if not _wanted():
        return None
    try:
        return build.load(NAME, SOURCES, FLAGS, LDFLAGS, hashed_extra=HEADERS)
    except Exception as exc:  # noqa: BLE001 - no compiler, no ninja, old binutils: fall back
        log.warning("CPU kernels not built (%s: %s); using torch's", type(exc).__name__, exc)
        return None


def has(name: str) -> bool:
    """Whether the built extension has ``name`` (False without the extension)."""
    return hasattr(module(), name)


def is_built() -> bool:
    """Whether the extension is already in the kernel cache (loading is then instant)."""
    return build.is_built(NAME, SOURCES, FLAGS, LDFLAGS, hashed_extra=HEADERS)


def prebuild(say=None) -> bool:
    """Builds the extension now, before several processes need it at once."""
    if say is not None and _wanted() and not is_built():
        say("building the CPU kernels (once per machine, about a minute) ...")
    return module() is not None
