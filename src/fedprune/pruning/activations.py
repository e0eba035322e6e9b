"""Calibration hidden states held batch by batch, in memory or spilled to a scratch file.

A layer-wise pruner keeps ``N x L x d`` hidden states per stream (the dense model's and the
pruned model's). At 128 samples of 512 tokens and ``d = 576`` that is 151 MiB per stream in
float32, more than the pruner's own working memory; for a 4096-wide model it is 1 GiB.
:class:`HiddenStream` stores the states as fixed-size batches either as tensors in memory or
in a temporary file read and written with ``pread``/``pwrite`` (the file lives in the page
cache, which the kernel may drop, and is not part of the process's resident memory). Only
one batch is resident at a time; the pruner reads a batch, runs the layer on it and writes
the result back in place.
"""
from __future__ import annotations

import ctypes
import gc
import os
import tempfile
from typing import Iterator

import torch

OFFLOAD_MODES = ("auto", "memory", "disk")
AUTO_SPILL_BYTES = 64 * 2**20
"""``offload="auto"`` spills a stream to disk when it would hold more than this."""


def release_free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``; no-op elsewhere).

    Large temporary tensors freed by PyTorch otherwise stay in the allocator's arenas and keep
    counting as resident memory, so a later phase's peak would include an earlier phase's.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class HiddenStream:
    """``n`` samples of ``[seq_len, d]`` hidden states stored in batches of ``batch_size`` samples.

    ``offload``: ``memory``, ``disk`` or ``auto`` (disk when the stream exceeds
    :data:`AUTO_SPILL_BYTES`). ``scratch_dir``: where spilled files go (default: the system's
    temporary directory). Batches are read as new tensors and written back by index. ``device``: where
    :meth:`read` returns batches (the device the layers run on; a batch read from disk is moved
    there); None: as stored (in memory: as written; from disk: the CPU).
    """

    def __init__(self, n: int, seq_len: int, d: int, batch_size: int, dtype: torch.dtype = torch.float32,
                 offload: str = "auto", scratch_dir: str | os.PathLike | None = None,
                 device: torch.device | str | None = None):
        if offload not in OFFLOAD_MODES:
            raise ValueError(f"offload must be one of {OFFLOAD_MODES}, got {offload!r}")
        if n < 1 or seq_len < 1 or d < 1 or batch_size < 1:
            raise ValueError(f"a hidden stream needs positive sizes, got n={n}, seq_len={seq_len}, d={d}, "
                             f"batch_size={batch_size}")
        self.n, self.seq_len, self.d, self.batch_size, self.dtype = n, seq_len, d, batch_size, dtype
        self.device = torch.device(device) if device is not None else None
        self._itemsize = torch.empty(0, dtype=dtype).element_size()
        total = n * seq_len * d * self._itemsize
        self.on_disk = offload == "disk" or (offload == "auto" and total > AUTO_SPILL_BYTES)
        self._mem: list[torch.Tensor | None] = [None] * self.num_batches
        self._fd: int | None = None
        if self.on_disk:
            fd, path = tempfile.mkstemp(prefix="fedprune-hidden-", suffix=".bin", dir=scratch_dir)
            os.unlink(path)  # the file disappears with the descriptor, even if the process dies
            self._fd = fd

    # ---- geometry --------------------------------------------------------------------------
    @property
    def num_batches(self) -> int:
        return (self.n + self.batch_size - 1) // self.batch_size

    def rows(self, i: int) -> int:
        """Samples in batch ``i`` (the last batch may be smaller)."""
        self._check(i)
        return min(self.batch_size, self.n - i * self.batch_size)

    def _check(self, i: int) -> None:
        if not 0 <= i < self.num_batches:
            raise IndexError(f"batch {i} out of range: the stream has {self.num_batches} batches")

    def _offset(self, i: int) -> int:
        return i * self.batch_size * self.seq_len * self.d * self._itemsize

    # ---- access ----------------------------------------------------------------------------
    def read(self, i: int, raw: bool = False) -> torch.Tensor:
        """Batch ``i`` as a ``[rows, seq_len, d]`` tensor (a copy when the stream is on disk; ``raw``:
        on the CPU then, not moved to ``device``)."""
        self._check(i)
        if not self.on_disk:
            t = self._mem[i]
            if t is None:
                raise RuntimeError(f"batch {i} of the hidden stream was never written")
            return t
        shape = (self.rows(i), self.seq_len, self.d)
        nbytes = shape[0] * self.seq_len * self.d * self._itemsize
        buf = bytearray(nbytes)
        got = os.preadv(self._fd, [buf], self._offset(i))
        if got != nbytes:
            raise RuntimeError(f"batch {i} of the hidden stream was never written (read {got} of {nbytes} bytes)")
        t = torch.frombuffer(buf, dtype=self.dtype).view(shape)
        return t.to(self.device) if self.device is not None and not raw else t

    def write(self, i: int, t: torch.Tensor) -> None:
        """Store ``t`` (``[rows(i), seq_len, d]``) as batch ``i``."""
        self._check(i)
        want = (self.rows(i), self.seq_len, self.d)
        if tuple(t.shape) != want:
            raise ValueError(f"batch {i} must have shape {want}, got {tuple(t.shape)}")
        t = t.detach().to(self.dtype)
        if not self.on_disk:
            self._mem[i] = t if t.is_contiguous() else t.contiguous()
            return
        data = memoryview(t.contiguous().cpu().view(torch.uint8).numpy())
        off, done = self._offset(i), 0
        while done < len(data):
            done += os.pwrite(self._fd, data[done:], off + done)

    def batches(self) -> Iterator[tuple[int, torch.Tensor]]:
        for i in range(self.num_batches):
            yield i, self.read(i)

    def clone(self) -> "HiddenStream":
        """An independent stream with the same content and storage kind."""
        out = HiddenStream(self.n, self.seq_len, self.d, self.batch_size, self.dtype,
                           "disk" if self.on_disk else "memory", None, self.device)
        for i in range(self.num_batches):
            t = self.read(i, raw=True)
            out.write(i, t.clone() if not self.on_disk else t)
        return out

    def to_tensor(self) -> torch.Tensor:
        """All samples as one ``[n, seq_len, d]`` tensor (for small streams and tests)."""
        return torch.cat([t for _, t in self.batches()])

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._mem = [None] * self.num_batches

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self) -> "HiddenStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
