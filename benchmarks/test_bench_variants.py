"""pytest-benchmark suite: the NumPy reference of the LSTM family (gpurnn/backends/numpy_lstm.py),
forward + backward of each variant beside the plain LSTM of backends.numpy (forward("lstm", ...)
and backward), float32, at T=100, B=32, I=256, H=256 (proj_size 128 for the _proj rows). The
issue's target: each variant within TARGET (1.3x) of the plain LSTM's time.

    python -m pytest benchmarks/test_bench_variants.py --benchmark-enable --benchmark-group-by=group
    python benchmarks/test_bench_variants.py [--threads 2 --rounds 3]   # the ratio table

Each case first checks its float32 results (y, h_n, c_n and every gradient) against the same
computation in float64 (bench.CHECK_TOL), then is timed as benchmarks/test_bench.py times: rounds
of one call after warm-up rounds of at least WARMUP_S, one case per test, so cases are timed in
blocks. The table times every case in blocks too (warm-up, then `repeat` calls in a row, the
order rotated each round) and reports medians; on a loaded machine `--threads 1 --clock cpu`
(this process's CPU time) gives ratios that other processes barely move. NumPy's BLAS runs on THREADS threads (threadpoolctl,
where installed). In the default test run (--benchmark-disable) every case still executes once,
checked, at a small shape (T 5, B 3, I 16, H 24, proj 12), so this code cannot rot unnoticed.
Ids read `lstm_peephole-fwdbw-numpy-f32-T100-B32-I256-H256`; the plain LSTM through the variants'
entry points (LSTMForm()) is `lstm-fwdbw-numpy_lstm-...`, the baseline `lstm-fwdbw-numpy-...`.
"""
import contextlib
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np
import pytest

from gpurnn import bench
from gpurnn.backends import numpy as ref
from gpurnn.testing import rel_err
from gpurnn.variants import form_of

THREADS = 2
WARMUP_S = 0.2
TARGET = 1.3
SHAPE = (100, 32, 256, 256)     # T, B, I, H
PROJ = 128
SMALL = (5, 3, 16, 24)
SMALL_PROJ = 12
VARIANTS = ("lstm_peephole", "cifg", "cifg_peephole", "mlstm", "lstm_proj", "lstm_peephole_proj",
            "cifg_proj", "cifg_peephole_proj")


@dataclass(frozen=True)
class Case:
    """`base` a variant name without its proj size ('lstm_proj'); route 'numpy': the plain
    cell of backends.numpy (the baseline), 'numpy_lstm': the variants' lstm_forward/backward."""
    base: str
    route: str
    T: int
    B: int
    I: int
    H: int
    proj: int = PROJ
    dtype: str = "float32"

    @property
    def name(self):
        return self.base.replace("_proj", f"_proj{self.proj}")

    @property
    def form(self):
        return form_of(self.name)

    @property
    def shape_id(self):
        short = {"float32": "f32", "float64": "f64"}[self.dtype]
        return f"{short}-T{self.T}-B{self.B}-I{self.I}-H{self.H}"

    @property
    def id(self):
        # the variants are all 'numpy'; only the plain LSTM runs on both routes
        impl = "numpy_lstm" if (self.base == "lstm" and self.route == "numpy_lstm") else "numpy"
        return f"{self.name}-fwdbw-{impl}-{self.shape_id}"

    def small(self):
        return Case(self.base, self.route, *SMALL, proj=SMALL_PROJ, dtype=self.dtype)


BASELINE = Case("lstm", "numpy", *SHAPE)
CASES = [BASELINE, Case("lstm", "numpy_lstm", *SHAPE)] + [Case(v, "numpy_lstm", *SHAPE)
                                                          for v in VARIANTS]


def _data(case, dtype, seed=0):
    """Parameters (torch's uniform(-1/sqrt(H), 1/sqrt(H))) and inputs of a case, in `dtype`."""
    rng = np.random.default_rng(seed)
    form, H = case.form, case.H
    R = form.state_size(H)
    k = 1 / np.sqrt(H)
    params = {n: rng.uniform(-k, k, s).astype(dtype) for n, s in form.param_shapes(case.I, H, True)}
    d = {"x": rng.standard_normal((case.T, case.B, case.I)), "h0": rng.standard_normal((case.B, R)),
         "c0": rng.standard_normal((case.B, H)), "dy": rng.standard_normal((case.T, case.B, R)),
         "dh": rng.standard_normal((case.B, R)), "dc": rng.standard_normal((case.B, H))}
    return params, {n: v.astype(dtype) for n, v in d.items()}


def make_runner(case, dtype=None):
    """(run, outputs): run() is one forward + backward; outputs() one more, returning
    {name: array} of y, h_n, c_n and every gradient."""
    params, d = _data(case, dtype or case.dtype)
    x, h0, c0, dy, dh, dc = (d[k] for k in ("x", "h0", "c0", "dy", "dh", "dc"))
    form = case.form
    if case.route == "numpy":
        w_ih, w_hh, b_ih, b_hh = (params[k] for k in ("weight_ih", "weight_hh", "bias_ih",
                                                       "bias_hh"))

        def outputs():
            y, h_n, c_n, reserve = ref.forward("lstm", x, w_ih, w_hh, b_ih, b_hh, h0, c0, None,
                                               False, True)
            g = ref.backward(reserve, dy, dh, dc)
            return {"y": y, "h_n": h_n, "c_n": c_n, **g._asdict()}
    else:
        def outputs():
            y, h_n, c_n, saved = ref.lstm_forward(form, x, params, h0, c0, None, False, True)
            dx, dh0, dc0, grads = ref.lstm_backward(form, x, params, saved, None, False, dy, dh,
                                                    dc)
            return {"y": y, "h_n": h_n, "c_n": c_n, "dx": dx, "dh0": dh0, "dc0": dc0, **grads}
    return outputs, outputs


def check(case):
    """The largest norm-relative error of the case's results against float64."""
    exact = make_runner(case, "float64")[1]()
    got = make_runner(case)[1]()
    assert sorted(got) == sorted(exact)
    return max(rel_err(got[k], exact[k]) for k in exact)


@contextlib.contextmanager
def blas_threads(n=THREADS):
    """n threads for NumPy's BLAS where threadpoolctl is installed (else its default, which only
    changes the timings)."""
    try:
        import threadpoolctl
    except ImportError:
        yield
        return
    with threadpoolctl.threadpool_limits(limits=n):
        yield


@pytest.fixture(scope="module", autouse=True)
def cpu_threads():
    with blas_threads():
        yield


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(benchmark, case):
    if benchmark.disabled:
        case = case.small()
    err = check(case)
    assert err <= bench.CHECK_TOL[case.dtype], f"{case.id}: relative error {err:.2e} to float64"
    run, _ = make_runner(case)
    benchmark.group = f"lstm-variants-fwdbw-numpy-{case.shape_id}"
    benchmark.extra_info.update(tokens=case.T * case.B, variant=case.name, max_rel_err=err)
    if benchmark.disabled:
        benchmark(run)                                # the default test run: once, untimed
        return
    once = 1.0
    for _ in range(3):                                # the first calls may pay one-time costs
        t0 = time.perf_counter()
        run()
        once = min(once, max(time.perf_counter() - t0, 1e-6))
    benchmark.pedantic(run, rounds=max(5, int(1.0 / once)),
                       warmup_rounds=max(2, int(WARMUP_S / once)), iterations=1)


def test_a_wrong_result_fails_the_check(monkeypatch):
    # the check above bites: a reference whose float32 path is off fails before any timing
    case = CASES[-1].small()
    real = ref.lstm_backward

    def skewed(form, x, *args, **kwargs):
        dx, dh0, dc0, grads = real(form, x, *args, **kwargs)
        if x.dtype == np.float32:
            grads["weight_hr"] = grads["weight_hr"] * np.float32(1.01)
        return dx, dh0, dc0, grads
    monkeypatch.setattr(ref, "lstm_backward", skewed)
    assert check(case) > bench.CHECK_TOL["float32"]


def time_blocks(runners, rounds, repeat, clock=time.perf_counter):
    """{name: median seconds} of `repeat` calls in a row per runner and round, after a warm-up
    of at least WARMUP_S, the order rotated each round (bench.time_blocks, with a choice of
    clock: time.process_time counts this process's CPU time only, which other processes'
    load on a shared machine barely changes; with one BLAS thread it is the compute time)."""
    names = list(runners)
    times = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            run = runners[name]
            calls, until = 0, time.perf_counter() + WARMUP_S
            while calls < 2 or time.perf_counter() < until:
                run()
                calls += 1
            for _ in range(repeat):
                t0 = clock()
                run()
                times[name].append(clock() - t0)
    return {n: statistics.median(v) for n, v in times.items()}


def table(rounds=3, repeat=5, threads=THREADS, clock=time.perf_counter):
    """[(case, median seconds, ratio to the baseline)]."""
    runners = {case.id: make_runner(case)[0] for case in CASES}
    with blas_threads(threads):
        timed = time_blocks(runners, rounds, repeat, clock)
    base = timed[BASELINE.id]
    return [(case, timed[case.id], timed[case.id] / base) for case in CASES]


def main(argv=None):
    import argparse
    parser = argparse.ArgumentParser(description="the LSTM variants' NumPy fwd+bwd time against "
                                                 "the plain LSTM's (exit status 1 over target)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=THREADS, help="NumPy's BLAS threads")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: time.perf_counter; cpu: time.process_time (use with "
                             "--threads 1 on a loaded machine)")
    args = parser.parse_args(argv)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    rows = table(args.rounds, args.repeat, args.threads, clock)
    print(f"NumPy fwd+bwd, float32, T={SHAPE[0]} B={SHAPE[1]} I={SHAPE[2]} H={SHAPE[3]} "
          f"(proj {PROJ}), {args.threads} BLAS thread(s), {args.clock} clock, medians of "
          f"{args.rounds} rounds x {args.repeat}; target <= {TARGET}x {BASELINE.id}")
    print(f"{'variant':<26}{'route':<12}{'ms':>8}{'ratio':>8}")
    for case, seconds, ratio in rows:
        flag = "" if ratio <= TARGET else "  over target"
        print(f"{case.name:<26}{case.route:<12}{seconds * 1e3:8.1f}{ratio:7.2f}x{flag}")
    return 0 if all(ratio <= TARGET for _, _, ratio in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
