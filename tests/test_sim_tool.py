"""The strict simulator itself (gpurnn.sim): tiny kernels with planted bugs, each of which must be
reported with its kernel, block, thread and line — and the same kernels fixed, which must run
clean. Kernels are plain Python functions over `numba.cuda` names, as a user writes them."""
import inspect
import math

import numpy as np
import pytest
from numba import cuda, float32, int32

from gpurnn import sim

from conftest import run_in_threads

pytestmark = pytest.mark.sim


def run(kernel, grid, block, *args, shared=0, **kw):
    return sim.launch(kernel, grid, block, args, shared_bytes=shared, **kw)


def findings(kernel, grid, block, *args, shared=0):
    report = run(kernel, grid, block, *args, shared=shared, raise_on_findings=False)
    return report.findings


def line_of(fn, text):
    """The file line of the first source line of `fn` containing `text`."""
    lines, start = inspect.getsourcelines(fn)
    return start + next(i for i, ln in enumerate(lines) if text in ln)


# -- a cross-block race without a grid barrier -------------------------------------------------
def rotate_racy(x, y):
    i = cuda.grid(1)
    n = cuda.gridsize(1)
    x[i] = i * 2.0
    y[i] = x[(i + cuda.blockDim.x) % n]        # another block's element, no barrier


def rotate_fixed(x, y):
    grid = cuda.cg.this_grid()
    i = cuda.grid(1)
    n = cuda.gridsize(1)
    x[i] = i * 2.0
    grid.sync()
    y[i] = x[(i + cuda.blockDim.x) % n]


def test_cross_block_race_without_grid_barrier_is_reported():
    x, y = np.zeros(64, np.float32), np.zeros(64, np.float32)
    found = findings(rotate_racy, 2, 32, x, y)
    races = [f for f in found if f.kind == "race"]
    assert races and all(f.array == "x (global)" for f in races)
    text = str(races[0])
    assert "block 0" in text and "block 1" in text
    store, load = line_of(rotate_racy, "x[i] ="), line_of(rotate_racy, "y[i] =")
    assert f"test_sim_tool.py:{store} (rotate_racy)" in text
    assert f"test_sim_tool.py:{load} (rotate_racy)" in text
    with pytest.raises(sim.SimulatorFindings, match="race on x"):
        run(rotate_racy, 2, 32, x, y)


def test_cross_block_exchange_with_grid_barrier_is_clean_and_right():
    x, y = np.zeros(64, np.float32), np.zeros(64, np.float32)
    report = run(rotate_fixed, 2, 32, x, y)
    assert report.findings == [] and report.grid_barriers == 1
    assert np.array_equal(y, ((np.arange(64) + 32) % 64 * 2.0).astype(np.float32))


# -- a shared-memory race without syncthreads --------------------------------------------------
def reverse_racy(x, y):
    s = cuda.shared.array(0, dtype=float32)
    t = cuda.threadIdx.x
    base = cuda.blockIdx.x * cuda.blockDim.x
    s[t] = x[base + t]
    y[base + t] = s[cuda.blockDim.x - 1 - t]


def reverse_fixed(x, y):
    s = cuda.shared.array(0, dtype=float32)
    t = cuda.threadIdx.x
    base = cuda.blockIdx.x * cuda.blockDim.x
    s[t] = x[base + t]
    cuda.syncthreads()
    y[base + t] = s[cuda.blockDim.x - 1 - t]


def test_shared_race_without_syncthreads_is_reported():
    x, y = np.arange(64, dtype=np.float32), np.zeros(64, np.float32)
    found = findings(reverse_racy, 2, 32, x, y, shared=32 * 4)
    races = [f for f in found if f.kind == "race"]
    assert races and all(f.array.startswith("shared (dynamic) of block") for f in races)
    assert any("write by block 0 thread" in f.first or "write by block 0 thread" in f.second
               for f in races)


def test_shared_reverse_with_syncthreads_is_clean_and_right():
    x, y = np.arange(64, dtype=np.float32), np.zeros(64, np.float32)
    report = run(reverse_fixed, 2, 32, x, y, shared=32 * 4)
    assert report.findings == [] and report.block_barriers == 2
    assert np.array_equal(y, np.concatenate([x[:32][::-1], x[32:][::-1]]))


def test_a_warp_is_not_assumed_to_run_in_lockstep():
    # threads 0 and 1 are in one warp; on a GPU this "works" by luck of lockstep, and is a race
    x, y = np.arange(32, dtype=np.float32), np.zeros(32, np.float32)
    assert any(f.kind == "race" for f in findings(reverse_racy, 1, 32, x, y, shared=32 * 4))


# -- barriers some threads never reach ----------------------------------------------------------
def divergent_sync(x):
    t = cuda.threadIdx.x
    if t < 16:
        x[t] = 1.0
        cuda.syncthreads()
    else:
        cuda.syncthreads()
        x[t] = 2.0


def uniform_sync(x):
    t = cuda.threadIdx.x
    if t < 16:
        x[t] = 1.0
    cuda.syncthreads()
    if t >= 16:
        x[t] = 2.0


def test_divergent_barrier_is_an_error_naming_both_lines():
    lines, start = inspect.getsourcelines(divergent_sync)
    first, second = [start + i for i, ln in enumerate(lines) if "syncthreads" in ln]
    with pytest.raises(sim.BarrierError, match="divergent barriers") as e:
        run(divergent_sync, 1, 32, np.zeros(32, np.float32))
    assert f"test_sim_tool.py:{first}" in str(e.value) and f"test_sim_tool.py:{second}" in str(e.value)


def test_uniform_barrier_is_clean():
    x = np.zeros(32, np.float32)
    assert run(uniform_sync, 1, 32, x).findings == []
    assert x.tolist() == [1.0] * 16 + [2.0] * 16


def exit_then_syncthreads(x):
    t = cuda.threadIdx.x
    if t >= 30:
        return
    x[t] = 1.0
    cuda.syncthreads()


def test_block_barrier_after_an_exit_is_an_error():
    with pytest.raises(sim.BarrierError, match=r"syncthreads at test_sim_tool.py:\d+ \(exit_then_syncthreads\),? which can never complete"):
        run(exit_then_syncthreads, 1, 32, np.zeros(32, np.float32))


def early_exit_before_grid_barrier(x, owned):
    grid = cuda.cg.this_grid()
    b = cuda.blockIdx.x
    if b >= owned:                         # a block that owns no work leaves early ...
        return
    x[b * cuda.blockDim.x + cuda.threadIdx.x] = 1.0
    grid.sync()                            # ... and the rest wait for it forever on a GPU


def stays_for_grid_barrier(x, owned):
    grid = cuda.cg.this_grid()
    b = cuda.blockIdx.x
    if b < owned:
        x[b * cuda.blockDim.x + cuda.threadIdx.x] = 1.0
    grid.sync()


def test_early_exit_before_grid_barrier_is_an_error():
    with pytest.raises(sim.BarrierError, match=r"grid barrier at test_sim_tool.py:\d+ \(early_exit_before_grid_barrier\).*"
                                               r"a GPU would hang here"):
        run(early_exit_before_grid_barrier, 3, 32, np.zeros(96, np.float32), 2)


def test_idle_block_joining_the_grid_barrier_is_clean():
    x = np.zeros(96, np.float32)
    assert run(stays_for_grid_barrier, 3, 32, x, 2).grid_barriers == 1
    assert x.tolist() == [1.0] * 64 + [0.0] * 32


def grid_vs_block_barrier(x):
    t = cuda.threadIdx.x
    if t == 0:
        cuda.cg.this_grid().sync()
    else:
        cuda.syncthreads()
    x[t] = 1.0


def test_grid_and_block_barrier_in_one_block_is_divergence():
    with pytest.raises(sim.BarrierError, match="divergent barriers"):
        run(grid_vs_block_barrier, 1, 32, np.zeros(32, np.float32))


# -- memory faults -------------------------------------------------------------------------------
def uninit_shared_read(x):
    s = cuda.shared.array(64, dtype=float32)
    t = cuda.threadIdx.x
    s[t] = 1.0
    cuda.syncthreads()
    x[t] = s[t + 32]                       # the upper half was never written


def init_shared_read(x):
    s = cuda.shared.array(64, dtype=float32)
    t = cuda.threadIdx.x
    s[t] = 1.0
    s[t + 32] = 2.0
    cuda.syncthreads()
    x[t] = s[t + 32]


def test_uninitialised_shared_read_is_reported_and_reads_poison():
    x = np.zeros(32, np.float32)
    found = findings(uninit_shared_read, 1, 32, x)
    assert [f.kind for f in found] == ["uninitialised-read"]
    assert found[0].count == 32 and "test_sim_tool.py" in found[0].first
    assert np.isnan(x).all()               # shared memory starts poisoned, not zeroed


def test_initialised_shared_read_is_clean():
    x = np.zeros(32, np.float32)
    assert run(init_shared_read, 1, 32, x).findings == []
    assert (x == 2.0).all()


def test_each_block_has_its_own_shared_memory():
    x = np.arange(64, dtype=np.float32)
    y = np.zeros(64, np.float32)
    run(reverse_fixed, 2, 32, x, y, shared=32 * 4)
    assert y[0] == 31 and y[32] == 63


def negative_index(x):
    t = cuda.threadIdx.x
    x[t - 1] = 1.0                         # thread 0 writes x[-1]: compiled Numba would wrap


def past_the_end(x):
    x[cuda.threadIdx.x + 1] = 1.0


def wrong_rank(x):
    x[cuda.threadIdx.x] = 1.0


def test_negative_index_is_a_fault():
    x = np.zeros(32, np.float32)
    with pytest.raises(sim.MemoryFault, match=r"block 0 thread 0 at test_sim_tool.py:\d+ "
                                               r"\(negative_index\).*index -1 is out of bounds"):
        run(negative_index, 1, 32, x)


def test_index_past_the_end_and_wrong_rank_are_faults():
    with pytest.raises(sim.MemoryFault, match=r"thread 31 .*index 32 is out of bounds"):
        run(past_the_end, 1, 32, np.zeros(32, np.float32))
    with pytest.raises(sim.MemoryFault, match=r"indexed with 1 index; it has 2 dimensions"):
        run(wrong_rank, 1, 32, np.zeros((32, 2), np.float32))


# -- atomics, local memory, kernel errors, what is not modelled -------------------------------
def atomic_sum(total, out):
    cuda.atomic.add(total, 0, 1)


def atomic_then_plain_read(total, out):
    cuda.atomic.add(total, 0, 1)
    out[cuda.grid(1)] = total[0]           # unordered with other threads' atomics: a race


def test_atomic_pairs_are_not_races_but_atomic_and_plain_access_are():
    total, out = np.zeros(1, np.int32), np.zeros(64, np.int32)
    assert run(atomic_sum, 2, 32, total, out).findings == []
    assert total[0] == 64
    total[0] = 0
    found = findings(atomic_then_plain_read, 2, 32, total, out)
    assert any(f.kind == "race" and "atomic" in f.first + f.second for f in found)


def local_uninit(x):
    buf = cuda.local.array(4, dtype=int32)
    buf[0] = 7
    x[cuda.threadIdx.x] = buf[0] + buf[1]


def test_uninitialised_local_read_is_reported():
    found = findings(local_uninit, 1, 32, np.zeros(32, np.int32))
    assert [f.kind for f in found] == ["uninitialised-read"] and "local array" in found[0].array


def divide(x):
    t = cuda.threadIdx.x
    x[t] = 1 // (t - 5)


def test_kernel_exception_names_block_thread_and_line():
    with pytest.raises(sim.KernelError, match=r"block 0 thread 5 at test_sim_tool.py:\d+ \(divide\): "
                                              r"ZeroDivisionError"):
        run(divide, 1, 32, np.zeros(32, np.int32))


def shuffle(x):
    x[cuda.threadIdx.x] = cuda.shfl_down_sync(0xFFFFFFFF, 1.0, 1)


def test_warp_intrinsics_are_not_modelled_and_say_so():
    with pytest.raises(sim.SimulatorError, match=r"cuda.shfl_down_sync is not modelled"):
        run(shuffle, 1, 32, np.zeros(32, np.float32))


@cuda.jit(device=True, inline=True)
def tanh_device(v):
    return math.tanh(v)


def test_device_functions_and_float32_math_keep_float32():
    x = np.linspace(-3, 3, 32).astype(np.float32)
    y = np.zeros(32, np.float32)
    holder = {}

    def probe(x, y):
        v = tanh_device(x[cuda.threadIdx.x])
        if cuda.threadIdx.x == 0:
            holder["type"] = type(v)
        y[cuda.threadIdx.x] = v
    run(probe, 1, 32, x, y)
    assert holder["type"] is np.float32
    assert np.array_equal(y, np.tanh(x.astype(np.float64)).astype(np.float32))


def test_a_numba_dispatcher_runs_as_its_source():
    k = sim.jit(cuda.jit(reverse_fixed))
    x, y = np.arange(32, dtype=np.float32), np.zeros(32, np.float32)
    report = k[1, 32, 0, 128](x, y)
    assert report.findings == [] and np.array_equal(y, x[::-1])


# -- launch limits, traffic, determinism, host threads -----------------------------------------
def test_too_many_threads_is_a_value_error_naming_the_grid():
    with pytest.raises(ValueError, match=r"grid \(100000, 1, 1\) x block \(32, 1, 1\).*at most"):
        run(atomic_sum, 100000, 32, np.zeros(1, np.int32), np.zeros(1, np.int32))


def test_bad_launch_shapes_are_value_errors():
    with pytest.raises(ValueError, match="grid must be a positive int"):
        run(atomic_sum, 0, 32, np.zeros(1, np.int32), np.zeros(1, np.int32))
    with pytest.raises(ValueError, match="shared_bytes must be an int >= 0"):
        run(atomic_sum, 1, 32, np.zeros(1, np.int32), np.zeros(1, np.int32), shared=-1)
    with pytest.raises(TypeError, match="takes 2 arguments"):
        run(atomic_sum, 1, 32, np.zeros(1, np.int32))


def test_traffic_record_counts_every_load_and_store():
    x, y = np.arange(64, dtype=np.float32), np.zeros(64, np.float32)
    report = run(reverse_fixed, 2, 32, x, y, shared=128)
    assert (report.traffic["x"].reads == 1).all() and (report.traffic["x"].writes == 0).all()
    assert (report.traffic["y"].writes == 1).all() and report.traffic["y"].total_reads == 0


def test_multi_dimensional_grids_and_blocks():
    def fill(out):
        x, y = cuda.grid(2)
        out[y, x] = cuda.blockIdx.y * 100 + cuda.threadIdx.x
    out = np.zeros((4, 64), np.int32)
    run(fill, (2, 2), (32, 2), out)
    assert out[3, 33] == 100 + 1 and out[0, 0] == 0


def test_launches_from_several_host_threads_are_independent():
    def worker(k):
        x = np.arange(64, dtype=np.float32) * k
        y = np.zeros(64, np.float32)
        run(rotate_fixed, 2, 32, x, y)
        return y
    results = run_in_threads(worker, 4)
    expected = ((np.arange(64) + 32) % 64 * 2.0).astype(np.float32)
    for k in range(4):
        assert np.array_equal(results[k], expected)


def test_supported_numba_cuda_version_is_checked():
    sim.check_numba_cuda()   # the installed one is supported; otherwise this raises with the fix
