"""Static GPU checks without a GPU: every registry specialization compiles for sm_80 and sm_90
with no spills and within the plan's register and shared-memory assumptions.

The compile runs once per session, in one subprocess without NUMBA_ENABLE_CUDASIM (compile_ptx
does not work in simulator mode, and importing numba.cuda here would fix this process's mode).
"""
import textwrap

import pytest

from gpurnn import planning as planmod
from gpurnn.kernels import compile as kcompile
from gpurnn.kernels.layout import KERNEL_REGS_MAX

ARCHS = ("sm_80", "sm_90")
PROFILE = {"sm_80": "A100", "sm_90": "H100"}

needs_ptxas = pytest.mark.skipif(
    kcompile.find_toolkit() is None,
    reason="ptxas from the nvidia-cuda-nvcc wheel is not installed "
           "(pip install 'cuda-toolkit[nvcc]==13.*')")


@pytest.fixture(scope="module")
def rows():
    return kcompile.check_kernels(ARCHS)


def _by_kernel(rows):
    out = {}
    for r in rows:
        out.setdefault(r.kernel, {})[r.arch] = r
    return out


@needs_ptxas
def test_every_specialization_compiles_for_every_arch(rows):
    kernels = _by_kernel(rows)
    # 4 cells x 2 dtypes x (persistent + pointwise) x (fwd + bwd) at least.
    assert len(kernels) >= 32
    for name, per_arch in kernels.items():
        assert set(per_arch) == set(ARCHS), name
    failed = [(r.kernel, r.arch, r.error) for r in rows if r.error]
    assert failed == []


@needs_ptxas
def test_the_lstm_variants_kernel_cells_are_compiled(rows):
    # the kernel-only cells (gpurnn.cells.KERNEL_CELLS), float32/float64, every kind
    from gpurnn.cells import KERNEL_CELLS
    from gpurnn.kernels.registry import KINDS
    have = {(r.cell, r.kind, r.dtype, r.arch) for r in rows}
    want = {(c, k, d, a) for c in KERNEL_CELLS for k in KINDS for d in ("float32", "float64")
            for a in ARCHS}
    assert want <= have
    assert not any(r.cell in KERNEL_CELLS and r.dtype not in ("float32", "float64") for r in rows)


@needs_ptxas
def test_the_regularised_specializations_compile_without_spills(rows):
    # zoneout / recurrent dropout: a specialization per torch-facing cell x dtype x kind, each
    # for every arch, with no spills, no local memory and within the register ceiling
    from gpurnn.kernels.layout import REGULARISED_CELLS
    from gpurnn.kernels.registry import DTYPES, KINDS, specializations
    names = {s.name for s in specializations() if s.regularised}
    assert len(names) == len(REGULARISED_CELLS) * len(KINDS) * len(DTYPES)
    got = {(r.kernel, r.arch): r for r in rows if r.kernel in names}
    assert set(got) == {(n, a) for n in names for a in ARCHS}
    bad = [(k, a, r.error, r.spill_bytes, r.local_bytes, r.registers) for (k, a), r in got.items()
           if r.error or r.spill_bytes or r.local_bytes or not 0 < r.registers <= KERNEL_REGS_MAX]
    assert bad == []


@needs_ptxas
def test_no_spills_and_no_local_memory(rows):
    spilled = [(r.kernel, r.arch, r.spill_stores, r.spill_loads, r.local_bytes) for r in rows
               if r.spill_bytes or r.local_bytes]
    assert spilled == []


@needs_ptxas
def test_registers_within_the_plans_budget(rows):
    for r in rows:
        p = planmod.plan(r.cell, 512, 512, 8, r.dtype, PROFILE[r.arch])
        budget = min(255, 65536 // p.threads)
        assert p.regs_per_thread == budget
        assert r.registers is not None and 0 < r.registers <= budget, (r.kernel, r.arch, r.registers)
        # the ceiling the plan assumes when it sizes persistent blocks
        assert r.registers <= KERNEL_REGS_MAX, (r.kernel, r.arch, r.registers)


def test_plan_refuses_blocks_that_starve_the_kernels_of_registers():
    p = planmod.plan("lstm", 64, 64, 1, "float32", "H100", threads=352)
    assert p.path == "stepwise"
    assert any(f"up to {KERNEL_REGS_MAX}" in r for r in p.reasons)
    assert planmod.plan("lstm", 64, 64, 1, "float32", "H100", threads=320).path == "persistent"


@needs_ptxas
def test_grid_sync_kernels_are_linked_with_cudadevrt(rows):
    for r in rows:
        assert r.linked_cudadevrt == r.grid_sync == r.kind.startswith("persistent"), (r.kernel, r.arch)


@needs_ptxas
def test_static_plus_planned_dynamic_smem_fits_at_capacity(rows):
    # The plan counts dynamic shared memory only; static arrays must leave it room even at the
    # largest H the plan calls persistent.
    for r in rows:
        if not r.kind.startswith("persistent"):
            continue
        dev = planmod.device_profile(PROFILE[r.arch])
        for batch in (1, 8):
            h = planmod.capacity(r.cell, r.dtype, dev, batch=batch)
            p = planmod.plan(r.cell, 64, h, batch, r.dtype, dev)
            assert p.persistent_fits
            dyn = p.smem_bytes_fwd if r.kind == "persistent_fwd" else p.smem_bytes_bwd
            assert r.static_smem + dyn <= dev.smem_per_block_optin, (r.kernel, r.arch, h, batch)


TOY = textwrap.dedent('''
    import math
    from numba import cuda, float32, int32, void
    from numba.cuda.cg import _grid_group_sync, _this_grid
    from gpurnn.kernels.layout import KernelSpec

    def synced(x, w, steps):
        grid = _this_grid()
        tile = cuda.shared.array(256, dtype=float32)       # 1024 B static
        i = cuda.grid(1)
        tile[cuda.threadIdx.x] = w[cuda.threadIdx.x]
        cuda.syncthreads()
        for _ in range(steps):
            if i < x.shape[0]:
                x[i] = math.tanh(x[i] * tile[cuda.threadIdx.x])
            _grid_group_sync(grid)

    def plain(x, w, steps):
        i = cuda.grid(1)
        if i < x.shape[0]:
            x[i] += w[i]

    SIG = void(float32[::1], float32[::1], int32)

    def specs():
        return [KernelSpec("toy_synced", synced, SIG, "rnn_tanh", "persistent_fwd", "float32", True),
                KernelSpec("toy_plain", plain, SIG, "rnn_tanh", "pointwise_fwd", "float32", False)]
''')


@needs_ptxas
def test_pipeline_on_toy_kernels_with_known_resources(tmp_path):
    path = tmp_path / "toy_kernels.py"
    path.write_text(TOY)
    got = {(r.kernel, r.arch): r for r in kcompile.check_kernels(("sm_90",), f"{path}:specs")}
    synced, plain = got["toy_synced", "sm_90"], got["toy_plain", "sm_90"]
    assert synced.error is None and plain.error is None
    assert synced.linked_cudadevrt and not plain.linked_cudadevrt
    assert synced.static_smem == 1024 and plain.static_smem == 0
    assert synced.stack_bytes > 0          # the call into cudadevrt's grid sync needs a frame
    assert 0 < plain.registers < synced.registers <= 255


PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z4kern' for 'sm_90'
ptxas info    : Function properties for _Z4kern
    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 1024 bytes smem, 384 bytes cmem[0]
ptxas info    : Function properties for _Z6helper
    0 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
"""
NVLINK_LOG = """\
nvlink info    : Function properties for '_Z5other':
nvlink info    : used 16 registers, used 1 barriers, 0 stack, 3080 bytes smem, 656 bytes cmem[0], 0 bytes lmem
nvlink info    : Function properties for '_Z4kern':
nvlink info    : used 56 registers, used 1 barriers, 16 stack, 1024 bytes smem, 700 bytes cmem[0], 8 bytes lmem
"""
PTX = """\
.extern .shared .align 16 .b8 _cudapy_smem_1[];
.shared .align 4 .b8 _cudapy_smem_2[1024];
.visible .shared .align 8 .f64 tile[16];
"""


def test_parsers():
    funcs = kcompile.parse_ptxas(PTXAS_LOG)
    assert funcs["_Z4kern"] == {"stack": 16, "spill_stores": 8, "spill_loads": 12, "registers": 40}
    assert funcs["_Z6helper"] == {"stack": 0, "spill_stores": 4, "spill_loads": 4}
    assert kcompile.parse_nvlink(NVLINK_LOG, "_Z4kern") == {"registers": 56, "stack": 16,
                                                          "smem": 1024, "lmem": 8}
    with pytest.raises(RuntimeError, match="_Z9missing"):
        kcompile.parse_nvlink(NVLINK_LOG, "_Z9missing")
    assert kcompile.ptx_static_smem(PTX) == 1024 + 128


def test_bad_arch_and_specs_are_rejected():
    with pytest.raises(ValueError, match="arch must look like"):
        kcompile.check_kernels(("ampere",))
    with pytest.raises(ValueError, match="specs must be"):
        kcompile.load_specs("no_colon")
