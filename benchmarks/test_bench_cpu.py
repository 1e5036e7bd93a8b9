"""Forward+backward of the NumPy backend against torch CPU (pytest-benchmark).

    python -m pytest benchmarks/ --benchmark-enable --benchmark-group-by=param:shape

Both sides run on 2 threads (torch.set_num_threads, threadpoolctl for NumPy's BLAS), on the
same weights and data; ids read lstm-fwdbw-numpy-f32-T100-B32-I256-H256. In the default test
run (--benchmark-disable) each case still executes once, so the benchmark code is exercised.
"""
import numpy as np
import pytest

import gpurnn

torch = pytest.importorskip("torch")

THREADS = 2
SHAPES = [(100, 32, 256, 256), (50, 4, 128, 128)]
CELLS = {"lstm": ("LSTM", {}), "gru": ("GRU", {}), "rnn": ("RNN", {})}


@pytest.fixture(scope="module", autouse=True)
def two_threads():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    with threadpoolctl.threadpool_limits(limits=THREADS):
        yield
    torch.set_num_threads(previous)


def _cases():
    for cell in CELLS:
        for T, B, I, H in SHAPES:
            for impl in ("numpy", "torch"):
                yield pytest.param(cell, impl, (T, B, I, H),
                                   id=f"{cell}-fwdbw-{impl}-f32-T{T}-B{B}-I{I}-H{H}")


@pytest.mark.parametrize("cell,impl,shape", list(_cases()))
def test_fwdbw(benchmark, cell, impl, shape):
    T, B, I, H = shape
    name, kw = CELLS[cell]
    rng = np.random.default_rng(0)
    ref = getattr(torch.nn, name)(I, H, **kw)
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    dy = rng.standard_normal((T, B, H)).astype(np.float32)
    benchmark.group = f"{cell}-T{T}-B{B}-I{I}-H{H}"
    benchmark.extra_info["tokens"] = T * B
    if impl == "numpy":
        m = getattr(gpurnn, name)(I, H, **kw)
        m.load_state_dict(ref.state_dict())

        def run():
            y, _ = m(x)
            return m.backward(dy)[0]
    else:
        xt = torch.tensor(x, requires_grad=True)
        dyt = torch.tensor(dy)

        def run():
            xt.grad = None
            y, _ = ref(xt)
            y.backward(dyt)
            return xt.grad.numpy()
    dx = benchmark(run)
    assert dx.shape == (T, B, I) and np.isfinite(dx).all()
