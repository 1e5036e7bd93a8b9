"""The launch layer without a GPU: the shared-memory opt-in call checked against a fake driver
(built on cuda-bindings' real enums and handle types), the cooperative-grid guard, and the
simulator path in a subprocess (so this process's numba.cuda mode stays untouched)."""
import os
import subprocess
import sys
import textwrap

import pytest

from gpurnn import planning as planmod
from gpurnn.kernels import launch

drv = pytest.importorskip("cuda.bindings.driver", reason="cuda-bindings is not installed")

MAX_DYN = drv.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
OPTIN = drv.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
H100_OPTIN = 227 * 1024


class FakeDriver:
    """cuda.bindings.driver's types and enums, with recorded, scriptable driver calls."""
    CUresult = drv.CUresult
    CUfunction_attribute = drv.CUfunction_attribute
    CUdevice_attribute = drv.CUdevice_attribute
    CUkernel = drv.CUkernel
    CUfunction = drv.CUfunction

    def __init__(self, set_result=drv.CUresult.CUDA_SUCCESS,
                 get_device_result=drv.CUresult.CUDA_SUCCESS, optin=H100_OPTIN):
        self.calls = []
        self.set_result = set_result
        self.get_device_result = get_device_result
        self.optin = optin

    def cuKernelSetAttribute(self, attrib, value, kernel, dev):
        self.calls.append(("cuKernelSetAttribute", attrib, value, type(kernel), int(kernel), int(dev)))
        return (self.set_result,)

    def cuFuncSetAttribute(self, func, attrib, value):
        self.calls.append(("cuFuncSetAttribute", type(func), int(func), attrib, value))
        return (self.set_result,)

    def cuCtxGetDevice(self):
        return self.get_device_result, drv.CUdevice(3)

    def cuDeviceGetAttribute(self, attrib, dev):
        self.calls.append(("cuDeviceGetAttribute", attrib, dev))
        return drv.CUresult.CUDA_SUCCESS, self.optin


class FakeCufunc:
    def __init__(self, handle):
        self.handle = handle


class FakeCodeLibrary:
    def __init__(self, handle):
        self.handle = handle

    def get_cufunc(self):
        return FakeCufunc(self.handle)


class FakeCompiled:
    """Shaped like numba-cuda 0.30's _Kernel: _codelibrary.get_cufunc().handle is a CUkernel."""
    def __init__(self, handle_value, coop_blocks=132, static_smem=0):
        self._codelibrary = FakeCodeLibrary(drv.CUkernel(handle_value))
        self.coop_blocks = coop_blocks
        self.shared_mem_per_block = static_smem
        self.occupancy_queries = []

    def max_cooperative_grid_blocks(self, blockdim, dynsmemsize=0):
        self.occupancy_queries.append((blockdim, dynsmemsize))
        return self.coop_blocks


class FakeDispatcher:
    def __init__(self, compiled):
        self.compiled = compiled
        self.overloads = {("sig",): compiled}
        self.launches = []

    def compile(self, sig):
        self.compiled_for = sig
        return self.compiled

    def typeof_pyval(self, value):
        return type(value).__name__

    def __getitem__(self, config):
        def run(*args):
            self.launches.append((config, args))
        return run


@pytest.fixture(autouse=True)
def fresh_opt_in_cache():
    launch._opted_in.clear()
    yield
    launch._opted_in.clear()


def test_opt_in_calls_cuKernelSetAttribute_with_the_exact_attribute_bytes_and_device():
    d = FakeDriver()
    launch.set_max_dynamic_shared_memory(FakeCompiled(0x1000), 200_000, driver=d)
    assert d.calls == [
        ("cuKernelSetAttribute", MAX_DYN, 200_000, drv.CUkernel, 0x1000, 3),
    ]
    assert MAX_DYN.name == "CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES" and int(MAX_DYN) == 8


def test_opt_in_on_a_plain_function_handle_calls_cuFuncSetAttribute():
    d = FakeDriver()
    launch.set_max_dynamic_shared_memory(FakeCufunc(drv.CUfunction(0x1010)), 70_000, driver=d)
    assert d.calls == [("cuFuncSetAttribute", drv.CUfunction, 0x1010, MAX_DYN, 70_000)]


def test_opt_in_through_the_module_level_driver(monkeypatch):
    d = FakeDriver()
    monkeypatch.setattr(launch, "DRIVER", d)
    launch.set_max_dynamic_shared_memory(FakeDispatcher(FakeCompiled(0x2000)), 65_536)
    assert d.calls[-1] == ("cuKernelSetAttribute", MAX_DYN, 65_536, drv.CUkernel, 0x2000,
                           3)


def test_opt_in_failure_raises_with_the_driver_error():
    d = FakeDriver(set_result=drv.CUresult.CUDA_ERROR_INVALID_VALUE)
    with pytest.raises(RuntimeError, match=r"MAX_DYNAMIC_SHARED_SIZE_BYTES, 300000\).*"
                                           r"CUDA_ERROR_INVALID_VALUE"):
        launch.set_max_dynamic_shared_memory(FakeCompiled(0x1000), 300_000, driver=d)


def test_device_lookup_failure_raises():
    d = FakeDriver(get_device_result=drv.CUresult.CUDA_ERROR_INVALID_CONTEXT)
    with pytest.raises(RuntimeError, match="cuCtxGetDevice failed with CUDA_ERROR_INVALID_CONTEXT"):
        launch.set_max_dynamic_shared_memory(FakeCompiled(0x1000), 100_000, driver=d)
    assert not any(c[0].endswith("SetAttribute") for c in d.calls)


@pytest.mark.parametrize("nbytes, exc", [(-1, ValueError), (1.5, TypeError), (True, TypeError)])
def test_opt_in_rejects_bad_sizes(nbytes, exc):
    with pytest.raises(exc, match="nbytes"):
        launch.set_max_dynamic_shared_memory(FakeCompiled(1), nbytes, driver=FakeDriver())


def test_ambiguous_dispatcher_needs_a_signature():
    disp = FakeDispatcher(FakeCompiled(1))
    disp.overloads = {("a",): disp.compiled, ("b",): disp.compiled}
    with pytest.raises(ValueError, match="signature= or args="):
        launch.compiled_kernel(disp)


def test_launch_opts_in_above_48k_then_launches_the_plan():
    p = planmod.plan("lstm", 64, 768, 1, device="H100")
    assert p.path == "persistent" and p.smem_bytes_bwd > 48 * 1024
    d = FakeDriver()
    compiled = FakeCompiled(0x3000, coop_blocks=132)
    disp = FakeDispatcher(compiled)
    launch.launch_persistent(disp, p, 0, ("x",), direction="bwd", driver=d)
    assert ("cuKernelSetAttribute", MAX_DYN, p.smem_bytes_bwd, drv.CUkernel, 0x3000,
            3) in d.calls
    assert disp.compiled_for == ("str",)  # the overload for the launch's argument types
    assert compiled.occupancy_queries == [(p.threads, p.smem_bytes_bwd)]
    assert disp.launches == [((p.blocks, p.threads, 0, p.smem_bytes_bwd), ("x",))]
    # A second launch of the same size does not call the driver again.
    n = len([c for c in d.calls if c[0] == "cuKernelSetAttribute"])
    launch.launch_persistent(disp, p, 0, ("x",), direction="bwd", driver=d)
    assert len([c for c in d.calls if c[0] == "cuKernelSetAttribute"]) == n
    assert len(disp.launches) == 2


def test_launch_below_48k_does_not_opt_in():
    d = FakeDriver()
    disp = FakeDispatcher(FakeCompiled(0x4000))
    launch.launch_persistent(disp, (8, 256, 16_384), 0, (), driver=d)
    assert not any(c[0].endswith("SetAttribute") for c in d.calls)
    assert disp.launches == [((8, 256, 0, 16_384), ())]


def test_cooperative_grid_above_the_device_limit_is_never_launched():
    d = FakeDriver()
    disp = FakeDispatcher(FakeCompiled(0x5000, coop_blocks=132))
    with pytest.raises(RuntimeError, match="133 blocks.*at most 132"):
        launch.launch_persistent(disp, (133, 256, 100_000), 0, (), driver=d)
    assert disp.launches == []


def test_static_plus_dynamic_smem_above_opt_in_is_refused():
    d = FakeDriver(optin=H100_OPTIN)
    disp = FakeDispatcher(FakeCompiled(0x6000, static_smem=2048))
    with pytest.raises(RuntimeError, match="2,048 B static.*opt-in limit"):
        launch.launch_persistent(disp, (100, 256, H100_OPTIN - 1024), 0, (), driver=d)
    assert disp.launches == []
    assert not any(c[0].endswith("SetAttribute") for c in d.calls)


def test_stepwise_plan_and_bad_launch_tuples_are_rejected():
    p = planmod.plan("lstm", 64, 4096, 8, device="H100")
    assert p.path == "stepwise"
    disp = FakeDispatcher(FakeCompiled(1))
    with pytest.raises(ValueError, match="'stepwise' path"):
        launch.launch_persistent(disp, p, 0, (), driver=FakeDriver())
    with pytest.raises(TypeError, match="launch must be"):
        launch.launch_persistent(disp, (1, 256), 0, (), driver=FakeDriver())
    with pytest.raises(ValueError, match="must be positive"):
        launch.launch_persistent(disp, (0, 256, 0), 0, (), driver=FakeDriver())
    ok = planmod.plan("lstm", 64, 64, 1, device="H100")
    with pytest.raises(ValueError, match="direction must be"):
        launch.launch_persistent(disp, ok, 0, (), direction="up", driver=FakeDriver())
    assert disp.launches == []


SIM_SCRIPT = textwrap.dedent("""
    import numpy as np
    from numba import cuda, float32, int32, void
    from gpurnn.kernels import launch

    def kernel(x, steps):
        grid = cuda.cg.this_grid()
        smem = cuda.shared.array(0, dtype=float32)
        i = cuda.grid(1)
        for _ in range(steps):
            smem[cuda.threadIdx.x] = 1.0
            if i < x.shape[0]:
                x[i] += smem[cuda.threadIdx.x]
            grid.sync()

    k = cuda.jit(kernel)
    assert launch.is_simulator_kernel(k)
    x = np.zeros(64, np.float32)
    # One block: the single cooperative launch covers every step, as on a GPU. The opt-in
    # size (above 48 KB) is irrelevant to the simulator.
    launch.launch_persistent(k, (1, 32, 100_000), 0, (x, 3))
    launch.set_max_dynamic_shared_memory(k, 100_000)
    assert x[:32].tolist() == [3.0] * 32 and x[32:].tolist() == [0.0] * 32, x
    try:
        launch.launch_persistent(k, (2, 32, 128), 0, (x, 3))
    except RuntimeError as e:
        assert "single_step=True" in str(e), e
    else:
        raise SystemExit("a multi-block multi-step simulator launch was not refused")
    launch.launch_persistent(k, (2, 32, 128), 0, (x, 1), single_step=True)
    assert x.tolist() == [4.0] * 32 + [1.0] * 32, x
    print("SIM-OK")
""")


@pytest.mark.sim
def test_simulator_launch_rules_in_a_subprocess():
    pytest.importorskip("numba.cuda", reason="numba-cuda is not installed")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    r = subprocess.run([sys.executable, "-c", SIM_SCRIPT], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "SIM-OK" in r.stdout, r.stdout + r.stderr
