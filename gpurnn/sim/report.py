"""What the strict simulator reports: accesses, findings, per-launch reports and the errors.

An access is remembered as a tuple (thread, block_epoch, grid_epoch, code, line, kind) — cheap to
make on every load and store; it becomes words only when a finding names it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

READ, WRITE, ATOMIC = "read", "write", "atomic"


def where(code, line) -> str:
    """file:line (function) of a source position."""
    return f"{os.path.basename(code.co_filename)}:{line} ({code.co_name})"


def who(thread) -> str:
    return f"block {thread.block_label} thread {thread.thread_label}"


def describe_access(rec) -> str:
    thread, block_epoch, grid_epoch, code, line, kind = rec
    return (f"{kind} by {who(thread)} at {where(code, line)} "
            f"[block epoch {block_epoch}, grid epoch {grid_epoch}]")


@dataclass
class Finding:
    """One kind of fault at one place (repeats are counted, not listed)."""
    kind: str              # "race" | "uninitialised-read"
    array: str             # e.g. "w_hh (global)", "shared (dynamic) of block 1"
    index: tuple
    first: str             # the earlier access, in words
    second: str            # the later access, in words ("" for an uninitialised read)
    count: int = 1

    def __str__(self):
        times = f" ({self.count} times)" if self.count > 1 else ""
        if self.kind == "race":
            return (f"race on {self.array}{list(self.index)}{times}: {self.first}, and {self.second}; "
                    f"no barrier orders them")
        return (f"uninitialised read of {self.array}{list(self.index)}{times}: {self.first} reads "
                f"memory no thread wrote in this launch")


@dataclass
class Traffic:
    """Per-element load and store counts of one kernel argument in one launch."""
    reads: np.ndarray
    writes: np.ndarray

    @property
    def total_reads(self) -> int:
        return int(self.reads.sum())

    @property
    def total_writes(self) -> int:
        return int(self.writes.sum())


@dataclass
class LaunchReport:
    """What one strict-simulator launch did and found."""
    kernel: str
    grid: tuple
    block: tuple
    shared_bytes: int
    findings: list = field(default_factory=list)
    traffic: dict = field(default_factory=dict)     # argument name -> Traffic
    block_barriers: int = 0                          # completed syncthreads, over all blocks
    grid_barriers: int = 0                           # completed grid barriers
    accesses: int = 0                                # instrumented loads and stores
    seconds: float = 0.0

    def __str__(self):
        head = (f"{self.kernel}[grid={self.grid}, block={self.block}, shared={self.shared_bytes} B]: "
                f"{len(self.findings)} finding(s), {self.grid_barriers} grid and "
                f"{self.block_barriers} block barriers, {self.accesses:,} accesses, "
                f"{self.seconds:.2f} s")
        return "\n".join([head] + [f"  - {f}" for f in self.findings])


class SimulatorError(RuntimeError):
    """A launch the strict simulator stopped: the message names kernel, block, thread and line."""


class BarrierError(SimulatorError):
    """Divergent barriers, a barrier some threads never reach, a grid barrier after an exit."""


class MemoryFault(SimulatorError):
    """An index out of bounds (negative ones included), a bad index, a write to constant memory."""


class KernelError(SimulatorError):
    """A Python exception raised by the kernel's own code."""


class NotModelled(SimulatorError):
    """The kernel used something the strict simulator does not model (see gpurnn.sim)."""


class SimulatorFindings(SimulatorError):
    """The launch ran to its end but raced or read uninitialised memory; `.report` has it all."""

    def __init__(self, report: LaunchReport):
        super().__init__(str(report))
        self.report = report


class WatchdogTimeout(SimulatorError):
    """No thread finished or reached a barrier within the watchdog's time."""


def located(message: str, thread, code=None, line: Optional[int] = None) -> str:
    at = f" at {where(code, line)}" if code is not None else ""
    return f"{thread.launch.kernel_name}: {who(thread)}{at}: {message}"
