"""What a run needs to continue exactly where it stopped: RNG states, and a clean stop on a signal.

A run interrupted after any batch and resumed reproduces the uninterrupted run's
metrics on the CPU because everything random is captured: torch's global RNG
(dropout, init), the batch-order generator at the start of the epoch, CUDA's
RNGs, and Python's and NumPy's for user code that draws from them.
"""

from __future__ import annotations

import random
import signal
import sys
import threading

import numpy as np
import torch


def capture_rng(shuffle: torch.Generator, shuffle_state: torch.Tensor | None = None) -> dict:
    """Every RNG state, as tensors and plain containers (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "shuffle": shuffle.get_state() if shuffle_state is None else shuffle_state,
    }


def restore_rng(state: dict, shuffle: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    shuffle.set_state(state["shuffle"])


class StopRequest:
    """While active, the first SIGINT or SIGTERM only sets ``requested`` (the loop then saves and stops);
    a second one stops at once, leaving the files already written untouched."""

    def __init__(self, on_second: str = "", second_stops: bool = True, announce: bool = True):
        self.requested: str | None = None
        self._on_second = on_second
        self._announce = announce
        # Under torchrun a Ctrl-C reaches each worker twice (from the terminal, then forwarded by
        # the launcher), so there a second signal cannot mean "now"; torchrun itself kills workers
        # that have not stopped 30 s after it forwarded the signal.
        self._second_stops = second_stops
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested is None or not self._second_stops:
            if self.requested is None and self._announce:
                again = " (press Ctrl-C again to stop at once)" if self._second_stops else ""
                print(f"\n{signal.Signals(signum).name}: finishing this batch, then saving a checkpoint{again}",
                      file=sys.stderr)
            self.requested = self.requested or signal.Signals(signum).name
            return
        print(f"{signal.Signals(signum).name} again: stopping at once. {self._on_second}", file=sys.stderr)
        raise KeyboardInterrupt

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
