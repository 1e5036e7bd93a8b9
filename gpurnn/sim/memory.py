"""Instrumented arrays: every load and store of a simulated kernel goes through a TrackedArray.

Each access is bounds-checked (a negative index is a fault: compiled Numba would wrap it, and
in these kernels that is always a bug) and checked for a race against what the element
remembers: its last writer (or the atomic writers since the last plain write) and its readers
since that write. Two accesses by different threads, at least one a write, race unless a
barrier orders them: within a block, a barrier between them (the block epochs differ); across
blocks, a grid barrier (the grid epochs differ). Keeping only the last writer is enough: a
later access ordered after it is ordered after everything before it. Readers ordered before a
new reader are not pruned (only a write clears them), so every racing reader is found.
Atomic/atomic pairs never race. Shared and local memory start poisoned (NaN for floats) and a
read of an element nothing wrote in this launch is reported. Global arrays (kernel arguments)
also count loads and stores per element: the traffic record.

Only the thread holding its launch's baton runs (gpurnn.sim.executor), so no lock is needed.
"""
from __future__ import annotations

import operator
import sys
import threading

import numpy as np

from .report import (ATOMIC, READ, WRITE, Finding, MemoryFault, describe_access, located)

# The simulated thread running on this Python thread (set by the executor).
current = threading.local()

GLOBAL, SHARED, LOCAL, CONST = "global", "shared", "local", "const"


class Abort(BaseException):
    """Unwinds a simulated thread when its launch has failed (never caught by kernel code)."""


def poison_value(dtype: np.dtype):
    """What never-written shared/local memory holds: NaN, or an integer nobody computes."""
    if dtype.kind in "fc":
        return np.nan
    if dtype.kind == "b":
        return True
    if dtype.kind == "i":
        return np.iinfo(dtype).min
    return np.iinfo(dtype).max


def _ordered(rec, thread) -> bool:
    """Does access `rec` happen before anything `thread` does now?"""
    other = rec[0]
    if other is thread:
        return True
    if other.block == thread.block:
        return rec[1] < thread.be
    return rec[2] < thread.ge


class TrackedArray:
    """A NumPy array as a simulated kernel sees it (global argument, shared, local or const)."""

    __slots__ = ("data", "flat", "shape", "ndim", "size", "dtype", "label", "space", "launch",
                 "writers", "readers", "reads", "writes", "check_uninit", "readonly")

    def __init__(self, data: np.ndarray, label: str, space: str, launch, *, count: bool = False,
                 check_uninit: bool = False, readonly: bool = False):
        self.data = data
        self.flat = data.reshape(-1) if data.flags.c_contiguous else None
        self.shape = tuple(int(n) for n in data.shape)
        self.ndim = data.ndim
        self.size = int(data.size)
        self.dtype = data.dtype
        self.label = label
        self.space = space
        self.launch = launch
        self.writers = [None] * self.size      # None | access tuple | list of atomic accesses
        self.readers = [None] * self.size      # None | {thread: access}
        self.reads = [0] * self.size if count else None
        self.writes = [0] * self.size if count else None
        self.check_uninit = check_uninit
        self.readonly = readonly

    def __len__(self):
        return self.shape[0]

    def __repr__(self):
        return f"<simulated {self.space} array {self.label} {self.shape} {self.dtype}>"

    # -- indexing ---------------------------------------------------------------------------
    def _fault(self, thread, frame, msg):
        raise MemoryFault(located(f"{self.label}: {msg}", thread, frame.f_code, frame.f_lineno))

    def _linear(self, idx, thread, frame) -> int:
        if type(idx) is tuple:
            if len(idx) != self.ndim:
                self._fault(thread, frame, f"indexed with {len(idx)} indices; it has "
                            f"{self.ndim} dimensions {self.shape}")
            lin = 0
            for axis, (i, n) in enumerate(zip(idx, self.shape)):
                try:
                    i = operator.index(i)
                except TypeError:
                    self._fault(thread, frame, f"index {i!r} on axis {axis} is not an integer "
                                f"(slices and views are not modelled)")
                if i < 0 or i >= n:
                    self._fault(thread, frame, f"index {tuple(idx)} is out of bounds on axis "
                                f"{axis} (size {n}; shape {self.shape})")
                lin = lin * n + i
            return lin
        if self.ndim != 1:
            self._fault(thread, frame, f"indexed with 1 index; it has {self.ndim} dimensions "
                        f"{self.shape} (row views are not modelled)")
        try:
            i = operator.index(idx)
        except TypeError:
            self._fault(thread, frame, f"index {idx!r} is not an integer (slices and views are not "
                        f"modelled)")
        if i < 0 or i >= self.shape[0]:
            self._fault(thread, frame, f"index {i} is out of bounds (size {self.shape[0]})")
        return i

    def _index(self, lin):
        return tuple(int(v) for v in np.unravel_index(lin, self.shape))

    def _race(self, lin, earlier, thread, kind, frame):
        later = (thread, thread.be, thread.ge, frame.f_code, frame.f_lineno, kind)
        key = ("race", self.label, earlier[3], earlier[4], earlier[5], frame.f_code,
               frame.f_lineno, kind)
        self.launch.add_finding(key, lambda: Finding("race", self.label, self._index(lin),
                                                     describe_access(earlier),
                                                     describe_access(later)))

    def _uninit(self, lin, thread, frame):
        rec = (thread, thread.be, thread.ge, frame.f_code, frame.f_lineno, READ)
        key = ("uninit", self.label, frame.f_code, frame.f_lineno)
        self.launch.add_finding(key, lambda: Finding("uninitialised-read", self.label,
                                                     self._index(lin), describe_access(rec), ""))

    def _check_writers(self, lin, thread, kind, frame):
        w = self.writers[lin]
        if w is None:
            if self.check_uninit and kind != WRITE:
                self._uninit(lin, thread, frame)
        elif type(w) is tuple:
            if not _ordered(w, thread):
                self._race(lin, w, thread, kind, frame)
        elif kind != ATOMIC:
            for rec in w:
                if not _ordered(rec, thread):
                    self._race(lin, rec, thread, kind, frame)
                    break

    def _check_readers(self, lin, thread, kind, frame):
        readers = self.readers[lin]
        if readers:
            for rec in readers.values():
                if not _ordered(rec, thread):
                    self._race(lin, rec, thread, kind, frame)
                    break
            self.readers[lin] = None

    # -- loads and stores -------------------------------------------------------------------
    def __getitem__(self, idx):
        thread = current.thread
        launch = self.launch
        if launch.abort:
            raise Abort
        frame = sys._getframe(1)
        lin = self._linear(idx, thread, frame)
        self._check_writers(lin, thread, READ, frame)
        rec = (thread, thread.be, thread.ge, frame.f_code, frame.f_lineno, READ)
        readers = self.readers[lin]
        if readers is None:
            self.readers[lin] = {thread: rec}
        else:
            readers[thread] = rec
        if self.reads is not None:
            self.reads[lin] += 1
        value = self.flat[lin] if self.flat is not None else self._load(lin)
        launch.tick(thread)
        return value

    def __setitem__(self, idx, value):
        thread = current.thread
        launch = self.launch
        if launch.abort:
            raise Abort
        frame = sys._getframe(1)
        lin = self._linear(idx, thread, frame)
        if self.readonly:
            self._fault(thread, frame, f"is read-only ({self.space} memory); a store was attempted")
        self._check_writers(lin, thread, WRITE, frame)
        self._check_readers(lin, thread, WRITE, frame)
        self.writers[lin] = (thread, thread.be, thread.ge, frame.f_code, frame.f_lineno, WRITE)
        if self.writes is not None:
            self.writes[lin] += 1
        self._store(lin, value)
        launch.tick(thread)

    def _store(self, lin, value):
        if self.flat is not None:
            self.flat[lin] = value
        else:
            self.data[np.unravel_index(lin, self.shape)] = value

    def _load(self, lin):
        return self.flat[lin] if self.flat is not None else self.data[np.unravel_index(lin, self.shape)]

    def atomic(self, idx, op, frame):
        """Read-modify-write `op(old) -> new` as one atomic access; returns the old value."""
        thread = current.thread
        launch = self.launch
        if launch.abort:
            raise Abort
        lin = self._linear(idx, thread, frame)
        if self.readonly:
            self._fault(thread, frame, f"is read-only ({self.space} memory); an atomic was attempted")
        self._check_writers(lin, thread, ATOMIC, frame)
        self._check_readers(lin, thread, ATOMIC, frame)
        rec = (thread, thread.be, thread.ge, frame.f_code, frame.f_lineno, ATOMIC)
        w = self.writers[lin]
        if type(w) is list:
            w[:] = [r for r in w if not _ordered(r, thread)]
            w.append(rec)
        else:
            self.writers[lin] = [rec]
        if self.reads is not None:
            self.reads[lin] += 1
            self.writes[lin] += 1
        old = self._load(lin)
        self._store(lin, op(old))
        launch.tick(thread)
        return old

    def traffic(self):
        from .report import Traffic
        return Traffic(reads=np.asarray(self.reads, np.int64).reshape(self.shape),
                       writes=np.asarray(self.writes, np.int64).reshape(self.shape))
