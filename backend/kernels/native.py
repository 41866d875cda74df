"""The project's C++ CPU kernels as one extension, built once per machine (``backend.kernels.build``).

Sources beside this file (``cpu_kernels.h`` says what each holds), compiled in one of two
variants (``simd.h``): ``avx512`` where the CPU has AVX512-BF16, else ``avx2`` where it has
AVX2 with FMA (the AMD EPYC machines this project also runs on: without it they fell back to
the torch forward, several times slower per step). Where neither fits, or the build fails (no
compiler, no ninja), ``module()`` is None and every caller keeps its torch fallback.
``MULTISTREAM_INT4_KERNEL=torch`` forces that too; ``MULTISTREAM_CPU_KERNELS=avx2`` builds the
AVX2 variant on an AVX-512 machine (tests, comparisons).
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
#: Hashed with the sources: a change to a header rebuilds too.
HEADERS = [HERE / "cpu_kernels.h", HERE / "simd.h"]
#: Named instruction sets only, never -march=native: some VMs advertise AMX and trap on it.
VARIANT_FLAGS = {
    "avx512": [
        "-O3",
        "-mavx512f",
        "-mavx512bw",
        "-mavx512vl",
        "-mavx512dq",
        "-mavx512bf16",
        "-mfma",
        "-fopenmp",
    ],
    "avx2": ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"],
}
#: What /proc/cpuinfo must list for each variant.
VARIANT_CPU_FLAGS = {
    "avx512": ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "fma"),
    "avx2": ("avx2", "fma", "f16c"),
}
LDFLAGS = ["-fopenmp"]


def cpu_flags() -> set[str]:
    """The instruction-set flags /proc/cpuinfo lists (empty where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_has_avx512_bf16() -> bool:
    return "avx512_bf16" in cpu_flags()


def fitting_variants() -> list[str]:
    """The variants this CPU can run, best first (whatever the environment asks for)."""
    flags = cpu_flags()
    return [v for v, need in VARIANT_CPU_FLAGS.items() if all(f in flags for f in need)]


def variant() -> str | None:
    """The kernel variant this machine gets (``avx512`` / ``avx2``), or None (torch's kernels)."""
    if os.environ.get("MULTISTREAM_INT4_KERNEL", "auto") == "torch":
        return None
    fits = fitting_variants()
    wanted = os.environ.get("MULTISTREAM_CPU_KERNELS", "auto")
    if wanted != "auto":
        if wanted not in VARIANT_FLAGS:
            raise ValueError(
                f"MULTISTREAM_CPU_KERNELS must be auto, {' or '.join(VARIANT_FLAGS)}; got {wanted!r}"
            )
        return wanted if wanted in fits else None
    return fits[0] if fits else None


def _build_args() -> tuple[str, list[str]]:
    v = variant()
    assert v is not None
    return (NAME if v == "avx512" else f"{NAME}_{v}"), VARIANT_FLAGS[v]


@functools.cache
def module() -> ModuleType | None:
    """The compiled extension, or None (logged once) when it cannot be built here."""
    if variant() is None:
        return None
    name, flags = _build_args()
    try:
        return build.load(name, SOURCES, flags, LDFLAGS, hashed_extra=HEADERS)
    except Exception as exc:  # noqa: BLE001 - no compiler, no ninja, old binutils: fall back
        log.warning("CPU kernels not built (%s: %s); using torch's", type(exc).__name__, exc)
        return None


def has(name: str) -> bool:
    """Whether the built extension has ``name`` (False without the extension)."""
    return hasattr(module(), name)


def is_built() -> bool:
    """Whether the extension is already in the kernel cache (loading is then instant)."""
    if variant() is None:
        return False
    name, flags = _build_args()
    return build.is_built(name, SOURCES, flags, LDFLAGS, hashed_extra=HEADERS)


def prebuild(say=None) -> bool:
    """Builds the extension now, before several processes need it at once."""
    if say is not None and variant() is not None and not is_built():
        say("building the CPU kernels (once per machine, about a minute) ...")
    return module() is not None
