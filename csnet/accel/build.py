"""Build and load csnet's C kernels: compiled with the system C compiler on first use, cached per
CPU, called through ctypes with the tensors' data pointers (``kernels.py`` wraps them as torch
custom ops).

Why C at first use rather than a torch C++ extension: torch's headers take a minute to compile
and need ninja and a matching toolchain; these files have no dependencies, compile in under a
second with ``cc -O3 -march=native -fopenmp``, and run their loops on the OpenMP thread pool
torch already uses (libgomp.so.1, the library torch's Linux wheels load), so the two never
compete for the cores. Anything that stops the build (no GCC, not Linux, ``CSNET_NATIVE=0``)
leaves csnet on its PyTorch layers, which compute the same numbers; ``status()`` says why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SOURCES = tuple(Path(__file__).with_name(name) for name in ("mix.c", "bnpool.c"))
# -march=native: the library is built on the machine that runs it, and cached per CPU (below).
# No -ffast-math: linked into a shared library it would switch the whole process to
# flush-denormals-to-zero.
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")
MAX_TASKS = 16  # the backward keeps T^2 vector accumulators on each thread's stack

_P = ctypes.c_void_p
_L = ctypes.c_long


def _cache_dir() -> Path:
    """$CSNET_CACHE, else $XDG_CACHE_HOME/csnet, else ~/.cache/csnet."""
    if os.environ.get("CSNET_CACHE"):
        return Path(os.environ["CSNET_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "csnet"


def _cpu_signature() -> str:
    """What the compiled code depends on: -march=native builds for this CPU's instruction set, and a
    cache folder on a shared home directory may be read by machines with other CPUs."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()} {flags}"


def _uses_libgomp() -> bool:
    """True when this process already runs GNU OpenMP (torch's Linux wheels do), so the kernel's
    ``-fopenmp`` resolves to the same runtime and thread pool instead of starting a second one."""
    try:
        return "libgomp" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("CSNET_NATIVE", "1") == "0":
        return None, "turned off by CSNET_NATIVE=0"
    if not sys.platform.startswith("linux"):
        return None, f"not built on {sys.platform} (Linux only)"
    torch.get_num_threads()  # makes sure torch's OpenMP runtime is loaded before we look for it
    if not _uses_libgomp():
        return None, "torch does not run GNU OpenMP (libgomp) in this process"
    compiler = shlex.split(os.environ.get("CC", "")) or [shutil.which("cc") or shutil.which("gcc") or ""]
    if not compiler[0]:
        return None, "no C compiler (cc) found"
    try:  # GCC's -fopenmp links libgomp, torch's runtime; clang's would bring a second one (libomp)
        banner = subprocess.run([*compiler, "--version"], capture_output=True, text=True).stdout
    except OSError as e:
        return None, f"cannot run {' '.join(compiler)}: {e}"
    if "Free Software Foundation" not in banner:
        return None, f"{' '.join(compiler)} is not GCC (its OpenMP runtime would not be torch's libgomp)"
    key = hashlib.sha256(b"\0".join([*(f.read_bytes() for f in SOURCES), " ".join(FLAGS).encode(),
                                     banner.encode(), _cpu_signature().encode()])).hexdigest()[:16]
    path = _cache_dir() / f"kernels-{key}.so"
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            # Compile to a private name, then rename: processes started together (torchrun) may
            # all compile, and none may load a half-written file.
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
                out = Path(tmp) / path.name
                done = subprocess.run([*compiler, *FLAGS, *map(str, SOURCES), "-o", str(out)],
                                      capture_output=True, text=True)
                if done.returncode:
                    first = (done.stderr.strip().splitlines() or ["no message"])[0]
                    return None, f"{' '.join(compiler)} failed: {first}"
                os.replace(out, path)
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        return None, f"could not build or load {path}: {e}"
    lib.csnet_mix_forward.argtypes = [ctypes.c_int, _P, _P, _P, _L, _L, _L, ctypes.c_int]
    lib.csnet_mix_backward.argtypes = [ctypes.c_int, _P, _P, _P, _P, _P, _L, _L, _L, _P, _P, ctypes.c_int]
    lib.csnet_bn_stats.argtypes = [_P, _L, _L, _P, _P, _P, ctypes.c_int]
    lib.csnet_bn_pool_relu_forward.argtypes = [_P, _P, _P, _P, _P, _P, _L, _L, _L, _L, ctypes.c_int]
    lib.csnet_bn_pool_relu_backward.argtypes = [_P, _P, _P, _P, _P, _P, _P, _P, ctypes.c_int, _L, _L, _L, _L,
                                                _P, _P, _P, _P, ctypes.c_int]
    lib.csnet_patch_moments.argtypes = [_P, _L, _L, _L, _L, _P, _P, _P, _P, _P, ctypes.c_int]
    lib.csnet_conv_bn_pool_relu_forward.argtypes = [_P, _P, _P, _P, _P, _P, _L, _L, _L, _L, _L, _P, ctypes.c_int]
    lib.csnet_conv_bn_pool_relu_backward.argtypes = [_P, _P, _P, _L, _L, _L, _L, _L, _P, _P, _P, _P, ctypes.c_int]
    for f in ("csnet_mix_forward", "csnet_mix_backward", "csnet_bn_stats", "csnet_bn_pool_relu_forward",
              "csnet_bn_pool_relu_backward", "csnet_patch_moments", "csnet_conv_bn_pool_relu_forward",
              "csnet_conv_bn_pool_relu_backward"):
        getattr(lib, f).restype = None
    return lib, f"compiled C kernel ({path})"


def status() -> str:
    """Which implementation the unit and the conv blocks use on the CPU, and why (for the benchmark's report)."""
    lib, why = _load()
    return f"native: {why}" if lib else f"PyTorch ops: {why}"


def lib() -> ctypes.CDLL | None:
    """The loaded kernels, or None (see ``status``)."""
    return _load()[0]
