"""csnet's CPU kernels, compiled with the system C compiler on first use: the cross-stitch unit
(mix.c), the convnet column's conv blocks (bnpool.c): batch norm -> max-pool -> ReLU after a
conv, and the first block whole, its conv included; and dropout (dropout.c).

Why C: the unit is memory-bound. Written with tensor ops, every target task reads every
source task, forward and backward, so T tasks cost T^2 passes over the activations; at
8 tasks that made the stitched network 19% slower than its columns (issue 6: at most 15%).
The kernel reads each input once and writes each output once. bnpool.c says the same
of the three layers after each conv of the Fashion column.

Why not a torch C++ extension: torch's headers take a minute to compile and need ninja;
this file has no dependencies, compiles in under a second, and is called through ctypes
with the tensors' data pointers. It runs its loops on the OpenMP thread pool torch
already uses (libgomp.so.1, the library torch's Linux wheels load), so the two never
compete for the cores.

Used only where they apply: CPU float32 tensors; for the unit, each task's activation
contiguous in the same layout (NCHW, channels-last or (B, C) rows), at most ``MAX_TASKS``
tasks; for batch norm -> pool -> ReLU, channels-last maps; for the whole first block, a 3x3
conv without bias on channels-last images that need no gradient (``conv_block_usable``).
Everything else (CUDA, bfloat16 autocast, float64 gradchecks, no compiler) takes the PyTorch
path, which computes the same values (dropout: the same distribution, other masks).
``CSNET_NATIVE=0`` turns the kernels off; ``status()`` says which path is in use and why.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SOURCES = tuple(Path(__file__).with_name(name) for name in ("mix.c", "bnpool.c", "dropout.c"))
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
    lib.csnet_dropout.argtypes = [_P, _P, _L, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_float, ctypes.c_int]
    for f in ("csnet_mix_forward", "csnet_mix_backward", "csnet_bn_stats", "csnet_bn_pool_relu_forward",
              "csnet_bn_pool_relu_backward", "csnet_patch_moments", "csnet_conv_bn_pool_relu_forward",
              "csnet_conv_bn_pool_relu_backward", "csnet_dropout"):
        getattr(lib, f).restype = None
    return lib, f"compiled C kernel ({path})"


def status() -> str:
    """Which implementation the unit and the conv blocks use on the CPU, and why (for the benchmark's report)."""
    lib, why = _load()
    return f"native: {why}" if lib else f"PyTorch ops: {why}"


def _layout(x: torch.Tensor) -> tuple[torch.memory_format, tuple[int, int, int]] | None:
    """(memory format, (N, C, K)) when x is a dense array the kernel can walk, else None."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        b, c, h, w = x.shape
        return torch.channels_last, (b * h * w, c, 1)
    if x.dim() >= 2 and x.is_contiguous():
        return torch.contiguous_format, (x.shape[0], x.shape[1], math.prod(x.shape[2:]))
    return None


def usable(w: torch.Tensor, xs) -> bool:
    """Whether the kernel takes this call (see the module docstring), building it on first use."""
    x0 = xs[0]
    if _switched_off or _compiling() or len(xs) > MAX_TASKS or _layout(x0) is None:
        return False
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (w, *xs)):
        return False
    return all(x.shape == x0.shape for x in xs) and _load()[0] is not None


_switched_off = []  # non-empty inside ``off()``


@contextlib.contextmanager
def off():
    """Run the PyTorch path inside this block (the benchmark compares the two in one process)."""
    _switched_off.append(True)
    try:
        yield
    finally:
        _switched_off.pop()


def _compiling() -> bool:
    """Under torch.compile the tensor-op path runs: the compiler cannot trace into a ctypes call,
    and generates its own fused loops from the ops."""
    is_compiling = getattr(torch.compiler, "is_compiling", None)  # torch >= 2.3
    return bool(is_compiling and is_compiling())


def _ptrs(ts) -> ctypes.Array:
    return (_P * len(ts))(*[t.data_ptr() for t in ts])


def _weights(w: torch.Tensor, channels: int) -> torch.Tensor:
    """(T, T, C) contiguous weights: a per-layer (T, T) matrix repeated over the channels."""
    return (w.unsqueeze(-1).expand(*w.shape, channels) if w.dim() == 2 else w).contiguous()


def mix(w: torch.Tensor, xs) -> list[torch.Tensor]:
    """``[sum_j w[i, j] * xs[j] for each i]``; w is (T, T, C) or (T, T). Call only when ``usable``."""
    fmt, (n, c, k) = _layout(xs[0])
    xs = [x.contiguous(memory_format=fmt) for x in xs]
    outs = [torch.empty_like(xs[0], memory_format=fmt) for _ in xs]
    w3 = _weights(w, c)
    _load()[0].csnet_mix_forward(len(xs), _ptrs(xs), _ptrs(outs), w3.data_ptr(), n, c, k, torch.get_num_threads())
    return outs


def mix_backward(w: torch.Tensor, xs, grads, need_w: bool, need_x: bool):
    """(grad of w, grads of xs) of ``mix``; either is None when not needed."""
    fmt, (n, c, k) = _layout(xs[0])
    xs = [x.contiguous(memory_format=fmt) for x in xs]
    grads = [g.contiguous(memory_format=fmt) for g in grads]
    grad_xs = [torch.empty_like(xs[0], memory_format=fmt) for _ in xs] if need_x else None
    grad_w = torch.empty(len(xs), len(xs), c, dtype=torch.float64) if need_w else None
    wt = _weights(w, c).transpose(0, 1).contiguous()
    threads = torch.get_num_threads()
    # the threads' own weight-gradient sums (double, and float for the row blocks of K = 1)
    scratch = threads * len(xs) ** 2 * c if need_w else 0
    tots, parts = torch.zeros(scratch, dtype=torch.float64), torch.zeros(scratch if k == 1 else 0)
    _load()[0].csnet_mix_backward(len(xs), _ptrs(grads), _ptrs(xs), _ptrs(grad_xs) if need_x else None,
                                  _ptr(grad_w), wt.data_ptr(), n, c, k, tots.data_ptr(), parts.data_ptr(), threads)
    if grad_w is not None:
        grad_w = (grad_w.sum(-1) if w.dim() == 2 else grad_w).to(w.dtype)
    return grad_w, grad_xs


# ---------------------------------------------------------------- batch norm -> 2x2 max-pool -> ReLU

def pooled_maps_usable(y: torch.Tensor) -> bool:
    """Whether bnpool.c takes this conv output: CPU float32, (B, C, H, W) stored channels last."""
    return (not _switched_off and not _compiling() and y.device.type == "cpu" and y.dtype == torch.float32
            and y.dim() == 4 and min(y.shape[2:]) >= 2
            and y.is_contiguous(memory_format=torch.channels_last) and _load()[0] is not None)


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _floats(t: torch.Tensor) -> torch.Tensor:
    """A per-channel vector as the contiguous float32 array the kernel reads."""
    return t.detach().to(torch.float32).contiguous()


def channel_sums(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel sum and sum of squares (double) of a channels-last map."""
    c, threads = y.shape[1], torch.get_num_threads()
    s, sq = torch.empty(c, dtype=torch.float64), torch.empty(c, dtype=torch.float64)
    parts = torch.zeros(threads * 2 * c, dtype=torch.float64)
    _load()[0].csnet_bn_stats(y.data_ptr(), y.numel() // c, c, s.data_ptr(), sq.data_ptr(), parts.data_ptr(), threads)
    return s, sq


def bn_pool_relu(y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, keep: bool):
    """ReLU(2x2 max-pool(y * scale + shift)) per channel; with ``keep``, also what the backward pass
    needs (each output's winning input, 0..3 or 4 where the ReLU zeroed it, and its raw value)."""
    b, c, h, w = y.shape
    out = torch.empty(b, c, h // 2, w // 2, memory_format=torch.channels_last)
    winner = torch.empty(out.shape, dtype=torch.uint8, memory_format=torch.channels_last) if keep else None
    picked = torch.empty_like(out) if keep else None
    # Named, so that no tensor whose address the kernel reads is freed before the call.
    scale, shift = _floats(scale), _floats(shift)
    _load()[0].csnet_bn_pool_relu_forward(y.data_ptr(), out.data_ptr(), _ptr(winner), _ptr(picked),
                                          scale.data_ptr(), shift.data_ptr(), b, h, w, c, torch.get_num_threads())
    return out, winner, picked


def bn_pool_relu_backward(grad_out, winner, picked, y, mean, invstd, gamma, batch_stats: bool):
    """(grad of y, grad of gamma, grad of beta) of ``bn_pool_relu`` with batch norm's scale and shift
    written out (mean, invstd: the statistics used; batch_stats: whether they came from this batch)."""
    b, c, h, w = y.shape
    grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    dy = torch.empty_like(y, memory_format=torch.channels_last)
    dbeta, dgamma = torch.empty(c, dtype=torch.float64), torch.empty(c, dtype=torch.float64)
    mean, invstd, gamma = _floats(mean), _floats(invstd), _floats(gamma)
    threads = torch.get_num_threads()
    parts, coef = torch.zeros(threads * 2 * c, dtype=torch.float64), torch.empty(3 * c)
    _load()[0].csnet_bn_pool_relu_backward(
        grad_out.data_ptr(), winner.data_ptr(), picked.data_ptr(), y.data_ptr(), dy.data_ptr(),
        mean.data_ptr(), invstd.data_ptr(), gamma.data_ptr(), int(batch_stats), b, h, w, c,
        dbeta.data_ptr(), dgamma.data_ptr(), parts.data_ptr(), coef.data_ptr(), threads)
    return dy, dgamma.float(), dbeta.float()


# ---------------------------------------------------------------- the first conv block whole (bnpool.c)

MAX_IN_CHANNELS = 3  # the kernels keep four (9 x in-channels)-tap patches on the stack; RGB is the widest input
MAX_WIDTH = 1024  # the backward pass keeps a pooled row's patches on an OpenMP thread's stack (220 KB at 1024)
LANES = 16  # floats per vector in bnpool.c (V): its scratch rows are whole vectors


def _autocast_on() -> bool:
    """Whether CPU autocast is on: the layers would run in bfloat16, which the kernels do not."""
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4 takes no device type
        return torch.is_autocast_cpu_enabled()


def conv_block_usable(x: torch.Tensor, conv: torch.nn.Conv2d) -> bool:
    """Whether bnpool.c runs conv -> batch norm -> pool -> ReLU whole on this input: a 3x3 conv with
    stride 1, zero padding 1 and no bias, on a CPU float32 channels-last input of at most
    ``MAX_IN_CHANNELS`` channels that needs no gradient (a column's first block, fed the images)."""
    w = conv.weight
    return (type(conv) is torch.nn.Conv2d  # a subclass may change what its forward computes
            and not _switched_off and not _compiling() and not x.requires_grad and not _autocast_on()
            and x.device.type == w.device.type == "cpu" and x.dtype == w.dtype == torch.float32
            and x.dim() == 4 and 1 <= x.shape[1] == conv.in_channels <= MAX_IN_CHANNELS
            and 2 <= min(x.shape[2:]) and x.shape[3] <= MAX_WIDTH
            and x.is_contiguous(memory_format=torch.channels_last)
            and conv.bias is None and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and _load()[0] is not None)


def _pads(x: torch.Tensor, threads: int) -> torch.Tensor:
    """Each thread's zero-padded copy of one image (bnpool.c's pad_image)."""
    b, cin, h, w = x.shape
    return torch.empty(threads * cin * (h + 2) * (-(-w // LANES) * LANES + 2))


_shared: dict | None = None  # inside ``shared_moments``: {id(x): (x, S, G)}


@contextlib.contextmanager
def shared_moments():
    """Within this block (one forward pass of a stitched network, whose columns all read the same
    images) each input's patch moments are computed once. Only within it: outside, a buffer
    refilled without bumping its version (``.data``, numpy) would be taken for the last batch."""
    global _shared
    outer, _shared = _shared, {}
    try:
        yield
    finally:
        _shared = outer


def patch_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, G), double: the sum over all positions of the input's 3x3 patches (zero padded, taps in
    (dh, dw, in-channel) order) and of their outer products. A conv's output y = w.P has channel
    sums w.S and sums of squares w'Gw: batch-norm statistics without the output map."""
    if _shared is None:
        return _patch_moments(x)
    hit = _shared.get(id(x))
    if hit is None or hit[0] is not x:
        hit = _shared[id(x)] = (x, *_patch_moments(x))
    return hit[1], hit[2]


def _patch_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b, cin, h, w = x.shape
    taps, threads = 9 * cin, torch.get_num_threads()
    n = taps * taps + taps
    S, G = torch.empty(taps, dtype=torch.float64), torch.empty(taps, taps, dtype=torch.float64)
    pads, rows = _pads(x, threads), torch.empty(threads * n * LANES)
    parts = torch.zeros(threads * n, dtype=torch.float64)
    _load()[0].csnet_patch_moments(x.data_ptr(), b, h, w, cin, S.data_ptr(), G.data_ptr(), pads.data_ptr(),
                                   rows.data_ptr(), parts.data_ptr(), threads)
    return S, G


def conv_taps(weight: torch.Tensor) -> torch.Tensor:
    """(C, Cin, 3, 3) conv weights as the (taps, C) float32 array the kernels read."""
    return weight.detach().permute(2, 3, 1, 0).reshape(-1, weight.shape[0]).float().contiguous()


def conv_bn_pool_relu(x: torch.Tensor, taps: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, keep: bool):
    """ReLU(2x2 max-pool(conv(x) * scale + shift)) and, with ``keep``, each output's winner (as
    ``bn_pool_relu``); ``taps`` from ``conv_taps``."""
    b, cin, h, w = x.shape
    c, threads = taps.shape[1], torch.get_num_threads()
    out = torch.empty(b, c, h // 2, w // 2, memory_format=torch.channels_last)
    winner = torch.empty(out.shape, dtype=torch.uint8, memory_format=torch.channels_last) if keep else None
    scale, shift, pads = _floats(scale), _floats(shift), _pads(x, threads)
    _load()[0].csnet_conv_bn_pool_relu_forward(x.data_ptr(), taps.data_ptr(), scale.data_ptr(), shift.data_ptr(),
                                               out.data_ptr(), _ptr(winner), b, h, w, cin, c, pads.data_ptr(),
                                               threads)
    return out, winner


def conv_bn_pool_relu_sums(x: torch.Tensor, grad_out: torch.Tensor, winner: torch.Tensor):
    """(Q, A), double: per tap and channel, the sum of dz times the winning position's patch, and per
    channel the sum of dz, where dz is the gradient at batch norm's output (grad_out where the ReLU
    let the winner through, zero elsewhere)."""
    b, cin, h, w = x.shape
    c, threads = grad_out.shape[1], torch.get_num_threads()
    taps = 9 * cin
    grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    Q, A = torch.empty(taps, c, dtype=torch.float64), torch.empty(c, dtype=torch.float64)
    parts = torch.zeros(threads * (taps + 1) * c, dtype=torch.float64)
    pads = _pads(x, threads)
    _load()[0].csnet_conv_bn_pool_relu_backward(x.data_ptr(), grad_out.data_ptr(), winner.data_ptr(), b, h, w, cin,
                                                c, Q.data_ptr(), A.data_ptr(), parts.data_ptr(), pads.data_ptr(),
                                                threads)
    return Q, A


# ---------------------------------------------------------------- dropout (dropout.c)

def dropout_usable(x: torch.Tensor) -> bool:
    """Whether dropout.c takes this activation: CPU float32, contiguous."""
    return (not _switched_off and not _compiling() and x.device.type == "cpu" and x.dtype == torch.float32
            and x.is_contiguous() and _load()[0] is not None)


def dropout_seed() -> int:
    """A 64-bit seed from torch's default generator, so that torch.manual_seed fixes the masks."""
    return int(torch.randint(-(2 ** 63), 2 ** 63 - 1, (), dtype=torch.int64)) % 2 ** 64


def dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """x * mask / (1 - p), mask the one dropout.c derives from ``seed`` (the same for the gradient)."""
    out = torch.empty_like(x)
    _load()[0].csnet_dropout(x.data_ptr(), out.data_ptr(), x.numel(), seed, round(p * 2 ** 24), 1.0 / (1.0 - p),
                             torch.get_num_threads())
    return out
