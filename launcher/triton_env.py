"""Locate the Triton server pieces shipped in the ``nvidia-pytriton`` wheel.

Why this exists: on a machine without the Triton container (CPU laptops, CI)
the only tritonserver we have is the one inside the ``nvidia-pytriton`` wheel.
It is usable as a plain server once we (1) build a backend directory whose
``python/`` holds ``libtriton_python.so``, ``triton_python_backend_utils.py``
and the stub built for *this* interpreter's version, and (2) give the server
an ``LD_LIBRARY_PATH`` with this interpreter's ``lib/`` (for
``libpython3.X.so`` -- without it the stub silently binds the *system*
libpython, a different interpreter without our packages) and the wheel's
``nvidia_pytriton.libs/``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

INSTALL_HINT = "run `bash scripts/setup.sh` (or `python3 -m pip install nvidia-pytriton==0.7.0`)"


class TritonEnvError(RuntimeError):
    """A piece of the Triton install is missing; the message says which and how to fix it."""


@dataclass(frozen=True)
class TritonInstall:
    """Paths of the Triton pieces inside the nvidia-pytriton wheel."""

    tritonserver: Path
    backend_lib: Path  # libtriton_python.so
    backend_utils: Path  # triton_python_backend_utils.py
    stub: Path  # triton_python_backend_stub for this Python version
    libs_dir: Path  # site-packages/nvidia_pytriton.libs
    python_lib_dir: Path  # dir holding libpython3.X.so

    def ld_library_path(self, existing: str | None = None) -> str:
        """LD_LIBRARY_PATH for tritonserver and its stubs (interpreter lib first)."""
        parts = [str(self.python_lib_dir), str(self.libs_dir)]
        if existing:
            parts.append(existing)
        return os.pathsep.join(parts)


def _pytriton_root() -> Path:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonEnvError(
            f"the nvidia-pytriton wheel is not installed in {sys.executable}; {INSTALL_HINT}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _must_exist(path: Path, what: str) -> Path:
    if not path.exists():
        raise TritonEnvError(f"{what} not found at {path}; {INSTALL_HINT}")
    return path


def python_lib_dir() -> Path:
    """Directory holding the shared libpython of the running interpreter."""
    libdir = Path(sysconfig.get_config_var("LIBDIR") or Path(sys.base_prefix) / "lib")
    ldlibrary = (
        sysconfig.get_config_var("LDLIBRARY")
        or f"libpython{sys.version_info.major}.{sys.version_info.minor}.so"
    )
    if not (libdir / ldlibrary).exists() or not ldlibrary.endswith(".so"):
        raise TritonEnvError(
            f"{sys.executable} has no shared libpython ({libdir / ldlibrary}); the Triton python stub "
            "embeds the interpreter and needs one (pyenv: PYTHON_CONFIGURE_OPTS=--enable-shared)"
        )
    return libdir


def find_triton() -> TritonInstall:
    """Find every piece, raising TritonEnvError naming the first one missing."""
    root = _pytriton_root() / "tritonserver"
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    libs = root.parent.parent / "nvidia_pytriton.libs"
    return TritonInstall(
        tritonserver=_must_exist(root / "bin" / "tritonserver", "tritonserver binary"),
        backend_lib=_must_exist(root / "backends" / "python" / "libtriton_python.so", "libtriton_python.so"),
        backend_utils=_must_exist(
            root / "backends" / "python" / "triton_python_backend_utils.py", "triton_python_backend_utils.py"
        ),
        stub=_must_exist(
            root / "python_backend_stubs" / ver / "triton_python_backend_stub",
            f"triton_python_backend_stub for Python {ver}",
        ),
        libs_dir=_must_exist(libs, "nvidia_pytriton.libs (shared libraries of the wheel)"),
        python_lib_dir=python_lib_dir(),
    )


def check_numpy() -> None:
    """The 2.51 stub misreads tensors with NumPy 2 (inputs garbled, outputs empty): refuse early."""
    import numpy

    if int(numpy.__version__.split(".")[0]) >= 2:
        raise TritonEnvError(
            f"NumPy {numpy.__version__} is installed in {sys.executable}; the Triton python stub needs "
            'NumPy < 2 (install with `python3 -m pip install "numpy<2"`)'
        )


def build_backend_dir(dest: Path, install: TritonInstall | None = None) -> Path:
    """Create ``dest/python/`` with the backend library, utils and stub; return ``dest``.

    Files are symlinked when possible (cheap, always current) and copied otherwise.
    """
    install = install or find_triton()
    pydir = dest / "python"
    pydir.mkdir(parents=True, exist_ok=True)
    for src in (install.backend_lib, install.backend_utils, install.stub):
        target = pydir / src.name
        if target.is_symlink() or target.exists():
            if target.resolve() == src.resolve():
                continue
            target.unlink()
        try:
            target.symlink_to(src)
        except OSError:
            shutil.copy2(src, target)
    return dest


def server_env(install: TritonInstall | None = None, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for tritonserver: LD_LIBRARY_PATH set, PYTHONPATH dropped (the stub ignores it)."""
    install = install or find_triton()
    env = dict(os.environ if base is None else base)
    env["LD_LIBRARY_PATH"] = install.ld_library_path(env.get("LD_LIBRARY_PATH"))
    env.pop("PYTHONPATH", None)
    # One OpenMP/MKL pool per stub would oversubscribe small machines; models set torch threads themselves.
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


if __name__ == "__main__":  # `python -m launcher.triton_env` prints what was found
    found = find_triton()
    for field in found.__dataclass_fields__:
        print(f"{field:16} {getattr(found, field)}")
    print(f"{'LD_LIBRARY_PATH':16} {found.ld_library_path()}")
