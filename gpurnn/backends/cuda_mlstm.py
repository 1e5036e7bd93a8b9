"""The multiplicative LSTM on the kernel backends (cuda, and sim through its Runtime): the host
side of gpurnn/kernels/mlstm.py, written once against `rt.xp` as gpurnn.backends.cuda is.

  forward   Gx = x W_ih^T + b_ih + b_hh and mx = x W_mx^T (two GEMMs over all T*B rows), then
            the persistent kernel (one launch, two grid barriers a step), or per step: GEMM
            mh = h_{t-1} W_mh^T, m = mx * mh, GEMM m W_hh^T, the LSTM's pointwise kernel
  backward  the persistent kernel (one launch, 2T+1 half-phases), or per step: GEMM
            dh_rec = dmh_{next} W_mh, the LSTM's pointwise backward, GEMM dm = dgh W_hh, the
            mLSTM's dm split; then dx = dgh W_ih + dmx W_mx, dW_ih = dgh^T x, dW_hh = dgh^T m,
            dW_mx = dmx^T x, dW_mh = dmh^T h_in, db = sum dgh, with padded steps' x and m zeroed
            (their gradients are 0, but a NaN in padding must not reach a sum)
Entry points (called by gpurnn.backends.cuda's lstm_forward / lstm_backward for the mlstm form;
returns as gpurnn.variants documents):
    run_forward(rt, form, x, params, h0, c0, lengths, reverse, need_saved, options)
        -> (y, h_n, c_n, (h, c, gates, mx, mh) | None)
    run_backward(rt, form, x, params, saved, lengths, reverse, dy, dh_n, dc_n, options)
        -> (dx, dh0, dc0, {param name: gradient})
options: the cuda backend's {"path", "blocks", "threads", "batch_tile"} (the sim backend takes
its 'simulator' key off before it calls here). The saved tuple carries no launch, so backward
plans again from the same options (the same plan). Uses gpurnn.backends.cuda's private
_kernel_lengths (the same host side, split over files) and gpurnn.backends.launching (the launch
choice and the launches every kernel family shares).
"""
from __future__ import annotations

import functools

import numpy as np

from . import cuda as host
from . import launching
from .numpy import inputs_seen
from ..kernels import mlstm as kernels
from ..planning import mlstm as planning

_kernel = launching.KernelCache(kernels.spec)     # (rt, kind, dtype) -> (spec, kernel)
_launch_persistent = _kernel.persistent
# the launch configuration (gpurnn.backends.cuda.LaunchConfig): options where given, the
# plan (gpurnn.planning.mlstm) for the rest
choose_launch = functools.partial(launching.choose_layer_launch, planning)


def _launch_pointwise(rt, dtype, n, threads, args, step):
    _kernel.pointwise(rt, "pointwise_dm", dtype, n, threads, args, step)


def run_forward(rt, form, x, params, h0, c0, lengths, reverse, need_saved, options):
    xp = rt.xp
    T, B, I = x.shape
    w_ih, w_hh = params["weight_ih"], params["weight_hh"]
    w_mx, w_mh = params["weight_mx"], params["weight_mh"]
    b_ih, b_hh = params.get("bias_ih"), params.get("bias_hh")
    H = w_mh.shape[0]
    dtype = np.dtype(x.dtype).name
    dt = x.dtype
    rev = 1 if reverse else 0
    cfg = choose_launch(I, H, B, dtype, rt.device, options, rt.name)

    x2 = x.reshape(T * B, I)
    gx = xp.matmul(x2, w_ih.T).reshape(T, B, 4 * H)
    if b_ih is not None:
        gx += b_ih + b_hh
    gx = xp.ascontiguousarray(gx)
    mx = xp.ascontiguousarray(xp.matmul(x2, w_mx.T).reshape(T, B, H))
    h = xp.empty((T + 1, B, H), dt)
    c = xp.empty((T + 1, B, H), dt)
    h[T if rev else 0] = h0
    c[T if rev else 0] = c0
    save = 1 if need_saved else 0
    placeholder = xp.zeros((1, 1, 1), dt)
    gates = xp.empty((T, B, 4 * H), dt) if save else placeholder
    y = xp.empty((T, B, H), dt)
    b_rec = xp.zeros(1, dt)
    lengths_k = host._kernel_lengths(xp, lengths, T, B)
    w_mh_c, w_hh_c = xp.ascontiguousarray(w_mh), xp.ascontiguousarray(w_hh)

    if cfg.path == "persistent":
        mh = xp.empty((T, B, H), dt) if save else placeholder
        m = xp.empty((B, H), dt)
        U, bt = cfg.units_per_block, cfg.batch_tile
        smem = kernels.smem_bytes("fwd", H, bt, U, dtype, threads=cfg.threads)
        for q_range in launching.phase_ranges(rt, cfg.blocks, 2 * T):
            _launch_persistent(rt, "persistent_fwd", dtype, cfg, smem,
                               (gx, mx, w_mh_c, w_hh_c, b_rec, h, c, gates, y, mh, m, lengths_k,
                                rev, q_range[0], q_range[1], U, save, bt), q_range)
    else:
        mh = xp.empty((T, B, H), dt)
        w_mh_t = xp.ascontiguousarray(w_mh.T)
        w_hh_t = xp.ascontiguousarray(w_hh.T)
        m = xp.empty((B, H), dt)
        gh = xp.empty((B, 4 * H), dt)
        for s in range(T):
            t = T - 1 - s if rev else s
            xp.matmul(h[t + rev], w_mh_t, out=mh[t])
            xp.multiply(mx[t], mh[t], out=m)
            xp.matmul(m, w_hh_t, out=gh)
            rt.launch_pointwise("lstm", "pointwise_fwd", dtype, B * H, cfg.threads,
                                (gx, gh, b_rec, h, c, gates, y, lengths_k, rev, s, save), s)
        if not save:
            mh = None

    h_n = h[0 if rev else T].copy()
    c_n = c[0 if rev else T].copy()
    saved = (h, c, gates, mx, mh) if need_saved else None
    return y, h_n, c_n, saved


def run_backward(rt, form, x, params, saved, lengths, reverse, dy, dh_n, dc_n, options):
    xp = rt.xp
    T, B, I = x.shape
    w_ih, w_hh = params["weight_ih"], params["weight_hh"]
    w_mx, w_mh = params["weight_mx"], params["weight_mh"]
    has_bias = "bias_ih" in params and params["bias_ih"] is not None
    h, c, gates, mx, mh = (xp.ascontiguousarray(a) for a in saved)
    H = w_mh.shape[0]
    dtype = np.dtype(x.dtype).name
    dt = x.dtype
    rev = 1 if reverse else 0
    cfg = choose_launch(I, H, B, dtype, rt.device, options, rt.name)

    dgh = xp.empty((T, B, 4 * H), dt)
    dmh = xp.empty((T, B, H), dt)
    dmx = xp.empty((T, B, H), dt)
    # a cotangent the caller has none for (None) is zero, as in gpurnn.backends.cuda
    dh_carry = (xp.zeros((B, H), dt) if dh_n is None
                else xp.array(dh_n, dtype=dt, copy=True, order="C"))
    dc_carry = (xp.zeros((B, H), dt) if dc_n is None
                else xp.array(dc_n, dtype=dt, copy=True, order="C"))
    dy = xp.zeros((T, B, H), dt) if dy is None else xp.ascontiguousarray(dy)
    b_rec = xp.zeros(1, dt)
    dgx = xp.zeros((1, 1, 1), dt)
    lengths_k = host._kernel_lengths(xp, lengths, T, B)
    w_mh_c, w_hh_c = xp.ascontiguousarray(w_mh), xp.ascontiguousarray(w_hh)

    if cfg.path == "persistent":
        U, bt = cfg.units_per_block, cfg.batch_tile
        smem = kernels.smem_bytes("bwd", H, bt, U, dtype, threads=cfg.threads)
        for q_range in launching.phase_ranges(rt, cfg.blocks, 2 * T + 1):
            _launch_persistent(rt, "persistent_bwd", dtype, cfg, smem,
                               (w_mh_c, w_hh_c, b_rec, h, c, gates, dy, mx, mh, dgh, dgx, dmh,
                                dmx, dh_carry, dc_carry, lengths_k, rev, q_range[0], q_range[1],
                                U, bt), q_range)
        dh0 = dh_carry
    else:
        dh_rec = xp.zeros((B, H), dt)
        dm = xp.empty((B, H), dt)
        for s in range(T - 1, -1, -1):
            t = T - 1 - s if rev else s
            if s + 1 < T:
                xp.matmul(dmh[t + 1 - 2 * rev], w_mh_c, out=dh_rec)
            rt.launch_pointwise("lstm", "pointwise_bwd", dtype, B * H, cfg.threads,
                                (b_rec, h, c, gates, dy, dh_rec, dgh, dgx, dh_carry,
                                 dc_carry, lengths_k, rev, s), s)
            xp.matmul(dgh[t], w_hh_c, out=dm)
            _launch_pointwise(rt, dtype, B * H, cfg.threads,
                              (dm, mx, mh, dmh, dmx, lengths_k, rev, s), s)
        t0 = T - 1 if rev else 0
        dh0 = dh_carry + xp.matmul(dmh[t0], w_mh_c)

    TB = T * B
    dgh2, dmh2, dmx2 = dgh.reshape(TB, 4 * H), dmh.reshape(TB, H), dmx.reshape(TB, H)
    x_seen = inputs_seen(x, lengths, xp).reshape(TB, I)
    m_seen = inputs_seen(mx * mh, lengths, xp).reshape(TB, H)
    h_in = h[rev: rev + T].reshape(TB, H)
    dx = (xp.matmul(dgh2, w_ih) + xp.matmul(dmx2, w_mx)).reshape(T, B, I)
    grads = {"weight_ih": xp.matmul(dgh2.T, x_seen), "weight_hh": xp.matmul(dgh2.T, m_seen)}
    if has_bias:
        db = dgh2.sum(axis=0)
        grads["bias_ih"] = db
        grads["bias_hh"] = db.copy()
    grads["weight_mx"] = xp.matmul(dmx2.T, x_seen)
    grads["weight_mh"] = xp.matmul(dmh2.T, h_in)
    return dx, dh0, dc_carry, grads
