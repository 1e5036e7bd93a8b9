"""The step-time model for both paths — a model until a GPU measures it (`gpurnn bench` prints
measured over predicted, so the first GPU run calibrates it) — and the FLOP model every rate
gpurnn reports is computed from (gpurnn.bench's GFLOP/s, step_traffic's flops).

Persistent step (forward or backward, the busiest SM; `n` = ceil(P / SMs) blocks on it):
    max(FMA time, shared-memory read time) + staging + barriers
  FMA time     n * MACs per block / (FMA per clock per SM * clock)
  shared reads every multiply-add reads a weight and an activation (h forward, a gate gradient
               backward) from shared memory: 2 loads per MAC, a warp-wide load serving 32 of
               them per clock (64-bit loads take two), so n * 2 * MACs * words / 32 / clock
  staging      the block's tiles of h (B*H) or gate gradients (B*G*H) from L2, at the SM's
               share of L2 bandwidth, plus the step's reserve writes and, for the peephole
               cells, the peephole weights each (row, unit) reads (n = 3 or 2 per unit,
               gpurnn.cells.PEEPHOLES; global loads, not shared memory: they set no capacity)
  barriers     one grid barrier (latency: the device profile's grid_sync_s) + the block
               barriers of every batch tile (block_sync_s each)
  noise        the regularisers' masks (gpurnn/layernorm.py; compute-dtype words, 4 bytes for
               16-bit storage): each zoneout mask one load per (row, unit) each way; recurrent
               dropout forward one mask load per staged h element (every block stages all of
               h_{t-1}: B*H) plus the unmasked h_{t-1} of its own units re-read for the update,
               backward one mask load per (row, unit)
Stepwise step: one GEMM (h_{t-1} W_hh^T forward, dgh W_hh backward) at max(FLOPs / fp32-or-fp64
peak, bytes / bandwidth — W_hh from L2 when it fits there, else DRAM) + one pointwise kernel
(its bytes at DRAM bandwidth) + two launches (launch_s each). With noise the pointwise kernel
also reads each zoneout mask (B*H) and, backward, the recurrent mask; forward the recurrent mask
is applied to h_{t-1} by one more elementwise kernel before the GEMM (a launch, and reading h
and the mask, writing the masked copy).
Not modelled: occupancy and latency hiding inside a step, bank conflicts (the kernels pad rows
to avoid them), tensor cores (CuPy's fp32 GEMM does not use TF32 by default), clock changes
under load, and the input GEMM / weight-gradient GEMMs (the same for both paths).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..cells import GATES

# Sources of the timing parameters (peak clocks and per-SM FMA rates reproduce the vendors'
# published peak FLOP/s: H100 SXM 132 SMs x 128 FP32 FMA x 2 x 1.98 GHz = 66.9 TFLOP/s, FP64
# 33.5; A100 SXM 108 x 64 x 2 x 1.41 GHz = 19.5 TFLOP/s, FP64 9.7; RTX 4090 128 x 128 x 2 x
# 2.52 GHz = 82.6 TFLOP/s).
L2_SOURCE = ("A100 whitepaper: L2 read bandwidth 5120 B/clk; assumed the same per clock on the "
             "other profiles (not measured)")
GRID_SYNC_SOURCE = ("published grid-sync microbenchmarks put one cooperative grid barrier at "
                    "~0.7-1 us on recent GPUs (e.g. Zhang et al., 'A Study of Single and "
                    "Multi-device Synchronization Methods in Nvidia GPUs', IPDPS 2020); 0.8 us "
                    "is the prior until gpurnn bench measures it")
LAUNCH_SOURCE = ("assumed 2.5 us per dependent kernel launch on one stream (typical host "
                 "launch overhead; not measured here)")


@dataclass(frozen=True)
class Timing:
    """A device's timing parameters for the step model."""
    clock_hz: float
    fma_per_clk_sm: dict         # itemsize -> FMAs per clock per SM (2 = fp16 storage, fp32 math)
    l2_bytes_per_clk: float
    grid_sync_s: float = 0.8e-6
    block_sync_s: float = 0.02e-6
    launch_s: float = 2.5e-6


_HOPPER = Timing(clock_hz=1.98e9, fma_per_clk_sm={2: 128, 4: 128, 8: 64}, l2_bytes_per_clk=5120)
TIMINGS = {
    "H100": _HOPPER,
    "H200": _HOPPER,
    "A100": Timing(clock_hz=1.41e9, fma_per_clk_sm={2: 64, 4: 64, 8: 32}, l2_bytes_per_clk=5120),
    "A100-80GB": Timing(clock_hz=1.41e9, fma_per_clk_sm={2: 64, 4: 64, 8: 32},
                        l2_bytes_per_clk=5120),
    "RTX4090": Timing(clock_hz=2.52e9, fma_per_clk_sm={2: 128, 4: 128, 8: 2},
                      l2_bytes_per_clk=5120),
}
# FP32 FMA units per SM by compute capability major (FP64: the ratio to FP32) for devices
# read off the driver.
_FMA_BY_CC = {7: (64, 0.5), 8: (64, 0.5), 9: (128, 0.5)}


def timing_for(dev, clock_hz=None):
    """Timing of a gpurnn.planning DeviceProfile (None for the simulator: it has no timing)."""
    if dev.simulator:
        return None
    if dev.name in TIMINGS:
        return TIMINGS[dev.name]
    fp32, fp64_ratio = _FMA_BY_CC.get(dev.compute_capability[0], (64, 1 / 32))
    if dev.compute_capability in ((8, 6), (8, 9)):
        fp32, fp64_ratio = 128, 1 / 64
    return Timing(clock_hz=clock_hz or 1.5e9,
                  fma_per_clk_sm={2: fp32, 4: fp32, 8: max(1, int(fp32 * fp64_ratio))},
                  l2_bytes_per_clk=5120)


@dataclass(frozen=True)
class StepTime:
    """Predicted seconds of one step, and its parts."""
    total: float
    parts: dict

    def __str__(self):
        parts = ", ".join(f"{k} {v * 1e6:.2f}" for k, v in self.parts.items())
        return f"{self.total * 1e6:.2f} us ({parts})"


def _words(itemsize):
    return 2 if itemsize == 8 else 1


def _noise_keys(noise):
    """The regularisers that are on, as a frozenset of gpurnn.layernorm.NOISE_KEYS."""
    keys = frozenset(noise or ())
    unknown = sorted(keys - {"recurrent", "zoneout_h", "zoneout_c"})
    if unknown:
        raise ValueError(f"noise has unknown keys {unknown}; expected a subset of "
                         f"('recurrent', 'zoneout_h', 'zoneout_c')")
    return keys


def _mask_itemsize(itemsize):
    return max(itemsize, 4)             # the masks are in the compute dtype


def persistent_step(direction, gates, hidden, batch, itemsize, blocks, units, batch_tile,
                    reserve_gates, dev, timing, peepholes=0, *, noise=()) -> StepTime:
    """One persistent step ('fwd' or 'bwd') on the busiest SM; `peepholes`: the peephole
    vectors a (row, unit) reads per step (0, or 3 / 2 for lstm_peephole / cifg_peephole);
    `noise`: the regularisers on (any of 'recurrent', 'zoneout_h', 'zoneout_c')."""
    n = -(-blocks // dev.sm_count)
    macs = batch * gates * units * hidden
    fma = n * macs / (timing.fma_per_clk_sm[itemsize] * timing.clock_hz)
    smem = n * 2 * macs * _words(itemsize) / 32 / timing.clock_hz
    staged = batch * hidden if direction == "fwd" else batch * gates * hidden
    written = batch * units * (reserve_gates + 3 if direction == "fwd" else gates + 2)
    written += batch * units * peepholes        # peephole weight loads, both directions
    keys = _noise_keys(noise)
    masks = batch * units * len(keys & {"zoneout_h", "zoneout_c"})
    if "recurrent" in keys:
        if direction == "fwd":
            masks += batch * hidden             # the staged h's mask
            written += batch * units            # the unmasked h_{t-1} the update reads
        else:
            masks += batch * units
    l2_share = timing.l2_bytes_per_clk * timing.clock_hz / dev.sm_count
    staging = n * ((staged + written) * itemsize + masks * _mask_itemsize(itemsize)) / l2_share
    tiles = -(-batch // batch_tile)
    per_tile = 3 if direction == "fwd" else 2
    barriers = timing.grid_sync_s + tiles * per_tile * timing.block_sync_s
    return StepTime(max(fma, smem) + staging + barriers,
                    {"fma": fma, "smem": smem, "staging": staging, "barriers": barriers})


def stepwise_step(direction, gates, hidden, batch, itemsize, l2_bytes, dev, timing, *,
                  noise=()) -> StepTime:
    """One stepwise step: a GEMM, a pointwise kernel, two launches (with recurrent dropout
    forward, a third: the masked copy of h_{t-1})."""
    peak = dev.sm_count * timing.fma_per_clk_sm[itemsize] * 2 * timing.clock_hz
    w = gates * hidden * hidden * itemsize
    l2_bw = timing.l2_bytes_per_clk * timing.clock_hz
    dram = dev.mem_bandwidth or l2_bw / 3
    w_bw = l2_bw if l2_bytes and w <= l2_bytes else dram
    act = (batch * hidden + batch * gates * hidden) * itemsize
    gemm = max(2 * batch * gates * hidden * hidden / peak, w / w_bw + act / l2_bw)
    pointwise = 4 * batch * gates * hidden * itemsize / dram
    launches = 2 * timing.launch_s
    keys = _noise_keys(noise)
    ms = _mask_itemsize(itemsize)
    masks = batch * hidden * len(keys & {"zoneout_h", "zoneout_c"})
    if "recurrent" in keys:
        if direction == "fwd":
            pointwise += batch * hidden * (itemsize + 2 * ms) / dram    # h * mask -> copy
            launches += timing.launch_s
        else:
            masks += batch * hidden
    pointwise += masks * ms / dram
    return StepTime(gemm + pointwise + launches,
                    {"gemm": gemm, "pointwise": pointwise, "launches": launches})


# FLOPs per (batch row, hidden unit) of one forward step besides the matrix products, counted
# off the cell's equations as gpurnn.cells writes them, not off any implementation (which may
# fold the biases into the input GEMM, or rewrite (1-z)*n + z*h): every +, -, * is one FLOP and
# every sigmoid, tanh and relu is one (one special-function evaluation, as exp is).
#   LSTM  i, f, g, o: x W^T + b_ih + h W^T + b_hh is 3 sums, then the activation: 4 x 4 = 16;
#         c' = f*c + i*g (2 products, 1 sum) 3; h' = o*tanh(c') (tanh, product) 2      = 21
#   GRU   r, z: 3 sums and a sigmoid each, 8; n = tanh(W_in x + b_in + r*(W_hn h + b_hn)):
#         3 sums, 1 product, tanh, 5; h' = (1-z)*n + z*h: 1 difference, 2 products, 1 sum, 4 = 17
#   RNN   act(x W_ih^T + b_ih + h W_hh^T + b_hh): 3 sums and the activation              = 4
# The kernel-only LSTM variants (gpurnn.cells.KERNEL_CELLS, gpurnn.variants):
#   lstm_peephole  LSTM's 21 + w_ci*c, w_cf*c, w_co*c' (a product and a sum each) 6       = 27
#   cifg           i, g, o: 3 x 4 = 12; f = 1 - i 1; c' = f*c + i*g 3; h' 2               = 18
#   cifg_peephole  cifg's 18 + w_ci*c, w_co*c' 4                                           = 22
POINTWISE_FLOPS = {"lstm": 21, "gru": 17, "rnn_tanh": 4, "rnn_relu": 4,
                   "lstm_peephole": 27, "cifg": 18, "cifg_peephole": 22}


def step_flops(cell, batch, hidden):
    """FLOPs of one forward step of the recurrence: the recurrent product h_{t-1} W_hh^T (a
    multiply-add is 2 FLOPs) and the pointwise update (POINTWISE_FLOPS per row and unit)."""
    G = GATES[cell]
    return 2 * batch * G * hidden * hidden + POINTWISE_FLOPS[cell] * batch * hidden


def layer_flops(cell, steps, batch, input_size, hidden, *, backward=False):
    """FLOPs of one layer and direction over `steps` steps: each step's input projection
    x_t W_ih^T (2*B*G*H*I) and step_flops. With backward, 3x that: the backward's products are
    exactly twice the forward's (dgates W_hh per step and dW_hh = dgates^T h, dx = dgates W_ih
    and dW_ih = dgates^T x), and its pointwise work is counted as twice the forward's."""
    G = GATES[cell]
    fwd = steps * (2 * batch * G * hidden * input_size + step_flops(cell, batch, hidden))
    return 3 * fwd if backward else fwd


__all__ = ["Timing", "TIMINGS", "timing_for", "StepTime", "persistent_step", "stepwise_step",
           "POINTWISE_FLOPS", "step_flops", "layer_flops"]
