"""Running a launch: every thread of every block as a Python thread, real barriers, one baton.

Scheduling. All simulated threads exist at once, but exactly one runs at a time: it holds the
launch's baton until it reaches a barrier, exits, or has made PREEMPT_EVERY memory accesses,
then hands the baton to the next runnable thread (a FIFO). The schedule is a function of the
launch alone, so a run is reproducible, and no lock guards the race bookkeeping. Race
detection does not depend on the schedule: accesses carry barrier epochs (gpurnn.sim.memory).

Barriers. `syncthreads` completes when every thread of the block waits at the same call site
(the chain of source lines from the kernel down to the call); the grid barrier when every
thread of the grid waits at one. Errors, each naming kernel, block, thread and line: threads of
a block waiting at different barriers; a block barrier in a block where a thread exited, or a
thread exiting while its block-mates wait; a grid barrier after any thread of the grid exited
(a GPU would hang); no runnable thread left (deadlock); and, as a backstop, no progress within
the watchdog's time.
"""
from __future__ import annotations

import collections
import sys
import threading
import time
import traceback

import numpy as np

from . import memory
from .fakecuda import Dim3, Translator, dim3
from .memory import GLOBAL, SHARED, Abort, TrackedArray, poison_value
from .report import (BarrierError, KernelError, LaunchReport, SimulatorError,
                     SimulatorFindings, WatchdogTimeout, located, where, who)

PREEMPT_EVERY = 20000        # accesses before the baton moves on (lets spin-waits progress)
MAX_THREADS = 4096           # Python threads one launch may start
MAX_FINDINGS = 50            # distinct findings kept per launch
WATCHDOG_SECONDS = 600.0


class SimThread:
    """One simulated CUDA thread."""

    __slots__ = ("launch", "block", "tid", "block_idx", "thread_idx", "block_label",
                 "thread_label", "be", "ge", "sem", "ticks", "exited", "value", "result",
                 "pythread")

    def __init__(self, launch, block, tid, block_idx, thread_idx):
        self.launch = launch
        self.block = block              # linear block index
        self.tid = tid                  # linear thread index in the block
        self.block_idx = block_idx
        self.thread_idx = thread_idx
        self.block_label = _label(block_idx, launch.grid_dim)
        self.thread_label = _label(thread_idx, launch.block_dim)
        self.be = 0                     # barriers this thread's block has passed
        self.ge = 0                     # grid barriers passed
        self.sem = threading.Semaphore(0)
        self.ticks = 0
        self.exited = False
        self.value = None               # syncthreads_count/and/or contribution
        self.result = None


def _label(idx, dims):
    if dims.y == 1 and dims.z == 1:
        return str(idx.x)
    return f"({idx.x}, {idx.y}, {idx.z})"


class _Block:
    __slots__ = ("threads", "waiting", "kind", "site", "exited", "dynamic", "static")

    def __init__(self):
        self.threads = []
        self.waiting = []
        self.kind = None                # "block" | "grid" while threads wait
        self.site = None
        self.exited = []
        self.dynamic = None
        self.static = {}


class Launch:
    def __init__(self, fn, grid, block, shared_bytes, name, watchdog):
        self.kernel_name = name
        self.grid_dim = dim3(grid, "grid")
        self.block_dim = dim3(block, "block")
        if isinstance(shared_bytes, bool) or not isinstance(shared_bytes, (int, np.integer)) \
                or shared_bytes < 0:
            raise ValueError(f"shared_bytes must be an int >= 0; got {shared_bytes!r}")
        self.shared_bytes = int(shared_bytes)
        g, b = self.grid_dim, self.block_dim
        self.nblocks = g.x * g.y * g.z
        self.per_block = b.x * b.y * b.z
        if self.nblocks * self.per_block > MAX_THREADS:
            raise ValueError(f"grid {tuple(g)} x block {tuple(b)} is "
                             f"{self.nblocks * self.per_block} threads; the strict simulator "
                             f"runs at most {MAX_THREADS} (one Python thread each)")
        self.watchdog = watchdog
        self.abort = False
        self.error = None
        self.findings = {}
        self.runnable = collections.deque()
        self.done = threading.Event()
        self.live = 0
        self.exited = []
        self.grid_waiting = 0
        self.block_barriers = 0
        self.grid_barriers = 0
        self.accesses = 0
        self.blocks = [_Block() for _ in range(self.nblocks)]
        self.threads = []
        for bl, bidx in enumerate(np.ndindex(g.z, g.y, g.x)):
            bz, by, bx = bidx
            for tl, tidx in enumerate(np.ndindex(b.z, b.y, b.x)):
                tz, ty, tx = tidx
                th = SimThread(self, bl, tl, Dim3(bx, by, bz), Dim3(tx, ty, tz))
                self.blocks[bl].threads.append(th)
                self.threads.append(th)
        self.live = len(self.threads)
        self.translator = Translator(self)
        self.fn = self.translator.function(fn)

    # -- findings and failure --------------------------------------------------------------
    def add_finding(self, key, make):
        f = self.findings.get(key)
        if f is not None:
            f.count += 1
        elif len(self.findings) < MAX_FINDINGS:
            self.findings[key] = make()

    def fail(self, err):
        if self.error is None:
            self.error = err
        self.abort = True
        for th in self.threads:
            th.sem.release()
        self.done.set()

    def _check(self):
        if self.abort:
            raise Abort

    # -- the baton ---------------------------------------------------------------------------
    def _pass_baton(self):
        """The running thread gives up the baton (it is waiting or has exited)."""
        if self.runnable:
            self.runnable.popleft().sem.release()
        elif self.live == 0:
            self.done.set()
        else:
            waits = "; ".join(f"block {i} waits at {b.kind} barrier {self._site_text(b.site)}"
                              for i, b in enumerate(self.blocks) if b.waiting)
            self.fail(BarrierError(f"{self.kernel_name}: deadlock: no thread can run ({waits})"))

    def _wait_turn(self, th):
        th.sem.acquire()
        if self.abort:
            raise Abort

    def tick(self, th):
        th.ticks += 1
        if th.ticks >= PREEMPT_EVERY:
            th.ticks = 0
            self.accesses += PREEMPT_EVERY
            if self.runnable:
                self.runnable.append(th)
                self._pass_baton()
                self._wait_turn(th)

    # -- barriers ----------------------------------------------------------------------------
    def _site(self, frame):
        """The barrier's identity: (code, line) of every simulated frame above it."""
        chain = []
        while frame is not None and frame.f_code is not _THREAD_MAIN_CODE:
            if frame.f_code in self.translator.codes:
                chain.append((frame.f_code, frame.f_lineno))
            frame = frame.f_back
        return tuple(reversed(chain))

    @staticmethod
    def _site_text(site):
        return " <- ".join(where(c, ln) for c, ln in reversed(site)) if site else "?"

    def _arrive(self, th, kind, frame):
        self._check()
        site = self._site(frame)
        blk = self.blocks[th.block]
        code, line = site[-1] if site else (None, None)
        if kind == "block" and blk.exited:
            gone = ", ".join(t.thread_label for t in blk.exited[:8])
            raise BarrierError(located(f"reached the syncthreads at {self._site_text(site)}, which "
                                       f"can never complete: thread(s) {gone} of this block "
                                       f"already exited",
                                       th, code, line))
        if kind == "grid" and self.exited:
            first = self.exited[0]
            raise BarrierError(located(f"reached the grid barrier at {self._site_text(site)} after "
                                       f"{who(first)} exited ({len(self.exited)} thread(s) gone): "
                                       f"a GPU would hang here", th, code, line))
        if blk.waiting:
            if blk.kind != kind or blk.site != site:
                other = blk.waiting[0]
                raise BarrierError(located(
                    f"divergent barriers: this thread reached the {kind} barrier at "
                    f"{self._site_text(site)} while thread {other.thread_label} of the same block "
                    f"waits at the {blk.kind} barrier at {self._site_text(blk.site)}",
                    th, code, line))
        else:
            blk.kind, blk.site = kind, site
        blk.waiting.append(th)
        return blk

    def syncthreads(self, th, value=None, reduce=None):
        blk = self._arrive(th, "block", sys._getframe())
        th.value = value
        if len(blk.waiting) == self.per_block:
            waiting = blk.waiting
            blk.waiting, blk.kind, blk.site = [], None, None
            result = None
            if reduce == "count":
                result = sum(1 for t in waiting if t.value)
            elif reduce == "and":
                result = int(all(t.value for t in waiting))
            elif reduce == "or":
                result = int(any(t.value for t in waiting))
            for t in waiting:
                t.be += 1
                t.result = result
                if t is not th:
                    self.runnable.append(t)
            self.block_barriers += 1
        else:
            self._pass_baton()
            self._wait_turn(th)
        return th.result

    def grid_sync(self, th):
        self._arrive(th, "grid", sys._getframe())
        self.grid_waiting += 1
        if self.grid_waiting == len(self.threads):
            self.grid_waiting = 0
            for blk in self.blocks:
                blk.waiting, blk.kind, blk.site = [], None, None
            for t in self.threads:
                t.be += 1
                t.ge += 1
                if t is not th:
                    self.runnable.append(t)
            self.grid_barriers += 1
        else:
            self._pass_baton()
            self._wait_turn(th)

    def _exit(self, th):
        blk = self.blocks[th.block]
        if blk.waiting and blk.kind == "block":
            other = blk.waiting[0]
            raise BarrierError(located(
                f"thread exited while {len(blk.waiting)} thread(s) of its block (thread "
                f"{other.thread_label}, ...) wait at the syncthreads at "
                f"{self._site_text(blk.site)}, which can never complete", th))
        if self.grid_waiting:
            site = next(b.site for b in self.blocks if b.kind == "grid")
            raise BarrierError(located(f"thread exited while {self.grid_waiting} thread(s) wait at "
                                       f"the grid barrier at {self._site_text(site)}: a GPU would "
                                       f"hang here", th))
        th.exited = True
        blk.exited.append(th)
        self.exited.append(th)
        self.live -= 1

    # -- memory --------------------------------------------------------------------------------
    def shared_array(self, th, shape, dtype, frame):
        blk = self.blocks[th.block]
        dynamic = shape == 0 or shape == (0,)
        if dynamic:
            # one buffer per block, all bytes 0xFF (NaN in every float width); each dtype's
            # view of it is tracked on its own
            if blk.dynamic is None:
                blk.dynamic = {"bytes": np.full(self.shared_bytes, 0xFF, np.uint8)}
            arr = blk.dynamic.get(dtype)
            if arr is None:
                n = self.shared_bytes // dtype.itemsize
                label = f"shared (dynamic) of block {th.block_label}"
                if len(blk.dynamic) > 1:
                    label = f"shared (dynamic, as {dtype}) of block {th.block_label}"
                arr = TrackedArray(blk.dynamic["bytes"][: n * dtype.itemsize].view(dtype), label,
                                   SHARED, self, check_uninit=True)
                blk.dynamic[dtype] = arr
            return arr
        shape = shape if isinstance(shape, tuple) else (shape,)
        key = (frame.f_code, frame.f_lineno, shape, dtype)
        arr = blk.static.get(key)
        if arr is None:
            arr = TrackedArray(np.full(shape, poison_value(dtype), dtype),
                               f"shared {where(frame.f_code, frame.f_lineno)} of block "
                               f"{th.block_label}", SHARED, self, check_uninit=True)
            blk.static[key] = arr
        return arr

    # -- running -------------------------------------------------------------------------------
    def thread_main(self, th, args):
        memory.current.thread = th
        try:
            self._wait_turn(th)
            self.fn(*args)
            self._exit(th)
        except Abort:
            return
        except SimulatorError as err:
            self.fail(err)
            return
        except BaseException as err:      # the kernel's own exception, located and re-raised
            self.fail(self._kernel_error(th, err))
            return
        self._pass_baton()

    def _kernel_error(self, th, err):
        tb = err.__traceback__
        code = line = None
        while tb is not None:
            if tb.tb_frame.f_code in self.translator.codes:
                code, line = tb.tb_frame.f_code, tb.tb_lineno
            tb = tb.tb_next
        e = KernelError(located(f"{type(err).__name__}: {err}", th, code, line))
        e.__cause__ = err
        return e

    def run(self, args):
        started = time.perf_counter()
        pythreads = [threading.Thread(target=self.thread_main, args=(th, args), daemon=True,
                                      name=f"gpurnn-sim {self.kernel_name} {th.block_label}/"
                                           f"{th.thread_label}")
                     for th in self.threads]
        for t in pythreads:
            t.start()
        self.runnable.extend(self.threads[1:])
        self.threads[0].sem.release()
        if not self.done.wait(self.watchdog):
            self.fail(WatchdogTimeout(f"{self.kernel_name}: no end within {self.watchdog:.0f} s; "
                                      f"running: {self._running_where()}"))
        for t in pythreads:
            t.join(timeout=5.0)
        self.accesses += sum(th.ticks for th in self.threads)
        return time.perf_counter() - started

    def _running_where(self):
        frames = sys._current_frames()
        for th in self.threads:
            if not th.exited:
                for ident, frame in frames.items():
                    stack = traceback.extract_stack(frame)
                    if any(fs.name == self.fn.__name__ for fs in stack):
                        return f"{who(th)} near {stack[-1].filename}:{stack[-1].lineno}"
        return "unknown"


def _thread_main_code():
    return Launch.thread_main.__code__


_THREAD_MAIN_CODE = _thread_main_code()


def wrap_args(launch, names, args):
    wrapped = []
    for i, a in enumerate(args):
        name = names[i] if i < len(names) else f"arg{i}"
        if isinstance(a, np.ndarray):
            wrapped.append(TrackedArray(a, f"{name} (global)", GLOBAL, launch, count=True))
        elif isinstance(a, (bool, int, float, complex, np.generic)):
            wrapped.append(a)
        else:
            raise TypeError(f"argument {name!r} of {launch.kernel_name} is "
                            f"{type(a).__module__}.{type(a).__name__}; the strict simulator takes "
                            f"NumPy arrays and scalars")
    return wrapped
