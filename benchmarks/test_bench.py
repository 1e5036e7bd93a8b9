"""pytest-benchmark suite: the cases of `gpurnn bench` (its default grid, plus the shapes of
issue 15's table, where the CPU fast path is held to torch CPU), for every implementation
gpurnn knows. Each case first checks its result against the float64 NumPy reference
(bench.check_runner), then is timed: rounds of one call after warm-up rounds lasting at least
WARMUP_S, so the workers of whatever ran before have gone idle (pytest-benchmark times one
implementation per test, so implementations are timed in blocks; for a rotating, same-run
comparison with other-process CPU shares use `gpurnn bench`).

    python -m pytest benchmarks --benchmark-enable --benchmark-group-by=group

Ids read `lstm-fwdbw-cpu-f32-T100-B32-I256-H256` (cell-mode-impl-dtype-shape). CPU cases run
on 2 threads for both sides (torch.set_num_threads, threadpoolctl for NumPy's BLAS). Without
torch only the torch cases skip, with the reason; gpurnn's numpy and cpu cases still run. GPU
implementations (gpurnn cuda, its stepwise path, torch cuDNN) skip with the reason where no
device is usable — including in a pytest process whose simulator tests have put numba.cuda in
simulator mode, so run this directory on its own on a GPU machine. In the default test run
(--benchmark-disable) every case still executes once, checked, at a small shape of its own
(T <= 5, B <= 3, I <= 16, H <= 24; the full shapes take minutes), so this code cannot rot
unnoticed.
"""
import contextlib
import time

import pytest

from gpurnn import bench

THREADS = 2
WARMUP_S = 0.2
SHORT = {"gpurnn-cpu": "cpu", "gpurnn-numpy": "numpy", "torch-cpu": "torch", "gpurnn-cuda": "cuda",
         "gpurnn-cuda-stepwise": "cuda_stepwise", "torch-cudnn": "cudnn"}
# issue 15: the CPU fast path's targets against torch CPU (float32, 2 threads)
ISSUE_15_SHAPES = ((512, 1, 256, 256), (50, 4, 128, 128), (100, 32, 256, 256), (64, 128, 256, 256))
HELD_TO = [bench.Case(c, m, *shape) for c in ("lstm", "gru", "rnn_tanh") for m in ("fwd", "fwdbw")
           for shape in ISSUE_15_SHAPES]
CASES = HELD_TO + [c for c in bench.grid() if c not in HELD_TO]
AVAILABLE = bench.available_impls()


def _params():
    for case in CASES:
        for impl, short in SHORT.items():
            ok, why = AVAILABLE[impl]
            marks = [] if ok else [pytest.mark.skip(reason=f"{impl}: {why}")]
            cid = case.id.replace(f"-{case.mode}-", f"-{case.mode}-{short}-", 1)
            yield pytest.param(case, impl, id=cid, marks=marks)


@pytest.fixture(scope="module", autouse=True)
def cpu_threads():
    """THREADS for torch and NumPy's BLAS, each where installed (without threadpoolctl the BLAS
    keeps its default, which only changes the timings)."""
    try:
        import torch
    except ImportError:
        torch = None
    try:
        import threadpoolctl
        limits = threadpoolctl.threadpool_limits(limits=THREADS)
    except ImportError:
        limits = contextlib.nullcontext()
    previous = torch.get_num_threads() if torch is not None else None
    if torch is not None:
        torch.set_num_threads(THREADS)
    try:
        with limits:
            yield
    finally:
        if torch is not None:
            torch.set_num_threads(previous)


@pytest.mark.parametrize("case,impl", list(_params()))
def test_case(benchmark, case, impl):
    if benchmark.disabled:
        case = bench.Case(case.cell, case.mode, min(case.T, 5), min(case.B, 3), min(case.I, 16),
                          min(case.H, 24), case.dtype)
    run = bench.make_runner(impl, case)
    # right before timed: one call against the float64 NumPy reference on the same data
    # (check_runner raises, naming the output, where it is off; a wrong result is never timed)
    err = bench.check_runner(run, impl, case)
    assert err <= bench.CHECK_TOL[case.dtype], f"{impl} on {case.id}: relative error {err:.2e}"
    benchmark.group = case.id
    benchmark.extra_info.update(tokens=case.T * case.B, model_flops=bench.flops(case), impl=impl,
                                max_rel_err=err)
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


def test_a_wrong_result_is_not_timed():
    # the check above bites: an implementation 1% off on one output fails before any timing
    case = bench.Case("gru", "fwdbw", 4, 2, 3, 5)
    run = bench.make_runner("gpurnn-numpy", case)
    skewed = bench.Runner(run, lambda: {**run.outputs(), "dw_hh": 1.01 * run.outputs()["dw_hh"]})
    with pytest.raises(RuntimeError, match="dw_hh differs from the float64 NumPy reference"):
        bench.check_runner(skewed, "gpurnn-numpy", case)
