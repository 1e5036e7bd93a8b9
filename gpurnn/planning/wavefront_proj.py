"""The plan of the projected LSTM's layer wavefront (kernels: gpurnn/kernels/wavefront_proj.py,
whose smem_bytes is the one shared-memory model): does the whole stack of a projected cell
(lstm_proj<R>, lstm_peephole_proj<R>, cifg_proj<R>, cifg_peephole_proj<R>) fit, with how many
blocks per layer, and is it predicted faster than per-layer projection launches.

Capacity, as gpurnn.planning.wavefront: the WHOLE stack's recurrent weights stay in shared
memory at once, over L*P blocks; a block keeps, for its U = ceil(H/P) units and
Q = ceil(R/P) features, its layer's W_hh and (layers > 0) W_ih slices (2*G*U*R weights
forward, 2*Q*G*H backward) and its W_hr slice (Q*H forward, U*R backward), rows padded. The
grid of L*P blocks must be co-resident, every block within the opt-in limit. The search is
planning.wavefront's: the largest P <= H with L*P co-resident and no empty block unless
forced, the whole batch first, then the largest tile that fits.

Time (planning.cost, a model until a GPU measures it). Per-layer launches: L*T steps of
gpurnn.planning.projection's plan (its chosen path, fwd and bwd), the input GEMMs of layers
1..L-1 and one launch per layer and direction. Wavefront: T+L-1 forward and T+L backward stages,
each one projection step (planning.projection.persistent_step: two grid barriers) of the
busiest SM with the L*P blocks over the SMs, plus the input product's multiply-adds and
staging where L > 1. choose() runs the wavefront where it fits and is predicted faster per
sequence (forward + backward), and says why.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

from ..kernels import projection as kproj
from ..kernels import wavefront_proj as kernels
from ..kernels.dtypes import ITEMSIZE
from ..variants import form_of
from . import cost, family
from . import projection as pplan
from .capacity import check_int, kb, resident_limit
from .profiles import DeviceProfile, device_profile
from .wavefront import Choice, _gemm_time


@dataclass(frozen=True)
class ProjWavefrontFit:
    """One wavefront configuration of a projected stack and whether it can launch."""
    cell: str                       # the variant name, e.g. "lstm_proj3"
    hidden: int
    proj: int                       # R
    batch: int
    layers: int
    dtype: str
    device: DeviceProfile
    blocks_per_layer: int           # P
    threads: int
    units: int                      # U = ceil(H / P)
    feats: int                      # Q = ceil(R / P)
    batch_tile: int
    smem_fwd: int
    smem_bwd: int
    per_sm: int
    coop: int
    fits: bool
    reasons: tuple = field(default=())

    @property
    def blocks(self) -> int:
        return self.layers * self.blocks_per_layer

    @property
    def smem(self) -> int:
        return max(self.smem_fwd, self.smem_bwd)


def _form(cell):
    form = form_of(cell)
    if form is None or not form.proj_size or form.multiplicative:
        raise ValueError(f"cell must be a projected LSTM variant (lstm_proj<R>, "
                         f"lstm_peephole_proj<R>, cifg_proj<R>, cifg_peephole_proj<R>); got "
                         f"{cell!r}")
    return form


def _one(G, H, R, dtype, dev, threads, cap, P, tile):
    U, Q = kproj.slices(H, R, P)
    fwd = kernels.smem_bytes("fwd", G, H, R, tile, P, dtype, threads=threads)
    bwd = kernels.smem_bytes("bwd", G, H, R, tile, P, dtype, threads=threads)
    per_sm = family.per_sm(cap, dev, fwd, bwd)
    return P, U, Q, tile, fwd, bwd, per_sm, per_sm * dev.sm_count


def _ok(row, L, dev):
    P, U, Q, tile, fwd, bwd, per_sm, coop = row
    return max(fwd, bwd) <= dev.smem_per_block_optin and L * P <= coop


@functools.lru_cache(maxsize=512)
def _search(G, H, R, B, L, dtype, dev, threads, cap, blocks, tile):
    tiles = [tile] if tile is not None else sorted({B, *(B >> i for i in range(1, 12))} - {0},
                                                   reverse=True)
    cands = [blocks] if blocks is not None else range(
        min(H, max(1, dev.sm_count * max(cap, 1) // L)), 0, -1)
    first = None
    for t in tiles:
        for P in cands:
            row = _one(G, H, R, dtype, dev, threads, cap, P, t)
            if blocks is None and -(-H // row[1]) != P:     # no empty block unless forced
                continue
            if _ok(row, L, dev):
                return row, True
            if first is None:
                first = row
    if first is None:
        first = _one(G, H, R, dtype, dev, threads, cap, cands[-1] if blocks else 1, tiles[-1])
    return first, False


def fit(cell, hidden, batch, layers, dtype="float32", device="H100", *, blocks=None,
        threads=None, batch_tile=None, regs_per_thread=None) -> ProjWavefrontFit:
    """The wavefront's configuration for L = layers layers of the projected `cell` (R from its
    name), or the attempt that shows why none fits (fits False, reasons)."""
    form = _form(cell)
    check_int("hidden", hidden)
    check_int("layers", layers)
    R = form.proj_size
    if R >= hidden:
        raise ValueError(f"proj_size must be < hidden ({hidden}); got {R} (from {cell!r})")
    dtype, dev, nthreads, regs = pplan._resolve(batch, dtype, device, threads, regs_per_thread)
    family.check_forced(batch, blocks, batch_tile)
    cap = resident_limit(nthreads, regs, dev)
    G = form.gates
    row, ok = _search(G, hidden, R, batch, layers, dtype, dev, nthreads, cap, blocks, batch_tile)
    P, U, Q, tile, fwd, bwd, per_sm, coop = row
    limit = dev.smem_per_block_optin
    reasons = family.forced_reasons(blocks, None, " per layer")
    if ok and regs < kernels.REGS_MAX:
        ok = False
        reasons.append(f"{nthreads} threads per block leave {regs} registers per thread; the "
                       f"wavefront projection kernels use up to {kernels.REGS_MAX} (at most "
                       f"{dev.regs_per_block // kernels.REGS_MAX // 32 * 32} threads per block)")
    elif ok:
        w = (2 * G * U * R + Q * hidden) * ITEMSIZE[dtype]
        reasons.append(f"{layers} layers x P={P} blocks = {layers * P} blocks <= cooperative "
                       f"limit {coop} ({per_sm} resident per SM x {dev.sm_count} SMs); two grid "
                       f"barriers per stage (the cell, then the projection)")
        reasons.append(f"each block keeps W_hh, W_ih slices of U={U} units and a W_hr slice of "
                       f"Q={Q} features ({kb(w)}); forward {kb(fwd)}, backward {kb(bwd)} per "
                       f"block within the {kb(limit)} opt-in limit; batch tile {tile} of {batch}")
    else:
        if max(fwd, bwd) > limit:
            reasons.append(f"at P={P} (U={U}, Q={Q}) a block needs {kb(max(fwd, bwd))} of "
                           f"shared memory, over the {kb(limit)} opt-in limit of {dev.name}")
        if layers * P > coop:
            reasons.append(f"{layers} layers x P={P} = {layers * P} blocks cannot be "
                           f"co-resident (at most {per_sm} per SM x {dev.sm_count} SMs = {coop})")
        if not reasons or (blocks is not None and len(reasons) == 1):
            reasons.append(f"the stack's weights do not fit in the shared memory of any "
                           f"co-resident grid on {dev.name}")
    return ProjWavefrontFit(cell=cell, hidden=hidden, proj=R, batch=batch, layers=layers,
                            dtype=dtype, device=dev, blocks_per_layer=P, threads=nthreads,
                            units=U, feats=Q, batch_tile=tile, smem_fwd=fwd, smem_bwd=bwd,
                            per_sm=per_sm, coop=coop, fits=ok, reasons=tuple(reasons))


def stage_time(direction, f: ProjWavefrontFit, timing) -> cost.StepTime:
    """One wavefront stage ('fwd' or 'bwd'): planning.projection.persistent_step of the busiest
    SM (the L*P blocks over the SMs), plus the input product where L > 1 (forward B*G*U*R more
    multiply-adds and B*R more staged, backward B*Q*G*H and B*G*H)."""
    G, H, R, B = _form(f.cell).gates, f.hidden, f.proj, f.batch
    itemsize = ITEMSIZE[f.dtype]
    grid = pplan.Fit(f.blocks, f.units, f.feats, f.batch_tile, f.smem_fwd, f.smem_bwd,
                     f.per_sm, f.coop)
    st = pplan.persistent_step(direction, G, H, R, B, itemsize, grid, f.device, timing)
    if f.layers == 1:
        return st
    n = -(-f.blocks // f.device.sm_count)
    macs, staged = ((B * G * f.units * R, B * R) if direction == "fwd"
                    else (B * f.feats * G * H, B * G * H))
    words = 2 if itemsize == 8 else 1
    l2_share = timing.l2_bytes_per_clk * timing.clock_hz / f.device.sm_count
    parts = dict(st.parts)
    parts["fma"] += n * macs / (timing.fma_per_clk_sm[itemsize] * timing.clock_hz)
    parts["smem"] += n * 2 * macs * words / 32 / timing.clock_hz
    parts["staging"] += n * staged * itemsize / l2_share
    return cost.StepTime(max(parts["fma"], parts["smem"]) + parts["staging"] + parts["barriers"],
                         parts)


def predict(cell, input_size, hidden, batch, layers, steps, dtype="float32", device="H100", *,
            threads=None):
    """(fit, per-layer plan of layers 1.., wavefront (fwd, fwd+bwd), per-layer (fwd, fwd+bwd))
    predicted seconds per sequence of `steps` steps; the times are None without a timing."""
    form = _form(cell)
    dev = device_profile(device)
    f = fit(cell, hidden, batch, layers, dtype, dev, threads=threads)
    timing = cost.timing_for(dev)
    R = form.proj_size
    kc = form.kernel_cell
    p0 = pplan.plan(kc, input_size, hidden, R, batch, dtype, dev, threads=threads)
    pu = pplan.plan(kc, R, hidden, R, batch, dtype, dev, threads=threads)
    if timing is None:
        return f, pu, None, None
    per = []
    for i, d in enumerate(("fwd", "bwd")):
        step = (p0.predicted[p0.path][i].total + (layers - 1) * pu.predicted[pu.path][i].total)
        per.append(steps * step + layers * timing.launch_s)
    gemm = (layers - 1) * _gemm_time(steps * batch, form.gates * hidden, R, ITEMSIZE[f.dtype],
                                     dev, timing)
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
    predicts it faster per sequence (forward + backward); per-layer launches otherwise
    (planning.wavefront.Choice)."""
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
                f"{layers} x {steps} steps of the {pu.path} projection path)")
        if wave[1] < per[1]:
            choice = "wavefront"
            line += "; the wavefront is predicted faster"
        else:
            line += "; per-layer launches are predicted faster"
        reasons.append(line)
    return Choice(choice=choice, fit=f, per_layer_path=pu.path, wavefront_s=wave,
                  per_layer_s=per, reasons=tuple(reasons))


__all__ = ["ProjWavefrontFit", "fit", "stage_time", "predict", "choose"]
