"""Benchmark runner behind `gpurnn bench` and `benchmarks/`: cases, an explicit FLOP model, the
implementations being compared, and timing with the device synchronised inside the timed call.

Fair timing on a CPU (time_blocks): idle BLAS/OpenMP workers keep spinning for 10-100 ms after
a call and slow whatever runs next, so implementations are never timed call by call. Each is
timed in blocks: untimed calls first (at least `warmup_s` of them, so the other library's
workers have gone idle), then `repeat` timed calls; the order of the implementations rotates
from round to round, and each reports the median over all its rounds, with the share of the
machine's CPU time other processes used during its blocks (Linux /proc/stat; None elsewhere).
Before anything is timed, each implementation's result on the case's data is checked against
the float64 NumPy reference (check_runner): a wrong implementation is never timed.

FLOP model: gpurnn.planning.layer_flops, the one the plan's traffic model uses too (one layer,
one direction, multiply-add = 2 FLOPs, G gates):
    forward   2*T*B*G*H*(I + H)      input projection + recurrent GEMMs
              + P*T*B*H              pointwise (P = planning.POINTWISE_FLOPS: LSTM 21, GRU 17,
                                     RNN 4, counted off the cell equations; see planning/cost.py)
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

from . import layernorm, planning, variants
from .cells import GATES, REGISTRY
from .variants import form_of
from .testing import rel_err

IMPLS = ("gpurnn-cpu", "gpurnn-numpy", "torch-cpu", "gpurnn-cuda", "gpurnn-cuda-stepwise",
         "torch-cudnn", "gpurnn-sim")
PEER = {"gpurnn-cpu": "torch-cpu", "gpurnn-numpy": "torch-cpu", "gpurnn-sim": "torch-cpu",
        "gpurnn-cuda": "torch-cudnn", "gpurnn-cuda-stepwise": "torch-cudnn"}
GPURNN_BACKEND = {"gpurnn-cpu": "cpu", "gpurnn-numpy": "numpy", "gpurnn-sim": "sim",
                  "gpurnn-cuda": "cuda", "gpurnn-cuda-stepwise": "cuda"}
# norm-relative error allowed against the float64 NumPy reference before a case is timed
CHECK_TOL = {"float32": 1e-4, "float64": 1e-9}


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
    """The case's model FLOPs (gpurnn.planning.layer_flops; an LSTM variant's,
    gpurnn.variants.layer_flops, is the same model with its extra products)."""
    form, bw = form_of(case.cell), case.mode == "fwdbw"
    if case.cell == layernorm.NAME:
        return float(layernorm.layer_flops(case.T, case.B, case.I, case.H, backward=bw))
    if case.cell.startswith("gf_"):
        from . import feedback
        return float(feedback.stack_flops(case.cell, case.T, case.B, case.I, case.H, 1,
                                          backward=bw))
    if case.cell in REGISTRY or form is None:
        return float(planning.layer_flops(case.cell, case.T, case.B, case.I, case.H, backward=bw))
    return float(variants.layer_flops(form, case.T, case.B, case.I, case.H, backward=bw))


def is_variant(cell):
    """True for the cells run through the stack core (the LSTM family of gpurnn.variants, the
    LayerNormLSTM, the gated-feedback cells), False for the cells of gpurnn.cells (run through
    gpurnn.functional)."""
    return cell not in REGISTRY


def supports(impl, case):
    """Whether `impl` runs `case`: torch has the projection (torch.nn.LSTM(proj_size)) but
    none of the other variants."""
    if not is_variant(case.cell) or impl in GPURNN_BACKEND:
        return True
    form = form_of(case.cell)
    return form is not None and form.base == "lstm" and form.proj_size > 0


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
    for impl in ("gpurnn-cpu", "gpurnn-numpy"):
        out[impl] = availability(GPURNN_BACKEND[impl])
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


def _variant_stack(case):
    from .stack import make_stack
    return make_stack(case.cell, case.I, case.H)


def _variant_data(case, rng, xp=np):
    """x, dy and the one layer's parameters (torch's names, without the _l0 suffix) of a case
    run through the stack core."""
    st = _variant_stack(case)
    k = 1.0 / np.sqrt(case.H)
    host = {"x": rng.standard_normal((case.T, case.B, case.I)),
            "dy": rng.standard_normal((case.T, case.B, st.state_width))}
    params = {name.removesuffix("_l0"): rng.uniform(-k, k, shape)
              for name, shape in st.param_shapes()}
    conv = lambda v: xp.asarray(v.astype(case.dtype))   # noqa: E731
    return {n: conv(v) for n, v in host.items()}, {n: conv(v) for n, v in params.items()}


def _variant_step(case, backend, xp, x, params, dy, options=None):
    """One forward (+ backward) of a one-layer stack of the variant; (y, {gradient name: array})."""
    from .stack import Run
    st = _variant_stack(case)
    training = case.mode == "fwdbw"
    run = Run(backend, xp, options, None, need_saved=training)
    suffixed = {n + "_l0": v for n, v in params.items()}
    y, _, _, saved = st.forward(run, x, suffixed)
    if not training:
        return y, None
    dx, _, _, grads = st.backward(run, saved, suffixed, dy)
    return y, {"dx": dx, **{n.removesuffix("_l0"): g for n, g in grads.items()}}


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


class Runner:
    """One implementation on one case. Calling it runs one iteration (the device synchronised
    before it returns); outputs() runs one more and returns what it computed as float64 NumPy
    arrays: y, and for fwdbw the gradients dx, dw_ih, dw_hh, db_ih, db_hh."""

    def __init__(self, run, outputs):
        self._run, self.outputs = run, outputs

    def __call__(self):
        self._run()


def _host64(a):
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    elif hasattr(a, "get"):
        a = a.get()
    return np.asarray(a, dtype=np.float64)


def make_runner(impl, case, seed=0):
    """A Runner for `impl` on `case`, on the data of _data(case, seed): every implementation
    computes with the same inputs and weights."""
    rng = np.random.default_rng(seed)
    training = case.mode == "fwdbw"
    if not supports(impl, case):
        raise ValueError(f"{impl} has no {case.cell}")
    if is_variant(case.cell):
        return _variant_runner(impl, case, rng)
    if impl in GPURNN_BACKEND:
        from . import functional as F
        backend = GPURNN_BACKEND[impl]
        options = {"path": "stepwise"} if impl == "gpurnn-cuda-stepwise" else None
        sync = lambda: None  # noqa: E731
        xp = np
        if backend == "cuda":
            import cupy
            xp = cupy
            sync = cupy.cuda.get_current_stream().synchronize
        d = _data(case, rng, xp)

        def step():
            y, h_n, c_n, res = F.forward(case.cell, d["x"], d["w_ih"], d["w_hh"], d["b_ih"], d["b_hh"],
                                         training=training, backend=backend, backend_options=options)
            grads = F.backward(res, d["dy"], backend_options=options) if training else None
            sync()
            return y, grads

        def outputs():
            y, g = step()
            out = {"y": y}
            if g is not None:
                out.update(dx=g.dx, dw_ih=g.dw_ih, dw_hh=g.dw_hh, db_ih=g.db_ih, db_hh=g.db_hh)
            return {k: _host64(v) for k, v in out.items()}
        return Runner(step, outputs)
    if impl in ("torch-cpu", "torch-cudnn"):
        import torch
        device = "cuda" if impl == "torch-cudnn" else "cpu"
        cell = REGISTRY[case.cell]
        tdtype = getattr(torch, case.dtype)
        m = getattr(torch.nn, cell.torch_class)(case.I, case.H, **cell.torch_kwargs).to(
            device=device, dtype=tdtype)
        d = _data(case, rng)
        with torch.no_grad():
            for key, p in (("w_ih", m.weight_ih_l0), ("w_hh", m.weight_hh_l0), ("b_ih", m.bias_ih_l0),
                           ("b_hh", m.bias_hh_l0)):
                p.copy_(torch.from_numpy(d[key]))
        grads = {"dw_ih": m.weight_ih_l0, "dw_hh": m.weight_hh_l0, "db_ih": m.bias_ih_l0,
                 "db_hh": m.bias_hh_l0}
        return _torch_runner(m, d["x"], d["dy"], device, training, grads)
    raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}")


def _torch_runner(m, x, dy, device, training, grads):
    """A Runner of torch module m on x (with dy for fwdbw): its outputs y, and for fwdbw dx and
    the gradient of each parameter in `grads` ({output name: parameter})."""
    import torch
    x = torch.tensor(x, device=device, requires_grad=training)
    dy = torch.tensor(dy, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run():
        if training:
            x.grad = None
            m.zero_grad(set_to_none=True)
            y, _ = m(x)
            y.backward(dy)
        else:
            with torch.no_grad():
                y, _ = m(x)
        sync()
        return y

    def outputs():
        y = run()
        out = {"y": y}
        if training:
            out["dx"] = x.grad
            out.update((name, p.grad) for name, p in grads.items())
        return {k: _host64(v) for k, v in out.items()}
    return Runner(run, outputs)


def _variant_runner(impl, case, rng):
    """A Runner of an LSTM-variant case: gpurnn through the stack core, torch.nn.LSTM for the
    projection. Its outputs: y, and for fwdbw dx and every parameter's gradient."""
    training = case.mode == "fwdbw"
    if impl in GPURNN_BACKEND:
        backend = GPURNN_BACKEND[impl]
        options = {"path": "stepwise"} if impl == "gpurnn-cuda-stepwise" else None
        xp, sync = np, (lambda: None)
        if backend == "cuda":
            import cupy
            xp, sync = cupy, cupy.cuda.get_current_stream().synchronize
        d, params = _variant_data(case, rng, xp)

        def step():
            out = _variant_step(case, backend, xp, d["x"], params, d["dy"], options)
            sync()
            return out

        def outputs():
            y, grads = step()
            return {k: _host64(v) for k, v in {"y": y, **(grads or {})}.items()}
        return Runner(step, outputs)
    import torch
    device = "cuda" if impl == "torch-cudnn" else "cpu"
    form = form_of(case.cell)
    m = torch.nn.LSTM(case.I, case.H, proj_size=form.proj_size).to(
        device=device, dtype=getattr(torch, case.dtype))
    d, params = _variant_data(case, rng)
    with torch.no_grad():
        for name, value in params.items():
            getattr(m, name + "_l0").copy_(torch.from_numpy(value))
    return _torch_runner(m, d["x"], d["dy"], device, training,
                         {name: getattr(m, name + "_l0") for name in params})


_references = {}


def reference(case, seed=0):
    """The float64 NumPy reference's outputs on the case's data (as Runner.outputs)."""
    key = (case, seed)
    if key not in _references and is_variant(case.cell):
        d, params = _variant_data(case, np.random.default_rng(seed))
        f64 = lambda a: a.astype(np.float64)   # noqa: E731
        y, grads = _variant_step(case, "numpy", np, f64(d["x"]),
                                 {n: f64(v) for n, v in params.items()}, f64(d["dy"]))
        _references.clear()
        _references[key] = {"y": y, **(grads or {})}
    if key not in _references:
        d = _data(case, np.random.default_rng(seed))          # the very values the runners use
        d64 = {k: v.astype(np.float64) for k, v in d.items()}
        from . import functional as F
        y, _, _, res = F.forward(case.cell, d64["x"], d64["w_ih"], d64["w_hh"], d64["b_ih"],
                                 d64["b_hh"], training=case.mode == "fwdbw", backend="numpy")
        out = {"y": y}
        if res is not None:
            g = F.backward(res, d64["dy"])
            out.update(dx=g.dx, dw_ih=g.dw_ih, dw_hh=g.dw_hh, db_ih=g.db_ih, db_hh=g.db_hh)
        _references.clear()                                   # keep one case's arrays at a time
        _references[key] = out
    return _references[key]


def check_runner(runner, impl, case, seed=0):
    """Largest norm-relative error of the runner's outputs against the float64 reference;
    RuntimeError naming the output when it is above CHECK_TOL (NaN is never within it)."""
    want = reference(case, seed)
    got = runner.outputs()
    worst = 0.0
    for key, w in want.items():
        g = got[key]
        if g.shape != w.shape:
            raise RuntimeError(f"{impl} on {case.id}: {key} has shape {g.shape}; expected {w.shape}")
        err = rel_err(g, w)
        if not np.isfinite(err) or err > CHECK_TOL[case.dtype]:
            raise RuntimeError(f"{impl} on {case.id}: {key} differs from the float64 NumPy "
                               f"reference by {err:.2e} (allowed {CHECK_TOL[case.dtype]:.0e}); "
                               f"not timed")
        worst = max(worst, err)
    return worst


class cpu_share:
    """Context manager: .other is the share of the machine's CPU time that other processes
    used while it was open (0..1), from /proc/stat and this process's own times; None where
    /proc/stat is not there."""

    @staticmethod
    def _machine():
        try:
            with open("/proc/stat") as fh:
                v = [int(x) for x in fh.readline().split()[1:9]]
        except OSError:
            return None
        return sum(v) - v[3] - v[4], sum(v)          # busy, all (jiffies)

    @staticmethod
    def _own():
        import os
        t = os.times()
        return (t.user + t.system) * os.sysconf("SC_CLK_TCK")

    def __enter__(self):
        self.other = None
        self._m0, self._o0 = self._machine(), self._own()
        return self

    def __exit__(self, *exc):
        m1 = self._machine()
        if self._m0 is not None and m1 is not None and m1[1] > self._m0[1]:
            busy = (m1[0] - self._m0[0]) - (self._own() - self._o0)
            self.other = min(1.0, max(0.0, busy / (m1[1] - self._m0[1])))
        return False


def time_blocks(runners, rounds=3, repeat=5, warmup_s=0.2, progress=None):
    """Time {impl: runner} fairly (see the module's docstring). Returns {impl: (median seconds,
    all timed seconds, mean other-process CPU share or None)}."""
    names = list(runners)
    times = {n: [] for n in names}
    shares = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            run = runners[name]
            # the share covers the untimed calls too: /proc/stat counts in 10 ms ticks
            with cpu_share() as share:
                calls, until = 0, time.perf_counter() + warmup_s
                while calls < 2 or time.perf_counter() < until:
                    run()
                    calls += 1
                for _ in range(repeat):
                    t0 = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - t0)
            if share.other is not None:
                shares[name].append(share.other)
            if progress is not None:
                progress(name, r)
    return {n: (statistics.median(times[n]), times[n],
                statistics.fmean(shares[n]) if shares[n] else None) for n in names}


def time_runner(run, repeat=5, warmup=1, min_time=0.0):
    """Median seconds of `repeat` timed calls after `warmup` untimed ones (one implementation
    alone; to compare implementations use time_blocks)."""
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
    (None: the current GPU; or a profile name): T x gpurnn.planning.step_floor_seconds for the path
    the implementation runs — the plan's choice for gpurnn-cuda, the stepwise model for
    gpurnn-cuda-stepwise and for cuDNN (a GEMM and a pointwise pass per step). None for CPU
    implementations and for fwdbw cases (the model covers the forward recurrence only)."""
    if impl not in GPU_IMPLS or case.mode != "fwd":
        return None
    p = planning.plan(case.cell, case.I, case.H, case.B, case.dtype, device)
    path = p.path if impl == "gpurnn-cuda" else "stepwise"
    return case.T * planning.step_floor_seconds(p, path, training=False)


def model_seconds(case: Case, impl: str, device=None):
    """Seconds the step-time model (gpurnn.planning.cost, through the plan) predicts for the recurrence
    of `case` on `device` (None: the current GPU; or a profile name): T steps of the path the
    implementation runs (forward, or forward + backward), the plan's choice for gpurnn-cuda and
    the stepwise path for gpurnn-cuda-stepwise. None for other implementations: measured over
    predicted is what calibrates the model on a GPU's first run."""
    if impl not in ("gpurnn-cuda", "gpurnn-cuda-stepwise"):
        return None
    p = planning.plan(case.cell, case.I, case.H, case.B, case.dtype, device)
    path = p.path if impl == "gpurnn-cuda" else "stepwise"
    fwd, bwd = p.predicted_step(path, "fwd"), p.predicted_step(path, "bwd")
    if fwd is None:
        return None
    return case.T * (fwd.total + (bwd.total if case.mode == "fwdbw" else 0.0))


def run_cases(cases, impls, repeat=5, rounds=3, warmup_s=0.2, progress=None, on_case=None):
    """Check, then time every case with every impl (time_blocks); returns result dicts (one per
    case x impl) with median seconds, tokens/s, GFLOP/s, the error against the reference, the
    other-process CPU share, the ratio to the case's peer when the peer was timed, and for GPU
    forward cases where the time sits against the traffic model's floor.
    progress(case, impl) is called after each implementation's last block; on_case(case, its
    result dicts) once a case is complete (ratios filled in), so a caller can save results as
    they come."""
    results = []
    for case in cases:
        runners = {impl: make_runner(impl, case) for impl in impls if supports(impl, case)}
        errors = {impl: check_runner(run, impl, case) for impl, run in runners.items()}

        def block_done(impl, r):
            if progress is not None and r == rounds - 1:
                progress(case, impl)
        timed = time_blocks(runners, rounds=rounds, repeat=repeat, warmup_s=warmup_s,
                            progress=block_done)
        ran = list(runners)
        del runners
        for impl in ran:
            median, times, other = timed[impl]
            floor = traffic_floor(case, impl)
            model = model_seconds(case, impl)
            results.append({"case": case.id, **asdict(case), "impl": impl, "median_s": median,
                            "times_s": times, "rounds": rounds, "repeat": repeat,
                            "tokens_per_s": case.T * case.B / median,
                            "gflops": flops(case) / median / 1e9, "model_flops": flops(case),
                            "max_rel_err": errors[impl], "other_cpu_share": other,
                            "traffic_floor_s": floor,
                            "times_floor": None if floor is None else median / floor,
                            "model_s": model,
                            "times_model": None if model is None else median / model})
        for r in results[-len(ran):]:
            peer = PEER.get(r["impl"])
            r["peer"] = peer if peer in timed else None
            r["ratio_to_peer"] = (r["median_s"] / timed[peer][0]) if peer in timed else None
        if on_case is not None:
            on_case(case, results[-len(ran):])
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
