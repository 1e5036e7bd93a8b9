"""Benchmark runner behind `gpurnn bench` and `benchmarks/`: cases, an explicit FLOP model, the
implementations being compared, and timing with the device synchronised inside the timed call.

FLOP model (one layer, one direction, multiply-add = 2 FLOPs), G gates:
    forward   2*T*B*G*H*(I + H)      input projection + recurrent GEMMs
              + P*T*B*H              pointwise (P = 12 LSTM, 14 GRU, 2 RNN; transcendental = 1)
    backward  2x the forward GEMMs   (dgates W_hh per step, dx, dW_ih, dW_hh) + 2x pointwise
Rates are model FLOPs / measured seconds, the same model for every implementation, so they
compare fairly even where an implementation does extra work.
"""
from __future__ import annotations

import platform
import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np

from .cells import GATES

POINTWISE = {"lstm": 12, "gru": 14, "rnn_tanh": 2, "rnn_relu": 2}
TORCH_CLASS = {"lstm": ("LSTM", {}), "gru": ("GRU", {}), "rnn_tanh": ("RNN", {"nonlinearity": "tanh"}),
               "rnn_relu": ("RNN", {"nonlinearity": "relu"})}
IMPLS = ("gpurnn-numpy", "torch-cpu", "gpurnn-cuda", "gpurnn-cuda-stepwise", "torch-cudnn", "gpurnn-sim")
PEER = {"gpurnn-numpy": "torch-cpu", "gpurnn-sim": "torch-cpu", "gpurnn-cuda": "torch-cudnn",
        "gpurnn-cuda-stepwise": "torch-cudnn"}


@dataclass(frozen=True)
class Case:
    cell: str
    mode: str            # "fwd" (inference) or "fwdbw" (training forward + backward)
    T: int
    B: int
    I: int
    H: int
    dtype: str = "float32"

    @property
    def id(self):
        short = {"float32": "f32", "float64": "f64"}[self.dtype]
        return f"{self.cell}-{self.mode}-{short}-T{self.T}-B{self.B}-I{self.I}-H{self.H}"


def flops(case: Case) -> float:
    G = GATES[case.cell]
    gemm = 2.0 * case.T * case.B * G * case.H * (case.I + case.H)
    pointwise = float(POINTWISE[case.cell] * case.T * case.B * case.H)
    fwd = gemm + pointwise
    return fwd if case.mode == "fwd" else fwd + 2 * gemm + 2 * pointwise


def grid(quick=False, cells=("lstm", "gru", "rnn_tanh"), modes=("fwd", "fwdbw"), dtype="float32"):
    """The default case grid, or a small one for `--quick` (under a minute on a 2-core CPU)."""
    if quick:
        shapes = [(32, B, 64, 64) for B in (1, 8, 32)]
    else:
        shapes = [(100, B, H, H) for H in (128, 256) for B in (1, 8, 32, 64)]
    return [Case(c, m, T, B, I, H, dtype) for c in cells for m in modes for (T, B, I, H) in shapes]


def available_impls():
    """{impl: (available, reason)} for every implementation bench knows."""
    from .backends import availability
    out = {}
    ok, why = availability("numpy")
    out["gpurnn-numpy"] = (ok, why)
    try:
        import torch
        out["torch-cpu"] = (True, f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        cuda_ok = torch.cuda.is_available()
        out["torch-cudnn"] = (cuda_ok, "torch.cuda with cuDNN" if cuda_ok else "torch sees no CUDA device")
    except ImportError:
        out["torch-cpu"] = out["torch-cudnn"] = (False, "torch is not installed")
    ok, why = availability("cuda")
    out["gpurnn-cuda"] = out["gpurnn-cuda-stepwise"] = (ok, why)
    ok, why = availability("sim")
    out["gpurnn-sim"] = (ok, why + " (far too slow to time; only on request)" if ok else why)
    return out


def _data(case, rng, xp=np):
    G, H, I = GATES[case.cell], case.H, case.I
    k = 1.0 / np.sqrt(H)
    host = {
        "x": rng.standard_normal((case.T, case.B, I)),
        "w_ih": rng.uniform(-k, k, (G * H, I)), "w_hh": rng.uniform(-k, k, (G * H, H)),
        "b_ih": rng.uniform(-k, k, G * H), "b_hh": rng.uniform(-k, k, G * H),
        "dy": rng.standard_normal((case.T, case.B, H)),
    }
    return {n: xp.asarray(v.astype(case.dtype)) for n, v in host.items()}


def make_runner(impl, case, seed=0):
    """A zero-argument callable running one iteration of `case` with `impl`, returning only
    after the device has finished (synchronised inside the timed call)."""
    rng = np.random.default_rng(seed)
    training = case.mode == "fwdbw"
    if impl in ("gpurnn-numpy", "gpurnn-sim", "gpurnn-cuda", "gpurnn-cuda-stepwise"):
        from . import functional as F
        backend = {"gpurnn-numpy": "numpy", "gpurnn-sim": "sim"}.get(impl, "cuda")
        options = {"path": "stepwise"} if impl == "gpurnn-cuda-stepwise" else None
        sync = lambda: None  # noqa: E731
        xp = np
        if backend == "cuda":
            import cupy
            xp = cupy
            sync = cupy.cuda.get_current_stream().synchronize
        d = _data(case, rng, xp)

        def run():
            y, h_n, c_n, res = F.forward(case.cell, d["x"], d["w_ih"], d["w_hh"], d["b_ih"], d["b_hh"],
                                         training=training, backend=backend, backend_options=options)
            if training:
                F.backward(res, d["dy"], backend_options=options)
            sync()
        return run
    if impl in ("torch-cpu", "torch-cudnn"):
        import torch
        device = "cuda" if impl == "torch-cudnn" else "cpu"
        name, kw = TORCH_CLASS[case.cell]
        tdtype = getattr(torch, case.dtype)
        m = getattr(torch.nn, name)(case.I, case.H, **kw).to(device=device, dtype=tdtype)
        d = _data(case, rng)
        x = torch.tensor(d["x"], device=device, requires_grad=training)
        dy = torch.tensor(d["dy"], device=device)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

        def run():
            if training:
                x.grad = None
                y, _ = m(x)
                y.backward(dy)
            else:
                with torch.no_grad():
                    m(x)
            sync()
        return run
    raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}")


def time_runner(run, repeat=5, warmup=1, min_time=0.0):
    """Median seconds of `repeat` timed calls after `warmup` untimed ones."""
    for _ in range(warmup):
        run()
    times = []
    start_all = time.perf_counter()
    while len(times) < repeat or (time.perf_counter() - start_all) < min_time:
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
        if len(times) >= 10 * repeat:
            break
    return statistics.median(times), times


GPU_IMPLS = ("gpurnn-cuda", "gpurnn-cuda-stepwise", "torch-cudnn")


def traffic_floor(case: Case, impl: str, device=None):
    """Seconds the plan's traffic model says the recurrence of `case` cannot beat on `device`
    (None: the current GPU; or a profile name): T x gpurnn.plan.step_floor_seconds for the path
    the implementation runs — the plan's choice for gpurnn-cuda, the stepwise model for
    gpurnn-cuda-stepwise and for cuDNN (a GEMM and a pointwise pass per step). None for CPU
    implementations and for fwdbw cases (the model covers the forward recurrence only)."""
    if impl not in GPU_IMPLS or case.mode != "fwd":
        return None
    from . import plan as planmod
    p = planmod.plan(case.cell, case.I, case.H, case.B, case.dtype, device)
    path = p.path if impl == "gpurnn-cuda" else "stepwise"
    return case.T * planmod.step_floor_seconds(p, path, training=False)


def run_cases(cases, impls, repeat=5, warmup=1, progress=None, on_case=None):
    """Time every case with every impl; returns result dicts (one per case x impl) with median
    seconds, tokens/s, GFLOP/s, the ratio to the case's peer when the peer was timed, and for
    GPU forward cases where the time sits against the traffic model's floor.
    progress(case, impl) is called after each timing; on_case(case, its result dicts) once a
    case is complete (ratios filled in), so a caller can save results as they come."""
    results = []
    for case in cases:
        by_impl = {}
        for impl in impls:
            median, times = time_runner(make_runner(impl, case), repeat=repeat, warmup=warmup)
            by_impl[impl] = median
            floor = traffic_floor(case, impl)
            results.append({"case": case.id, **asdict(case), "impl": impl, "median_s": median,
                            "times_s": times, "tokens_per_s": case.T * case.B / median,
                            "gflops": flops(case) / median / 1e9, "model_flops": flops(case),
                            "traffic_floor_s": floor,
                            "times_floor": None if floor is None else median / floor})
            if progress is not None:
                progress(case, impl)
        for r in results[-len(impls):]:
            peer = PEER.get(r["impl"])
            r["peer"] = peer if peer in by_impl else None
            r["ratio_to_peer"] = (r["median_s"] / by_impl[peer]) if peer in by_impl else None
        if on_case is not None:
            on_case(case, results[-len(impls):])
    return results


def environment():
    env = {"python": platform.python_version(), "platform": platform.platform(),
           "machine": platform.machine(), "processor": platform.processor(), "numpy": np.__version__}
    from ._version import __version__
    env["gpurnn"] = __version__
    try:
        import torch
        env["torch"] = torch.__version__
        env["torch_threads"] = torch.get_num_threads()
    except ImportError:
        env["torch"] = None
    try:
        import threadpoolctl
        env["blas"] = [{k: p.get(k) for k in ("internal_api", "version", "num_threads")}
                       for p in threadpoolctl.threadpool_info()]
    except ImportError:
        env["blas"] = None
    import os
    env["cpu_count"] = os.cpu_count()
    return env
