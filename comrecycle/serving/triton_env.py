"""Where the embedded Triton server (nvidia-pytriton's wheel), its libraries and tools are, and the
backend directory and environment it runs with: the Python backend's files for the running
interpreter next to ComRecycle's Python-based backends (comrecycle.serving.backends), ``PATH``
starting with this interpreter's ``bin/`` (the stub finds its Python by ``python3`` on ``PATH``)
and ``LD_LIBRARY_PATH`` with the server's libraries and the interpreter's ``LIBDIR``.
"""
from __future__ import annotations

import errno
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

from .backends import SOURCE_DIR, backend_sources, install_backends
from ..errors import ServingFailure

LOG = logging.getLogger(__name__)

LOCALHOST = "127.0.0.1"
MODEL_CONTROL_MODES = ("none", "explicit")
DEFAULT_STOP_TIMEOUT_S = 30.0
# Triton's own grace period on shutdown (--exit-timeout-secs; Triton's default is 30). Triton
# also waits this long for idle keep-alive HTTP connections of clients that are still open, so a
# long grace makes every stop() slow; kept well below the stop timeout so a normal shutdown
# finishes before we resort to SIGKILL.
DEFAULT_EXIT_TIMEOUT_S = 5
LOG_TAIL_LINES = 60
NOT_READY_GRACE_S = 3.0  # live but not ready this long after start-up: a model failed to load
_PORT_RACE_ATTEMPTS = 3

class TritonStartError(ServingFailure):
    """The Triton server could not be started or did not become ready.

    The message names what was expected, what happened, the command line and the tail of
    Triton's log. ``log_path`` and ``command`` are also available as attributes.
    """

    def __init__(self, message: str, *, log_path: Optional[Path] = None,
                 command: Optional[Sequence[str]] = None):
        super().__init__(message)
        self.log_path = log_path
        self.command = list(command) if command is not None else None


class PortInUseError(TritonStartError):
    """A port requested for Triton is already bound by another process (checked before spawning)."""

    def __init__(self, port: int, role: str, address: str = LOCALHOST):
        super().__init__(
            f"{role} port {port} on {address} is already in use: expected a free port for "
            f"tritonserver's {role} endpoint. Pass another port, or None to pick a free one."
        )
        self.port = port
        self.role = role



# --------------------------------------------------------------------------------------------
# Locating the embedded server, its libraries and the tools
# --------------------------------------------------------------------------------------------

def _pytriton_dir() -> Path:
    try:
        import pytriton  # noqa: PLC0415 (imported lazily: only needed to locate files)
    except ImportError as exc:  # pragma: no cover - the package is a hard dependency
        raise TritonStartError(
            "the embedded Triton server comes from the PyPI package nvidia-pytriton, "
            f"which is not importable in {sys.executable}: {exc}"
        ) from exc
    return Path(pytriton.__file__).resolve().parent


def _site_packages() -> Path:
    return _pytriton_dir().parent


def _pytriton_version() -> str:
    try:
        return importlib.metadata.version("nvidia-pytriton")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        return "unknown"


def tritonserver_path() -> Path:
    """Path of the ``tritonserver`` binary shipped in ``nvidia-pytriton``."""
    path = _pytriton_dir() / "tritonserver" / "bin" / "tritonserver"
    if not path.is_file():
        raise TritonStartError(f"expected the tritonserver binary at {path}; it is missing "
                               "(is nvidia-pytriton installed completely?)")
    return path


def _server_libs_dir() -> Path:
    return _site_packages() / "nvidia_pytriton.libs"


def _python_libdir() -> Optional[str]:
    libdir = sysconfig.get_config_var("LIBDIR")
    return str(libdir) if libdir else None


def _python_bin_dir() -> Path:
    # Not resolved on purpose: a venv's bin/python is a symlink to the base interpreter, and
    # the stub must find the venv's python3 (which makes it use the venv's site-packages).
    return Path(sys.executable).parent


def _cuda_runtime_lib_dir() -> Optional[Path]:
    """``site-packages/nvidia/cuda_runtime/lib`` (PyPI nvidia-cuda-runtime-cu12), if installed."""
    try:
        spec = importlib.util.find_spec("nvidia.cuda_runtime")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        lib = Path(location) / "lib"
        if lib.is_dir():
            return lib
    return None


def _cache_root() -> Path:
    if os.environ.get("COMRECYCLE_CACHE_DIR"):
        return Path(os.environ["COMRECYCLE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "comrecycle"


def backend_directory(cache_root: Optional[Path] = None) -> Path:
    """Return (building it if needed) a Triton backend directory for the running interpreter.

    Layout: ``<dir>/python/{libtriton_python.so, triton_python_backend_utils.py,
    triton_python_backend_stub}``, copied from the nvidia-pytriton wheel (Triton refuses a
    Python-based backend whose libtriton_python.so resolves outside the backend directory, so
    these are copies, not links), and ``<dir>/<backend>/model.py`` for each of ComRecycle's
    Python-based backends (comrecycle.serving.backends), linked to the package's files so a
    server runs the code of this checkout. The folder name carries the nvidia-pytriton version,
    the Python version and a hash of the wheel's and the package's locations, so two
    environments or two checkouts never share one. The build is atomic (temporary folder +
    rename), hence safe when several processes start at once.
    """
    pytriton_dir = _pytriton_dir()
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    src_backend = pytriton_dir / "tritonserver" / "backends" / "python"
    stubs_dir = pytriton_dir / "tritonserver" / "python_backend_stubs"
    stub = stubs_dir / py / "triton_python_backend_stub"
    if not stub.is_file():
        available = sorted(p.name for p in stubs_dir.iterdir()) if stubs_dir.is_dir() else []
        raise TritonStartError(
            f"expected a Python-backend stub for Python {py} at {stub}; nvidia-pytriton "
            f"{_pytriton_version()} ships stubs for: {', '.join(available) or 'none'}"
        )
    wanted = {
        "libtriton_python.so": src_backend / "libtriton_python.so",
        "triton_python_backend_utils.py": src_backend / "triton_python_backend_utils.py",
        "triton_python_backend_stub": stub,
    }
    for name, target in wanted.items():
        if not target.is_file():
            raise TritonStartError(f"expected {name} of the Python backend at {target}; it is missing")
    models = backend_sources()

    key = hashlib.sha256(f"{pytriton_dir}\n{SOURCE_DIR}".encode()).hexdigest()[:10]
    root = Path(cache_root) if cache_root is not None else _cache_root()
    dest = root / f"triton-backends-{_pytriton_version()}-py{py.replace('.', '')}-{key}"
    if _backend_dir_valid(dest, wanted, models):
        return dest

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-backends-", dir=root))
    try:
        (tmp / "python").mkdir()
        for name, target in wanted.items():
            shutil.copy2(target, tmp / "python" / name)
        install_backends(tmp)
        tmp.chmod(0o755)
        if dest.exists() or dest.is_symlink():
            LOG.info("rebuilding stale Triton backend directory %s", dest)
            shutil.rmtree(dest, ignore_errors=True)
        try:
            os.rename(tmp, dest)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not _backend_dir_valid(dest, wanted, models):
                raise
            # another process built it concurrently: use theirs
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    LOG.debug("Triton backend directory ready: %s", dest)
    return dest


def _backend_dir_valid(dest: Path, wanted: Mapping[str, Path], models: Mapping[str, Path]) -> bool:
    """The Python backend's files are same-size copies; each model.py links to (or equals) ours."""
    try:
        for name, target in wanted.items():
            entry = dest / "python" / name
            if entry.is_symlink() or not entry.is_file() or entry.stat().st_size != target.stat().st_size:
                return False
        for name, src in models.items():
            entry = dest / name / "model.py"
            if entry.is_symlink():
                if entry.resolve() != src.resolve():
                    return False
            elif not entry.is_file() or entry.read_bytes() != src.read_bytes():
                return False
    except OSError:
        return False
    return True


def _prepend_paths(paths: Iterable[Optional[os.PathLike | str]], existing: Optional[str]) -> str:
    out: List[str] = []
    for p in list(paths) + (existing.split(os.pathsep) if existing else []):
        if p is None:
            continue
        s = os.fspath(p)
        if s and s not in out:
            out.append(s)
    return os.pathsep.join(out)


def server_env(base: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """Environment for ``tritonserver``: a copy of ``base`` (default ``os.environ``) with

    * ``PATH`` starting with this interpreter's ``bin/`` (the stub's Python lookup), and
    * ``LD_LIBRARY_PATH`` starting with ``nvidia_pytriton.libs`` and the interpreter's LIBDIR.
    """
    env = dict(os.environ if base is None else base)
    env["PATH"] = _prepend_paths([_python_bin_dir()], env.get("PATH", os.defpath))
    env["LD_LIBRARY_PATH"] = _prepend_paths([_server_libs_dir(), _python_libdir()],
                                            env.get("LD_LIBRARY_PATH"))
    return env


def tool_env(base: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """Environment for Triton's client tools (``perf_analyzer``): a copy of ``base`` (default
    ``os.environ``) with this interpreter's ``bin/`` first on ``PATH`` and the CUDA runtime of
    ``nvidia-cuda-runtime-cu12`` (``libcudart.so.12``, which perf_analyzer links even on CPU)
    first on ``LD_LIBRARY_PATH``. ``libb64.so.0d`` comes from the system (Debian ``libb64-0d``).
    """
    env = dict(os.environ if base is None else base)
    env["PATH"] = _prepend_paths([_python_bin_dir()], env.get("PATH", os.defpath))
    cudart = _cuda_runtime_lib_dir()
    if cudart is None:
        LOG.warning("nvidia-cuda-runtime-cu12 not found: perf_analyzer needs libcudart.so.12")
    env["LD_LIBRARY_PATH"] = _prepend_paths([cudart], env.get("LD_LIBRARY_PATH"))
    return env


def perf_analyzer_path() -> Path:
    """Path of the ``perf_analyzer`` binary installed by the ``tritonclient==2.51.0`` wheel."""
    candidates = [_python_bin_dir() / "perf_analyzer"]
    scripts = sysconfig.get_path("scripts")
    if scripts:
        candidates.append(Path(scripts) / "perf_analyzer")
    for cand in candidates:
        if cand.is_file() and os.access(cand, os.X_OK):
            return cand
    found = shutil.which("perf_analyzer")
    if found:
        return Path(found)
    raise FileNotFoundError(
        "perf_analyzer not found: expected it in "
        f"{', '.join(str(c) for c in candidates)} (it ships in the tritonclient==2.51.0 wheel)"
    )
