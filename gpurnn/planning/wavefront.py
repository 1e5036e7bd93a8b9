"""The layer wavefront's plan (kernels: gpurnn/kernels/wavefront.py, whose smem_bytes is the one
shared-memory model): does the whole stack fit, with how many blocks per layer, and is it
predicted faster than per-layer launches.

Capacity. The wavefront keeps the WHOLE stack's recurrent weights in shared memory at once,
spread over L*P blocks: each block holds, for its U = ceil(H/P) units, its layer's W_hh rows
and (layers > 0) its W_ih rows (2*G*U*H weights, rows padded), backward the matching columns
(W_hh of its layer and W_ih of the layer above). So the stack needs about 2*L*G*H*H weights
resident (layer 0's W_ih is a host GEMM, but its blocks allocate the same layout), against
one layer's G*H*H for a per-layer launch: the grid of L*P blocks must be co-resident, with
every block's shared memory within the opt-in limit. fit() searches P (the largest P <= H
with L*P co-resident, i.e. the smallest slice per block) and the batch tile (whole batch
first, then the largest tile that fits), as gpurnn.planning.capacity does for one layer.

Time (planning.cost, a model until a GPU measures it). Per-layer launches: L*T steps of the
per-layer plan (its chosen path, persistent or stepwise, fwd and bwd), plus the input GEMMs of
layers 1..L-1 (layer l's Gx = y_{l-1} W_ih^T, one GEMM each, at max(FLOPs / peak, bytes /
bandwidth)) and one launch per layer and direction. Wavefront: T+L-1 forward stages and T+L
backward stages (the dh0 tail), each about one persistent step of the busiest SM with
n = ceil(L*P / SMs) blocks on it, the input product doubling the multiply-adds and the
staging (planning.cost.persistent_step's parts, the FMA / shared-memory / staging terms
doubled), plus one grid barrier. choose() runs the wavefront where it fits and the model
predicts it faster per sequence (forward + backward), and says why. Not modelled: the same
as planning.cost (occupancy inside a step, tensor cores, clocks), and the layer-0 input GEMM
and the weight-gradient GEMMs (the same both ways).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Optional

from ..cells import GATES, RESERVE_GATES
from ..kernels import wavefront as kernels
from ..kernels.dtypes import ITEMSIZE
from ..kernels.layout import units_per_block
from . import cost, family
from .capacity import check_int, kb, resident_limit, resolve
from .profiles import DeviceProfile, device_profile


@dataclass(frozen=True)
class WavefrontFit:
    """One wavefront configuration and whether it can launch."""
    cell: str
    hidden: int
    batch: int
    layers: int
    dtype: str
    device: DeviceProfile
    blocks_per_layer: int           # P
    threads: int
    units: int                      # U = ceil(H / P)
    batch_tile: int
    smem_fwd: int
    smem_bwd: int
    per_sm: int                     # resident blocks per SM at this shared memory
    coop: int                       # SMs x per_sm
    fits: bool
    reasons: tuple = field(default=())

    @property
    def blocks(self) -> int:
        return self.layers * self.blocks_per_layer

    @property
    def smem(self) -> int:
        return max(self.smem_fwd, self.smem_bwd)


def _one(cell, H, B, L, dtype, dev, threads, cap, P, tile):
    U = units_per_block(H, P)
    fwd = kernels.smem_bytes("fwd", GATES[cell], H, tile, U, dtype, threads=threads)
    bwd = kernels.smem_bytes("bwd", GATES[cell], H, tile, U, dtype, threads=threads)
    per_sm = family.per_sm(cap, dev, fwd, bwd)
    return P, U, tile, fwd, bwd, per_sm, per_sm * dev.sm_count


def _ok(row, L, dev):
    P, U, tile, fwd, bwd, per_sm, coop = row
    return max(fwd, bwd) <= dev.smem_per_block_optin and L * P <= coop


@functools.lru_cache(maxsize=512)
def _search(cell, H, B, L, dtype, dev, threads, cap, blocks, tile):
    tiles = [tile] if tile is not None else sorted({B, *(B >> i for i in range(1, 12))} - {0},
                                                   reverse=True)
    if blocks is not None:
        cands = [blocks]
    else:
        top = min(H, max(1, dev.sm_count * max(cap, 1) // L))
        cands = range(top, 0, -1)
    first = None
    for t in tiles:
        for P in cands:
            row = _one(cell, H, B, L, dtype, dev, threads, cap, P, t)
            P_used = -(-H // row[1]) if blocks is None else P     # no empty block unless forced
            if P_used != P:
                continue
            if _ok(row, L, dev):
                return row, True
            if first is None:
                first = row
    if first is None:
        first = _one(cell, H, B, L, dtype, dev, threads, cap, cands[-1] if blocks else 1,
                     tiles[-1])
    return first, False


def fit(cell, hidden, batch, layers, dtype="float32", device="H100", *, blocks=None,
        threads=None, batch_tile=None, regs_per_thread=None) -> WavefrontFit:
    """The wavefront's configuration for L = layers layers of `cell` (kernels.WAVEFRONT_CELLS:
    lstm, gru, rnn_tanh, rnn_relu, lstm_peephole, cifg, cifg_peephole), or the attempt that
    shows why none fits (fits False, reasons)."""
    if cell not in kernels.WAVEFRONT_CELLS:
        raise ValueError(f"cell must be one of {kernels.WAVEFRONT_CELLS}; got {cell!r}")
    check_int("hidden", hidden)
    check_int("layers", layers)
    dtype, dev, nthreads, regs = resolve(cell, batch, dtype, device, threads, regs_per_thread)
    family.check_forced(batch, blocks, batch_tile)
    cap = resident_limit(nthreads, regs, dev)
    row, ok = _search(cell, hidden, batch, layers, dtype, dev, nthreads, cap, blocks, batch_tile)
    P, U, tile, fwd, bwd, per_sm, coop = row
    reasons = []
    limit = dev.smem_per_block_optin
    G = GATES[cell]
    if blocks is not None:
        reasons.append(f"blocks={blocks} per layer forced by the caller")
    if ok and regs < kernels.REGS_MAX:
        ok = False
        reasons.append(f"{nthreads} threads per block leave {regs} registers per thread; the "
                       f"wavefront kernels use up to {kernels.REGS_MAX} (at most "
                       f"{dev.regs_per_block // kernels.REGS_MAX // 32 * 32} threads per block)")
    elif ok:
        w = 2 * G * U * hidden * ITEMSIZE[dtype]
        reasons.append(f"{layers} layers x P={P} blocks = {layers * P} blocks <= cooperative "
                       f"limit {coop} ({per_sm} resident per SM x {dev.sm_count} SMs)")
        reasons.append(f"each block keeps W_hh and W_ih slices of U={U} units ({kb(w)}); "
                       f"forward {kb(fwd)}, backward {kb(bwd)} per block within the {kb(limit)} "
                       f"opt-in limit; batch tile {tile} of {batch}")
    else:
        if max(fwd, bwd) > limit:
            reasons.append(f"at P={P} (U={U}) a block needs {kb(max(fwd, bwd))} of shared "
                           f"memory, over the {kb(limit)} opt-in limit of {dev.name}")
        if layers * P > coop:
            reasons.append(f"{layers} layers x P={P} = {layers * P} blocks cannot be "
                           f"co-resident (at most {per_sm} per SM x {dev.sm_count} SMs = {coop})")
        if not reasons or (blocks is not None and len(reasons) == 1):
            reasons.append(f"the stack's weights (about {2 * layers} x {G}H x H) do not fit in "
                           f"the shared memory of any co-resident grid on {dev.name}")
    return WavefrontFit(cell=cell, hidden=hidden, batch=batch, layers=layers, dtype=dtype,
                        device=dev, blocks_per_layer=P, threads=nthreads, units=U,
                        batch_tile=tile, smem_fwd=fwd, smem_bwd=bwd, per_sm=per_sm, coop=coop,
                        fits=ok, reasons=tuple(reasons))


def capacity(cell, layers, dtype="float32", device="H100", batch=1, *, threads=None) -> int:
    """The largest H the wavefront of `layers` layers fits on `device` (0 if none)."""
    return family.largest(lambda h: fit(cell, h, batch, layers, dtype, device,
                                        threads=threads).fits)


def stage_time(direction, f: WavefrontFit, timing) -> cost.StepTime:
    """One wavefront stage ('fwd' or 'bwd'): cost.persistent_step of the busiest SM (L*P blocks
    over the SMs) with the multiply-adds and staging doubled where a layer also forms its input
    product (L > 1), plus its one grid barrier."""
    itemsize = ITEMSIZE[f.dtype]
    st = cost.persistent_step(direction, GATES[f.cell], f.hidden, f.batch, itemsize, f.blocks,
                              f.units, f.batch_tile, RESERVE_GATES[f.cell], f.device, timing)
    k = 2 if f.layers > 1 else 1
    parts = {"fma": k * st.parts["fma"], "smem": k * st.parts["smem"],
             "staging": k * st.parts["staging"], "barriers": st.parts["barriers"]}
    return cost.StepTime(max(parts["fma"], parts["smem"]) + parts["staging"] + parts["barriers"],
                         parts)


def _gemm_time(m, n, k, itemsize, dev, timing):
    peak = dev.sm_count * timing.fma_per_clk_sm[itemsize] * 2 * timing.clock_hz
    dram = dev.mem_bandwidth or timing.l2_bytes_per_clk * timing.clock_hz / 3
    return max(2 * m * n * k / peak, (m * k + k * n + m * n) * itemsize / dram)


@dataclass(frozen=True)
class Choice:
    """wavefront or per-layer launches for one stack, and why (predicted seconds per
    sequence: forward, and forward + backward)."""
    choice: str                     # "wavefront" | "per_layer"
    fit: WavefrontFit
    per_layer_path: str             # the per-layer plan's path
    wavefront_s: Optional[tuple]    # (fwd, fwd+bwd) seconds per sequence; None if no timing
    per_layer_s: Optional[tuple]
    reasons: tuple

    def __str__(self):
        return family.explained(f"{self.choice}", self.reasons)


def predict(cell, input_size, hidden, batch, layers, steps, dtype="float32", device="H100", *,
            threads=None, dropout=0.0):
    """(fit, per-layer plan of layer 1.., wavefront (fwd, fwd+bwd), per-layer (fwd, fwd+bwd))
    predicted seconds per sequence of `steps` steps; the times are None without a timing."""
    from .choose import plan as layer_plan
    dev = device_profile(device)
    f = fit(cell, hidden, batch, layers, dtype, dev, threads=threads)
    timing = cost.timing_for(dev)
    p0 = layer_plan(cell, input_size, hidden, batch, dtype, dev, threads=threads)
    pu = layer_plan(cell, hidden, hidden, batch, dtype, dev, threads=threads)
    if timing is None:
        return f, pu, None, None
    itemsize = ITEMSIZE[f.dtype]
    G = GATES[cell]
    per = []
    for d in ("fwd", "bwd"):
        step = (p0.predicted_step(direction=d).total
                + (layers - 1) * pu.predicted_step(direction=d).total)
        per.append(steps * step + layers * timing.launch_s)
    # layers 1..L-1: Gx = y W_ih^T forward; dx = dgx W_ih backward (the same size)
    gemm = (layers - 1) * _gemm_time(steps * batch, G * hidden, hidden, itemsize, dev, timing)
    per_layer = (per[0] + gemm, per[0] + per[1] + 2 * gemm)
    wave = None
    if f.fits:
        fw = (steps + layers - 1) * stage_time("fwd", f, timing).total + timing.launch_s
        bw = (steps + layers) * stage_time("bwd", f, timing).total + timing.launch_s
        wave = (fw, fw + bw)
    return f, pu, wave, per_layer


def choose(cell, input_size, hidden, batch, layers, steps, dtype="float32", device="H100", *,
           threads=None, dropout=0.0) -> Choice:
    """The wavefront where it can run (no dropout between layers, the stack fits) and the model
    predicts it faster per sequence (forward + backward); per-layer launches otherwise."""
    f, pu, wave, per = predict(cell, input_size, hidden, batch, layers, steps, dtype, device,
                               threads=threads)
    reasons = list(f.reasons)
    choice = "per_layer"
    if dropout:
        reasons.append(f"dropout={dropout} between layers: the wavefront has none, so "
                       f"per-layer launches run")
    elif not f.fits:
        reasons.append("the stack does not fit the wavefront: per-layer launches run")
    elif wave is None:
        choice = "wavefront"
        reasons.append("no timing on this profile (the simulator): the wavefront runs since it "
                       "fits")
    else:
        line = (f"model (unmeasured), per sequence of T={steps}: wavefront "
                f"{wave[1] * 1e6:.1f} us fwd+bwd ({wave[0] * 1e6:.1f} fwd, {steps + layers - 1} "
                f"stages), per-layer {per[1] * 1e6:.1f} us ({per[0] * 1e6:.1f} fwd, "
                f"{layers} x {steps} steps of the {pu.path} path)")
        if wave[1] < per[1]:
            choice = "wavefront"
            line += "; the wavefront is predicted faster"
        else:
            line += "; per-layer launches are predicted faster"
        reasons.append(line)
    return Choice(choice=choice, fit=f, per_layer_path=pu.path, wavefront_s=wave,
                  per_layer_s=per, reasons=tuple(reasons))


def table(device="H100", steps=128, cell="lstm", dtype="float32", layers=(2, 4),
          hiddens=(256, 512), batches=(1, 8, 64), input_size=None) -> str:
    """The predicted microseconds per sequence (T = steps, forward + backward, and forward)
    of the wavefront and of per-layer launches on `device`:
    `python -c "from gpurnn.planning import wavefront; wavefront.print_table()"`."""
    lines = [f"{cell} {dtype} on {device}, T={steps}, predicted us per sequence "
             f"(model, unmeasured): fwd+bwd (fwd)",
             f"{'L':>2} {'H':>5} {'B':>4} {'P/layer':>8} {'wavefront':>20} {'per-layer':>20} "
             f"{'choice':>10}"]
    for L in layers:
        for H in hiddens:
            for B in batches:
                c = choose(cell, input_size or H, H, B, L, steps, dtype, device)
                w = ("does not fit" if c.wavefront_s is None
                     else f"{c.wavefront_s[1] * 1e6:9.1f} ({c.wavefront_s[0] * 1e6:7.1f})")
                p = f"{c.per_layer_s[1] * 1e6:9.1f} ({c.per_layer_s[0] * 1e6:7.1f})"
                pl = c.fit.blocks_per_layer if c.fit.fits else "-"
                lines.append(f"{L:>2} {H:>5} {B:>4} {pl!s:>8} {w:>20} {p:>20} {c.choice:>10}")
    return "\n".join(lines)


def print_table(device="H100", steps=128, **kwargs) -> None:
    """Print table(): LSTM L = 2/4, H = 256/512, B = 1/8/64 on the H100 profile by default."""
    print(table(device, steps, **kwargs))


__all__ = ["WavefrontFit", "fit", "capacity", "stage_time", "predict", "choose", "Choice",
           "table", "print_table"]
