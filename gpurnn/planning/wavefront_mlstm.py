"""The mLSTM layer wavefront's plan (kernels: gpurnn/kernels/wavefront_mlstm.py, whose smem_bytes
is the one shared-memory model): does the whole mLSTM stack fit, with how many blocks per
layer, and is it predicted faster than per-layer launches. The search, the reasons and the
choice are gpurnn.planning.wavefront's; what differs is the mLSTM's.

Capacity. Each block keeps, for its U = ceil(H/P) units, W_mh and W_hh rows of its layer and
(layers > 0) the input side's W_mx and W_ih rows: 2 x 5*U*H weights (rows padded), backward
the columns W_mh, W_hh of its layer and [W_ih; W_mx] of the layer above (the same count). So
the stack needs about 2*L*5*H*H weights resident over L*P co-resident blocks.
Time (a model until a GPU measures it). Per-layer launches: L*T steps of
gpurnn.planning.mlstm's plan (its path, fwd and bwd), the input GEMMs of layers 1..L-1 (x W_ih^T
and x W_mx^T, 5H outputs a row; backward the dx GEMMs) and one launch per layer and direction.
Wavefront: T+L-1 forward stages and T+L backward stages, each the mLSTM's two phases
(cost.persistent_step of a 1-gate and of a 4-gate product, each with its grid barrier) on the
busiest SM, multiply-adds and staging doubled where a layer also forms its input product
(L > 1). Not modelled: as planning.wavefront.
"""
from __future__ import annotations

import functools

from ..kernels import wavefront_mlstm as kernels
from ..kernels.dtypes import ITEMSIZE
from ..kernels.layout import units_per_block
from . import cost, family
from .capacity import check_int, kb, resident_limit
from .profiles import device_profile
from .wavefront import Choice, WavefrontFit, _gemm_time

CELL = kernels.CELL
_resolve = functools.partial(family.resolve_family, CELL, kernels.DTYPES)


def _one(H, L, dtype, dev, threads, cap, P, tile):
    U = units_per_block(H, P)
    fwd = kernels.smem_bytes("fwd", H, tile, U, dtype, threads=threads)
    bwd = kernels.smem_bytes("bwd", H, tile, U, dtype, threads=threads)
    per_sm = family.per_sm(cap, dev, fwd, bwd)
    ok = max(fwd, bwd) <= dev.smem_per_block_optin and L * P <= per_sm * dev.sm_count
    return (P, U, tile, fwd, bwd, per_sm, per_sm * dev.sm_count), ok


@functools.lru_cache(maxsize=512)
def _search(H, B, L, dtype, dev, threads, cap, blocks, tile):
    """planning.wavefront's search: the whole batch first, then smaller tiles; the largest P
    (smallest slice) with no empty block unless P was forced."""
    tiles = [tile] if tile is not None else sorted({B, *(B >> i for i in range(1, 12))} - {0},
                                                   reverse=True)
    cands = [blocks] if blocks is not None else range(
        min(H, max(1, dev.sm_count * max(cap, 1) // L)), 0, -1)
    first = None
    for t in tiles:
        for P in cands:
            row, ok = _one(H, L, dtype, dev, threads, cap, P, t)
            if blocks is None and -(-H // row[1]) != P:
                continue
            if ok:
                return row, True
            first = first or row
    return first or _one(H, L, dtype, dev, threads, cap, blocks or 1, tiles[-1])[0], False


def fit(cell, hidden, batch, layers, dtype="float32", device="H100", *, blocks=None,
        threads=None, batch_tile=None, regs_per_thread=None) -> WavefrontFit:
    """The mLSTM wavefront's configuration for `layers` layers (cell "mlstm"), or the attempt
    that shows why none fits (fits False, reasons)."""
    if cell != CELL:
        raise ValueError(f"cell must be {CELL!r}; got {cell!r}")
    check_int("hidden", hidden)
    check_int("layers", layers)
    dtype, dev, nthreads, regs = _resolve(batch, dtype, device, threads, regs_per_thread)
    family.check_forced(batch, blocks, batch_tile)
    cap = resident_limit(nthreads, regs, dev)
    (P, U, tile, fwd, bwd, per_sm, coop), ok = _search(hidden, batch, layers, dtype, dev,
                                                       nthreads, cap, blocks, batch_tile)
    limit = dev.smem_per_block_optin
    reasons = family.forced_reasons(blocks, None, " per layer")
    if ok and regs < kernels.REGS_MAX:
        ok = False
        reasons.append(f"{nthreads} threads per block leave {regs} registers per thread; the "
                       f"mLSTM wavefront kernels use up to {kernels.REGS_MAX} (at most "
                       f"{dev.regs_per_block // kernels.REGS_MAX // 32 * 32} threads per block)")
    elif ok:
        w = 2 * 5 * U * hidden * ITEMSIZE[dtype]
        reasons.append(f"{layers} layers x P={P} blocks = {layers * P} blocks <= cooperative "
                       f"limit {coop} ({per_sm} resident per SM x {dev.sm_count} SMs)")
        reasons.append(f"each block keeps W_mh, W_hh, W_mx and W_ih slices of U={U} units "
                       f"({kb(w)}); forward {kb(fwd)}, backward {kb(bwd)} per block within the "
                       f"{kb(limit)} opt-in limit; batch tile {tile} of {batch}; two grid "
                       f"barriers a stage (m needs all of h, the gates all of m)")
    else:
        if max(fwd, bwd) > limit:
            reasons.append(f"at P={P} (U={U}) a block needs {kb(max(fwd, bwd))} of shared "
                           f"memory, over the {kb(limit)} opt-in limit of {dev.name}")
        if layers * P > coop:
            reasons.append(f"{layers} layers x P={P} = {layers * P} blocks cannot be "
                           f"co-resident (at most {per_sm} per SM x {dev.sm_count} SMs = {coop})")
    return WavefrontFit(cell=cell, hidden=hidden, batch=batch, layers=layers, dtype=dtype,
                        device=dev, blocks_per_layer=P, threads=nthreads, units=U,
                        batch_tile=tile, smem_fwd=fwd, smem_bwd=bwd, per_sm=per_sm, coop=coop,
                        fits=ok, reasons=tuple(reasons))


def capacity(layers, dtype="float32", device="H100", batch=1, *, threads=None) -> int:
    """The largest H the mLSTM wavefront of `layers` layers fits on `device` (0 if none)."""
    return family.largest(lambda h: fit(CELL, h, batch, layers, dtype, device,
                                        threads=threads).fits)


def stage_time(direction, f: WavefrontFit, timing) -> cost.StepTime:
    """One stage ('fwd' or 'bwd'): the 1-gate and the 4-gate phase, each cost.persistent_step
    of the busiest SM with its grid barrier, the products doubled where L > 1."""
    k = 2 if f.layers > 1 else 1
    total, parts = 0.0, {"fma": 0.0, "smem": 0.0, "staging": 0.0, "barriers": 0.0}
    for gates in (1, kernels.GATES):
        st = cost.persistent_step(direction, gates, f.hidden, f.batch, ITEMSIZE[f.dtype],
                                  f.blocks, f.units, f.batch_tile, gates, f.device, timing)
        p = {"fma": k * st.parts["fma"], "smem": k * st.parts["smem"],
             "staging": k * st.parts["staging"], "barriers": st.parts["barriers"]}
        total += max(p["fma"], p["smem"]) + p["staging"] + p["barriers"]
        parts = {n: parts[n] + p[n] for n in parts}
    return cost.StepTime(total, parts)


def predict(input_size, hidden, batch, layers, steps, dtype="float32", device="H100", *,
            threads=None):
    """(fit, per-layer plan of layers 1.., wavefront (fwd, fwd+bwd), per-layer (fwd, fwd+bwd))
    seconds per sequence; the times are None without a timing."""
    from . import mlstm
    dev = device_profile(device)
    f = fit(CELL, hidden, batch, layers, dtype, dev, threads=threads)
    timing = cost.timing_for(dev)
    p0 = mlstm.plan(input_size, hidden, batch, dtype, dev, threads=threads)
    pu = mlstm.plan(hidden, hidden, batch, dtype, dev, threads=threads)
    if timing is None:
        return f, pu, None, None
    per = [steps * (p0.predicted[p0.path][i].total
                    + (layers - 1) * pu.predicted[pu.path][i].total) + layers * timing.launch_s
           for i in (0, 1)]
    gemm = (layers - 1) * _gemm_time(steps * batch, 5 * hidden, hidden, ITEMSIZE[f.dtype], dev,
                                     timing)
    per_layer = (per[0] + gemm, per[0] + per[1] + 2 * gemm)
    wave = None
    if f.fits:
        fw = (steps + layers - 1) * stage_time("fwd", f, timing).total + timing.launch_s
        bw = (steps + layers) * stage_time("bwd", f, timing).total + timing.launch_s
        wave = (fw, fw + bw)
    return f, pu, wave, per_layer


def choose(cell, input_size, hidden, batch, layers, steps, dtype="float32", device="H100", *,
           threads=None, dropout=0.0) -> Choice:
    """The mLSTM wavefront where it can run (no dropout between layers, the stack fits) and the
    model predicts it faster per sequence (forward + backward); per-layer launches otherwise."""
    if cell != CELL:
        raise ValueError(f"cell must be {CELL!r}; got {cell!r}")
    f, pu, wave, per = predict(input_size, hidden, batch, layers, steps, dtype, device,
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
        faster = wave[1] < per[1]
        choice = "wavefront" if faster else "per_layer"
        reasons.append(f"model (unmeasured), per sequence of T={steps}: wavefront "
                       f"{wave[1] * 1e6:.1f} us fwd+bwd ({steps + layers - 1} stages), per-layer "
                       f"{per[1] * 1e6:.1f} us ({layers} x {steps} steps of the {pu.path} path); "
                       + ("the wavefront is predicted faster" if faster
                          else "per-layer launches are predicted faster"))
    return Choice(choice=choice, fit=f, per_layer_path=pu.path, wavefront_s=wave,
                  per_layer_s=per, reasons=tuple(reasons))


__all__ = ["fit", "capacity", "stage_time", "predict", "choose"]
