"""The mLSTM layer wavefront's host side (kernels: gpurnn/kernels/wavefront_mlstm.py, plan:
gpurnn/planning/wavefront_mlstm.py): a stack of multiplicative LSTM layers in ONE persistent
launch forward and ONE backward, written against `rt.xp` as gpurnn.backends.cuda_mlstm is, so
the CUDA runtime, the strict simulator (gpurnn.backends.sim.RUNTIME) and Numba's stock
simulator (one launch per half-stage, launching.phase_ranges) run the same code.

  forward   layer 0: Gx = x W_ih^T (+ b_ih + b_hh) and mx = x W_mx^T (two GEMMs over all T*B
            rows, exactly as cuda_mlstm) -> the wavefront kernel: 2(T+L-1) half-stages; layers
            l > 0 form their gx and mx in the launch (written to the stacked arrays)
  backward  the reverse wavefront kernel: 2(T+L)-1 half-stages; it writes every lower layer's
            dy (the upper layer's dx); then per layer cuda_mlstm's GEMMs in its order: dW_ih =
            dgh^T x_seen, dW_hh = dgh^T m_seen, db = sum dgh, dW_mx = dmx^T x_seen, dW_mh =
            dmh^T h_in, and the stack's dx = dgh_0 W_ih0 + dmx_0 W_mx0
No dropout between layers (the caller keeps per-layer launches when dropout > 0); unidirectional;
every layer of one hidden size H (layer 0's input size I is free).
Entry points:
    run_stack_forward(rt, cell, x, layers, h0, c0, lengths, need_saved, options)
        -> (y (T, B, H), h_n (L, B, H), c_n (L, B, H), reserves, outputs)
        reserves: per layer gpurnn.variants' saved layout (h, c, gates, mx, mh), None when not
        need_saved; outputs: per layer its output y_l (T, B, H) (the last is y)
    run_stack_backward(rt, cell, x, layers, saved, lengths, dy, dh_n, dc_n, options)
        -> (dx, dh0 (L, B, H), dc0 (L, B, H), [per layer {weight_ih, weight_hh, bias_ih?,
        bias_hh?, weight_mx, weight_mh}]); saved = (reserves, outputs) of the forward
cell: "mlstm". layers: per layer a dict {weight_ih, weight_hh, weight_mx, weight_mh, bias_ih?,
bias_hh?} (gpurnn.variants' names, no suffix). h0, c0 (L, B, H) or None (zeros); dy, dh_n, dc_n
may be None (zeros). options: {"blocks": P per layer, "threads", "batch_tile"} (and "path":
"persistent" only); the rest from gpurnn.planning.wavefront_mlstm.fit; backward plans again from
the same options. _stack_forward / _stack_backward return everything the kernels wrote (the
stacked gx, mx, dy, dgh, dmh, dmx), for the tests' bit-level comparison. Uses
gpurnn.backends.cuda_wavefront's private stacking helpers (_rows, _stacked, _stacked_lengths;
the same host side, split over files, as cuda_mlstm uses cuda's _kernel_lengths).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import cuda as host
from . import launching
from .cuda_wavefront import WavefrontLaunch, _rows, _stacked, _stacked_lengths
from .numpy import inputs_seen
from ..kernels import wavefront_mlstm as kernels

_kernel = launching.KernelCache(kernels.spec)     # (rt, kind, dtype) -> (spec, kernel)
CELLS = (kernels.CELL,)


def choose_launch(hidden, batch, layers, dtype, device, options, backend=host.NAME):
    from ..planning import wavefront_mlstm as planning
    options = host.check_options(options, backend)
    if options.get("path", "persistent") != "persistent":
        raise ValueError(f"the wavefront is one persistent launch; options['path'] must be "
                         f"'persistent' or absent, got {options['path']!r}")
    options, kw = launching.forced(options, batch, backend)
    f = planning.fit(kernels.CELL, hidden, batch, layers, dtype, device, **kw)
    if not f.fits:
        raise ValueError(f"the wavefront cannot run {layers} x mlstm H={hidden} B={batch} "
                         f"{dtype} on {f.device.name}: " + "; ".join(f.reasons))
    return WavefrontLaunch(f.blocks_per_layer, f.threads, f.units, f.batch_tile, f)


def _launch(rt, kind, dtype, cfg, layers, hidden, args, n):
    """The kernel `kind` over n half-stages (one launch, or one each where the grid barrier
    cannot be trusted); args(q0, q1) are the launch's arguments."""
    sp, kern = _kernel(rt, kind, dtype)
    blocks = layers * cfg.blocks_per_layer
    smem = kernels.smem_bytes("fwd" if kind.endswith("fwd") else "bwd", hidden,
                              cfg.batch_tile, cfg.units, dtype, threads=cfg.threads)
    for q0, q1 in launching.phase_ranges(rt, blocks, n):
        launching.launch_persistent(rt, sp, kern, kind, blocks, cfg.threads, smem, args(q0, q1),
                                    (q0, q1), single_step=q1 - q0 == 1)


def _shape(p, key):
    a = p.get(key)
    return None if a is None else tuple(a.shape)


def _check_layers(cell, x, layers):
    if cell not in CELLS:
        raise ValueError(f"the mLSTM wavefront runs {CELLS}; got {cell!r}")
    if not layers:
        raise ValueError("layers must hold at least one layer's parameters")
    for l, p in enumerate(layers):
        missing = [k for k in ("weight_ih", "weight_hh", "weight_mx", "weight_mh")
                   if p.get(k) is None]
        if missing:
            raise ValueError(f"layer {l}: mlstm needs {missing}; got keys {sorted(p)}")
    H = layers[0]["weight_mh"].shape[0]
    for l, p in enumerate(layers):
        I = x.shape[2] if l == 0 else H
        want = {"weight_ih": (4 * H, I), "weight_hh": (4 * H, H), "weight_mx": (H, I),
                "weight_mh": (H, H)}
        got = {k: _shape(p, k) for k in want}
        if got != want:
            raise ValueError(f"layer {l}: {got} must be {want} (one hidden size H={H} for the "
                             f"whole stack; layer 0's input size {x.shape[2]})")
        if (p.get("bias_ih") is None) != (p.get("bias_hh") is None):
            raise ValueError(f"layer {l}: bias_ih and bias_hh go together; got "
                             f"{_shape(p, 'bias_ih')} / {_shape(p, 'bias_hh')}")
        for k in ("bias_ih", "bias_hh"):
            if p.get(k) is not None and _shape(p, k) != (4 * H,):
                raise ValueError(f"layer {l}: {k} has shape {_shape(p, k)}; expected "
                                 f"{(4 * H,)}")
    return H


def _call(rt, cell, x, layers, options):
    """(T, B, H, L, the dtype's name, the launch), the layers checked."""
    T, B, _ = x.shape
    H = _check_layers(cell, x, layers)
    L = len(layers)
    dtype = np.dtype(x.dtype).name
    if dtype not in kernels.DTYPES:
        raise ValueError(f"x.dtype must be one of {kernels.DTYPES} for the mlstm; got {dtype}")
    cfg = choose_launch(H, B, L, dtype, rt.device, options, rt.name)
    return T, B, H, L, dtype, cfg


def _stacked_weights(xp, layers, dt, H):
    """(w_mh, w_hh of every layer, w_mx, w_ih of layers 1.. (zeros for one layer))."""
    upper = layers[1:]
    return (_stacked(xp, layers, "weight_mh", dt, (H, H)),
            _stacked(xp, layers, "weight_hh", dt, (4 * H, H)),
            _stacked(xp, upper, "weight_mx", dt, (H, H)),
            _stacked(xp, upper, "weight_ih", dt, (4 * H, H)))


@dataclass
class ForwardState:
    """Everything the forward kernel wrote, stacked along the batch (kernels docstring)."""
    gx: Any
    mx: Any
    h: Any
    c: Any
    gates: Any
    mh: Any
    y: Any
    launch: WavefrontLaunch


def _stack_forward(rt, cell, x, layers, h0, c0, lengths, need_saved, options):
    xp = rt.xp
    T, B, H, L, dtype, cfg = _call(rt, cell, x, layers, options)
    dt = x.dtype
    I = x.shape[2]
    p0 = layers[0]

    # layer 0's input products: cuda_mlstm.run_forward's GEMMs, in its order
    x2 = x.reshape(T * B, I)
    gx0 = xp.matmul(x2, p0["weight_ih"].T).reshape(T, B, 4 * H)
    if p0.get("bias_ih") is not None:
        gx0 += p0["bias_ih"] + p0["bias_hh"]
    gx = xp.empty((T, L * B, 4 * H), dt)
    gx[:, :B] = gx0
    mx = xp.empty((T, L * B, H), dt)
    mx[:, :B] = xp.matmul(x2, p0["weight_mx"].T).reshape(T, B, H)
    w_mh, w_hh, w_mx, w_ih = _stacked_weights(xp, layers, dt, H)
    bias = xp.zeros(L * 4 * H, dt)
    for l, p in enumerate(layers):
        if l > 0 and p.get("bias_ih") is not None:
            bias[l * 4 * H:(l + 1) * 4 * H] = p["bias_ih"] + p["bias_hh"]
    b_rec = xp.zeros(1, dt)                 # the LSTM's cell math reads no b_rec
    h = xp.empty((T + 1, L * B, H), dt)
    c = xp.empty((T + 1, L * B, H), dt)
    h[0] = 0 if h0 is None else xp.asarray(h0).reshape(L * B, H)
    c[0] = 0 if c0 is None else xp.asarray(c0).reshape(L * B, H)
    save = 1 if need_saved else 0
    placeholder = xp.zeros((1, 1, 1), dt)
    gates = xp.empty((T, L * B, 4 * H), dt) if save else placeholder
    mh = xp.empty((T, L * B, H), dt) if save else placeholder
    y = xp.empty((T, L * B, H), dt)
    m = xp.empty((L * B, H), dt)
    lengths_k = _stacked_lengths(xp, lengths, T, B, L)
    U, bt = cfg.units, cfg.batch_tile
    _launch(rt, "wavefront_fwd", dtype, cfg, L, H,
            lambda q0, q1: (gx, mx, w_mh, w_hh, w_mx, w_ih, bias, b_rec, h, c, gates, y, mh, m,
                            lengths_k, L, q0, q1, U, save, bt),
            kernels.stages("fwd", T, L))
    return ForwardState(gx=gx, mx=mx, h=h, c=c, gates=gates, mh=mh, y=y, launch=cfg)


def _forward_results(xp, st, x, L, need_saved):
    """run_stack_forward's results from the stacked arrays of the launch."""
    T, B, _ = x.shape
    outputs = [_rows(xp, st.y, l, B) for l in range(L)]
    h_n = st.h[T].reshape(L, B, -1).copy()
    c_n = st.c[T].reshape(L, B, -1).copy()
    reserves = None
    if need_saved:
        reserves = [tuple(_rows(xp, a, l, B) for a in (st.h, st.c, st.gates, st.mx, st.mh))
                    for l in range(L)]
    return outputs[-1], h_n, c_n, reserves, outputs


def run_stack_forward(rt, cell, x, layers, h0, c0, lengths, need_saved, options):
    st = _stack_forward(rt, cell, x, layers, h0, c0, lengths, need_saved, options)
    return _forward_results(rt.xp, st, x, len(layers), need_saved)


@dataclass
class BackwardState:
    dy: Any
    dgh: Any
    dmh: Any
    dmx: Any
    dh0: Any
    dc0: Any
    launch: WavefrontLaunch


def _stack_backward(rt, cell, x, layers, saved, lengths, dy, dh_n, dc_n, options):
    xp = rt.xp
    T, B, H, L, dtype, cfg = _call(rt, cell, x, layers, options)
    dt = x.dtype
    reserves = saved[0] if saved is not None else None
    if reserves is None or len(reserves) != L or any(len(r) != 5 for r in reserves):
        raise ValueError("saved must be the (reserves, outputs) of a training forward of the "
                         "same stack (per layer (h, c, gates, mx, mh))")
    h, c, gates, mx, mh = (xp.ascontiguousarray(xp.concatenate([r[i] for r in reserves],
                                                               axis=1)) for i in range(5))
    w_mh, w_hh, w_mx, w_ih = _stacked_weights(xp, layers, dt, H)
    b_rec = xp.zeros(1, dt)
    dy_all = xp.zeros((T, L * B, H), dt)    # the lower layers' rows: written by the kernel
    if dy is not None:
        dy_all[:, (L - 1) * B:] = dy
    dgh = xp.empty((T, L * B, 4 * H), dt)
    dmh = xp.empty((T, L * B, H), dt)
    dmx = xp.empty((T, L * B, H), dt)
    dgx = xp.zeros((1, 1, 1), dt)           # the cell math's GRU-only dgx: a placeholder
    dh_carry = xp.zeros((L * B, H), dt)
    dc_carry = xp.zeros((L * B, H), dt)
    if dh_n is not None:
        dh_carry[...] = xp.asarray(dh_n).reshape(L * B, H)
    if dc_n is not None:
        dc_carry[...] = xp.asarray(dc_n).reshape(L * B, H)
    lengths_k = _stacked_lengths(xp, lengths, T, B, L)
    U, bt = cfg.units, cfg.batch_tile
    _launch(rt, "wavefront_bwd", dtype, cfg, L, H,
            lambda q0, q1: (w_mh, w_hh, w_mx, w_ih, b_rec, h, c, gates, dy_all, mx, mh, dgh,
                            dgx, dmh, dmx, dh_carry, dc_carry, lengths_k, L, q0, q1, U, bt),
            kernels.stages("bwd", T, L))
    return BackwardState(dy=dy_all, dgh=dgh, dmh=dmh, dmx=dmx, dh0=dh_carry.reshape(L, B, H),
                         dc0=dc_carry.reshape(L, B, H), launch=cfg)


def _backward_results(xp, st, x, layers, saved, lengths):
    """run_stack_backward's results: cuda_mlstm.run_backward's GEMMs per layer, in its order."""
    T, B, I = x.shape
    TB = T * B
    reserves, outputs = saved
    grads = []
    dx = None
    for l, p in enumerate(layers):
        x_l = x if l == 0 else outputs[l - 1]
        h, _, _, mx, mh = (xp.ascontiguousarray(a) for a in reserves[l])
        dgh2, dmh2, dmx2 = (_rows(xp, a, l, B).reshape(TB, -1) for a in (st.dgh, st.dmh, st.dmx))
        x_seen = inputs_seen(x_l, lengths, xp).reshape(TB, x_l.shape[2])
        m_seen = inputs_seen(mx * mh, lengths, xp).reshape(TB, -1)
        h_in = h[0:T].reshape(TB, -1)
        if l == 0:      # the stack's dx; the lower layers' dx were the kernel's
            dx = (xp.matmul(dgh2, p["weight_ih"]) + xp.matmul(dmx2, p["weight_mx"])).reshape(
                T, B, I)
        g = {"weight_ih": xp.matmul(dgh2.T, x_seen), "weight_hh": xp.matmul(dgh2.T, m_seen)}
        if p.get("bias_ih") is not None:
            db = dgh2.sum(axis=0)
            g["bias_ih"] = db
            g["bias_hh"] = db.copy()
        g["weight_mx"] = xp.matmul(dmx2.T, x_seen)
        g["weight_mh"] = xp.matmul(dmh2.T, h_in)
        grads.append(g)
    return dx, st.dh0, st.dc0, grads


def run_stack_backward(rt, cell, x, layers, saved, lengths, dy, dh_n, dc_n, options):
    st = _stack_backward(rt, cell, x, layers, saved, lengths, dy, dh_n, dc_n, options)
    return _backward_results(rt.xp, st, x, layers, saved, lengths)


__all__ = ["run_stack_forward", "run_stack_backward", "choose_launch"]
