"""The layer wavefront's host side (kernels: gpurnn/kernels/wavefront.py, plan:
gpurnn/planning/wavefront.py): a whole stacked unidirectional LSTM / GRU / RNN, or a stack of
the kernel-cell LSTM variants (lstm_peephole, cifg, cifg_peephole), in ONE persistent launch
forward and ONE backward, written against `rt.xp` as gpurnn.backends.cuda is, so the
CUDA runtime and the strict simulator (gpurnn.backends.sim.RUNTIME) run the same code.

  forward   Gx_0 = x W_ih0^T + folded bias (one GEMM over all T*B rows, as per layer) -> the
            wavefront kernel: T+L-1 stages, one grid barrier each; layers l > 0 form their
            input product in the launch (written to the stacked gx)
  backward  the reverse wavefront kernel: T+L stages (the last only finishes layer 0's dh0);
            it writes every lower layer's dy (the upper layer's dx); then per layer, as
            gpurnn.backends.cuda does: dW_ih = dgx^T x_l, dW_hh = dgh^T h_in, db, the
            peephole weights' (cuda.peephole_grads, from dgh and c), and the stack's
            dx = dgx_0 W_ih0 (GEMMs)
No dropout between layers (the caller keeps per-layer launches when dropout > 0); unidirectional
only; every layer of one hidden size H (layer 0's input size I is free).
Entry points:
    run_stack_forward(rt, cell, x, layers, h0, c0, lengths, need_saved, options)
        -> (y (T, B, H), h_n (L, B, H), c_n (L, B, H) | None, reserves, outputs)
        reserves: per layer the tuple gpurnn.stack.KernelLayer keeps ((h, c, gates) for LSTM,
        (h, gates) for GRU, (h,) for RNN; h (T+1, B, H), c (T+1, B, H) in the compute dtype,
        gates (T, B, S*H)), None when not need_saved; outputs: per layer its output y_l
        (T, B, H) (layer l+1's input; the last is y)
    run_stack_backward(rt, cell, x, layers, saved, lengths, dy, dh_n, dc_n, options)
        -> (dx, dh0 (L, B, H), dc0 | None, [per-layer grads {weight_ih, weight_hh, bias_ih,
        bias_hh, weight_ch}]); saved = (reserves, outputs) of the forward
layers: per layer a dict {weight_ih, weight_hh, bias_ih?, bias_hh?, weight_ch (the peephole
cells)} (torch's and gpurnn.variants' names, no suffix). The variants' reserves are
gpurnn.variants' saved layout (h, c, gates), which is the LSTM's.
h0, c0 (L, B, H) or None (zeros); dy, dh_n, dc_n may be None (zeros).
options: {"blocks": P per layer, "threads", "batch_tile"} (and "path": "persistent" only);
the rest from gpurnn.planning.wavefront.fit. Backward plans again from the same options.
_stack_forward / _stack_backward return everything the kernels wrote (the stacked gx, dy, dgh,
dgx), for the tests' bit-level comparison with the per-layer kernels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import cuda as host
from . import launching
from .numpy import input_bias, inputs_seen
from ..cells import GATES, PEEPHOLES, RESERVE_GATES, has_cell_state
from ..kernels import wavefront as kernels
from ..kernels.dtypes import COMPUTE, host_view
from ..variants import form_of

_kernel = launching.KernelCache(kernels.spec)     # (rt, cell, kind, dtype) -> (spec, kernel)


@dataclass(frozen=True)
class WavefrontLaunch:
    blocks_per_layer: int
    threads: int
    units: int
    batch_tile: int
    fit: Any


def choose_launch(cell, hidden, batch, layers, dtype, device, options, backend=host.NAME):
    from ..planning import wavefront as planning
    options = host.check_options(options, backend)
    if options.get("path", "persistent") != "persistent":
        raise ValueError(f"the wavefront is one persistent launch; options['path'] must be "
                         f"'persistent' or absent, got {options['path']!r}")
    options, kw = launching.forced(options, batch, backend)
    f = planning.fit(cell, hidden, batch, layers, dtype, device, **kw)
    if not f.fits:
        raise ValueError(f"the wavefront cannot run {layers} x {cell} H={hidden} B={batch} "
                         f"{dtype} on {f.device.name}: " + "; ".join(f.reasons))
    return WavefrontLaunch(f.blocks_per_layer, f.threads, f.units, f.batch_tile, f)


def _launch(rt, cell, kind, dtype, cfg, layers, hidden, args, stages):
    """The wavefront kernel `kind` over `stages` stages (one launch, or one a stage where the
    grid barrier cannot be trusted); args(s0, s1) are the launch's arguments."""
    sp, kern = _kernel(rt, cell, kind, dtype)
    blocks = layers * cfg.blocks_per_layer
    smem = kernels.smem_bytes("fwd" if kind.endswith("fwd") else "bwd", GATES[cell], hidden,
                              cfg.batch_tile, cfg.units, dtype, threads=cfg.threads)
    for s0, s1 in launching.phase_ranges(rt, blocks, stages):
        launching.launch_persistent(rt, sp, kern, kind, blocks, cfg.threads, smem, args(s0, s1),
                                    (s0, s1), single_step=s1 - s0 == 1)


def _stacked_lengths(xp, lengths, T, B, L):
    """The kernels' lengths, one per row of the stacked (L*B) batch."""
    return xp.asarray(np.tile(np.asarray(host._kernel_lengths(np, lengths, T, B)), L))


def _check_layers(cell, x, layers):
    if cell not in kernels.WAVEFRONT_CELLS:
        raise ValueError(f"the wavefront runs {kernels.WAVEFRONT_CELLS}; got {cell!r}")
    if not layers:
        raise ValueError("layers must hold at least one layer's parameters")
    G = GATES[cell]
    H = layers[0]["weight_hh"].shape[1]
    peep = PEEPHOLES.get(cell, 0) * H
    for l, p in enumerate(layers):
        want_ih = (G * H, x.shape[2] if l == 0 else H)
        if tuple(p["weight_hh"].shape) != (G * H, H) or tuple(p["weight_ih"].shape) != want_ih:
            raise ValueError(f"layer {l}: weight_ih {tuple(p['weight_ih'].shape)} / weight_hh "
                             f"{tuple(p['weight_hh'].shape)} must be {want_ih} / {(G * H, H)} "
                             f"(one hidden size for the whole stack)")
        if peep and (p.get("weight_ch") is None or tuple(p["weight_ch"].shape) != (peep,)):
            got = None if p.get("weight_ch") is None else tuple(p["weight_ch"].shape)
            raise ValueError(f"layer {l}: {cell} needs weight_ch of shape {(peep,)}; got {got}")
    return H


def _stacked(xp, layers, key, dt, rows):
    return xp.ascontiguousarray(xp.concatenate([xp.asarray(p[key]).astype(dt, copy=False)
                                                for p in layers], axis=0)
                                if layers else xp.zeros(rows, dt))


def _stacked_weights(xp, layers, dt, GH, H):
    """(W_hh of every layer, W_ih of layers 1.. (zeros for one layer)), stacked along rows."""
    w_hh = _stacked(xp, layers, "weight_hh", dt, (GH, H))
    w_ih = (_stacked(xp, layers[1:], "weight_ih", dt, (GH, H)) if len(layers) > 1
            else xp.zeros((GH, H), dt))
    return w_hh, w_ih


def _stacked_b_rec(xp, cell, layers, cdt, H):
    """Every layer's b_rec of its per-layer launch, stacked (kernels docstring): GRU's b_hh
    (zeros without bias), the peephole vector, else one placeholder element per layer."""
    if cell == "gru":
        parts = [p["bias_hh"] if p.get("bias_hh") is not None else xp.zeros(3 * H, cdt)
                 for p in layers]
    elif PEEPHOLES.get(cell):
        parts = [p["weight_ch"] for p in layers]
    else:
        return xp.zeros(len(layers), cdt)
    return xp.ascontiguousarray(xp.concatenate([xp.asarray(a).astype(cdt, copy=False)
                                                for a in parts]))


def _call(rt, cell, x, layers, options):
    """What _stack_forward and _stack_backward start from: (T, B, H, L, the dtype's name, the
    storage and the compute dtype, the launch), the layers checked."""
    T, B, _ = x.shape
    H = _check_layers(cell, x, layers)
    L = len(layers)
    dtype = np.dtype(x.dtype).name
    cfg = choose_launch(cell, H, B, L, dtype, rt.device, options, rt.name)
    return T, B, H, L, dtype, x.dtype, np.dtype(COMPUTE[dtype]), cfg


@dataclass
class ForwardState:
    """Everything the forward kernel wrote, stacked along the batch (kernels docstring)."""
    gx: Any
    h: Any
    c: Any
    gates: Any
    y: Any
    launch: WavefrontLaunch


def _stack_forward(rt, cell, x, layers, h0, c0, lengths, need_saved, options):
    xp = rt.xp
    T, B, H, L, dtype, sdt, cdt, cfg = _call(rt, cell, x, layers, options)
    G, S = GATES[cell], RESERVE_GATES[cell]
    GH = G * H

    gx = xp.empty((T, L * B, GH), cdt)
    gx[:, :B] = host._input_projection(xp, x, layers[0]["weight_ih"],
                                       input_bias(cell, layers[0].get("bias_ih"),
                                                  layers[0].get("bias_hh")), cdt)
    w_hh, w_ih = _stacked_weights(xp, layers, sdt, GH, H)
    bias = xp.zeros(L * GH, cdt)
    for l, p in enumerate(layers):
        if l > 0 and p.get("bias_ih") is not None:
            bias[l * GH:(l + 1) * GH] = input_bias(cell, p["bias_ih"], p["bias_hh"]).astype(
                cdt, copy=False)
    b_rec = _stacked_b_rec(xp, cell, layers, cdt, H)
    h = xp.empty((T + 1, L * B, H), sdt)
    h[0] = 0 if h0 is None else xp.asarray(h0).reshape(L * B, H)
    c = xp.zeros((1, 1, 1), cdt)
    if has_cell_state(cell):
        c = xp.empty((T + 1, L * B, H), cdt)
        c[0] = 0 if c0 is None else xp.asarray(c0).reshape(L * B, H).astype(cdt, copy=False)
    save = 1 if (S and need_saved) else 0
    gates = xp.empty((T, L * B, S * H), sdt) if save else xp.zeros((1, 1, 1), sdt)
    y = xp.empty((T, L * B, H), sdt)
    lengths_k = _stacked_lengths(xp, lengths, T, B, L)

    def k(a):
        return host_view(xp, a, dtype)
    U, bt = cfg.units, cfg.batch_tile
    _launch(rt, cell, "wavefront_fwd", dtype, cfg, L, H,
            lambda s0, s1: (gx, k(w_hh), k(w_ih), bias, b_rec, k(h), c, k(gates), k(y),
                            lengths_k, L, s0, s1, U, save, bt), T + L - 1)
    return ForwardState(gx=gx, h=h, c=c, gates=gates, y=y, launch=cfg)


def _rows(xp, a, l, B):
    """Layer l's row block of a stacked (T', L*B, F) array, C-contiguous."""
    return xp.ascontiguousarray(a[:, l * B:(l + 1) * B])


def run_stack_forward(rt, cell, x, layers, h0, c0, lengths, need_saved, options):
    st = _stack_forward(rt, cell, x, layers, h0, c0, lengths, need_saved, options)
    return _forward_results(rt.xp, cell, st, x, len(layers), need_saved)


def _forward_results(xp, cell, st, x, L, need_saved):
    """run_stack_forward's results from the stacked arrays of the launch."""
    T, B, _ = x.shape
    sdt = x.dtype
    outputs = [_rows(xp, st.y, l, B) for l in range(L)]
    h_n = st.h[T].reshape(L, B, -1).copy()
    c_n = (st.c[T].reshape(L, B, -1).astype(sdt) if has_cell_state(cell) else None)
    reserves = None
    if need_saved:
        reserves = []
        for l in range(L):
            kept = [_rows(xp, st.h, l, B)]
            if has_cell_state(cell):
                kept.append(_rows(xp, st.c, l, B))
            if RESERVE_GATES[cell]:
                kept.append(_rows(xp, st.gates, l, B))
            reserves.append(tuple(kept))
    return outputs[-1], h_n, c_n, reserves, outputs


@dataclass
class BackwardState:
    dy: Any
    dgh: Any
    dgx: Any
    dh0: Any
    dc0: Any
    launch: WavefrontLaunch


def _stack_backward(rt, cell, x, layers, saved, lengths, dy, dh_n, dc_n, options):
    xp = rt.xp
    T, B, H, L, dtype, sdt, cdt, cfg = _call(rt, cell, x, layers, options)
    G, S = GATES[cell], RESERVE_GATES[cell]
    GH = G * H
    reserves, _ = saved
    if reserves is None or len(reserves) != L:
        raise ValueError("saved must be the (reserves, outputs) of a training forward of the "
                         "same stack")
    lstm = has_cell_state(cell)
    h = xp.ascontiguousarray(xp.concatenate([r[0] for r in reserves], axis=1))
    c = (xp.ascontiguousarray(xp.concatenate([r[1] for r in reserves], axis=1)).astype(
        cdt, copy=False) if lstm else xp.zeros((1, 1, 1), cdt))
    gates = (xp.ascontiguousarray(xp.concatenate([r[-1] for r in reserves], axis=1)) if S
             else xp.zeros((1, 1, 1), sdt))
    w_hh, w_ih = _stacked_weights(xp, layers, sdt, GH, H)
    b_rec = _stacked_b_rec(xp, cell, layers, cdt, H)   # read by the peephole cells only
    dy_all = xp.zeros((T, L * B, H), sdt)   # the lower layers' rows: written by the kernel
    if dy is not None:
        dy_all[:, (L - 1) * B:] = dy
    dgh = xp.empty((T, L * B, GH), cdt)
    dgx = xp.empty((T, L * B, GH), cdt) if cell == "gru" else xp.zeros((1, 1, 1), cdt)
    dh_carry = (xp.zeros((L * B, H), cdt) if dh_n is None
                else xp.array(xp.asarray(dh_n).reshape(L * B, H), dtype=cdt, copy=True, order="C"))
    dc_carry = xp.zeros((L * B, H) if lstm else (1, 1), cdt)
    if lstm and dc_n is not None:
        dc_carry[...] = xp.asarray(dc_n).reshape(L * B, H).astype(cdt, copy=False)
    lengths_k = _stacked_lengths(xp, lengths, T, B, L)

    def k(a):
        return host_view(xp, a, dtype)
    U, bt = cfg.units, cfg.batch_tile
    _launch(rt, cell, "wavefront_bwd", dtype, cfg, L, H,
            lambda s0, s1: (k(w_hh), k(w_ih), b_rec, k(h), c, k(gates), k(dy_all), dgh, dgx,
                            dh_carry, dc_carry, lengths_k, L, s0, s1, U, bt), T + L)
    return BackwardState(dy=dy_all, dgh=dgh, dgx=dgh if cell != "gru" else dgx,
                         dh0=dh_carry.reshape(L, B, H),
                         dc0=dc_carry.reshape(L, B, H) if lstm else None, launch=cfg)


def run_stack_backward(rt, cell, x, layers, saved, lengths, dy, dh_n, dc_n, options):
    st = _stack_backward(rt, cell, x, layers, saved, lengths, dy, dh_n, dc_n, options)
    return _backward_results(rt.xp, cell, st, x, layers, saved, lengths)


def _backward_results(xp, cell, st, x, layers, saved, lengths):
    """run_stack_backward's results: the weight-gradient GEMMs after the launch."""
    T, B, I = x.shape
    dtype = np.dtype(x.dtype).name
    sdt, cdt = x.dtype, np.dtype(COMPUTE[dtype])
    reserves, outputs = saved
    grads = []
    dx = None
    for l, p in enumerate(layers):
        x_l = x if l == 0 else outputs[l - 1]
        dgx_l, dgh_l = _rows(xp, st.dgx, l, B), _rows(xp, st.dgh, l, B)
        h_l = reserves[l][0]
        if l == 0:      # the stack's dx too; the lower layers' dx were the kernel's
            dx, dw_ih, dw_hh = host._weight_grads(xp, x_l, lengths, p["weight_ih"], dgx_l,
                                                  dgh_l, h_l, 0, cdt)
        else:           # _weight_grads' two weight GEMMs, in its order
            TB = T * B
            seen = inputs_seen(x_l, lengths, xp).reshape(TB, -1).astype(cdt, copy=False)
            dw_ih = xp.matmul(dgx_l.reshape(TB, -1).T, seen)
            dw_hh = xp.matmul(dgh_l.reshape(TB, -1).T,
                              h_l[0:T].reshape(TB, -1).astype(cdt, copy=False))
        g = {"weight_ih": dw_ih, "weight_hh": dw_hh}
        if p.get("bias_ih") is not None:
            db_ih = dgx_l.reshape(T * B, -1).sum(axis=0)
            g["bias_ih"] = db_ih
            g["bias_hh"] = dgh_l.reshape(T * B, -1).sum(axis=0) if cell == "gru" else db_ih.copy()
        if PEEPHOLES.get(cell):
            g["weight_ch"] = host.peephole_grads(xp, form_of(cell), dgh_l,
                                                 reserves[l][1].astype(cdt, copy=False), 0)
        grads.append({name: a.astype(sdt, copy=False) for name, a in g.items()})
    dc0 = st.dc0.astype(sdt, copy=False) if st.dc0 is not None else None
    return dx.astype(sdt, copy=False), st.dh0.astype(sdt, copy=False), dc0, grads
