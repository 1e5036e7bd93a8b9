"""The plan (gpurnn.planning): device profiles, the persistent/stepwise choice and its reasons,
the grid it picks (never an impossible cooperative grid), the capacity table, the per-step
traffic model and the one FLOP model."""
import dataclasses
import os
import subprocess
import sys
import textwrap

import pytest

from gpurnn import planning
from gpurnn.cells import ALL_CELLS, CELLS, GATES
from gpurnn.kernels.layout import smem_bytes
from gpurnn.planning import PROFILES, DeviceProfile, capacity, plan, step_floor_seconds, step_traffic

KB = 1024


def test_named_profiles_hold_the_documented_numbers():
    h100, a100, rtx = PROFILES["H100"], PROFILES["A100"], PROFILES["RTX4090"]
    assert (h100.sm_count, h100.smem_per_block_optin, h100.smem_per_sm) == (132, 227 * KB, 228 * KB)
    assert (a100.sm_count, a100.smem_per_block_optin, a100.smem_per_sm) == (108, 163 * KB, 164 * KB)
    assert (rtx.sm_count, rtx.smem_per_block_optin, rtx.smem_per_sm) == (128, 99 * KB, 100 * KB)
    assert h100.mem_bandwidth == 3.35e12 and h100.l2_bytes == 50 * KB * KB
    assert PROFILES["H200"].sm_count == 132 and PROFILES["H200"].mem_bandwidth > h100.mem_bandwidth
    assert PROFILES["sim"].simulator and PROFILES["sim"].default_threads == 32


def test_device_argument_forms():
    assert planning.device_profile("h100") is PROFILES["H100"]
    custom = dataclasses.replace(PROFILES["A100"], name="mine", sm_count=7)
    assert planning.device_profile(custom) is custom
    assert plan("gru", 8, 64, 2, device=custom).device.sm_count == 7
    with pytest.raises(ValueError, match=r"device must be one of .*'H100'.*got 'V100'"):
        planning.device_profile("V100")
    with pytest.raises(TypeError, match="device must be a profile name.*got int"):
        planning.device_profile(3)


def test_profile_from_a_numba_device():
    class FakeDevice:
        name = b"NVIDIA H100 80GB HBM3"
        compute_capability = (9, 0)
        MULTIPROCESSOR_COUNT = 132
        MAX_SHARED_MEMORY_PER_BLOCK_OPTIN = 232448
        MAX_SHARED_MEMORY_PER_MULTIPROCESSOR = 233472
        RESERVED_SHARED_MEMORY_PER_BLOCK = 1024
        MAX_REGISTERS_PER_MULTIPROCESSOR = 65536
        MAX_REGISTERS_PER_BLOCK = 65536
        MAX_THREADS_PER_BLOCK = 1024
        MAX_THREADS_PER_MULTI_PROCESSOR = 2048
        MAX_BLOCKS_PER_MULTIPROCESSOR = 32
        L2_CACHE_SIZE = 52428800
        MEMORY_CLOCK_RATE = 2619000        # kHz
        GLOBAL_MEMORY_BUS_WIDTH = 5120     # bits

    prof = planning.profile_from_numba_device(FakeDevice())
    assert prof.name == "NVIDIA H100 80GB HBM3" and prof.compute_capability == (9, 0)
    assert prof.mem_bandwidth == pytest.approx(3.352e12, rel=1e-3)
    same = dataclasses.replace(prof, name="H100", mem_bandwidth=3.35e12)
    assert same == PROFILES["H100"]


NO_DEVICE = textwrap.dedent("""
    import os
    from gpurnn import planning as planmod
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        print("PROFILE", planmod.device_profile(None).name)
    else:
        from numba import cuda
        if cuda.is_available():
            print("PROFILE", planmod.device_profile(None).name)
        else:
            try:
                planmod.plan("lstm", 8, 8, 1)
            except RuntimeError as e:
                print("ERROR", e)
""")


@pytest.mark.parametrize("sim", [False, True])
def test_current_device_in_a_subprocess(sim):
    # device=None imports numba.cuda, which fixes the simulator mode: never in this process.
    pytest.importorskip("numba.cuda", reason="numba-cuda is not installed")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    if sim:
        env["NUMBA_ENABLE_CUDASIM"] = "1"
    r = subprocess.run([sys.executable, "-c", NO_DEVICE], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    if sim:
        assert r.stdout.strip() == "PROFILE sim"
    elif r.stdout.startswith("ERROR"):
        assert "pass a profile name" in r.stdout and "'H100'" in r.stdout
    else:
        assert r.stdout.startswith("PROFILE "), r.stdout


def test_persistent_plan_uses_the_layout_model():
    p = plan("lstm", 256, 512, 8, device="H100")
    assert p.path == "persistent"
    assert (p.blocks, p.units_per_block, p.threads) == (128, 4, 256)
    # weights 4*4 rows of 514 (512 padded: 2 lanes per dot product, layout.padded_row)
    # + h 8*512 + pre-activations 8*4*4 + partial sums 256, in float32
    assert p.smem_bytes_fwd == smem_bytes("fwd", 4, 512, 8, 4, 4, threads=256) == 50816
    assert p.smem_bytes_bwd == smem_bytes("bwd", 4, 512, 8, 4, 4, threads=256)
    assert p.max_cooperative_blocks == 132 and p.blocks_per_sm == 1
    text = str(p)
    assert "persistent, 128 blocks x 256 threads, 4 units per block" in text
    assert "opt-in limit of H100" in text and "cuKernelSetAttribute" in text
    assert p.batch_tile == 8 and p.persistent_fits
    assert len(text.splitlines()) == 1 + len(p.reasons)


def test_stepwise_plan_says_which_limit_failed_and_by_how_much():
    p = plan("lstm", 256, 2048, 8, device="H100")
    assert p.path == "stepwise"
    fwd_over = p.smem_bytes_fwd - 227 * KB
    assert any(r.startswith("forward needs") and f"{fwd_over:,} B" in r and "over the" in r
               for r in p.reasons), p.reasons
    assert any(r.startswith("backward needs") for r in p.reasons)
    assert "stepwise" in str(p).splitlines()[0]
    assert p.stepwise_grid == -(-8 * 2048 // 256)


def test_batch_is_tiled_so_it_never_pushes_a_layer_off_chip():
    whole = plan("gru", 64, 768, 1, device="A100")
    big = plan("gru", 64, 768, 64, device="A100")
    assert whole.persistent_fits and whole.batch_tile == 1
    assert big.persistent_fits and 1 <= big.batch_tile < 64
    assert any(f"tiles of {big.batch_tile} rows" in r for r in big.reasons)
    assert max(big.smem_bytes_fwd, big.smem_bytes_bwd) <= 163 * KB
    # a tile one row larger would not fit
    over = plan("gru", 64, 768, 64, device="A100", batch_tile=big.batch_tile + 1)
    assert not over.persistent_fits and over.path == "stepwise"
    forced = plan("gru", 64, 768, 64, device="A100", batch_tile=3)
    assert forced.path == "persistent" and forced.batch_tile == 3
    assert "batch_tile=3 forced by the caller" in forced.reasons
    with pytest.raises(ValueError, match=r"batch_tile must be <= batch \(4\); got 5"):
        plan("gru", 64, 768, 4, device="A100", batch_tile=5)


@pytest.mark.parametrize("batch", [1, 2, 8, 16, 32, 48, 64])
def test_h1024_lstm_fits_persistent_on_h100_at_every_batch(batch):
    p = plan("lstm", 1024, 1024, batch, device="H100")
    assert p.persistent_fits, p


def test_step_time_model_picks_the_faster_path_and_prints_both():
    small = plan("lstm", 256, 512, 1, device="H100")
    large = plan("lstm", 1024, 1024, 64, device="H100")
    for p in (small, large):
        pers, step = p.predicted["persistent"], p.predicted["stepwise"]
        assert all(t.total > 0 for t in pers + step)
        faster = "persistent" if sum(t.total for t in pers) <= sum(t.total for t in step) else "stepwise"
        assert p.path == faster
        assert any(r.startswith("step-time model (unmeasured): persistent") for r in p.reasons)
    assert small.path == "persistent" and large.path == "stepwise"
    # forcing the grid keeps the persistent path whatever the model says
    assert plan("lstm", 1024, 1024, 64, device="H100", blocks=128).path == "persistent"
    # the simulator has no timing: fit alone decides
    assert plan("lstm", 4, 7, 3, device="sim").predicted is None


AWKWARD_H = (1, 7, 33, 59, 97, 131, 132, 133, 264, 1151)


@pytest.mark.parametrize("device", ["H100", "A100", "RTX4090", "sim"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_relu"])
def test_auto_grid_has_no_empty_block_and_minimal_slices(device, cell):
    dev = planning.device_profile(device)
    for h in AWKWARD_H:
        for b in (1, 3, 8):
            p = plan(cell, 16, h, b, device=dev)
            if p.path != "persistent":
                continue
            assert p.units_per_block == -(-h // p.blocks)
            assert -(-h // p.units_per_block) == p.blocks, (h, b)   # no block left without units
            assert p.blocks <= min(h, p.max_cooperative_blocks)
            if h <= dev.sm_count:
                assert p.units_per_block == 1


@pytest.mark.parametrize("device", ["H100", "A100", "RTX4090", "sim"])
def test_never_a_cooperative_grid_above_the_limit(device):
    dev = planning.device_profile(device)
    for h in AWKWARD_H:
        for threads in (32, 256, 1024):
            for blocks in (None, 1, 5, dev.sm_count, dev.sm_count + 1, 4 * dev.sm_count, 5000):
                if blocks is not None and blocks > h:
                    continue
                for regs in (None, 32):
                    p = plan("lstm", 16, h, 2, device=dev, blocks=blocks, threads=threads,
                             regs_per_thread=regs)
                    if p.path != "persistent":
                        continue
                    resident = p.blocks_per_sm
                    assert p.blocks <= p.max_cooperative_blocks == resident * dev.sm_count
                    assert resident * (max(p.smem_bytes_fwd, p.smem_bytes_bwd)
                                       + dev.smem_reserved_per_block) <= dev.smem_per_sm
                    assert resident * threads <= dev.max_threads_per_sm
                    assert resident <= dev.max_blocks_per_sm
                    assert max(p.smem_bytes_fwd, p.smem_bytes_bwd) <= dev.smem_per_block_optin


def test_explicit_blocks():
    p = plan("lstm", 8, 100, 2, device="H100", blocks=7)
    assert p.path == "persistent" and (p.blocks, p.units_per_block) == (7, 15)
    assert "blocks=7 forced by the caller" in p.reasons
    idle = plan("lstm", 8, 10, 1, device="H100", blocks=6)
    assert idle.blocks == 6 and idle.units_per_block == 2
    assert any("1 of the 6 blocks owns no unit" in r for r in idle.reasons)
    too_many = plan("lstm", 8, 1024, 1, device="H100", blocks=200, threads=320)
    assert too_many.path == "stepwise"
    assert any("cannot be co-resident" in r and "= 132" in r for r in too_many.reasons)
    with pytest.raises(ValueError, match="blocks must be >= 1; got 0"):
        plan("lstm", 8, 64, 1, device="H100", blocks=0)


def test_lower_register_budget_allows_more_resident_blocks():
    base = plan("lstm", 64, 512, 8, device="H100")
    lean = plan("lstm", 64, 512, 8, device="H100", regs_per_thread=64)
    assert base.regs_per_thread == 255 and base.blocks_per_sm == 1
    assert lean.blocks_per_sm > 1 and lean.blocks > base.blocks
    assert lean.units_per_block < base.units_per_block
    with pytest.raises(ValueError, match="regs_per_thread must be <= 255"):
        plan("lstm", 64, 512, 8, device="H100", regs_per_thread=300)


def test_threads_defaults_and_validation():
    assert plan("gru", 8, 64, 1, device="H100").threads == 256
    assert plan("gru", 8, 64, 1, device="sim").threads == 32
    with pytest.raises(ValueError, match="threads must be a multiple of 32 in 32..1024 on H100; got 48"):
        plan("gru", 8, 64, 1, device="H100", threads=48)
    with pytest.raises(ValueError, match="got 2048"):
        plan("gru", 8, 64, 1, device="H100", threads=2048)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(cell="rnn"), ValueError, "rnn_tanh"),
    (dict(cell="LSTM"), ValueError, "cell must be one of"),
    (dict(dtype="int8"), ValueError, "dtype must be one of"),
    (dict(hidden_size=0), ValueError, "hidden_size must be >= 1; got 0"),
    (dict(batch=2.0), TypeError, "batch must be an int; got float"),
    (dict(input_size=True), TypeError, "input_size must be an int"),
])
def test_argument_errors(kwargs, exc, match):
    args = dict(cell="lstm", input_size=8, hidden_size=16, batch=2, dtype="float32", device="H100")
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        plan(**args)


def test_numpy_dtypes_are_accepted():
    np = pytest.importorskip("numpy")
    assert plan("lstm", 8, 16, 2, np.float64, "H100").dtype == "float64"
    assert plan("lstm", 8, 16, 2, np.dtype("float32"), "H100").dtype == "float32"


def test_capacity_is_the_persistent_edge():
    for cell, dtype, device, batch in [("lstm", "float32", "H100", 1), ("gru", "float64", "A100", 8),
                                       ("rnn_tanh", "float32", "sim", 3)]:
        h = capacity(cell, dtype, device, batch=batch)
        assert plan(cell, 8, h, batch, dtype, device).persistent_fits
        edge = plan(cell, 8, h + 1, batch, dtype, device)
        assert not edge.persistent_fits and edge.path == "stepwise"


def test_capacity_numbers_are_sane():
    lstm = capacity("lstm", "float32", "H100", batch=1)
    # docs/design.md §2's weights-only ~1370 ignores that U = ceil(H / 132) is an integer (132 x 10 units), the
    # 1 KB of partial sums (one per thread) and the bank-conflict padding of the weight rows.
    assert 1250 <= lstm <= 1400 and lstm == 1308
    assert capacity("lstm", "float64", "H100") < lstm < capacity("lstm", "bfloat16", "H100")
    assert capacity("lstm", "bfloat16", "H100") / lstm == pytest.approx(1.4, abs=0.05)
    gru = capacity("gru", "float32", "H100")
    assert lstm < gru < capacity("rnn_tanh", "float32", "H100")
    assert capacity("rnn_relu", "float32", "H100") == capacity("rnn_tanh", "float32", "H100")
    assert capacity("lstm", "float32", "A100") < lstm
    assert capacity("lstm", "float32", "RTX4090") < capacity("lstm", "float32", "A100")
    # the batch is staged in tiles: the weights, not B, set the limit
    for batch in (8, 32, 64):
        assert capacity("lstm", "float32", "H100", batch=batch) == lstm
    assert capacity("lstm", "float32", "H200") == lstm     # same SMs and shared memory
    with pytest.raises(ValueError, match="dtype must be one of"):
        capacity("lstm", "int8", "H100")


def test_traffic_model_persistent_vs_stepwise():
    p = plan("lstm", 256, 512, 8, device="H100")
    s, G, H, B, P = 4, 4, 512, 8, p.blocks
    per = step_traffic(p, "persistent")
    stp = step_traffic(p, "stepwise")
    assert step_traffic(p) == per                      # the plan's own path by default
    assert per["flops"] == stp["flops"] == 2 * B * G * H * H + 21 * B * H
    assert (per["launches"], stp["launches"]) == (1, 2)
    assert per["bytes"]["read h_prev (every block)"] == P * B * H * s
    assert stp["bytes"]["gemm read w_hh"] == G * H * H * s == stp["w_hh_bytes"]
    assert stp["w_hh_fits_l2"]
    saving = planning.traffic_saving(p)
    assert saving["dram_bytes"] == G * H * H * s + 2 * B * G * H * s == 4_325_376
    assert saving["global_bytes"] == G * H * H * s + 2 * B * G * H * s - (P - 1) * B * H * s
    assert saving["global_bytes"] == stp["global_bytes"] - per["global_bytes"]
    assert per["dram_bytes"] == sum(v for k, v in per["bytes"].items() if "h_prev" not in k) + B * H * s
    assert stp["dram_bytes"] == stp["global_bytes"]
    inference = step_traffic(p, "persistent", training=False)
    assert per["dram_bytes"] - inference["dram_bytes"] == B * 4 * H * s   # the reserve gates
    assert step_floor_seconds(p) == pytest.approx(per["dram_bytes"] / 3.35e12)
    assert step_floor_seconds(p, "stepwise") > 10 * step_floor_seconds(p)


def test_traffic_model_cell_details_and_errors():
    rnn = step_traffic(plan("rnn_tanh", 8, 256, 4, device="H100"))
    assert "write reserve gates" not in rnn["bytes"] and "read c_prev" not in rnn["bytes"]
    gru = step_traffic(plan("gru", 8, 256, 4, device="H100"))
    assert gru["bytes"]["read b_hh"] == 3 * 256 * 4
    assert gru["bytes"]["write reserve gates"] == 4 * 4 * 256 * 4    # r, z, n, hn
    p = plan("lstm", 8, 64, 1, device="H100")
    with pytest.raises(ValueError, match="path must be"):
        step_traffic(p, "fused")
    blind = dataclasses.replace(p, device=dataclasses.replace(p.device, mem_bandwidth=None))
    with pytest.raises(ValueError, match="has no mem_bandwidth"):
        step_floor_seconds(blind)


def test_device_profile_str_is_readable():
    text = str(PROFILES["H100"])
    assert "132 SMs" in text and "227 KB opt-in" in text and "3.35 TB/s" in text
    assert isinstance(PROFILES["sim"], DeviceProfile)


def test_gpurnn_plan_is_the_planning_function():
    # a plain function: importing every planning module leaves it in place
    import gpurnn
    import gpurnn.planning.choose
    import gpurnn.planning.cost
    import gpurnn.planning.traffic  # noqa: F401
    assert gpurnn.plan is planning.plan is gpurnn.planning.choose.plan
    p = gpurnn.plan("gru", 8, 64, 1, device="A100")
    assert isinstance(p, planning.Plan) and p.path == "persistent"
    assert planning.capacity("gru", "float32", "A100") > 64


def test_one_flop_model_counts_every_cell():
    assert set(planning.POINTWISE_FLOPS) == set(ALL_CELLS)
    # counted off the cell equations (planning/cost.py): LSTM 4 gates x (3 sums + activation)
    # + f*c + i*g + o*tanh(c); GRU r, z (3 sums + sigmoid each), n (3 sums, r*, tanh), the
    # update (1-z)*n + z*h; RNN 3 sums + activation; peepholes a product and a sum each; CIFG
    # 3 gates and f = 1 - i
    assert planning.POINTWISE_FLOPS == {"lstm": 21, "gru": 17, "rnn_tanh": 4, "rnn_relu": 4,
                                        "lstm_peephole": 27, "cifg": 18, "cifg_peephole": 22}
    T, B, I, H = 10, 2, 3, 5
    for cell in ALL_CELLS:
        G, P = GATES[cell], planning.POINTWISE_FLOPS[cell]
        assert planning.step_flops(cell, B, H) == 2 * B * G * H * H + P * B * H
        fwd = planning.layer_flops(cell, T, B, I, H)
        assert fwd == T * (2 * B * G * H * (I + H) + P * B * H)
        assert planning.layer_flops(cell, T, B, I, H, backward=True) == 3 * fwd
    from gpurnn import bench
    case = bench.Case("gru", "fwdbw", T, B, I, H)
    assert bench.flops(case) == planning.layer_flops("gru", T, B, I, H, backward=True)


def test_import_gpurnn_stays_light():
    # importing numba.cuda would fix the process to hardware or simulator mode; torch is optional
    code = "import sys, gpurnn; print(sorted(m for m in ('numba.cuda', 'torch', 'cupy') if m in sys.modules))"
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_bench_reports_measured_over_the_step_time_model():
    from gpurnn import bench
    from gpurnn.commands.bench import format_table
    for mode in ("fwd", "fwdbw"):
        case = bench.Case("lstm", mode, 50, 8, 256, 512)
        p = plan("lstm", 256, 512, 8, device="H100")
        steps = p.predicted_step(None, "fwd").total + (
            p.predicted_step(None, "bwd").total if mode == "fwdbw" else 0.0)
        assert bench.model_seconds(case, "gpurnn-cuda", "H100") == pytest.approx(50 * steps)
        stepwise = p.predicted_step("stepwise", "fwd").total
        assert bench.model_seconds(case, "gpurnn-cuda-stepwise", "H100") >= 50 * stepwise
        assert bench.model_seconds(case, "torch-cudnn", "H100") is None
        assert bench.model_seconds(case, "gpurnn-numpy", "H100") is None
    row = {"case": "c", "impl": "gpurnn-cuda", "median_s": 2e-4, "tokens_per_s": 1.0,
           "gflops": 1.0, "times_model": 1.25}
    table = format_table([row, dict(row, impl="torch-cudnn", times_model=None)])
    assert "measured/model" in table.splitlines()[0] and "1.25" in table.splitlines()[1]


def test_the_lstm_variants_kernel_cells_are_planned():
    # cifg keeps 3 gates of W_hh in shared memory, the peephole cells 4 / 3 like their base:
    # the peephole vectors are global-memory reads and set no capacity
    for dev in ("H100", "A100"):
        lstm = capacity("lstm", "float32", dev)
        assert capacity("lstm_peephole", "float32", dev) == lstm
        assert capacity("cifg", "float32", dev) == capacity("cifg_peephole", "float32", dev)
        assert capacity("cifg", "float32", dev) == capacity("gru", "float32", dev) > lstm
    p = plan("cifg", 64, 512, 8, "float32", "H100")
    assert p.gates == 3 and p.path == "persistent"
    assert p.smem_bytes_fwd == smem_bytes("fwd", 3, 512, p.batch_tile, p.units_per_block, 4,
                                          threads=p.threads)
    # the peephole loads: in the model's staging, and in the traffic (B*n*H*s loads, the
    # (n*H*s) vector once in DRAM)
    q = plan("lstm_peephole", 64, 512, 8, "float32", "H100")
    base = plan("lstm", 64, 512, 8, "float32", "H100")
    assert (q.predicted_step("persistent").parts["staging"]
            > base.predicted_step("persistent").parts["staging"])
    tq, tb = step_traffic(q, "persistent"), step_traffic(base, "persistent")
    assert tq["bytes"]["read peephole weights"] == 8 * 3 * 512 * 4
    assert tq["global_bytes"] - tb["global_bytes"] == 8 * 3 * 512 * 4
    assert tq["dram_bytes"] - tb["dram_bytes"] == 3 * 512 * 4
    tc = step_traffic(plan("cifg", 64, 512, 8, "float32", "H100"), "persistent")
    assert tc["bytes"]["read c_prev"] == tc["bytes"]["write c_t"] == 8 * 512 * 4
    assert tc["bytes"]["read gx_t"] == 8 * 3 * 512 * 4


def test_the_regularisers_mask_reads_are_counted():
    # zoneout masks: B*H compute words each; recurrent dropout: every block's staged h is masked
    # (P*B*H mask reads) and the update re-reads its own units' unmasked h; stepwise: one more
    # elementwise kernel. Shared memory, capacity and the path's grid are unchanged.
    H, B = 256, 8
    base = plan("lstm", 8, H, B, "float16", device="H100")
    p = plan("lstm", 8, H, B, "float16", device="H100",
             noise={"recurrent": None, "zoneout_h": None, "zoneout_c": None})
    assert p.noise == ("recurrent", "zoneout_c", "zoneout_h") and base.noise == ()
    assert (p.blocks, p.smem_bytes_fwd, p.smem_bytes_bwd) == (base.blocks, base.smem_bytes_fwd,
                                                              base.smem_bytes_bwd)
    m = 4                                        # float32 masks for float16 storage
    per, per0 = step_traffic(p, "persistent"), step_traffic(base, "persistent")
    assert per["bytes"]["read zoneout masks"] == 2 * B * H * m
    assert per["bytes"]["read recurrent mask (every block)"] == p.blocks * B * H * m
    assert per["bytes"]["read h_prev (unmasked, own units)"] == B * H * 2
    assert per["global_bytes"] - per0["global_bytes"] == (2 + p.blocks) * B * H * m + B * H * 2
    assert per["dram_bytes"] - per0["dram_bytes"] == 3 * B * H * m
    stp, stp0 = step_traffic(p, "stepwise"), step_traffic(base, "stepwise")
    assert stp["launches"] == stp0["launches"] + 1
    assert stp["global_bytes"] - stp0["global_bytes"] == 2 * B * H * m + B * H * (2 + 2 * m)
    # the same counts from an explicit argument, and none with noise=()
    assert step_traffic(base, "persistent", noise=p.noise) == per
    assert step_traffic(p, "persistent", noise=()) == per0
    for path in ("persistent", "stepwise"):
        for d in ("fwd", "bwd"):
            assert p.predicted_step(path, d).total > base.predicted_step(path, d).total
    with pytest.raises(ValueError, match="unknown keys"):
        plan("lstm", 8, H, B, device="H100", noise={"dropout": None})
