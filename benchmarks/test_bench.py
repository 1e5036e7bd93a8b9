"""pytest-benchmark suite: the cases of `gpurnn bench` (its default grid, plus the two shapes
the NumPy backend is held to against torch CPU), for every implementation gpurnn knows.

    python -m pytest benchmarks --benchmark-enable --benchmark-group-by=group

Ids read `lstm-fwdbw-numpy-f32-T100-B32-I256-H256` (cell-mode-impl-dtype-shape). CPU cases run
on 2 threads for both sides (torch.set_num_threads, threadpoolctl for NumPy's BLAS). GPU
implementations (gpurnn cuda, its stepwise path, torch cuDNN) skip with the reason where no
device is usable — including in a pytest process whose simulator tests have put numba.cuda in
simulator mode, so run this directory on its own on a GPU machine. In the default test run
(--benchmark-disable) every case still executes once, so this code cannot rot unnoticed.
"""
import pytest

from gpurnn import bench

THREADS = 2
SHORT = {"gpurnn-numpy": "numpy", "torch-cpu": "torch", "gpurnn-cuda": "cuda",
         "gpurnn-cuda-stepwise": "cuda_stepwise", "torch-cudnn": "cudnn"}
# the NumPy backend's targets against torch CPU (forward + backward, float32)
HELD_TO = [bench.Case(c, "fwdbw", *shape) for c in ("lstm", "gru", "rnn_tanh")
           for shape in ((100, 32, 256, 256), (50, 4, 128, 128))]
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
    run = bench.make_runner(impl, case)
    benchmark.group = case.id
    benchmark.extra_info.update(tokens=case.T * case.B, model_flops=bench.flops(case), impl=impl)
    benchmark(run)
