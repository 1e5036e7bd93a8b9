"""pytest-benchmark suite: the cases of `gpurnn bench` (its default grid, plus the shapes of
issue 15's table, where the CPU fast path is held to torch CPU), for every implementation
gpurnn knows. Each case first checks its result against the float64 NumPy reference
(bench.check_runner), then is timed: rounds of one call after warm-up rounds lasting at least
WARMUP_S, so the workers of whatever ran before have gone idle (pytest-benchmark times one
implementation per test, so implementations are timed in blocks; for a rotating, same-run
comparison with other-process CPU shares use `gpurnn bench`).

    python -m pytest benchmarks --benchmark-enable --benchmark-group-by=group

Ids read `lstm-fwdbw-cpu-f32-T100-B32-I256-H256` (cell-mode-impl-dtype-shape). CPU cases run
on 2 threads for both sides (torch.set_num_threads, threadpoolctl for NumPy's BLAS). GPU
implementations (gpurnn cuda, its stepwise path, torch cuDNN) skip with the reason where no
device is usable — including in a pytest process whose simulator tests have put numba.cuda in
simulator mode, so run this directory on its own on a GPU machine. In the default test run
(--benchmark-disable) every case still executes once, checked, at a small shape of its own
(T <= 5, B <= 3, I <= 16, H <= 24; the full shapes take minutes), so this code cannot rot
unnoticed.
"""
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
    threadpoolctl = pytest.importorskip("threadpoolctl")
    torch = pytest.importorskip("torch")
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    with threadpoolctl.threadpool_limits(limits=THREADS):
        yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("case,impl", list(_params()))
def test_case(benchmark, case, impl):
    if benchmark.disabled:
        case = bench.Case(case.cell, case.mode, min(case.T, 5), min(case.B, 3), min(case.I, 16),
                          min(case.H, 24), case.dtype)
    run = bench.make_runner(impl, case)
    err = bench.check_runner(run, impl, case)          # raises (never times) a wrong result
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
