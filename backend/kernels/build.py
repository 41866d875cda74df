"""Building the project's C++ kernels once per machine, safe against interrupted builds.

Why not ``torch.utils.cpp_extension.load`` as is: it guards its build folder with a lock
*file* (``FileBaton``) whose existence is the lock, and it takes it on every load, even when
the library is already built. A process killed while holding it (a Ctrl-C during a first
start, a stub killed by Triton) leaves the file behind, and every later start waits on it
forever without a word. Here:

- a finished library lives at ``<cache>/kernels/<name>-<key>.so``, where the key hashes the
  sources, flags, torch and Python versions: loading it takes no lock at all;
- a build takes an ``flock`` on ``<cache>/kernels/.<name>.lock``, which the kernel releases
  when the holder dies, so a killed builder can never block the next one; a process that has
  to wait says which pid it is waiting for;
- the build runs in a fresh temporary folder (torch's own lock file is private to it) and the
  library is moved into place with one ``rename``, so it appears complete or not at all; the
  temporary folders of killed builds are removed by the next builder.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)


def kernels_dir() -> Path:
    """``<multistream cache>/kernels`` (``$MULTISTREAM_CACHE`` moves it, as for the model)."""
    from backend.model_store import default_cache_dir

    return default_cache_dir() / "kernels"


def library_path(
    name: str,
    sources: Sequence[Path],
    cflags: Sequence[str],
    ldflags: Sequence[str],
    hashed_extra: Sequence[Path] = (),
) -> Path:
    """Where the built library of this exact source and flag set lives (built or not).

    ``hashed_extra``: files that are not compiled themselves but change the build (headers).
    """
    import torch

    h = hashlib.sha256()
    for src in [*sources, *hashed_extra]:
        h.update(Path(src).read_bytes())
    h.update(repr((list(cflags), list(ldflags), torch.__version__, sys.version_info[:2])).encode())
    return kernels_dir() / f"{name}-{h.hexdigest()[:16]}.so"


def is_built(
    name: str,
    sources: Sequence[Path],
    cflags: Sequence[str],
    ldflags: Sequence[str],
    hashed_extra: Sequence[Path] = (),
) -> bool:
    return library_path(name, sources, cflags, ldflags, hashed_extra).is_file()


def _import(name: str, path: Path) -> ModuleType:
    """Imports a pybind11 extension from ``path``; its init symbol is ``PyInit_<name>``."""
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, str(path), loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


@contextlib.contextmanager
def _build_lock(path: Path, say: Callable[[str], None]) -> Iterator[None]:
    """An exclusive flock; if another live process holds it, say so and wait for it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            say(f"waiting for process {holder}, which is building {path.name[1:-5]} ({path.parent})")
            t0 = time.monotonic()
            fcntl.flock(fd, fcntl.LOCK_EX)
            say(f"process {holder} finished building after {time.monotonic() - t0:.0f} s of waiting")
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock


def load(
    name: str,
    sources: Sequence[Path],
    cflags: Sequence[str] = (),
    ldflags: Sequence[str] = (),
    say: Callable[[str], None] | None = None,
    hashed_extra: Sequence[Path] = (),
) -> ModuleType:
    """The extension module, built now if this machine has not built this source yet.

    Raises whatever the compiler step raises (callers fall back where they can).
    """
    say = say or log.warning
    final = library_path(name, sources, cflags, ldflags, hashed_extra)
    if final.is_file():
        return _import(name, final)
    with _build_lock(final.parent / f".{name}.lock", say):
        if final.is_file():  # built by the process we waited for
            return _import(name, final)
        for stale in final.parent.glob(f".build-{name}-*"):  # left by killed builds
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".build-{name}-", dir=final.parent))
        try:
            from torch.utils.cpp_extension import load as torch_load

            t0 = time.monotonic()
            module = torch_load(
                name=name,
                sources=[str(s) for s in sources],
                extra_cflags=list(cflags),
                extra_ldflags=list(ldflags),
                build_directory=str(tmp),
                verbose=False,
            )
            os.replace(tmp / f"{name}.so", final)  # atomic within one file system
            log.info("built %s in %.0f s", final, time.monotonic() - t0)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return module  # already imported by torch's loader (a moved file stays mapped)
