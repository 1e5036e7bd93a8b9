"""The LayerNormLSTM on the kernel backends (cuda, and sim through its Runtime): the host side of
gpurnn/kernels/layernorm.py, written once against `rt.xp` as gpurnn.backends.cuda is. The math,
the parameters, the saved layout and the `noise` dict are gpurnn/layernorm.py's.

  forward   xg = x W_ih^T (one GEMM over all T*B rows), its per-row mean and rstd (two-pass),
            xhat, gx = g_x xhat + b_x + b_ih + b_hh; then the persistent kernel (one launch, two
            grid barriers a step, 2T+1 half-phases), or per step: GEMM (h_{t-1} * mask) W_hh^T,
            the host's h-side row statistics, the gate kernel (c~), the host's c~ statistics,
            the output kernel
  backward  the persistent kernel (one launch, 2T+1 half-phases), or per step: GEMM
            (da_next W_hh) * mask, the c-side kernel, the host's row means of dchat and
            dchat*chat, the gate-side kernel, the host's da (the LN-h backward); then the LN-x
            backward and dx = dxg W_ih, dW_ih = dxg^T x, dW_hh = da^T (h_{t-1} * mask), the LN
            parameters' and the biases' gradients as sums, with padded steps' x, xhat and chat
            zeroed (their gradients are 0, but a NaN in padding must not reach a sum)
Entry points (the lead's gpurnn.backends.cuda / sim layernorm_forward / layernorm_backward call
them with their Runtime; returns as gpurnn/layernorm.py documents):
    run_forward(rt, x, params, h0, c0, lengths, reverse, need_saved, noise, options)
        -> (y, h_n, c_n, (h, c, gates, xhat, hhat, stats) | None)
    run_backward(rt, x, params, saved, lengths, reverse, dy, dh_n, dc_n, noise, options)
        -> (dx, dh0, dc0, {param name: gradient})
params: {"weight_ih", "weight_hh", ["bias_ih", "bias_hh",] "layernorm_x_weight", ...} without
the stack's suffix. options: the cuda backend's {"path", "blocks", "threads", "batch_tile"}
(the sim backend takes its 'simulator' key off first). The saved tuple carries no launch, so
backward plans again from the same options (the same plan). Uses gpurnn.backends.cuda's
private _kernel_lengths (the same host side, split over files) and gpurnn.backends.launching
(the launch choice and the launches every kernel family shares).
"""
from __future__ import annotations

import functools

import numpy as np

from . import cuda as host
from . import launching
from .numpy import inputs_seen
from ..kernels import layernorm as kernels
from ..kernels.cellmath import LN_REC, LN_ZC, LN_ZH
from ..layernorm import EPS, NOISE_KEYS
from ..planning import layernorm as planning

LN_NAMES = ("layernorm_x_weight", "layernorm_x_bias", "layernorm_h_weight", "layernorm_h_bias",
            "layernorm_c_weight", "layernorm_c_bias")


_kernel = launching.KernelCache(kernels.spec)     # (rt, kind, dtype) -> (spec, kernel)
_launch_persistent = _kernel.persistent
_launch_pointwise = _kernel.pointwise
# the launch configuration (gpurnn.backends.cuda.LaunchConfig): options where given, the
# plan (gpurnn.planning.layernorm) for the rest
choose_launch = functools.partial(launching.choose_layer_launch, planning)


def _noise(xp, noise, T, B, H, dt):
    """(bit mask, rmask (B, H) | (1, 1), zone (2, T, B, H) [zoneout_h; zoneout_c] | (2, 1, 1, 1))
    from `noise` (an absent zoneout mask's half of zone is zeros and its bit is off)."""
    noise = {} if noise is None else noise
    unknown = sorted(set(noise) - set(NOISE_KEYS), key=str)
    if unknown:
        raise ValueError(f"noise has unknown keys {unknown}; expected a subset of {NOISE_KEYS}")
    masks = {}
    for key, shape in (("recurrent", (B, H)), ("zoneout_h", (T, B, H)), ("zoneout_c", (T, B, H))):
        a = noise.get(key)
        if a is not None:
            a = xp.asarray(a, dtype=dt)
            if a.shape != shape:
                raise ValueError(f"noise[{key!r}] must have shape {shape}; got {a.shape}")
            masks[key] = a
    bits = ((LN_REC if "recurrent" in masks else 0) | (LN_ZH if "zoneout_h" in masks else 0)
            | (LN_ZC if "zoneout_c" in masks else 0))
    rmask = (xp.ascontiguousarray(masks["recurrent"]) if "recurrent" in masks
             else xp.zeros((1, 1), dt))
    if bits & (LN_ZH | LN_ZC):
        zone = xp.zeros((2, T, B, H), dt)
        for i, key in enumerate(("zoneout_h", "zoneout_c")):
            if key in masks:
                zone[i] = masks[key]
    else:
        zone = xp.zeros((2, 1, 1, 1), dt)
    return bits, rmask, zone


def _ln_params(xp, params, dt):
    """lnp (2, 5H): [layernorm_h_weight, layernorm_c_weight; layernorm_h_bias, layernorm_c_bias]."""
    return xp.ascontiguousarray(xp.stack([
        xp.concatenate([params["layernorm_h_weight"], params["layernorm_c_weight"]]),
        xp.concatenate([params["layernorm_h_bias"], params["layernorm_c_bias"]])]), dtype=dt)


def _row_stats(xp, a):
    """(mean, rstd) over the last axis: two-pass, the biased variance, EPS inside the root."""
    mean = a.mean(axis=-1)
    d = a - mean[..., None]
    return mean, 1.0 / xp.sqrt((d * d).mean(axis=-1) + EPS)


def _active(xp, lengths, T, B):
    """(T, B) bool: t < lengths[b]."""
    if lengths is None:
        return xp.ones((T, B), bool)
    return xp.asarray(np.arange(T)[:, None] < np.asarray(lengths)[None, :])


def _stats_into(xp, a, rowstat, stats, t, col, save):
    """The row statistics of a (B, F) into rowstat (mean, rstd) and, when saving, into
    stats[t, :, col:col + 2]."""
    mean, rstd = _row_stats(xp, a)
    rowstat[:, 0] = mean
    rowstat[:, 1] = rstd
    if save:
        stats[t, :, col] = mean
        stats[t, :, col + 1] = rstd


def _call(rt, x, params, reverse, noise, options):
    """What run_forward and run_backward start from: (T, B, I, H, the dtype's name, rev, the
    launch, (bits, rmask, zone) of the noise); a TypeError for a dtype the kernels lack."""
    T, B, I = x.shape
    H = params["weight_hh"].shape[1]
    dtype = np.dtype(x.dtype).name
    if dtype not in kernels.DTYPES:
        raise TypeError(f"x has dtype {dtype}; the LayerNormLSTM kernels run in {kernels.DTYPES}")
    cfg = choose_launch(I, H, B, dtype, rt.device, options, rt.name)
    return T, B, I, H, dtype, 1 if reverse else 0, cfg, _noise(rt.xp, noise, T, B, H, x.dtype)


def run_forward(rt, x, params, h0, c0, lengths, reverse, need_saved, noise, options):
    xp, dt = rt.xp, x.dtype
    T, B, I, H, dtype, rev, cfg, (bits, rmask, zone) = _call(rt, x, params, reverse, noise,
                                                             options)
    w_ih, w_hh = params["weight_ih"], params["weight_hh"]
    b_ih, b_hh = params.get("bias_ih"), params.get("bias_hh")
    GH = 4 * H

    xg = xp.matmul(x.reshape(T * B, I), w_ih.T).reshape(T, B, GH)
    mean_x, rstd_x = _row_stats(xp, xg)
    xhat = (xg - mean_x[..., None]) * rstd_x[..., None]
    gx = xhat * params["layernorm_x_weight"] + params["layernorm_x_bias"]
    if b_ih is not None:
        gx += b_ih + b_hh
    gx = xp.ascontiguousarray(gx, dtype=dt)
    lnp = _ln_params(xp, params, dt)
    h = xp.empty((T + 1, B, H), dt)
    c = xp.empty((T + 1, B, H), dt)
    h[T if rev else 0] = h0
    c[T if rev else 0] = c0
    save = 1 if need_saved else 0
    Tg = T if save else 1
    gates = xp.empty((Tg, B, GH), dt)
    hhat = xp.empty((Tg, B, GH), dt)
    stats = xp.empty((Tg, B, 6), dt)
    if save:
        stats[:, :, 0] = mean_x
        stats[:, :, 1] = rstd_x
    y = xp.empty((T, B, H), dt)
    ctil = xp.empty((B, H), dt)
    lengths_k = host._kernel_lengths(xp, lengths, T, B)

    if cfg.path == "persistent":
        U, bt = cfg.units_per_block, cfg.batch_tile
        part = xp.empty((2, cfg.blocks, B, 2), dt)
        smem = kernels.smem_bytes("fwd", H, bt, U, dtype, threads=cfg.threads)
        w_hh_c = xp.ascontiguousarray(w_hh)
        for q_range in launching.phase_ranges(rt, cfg.blocks, 2 * T + 1):
            _launch_persistent(rt, "persistent_fwd", dtype, cfg, smem,
                               (gx, w_hh_c, lnp, rmask, zone, h, c, gates, hhat, stats, y, ctil,
                                part, lengths_k, rev, q_range[0], q_range[1], U, save, bt,
                                bits), q_range)
    else:
        w_hh_t = xp.ascontiguousarray(w_hh.T)
        ah = xp.empty((1, B, GH), dt)
        rowstat = xp.empty((B, 2), dt)
        n = B * H
        for s in range(T):
            t = T - 1 - s if rev else s
            h_in = h[t + rev] * rmask if bits & LN_REC else h[t + rev]
            xp.matmul(h_in, w_hh_t, out=ah[0])
            _stats_into(xp, ah[0], rowstat, stats, t, 2, save)
            _launch_pointwise(rt, "pointwise_fwd_gates", dtype, n, cfg.threads,
                              (gx, lnp, ah, hhat, gates, c, ctil, zone, rowstat, lengths_k, rev, s,
                               save, bits), s)
            _stats_into(xp, ctil, rowstat, stats, t, 4, save)
            _launch_pointwise(rt, "pointwise_fwd_out", dtype, n, cfg.threads,
                              (gates, ctil, h, y, lnp, zone, rowstat, lengths_k, rev, s, save,
                               bits), s)

    h_n = h[0 if rev else T].copy()
    c_n = c[0 if rev else T].copy()
    saved = (h, c, gates, xhat.astype(dt, copy=False), hhat, stats) if need_saved else None
    return y, h_n, c_n, saved


def run_backward(rt, x, params, saved, lengths, reverse, dy, dh_n, dc_n, noise, options):
    xp, dt = rt.xp, x.dtype
    w_ih, w_hh = params["weight_ih"], params["weight_hh"]
    has_bias = params.get("bias_ih") is not None
    h, c, gates, xhat, hhat, stats = (xp.ascontiguousarray(a) for a in saved)
    T, B, I, H, dtype, rev, cfg, (bits, rmask, zone) = _call(rt, x, params, reverse, noise,
                                                             options)
    GH = 4 * H
    lnp = _ln_params(xp, params, dt)

    dz = xp.empty((T, B, GH), dt)
    da = xp.empty((T, B, GH), dt)
    dl = xp.empty((T, B, H), dt)
    dchat = xp.empty((B, H), dt)
    # a cotangent the caller has none for (None) is zero, as in gpurnn.backends.cuda
    dh_carry = (xp.zeros((B, H), dt) if dh_n is None
                else xp.array(dh_n, dtype=dt, copy=True, order="C"))
    dc_carry = (xp.zeros((B, H), dt) if dc_n is None
                else xp.array(dc_n, dtype=dt, copy=True, order="C"))
    dy = xp.zeros((T, B, H), dt) if dy is None else xp.ascontiguousarray(dy, dtype=dt)
    lengths_k = host._kernel_lengths(xp, lengths, T, B)
    active = _active(xp, lengths, T, B)
    w_hh_c = xp.ascontiguousarray(w_hh)

    if cfg.path == "persistent":
        U, bt = cfg.units_per_block, cfg.batch_tile
        part = xp.empty((2, cfg.blocks, B, 2), dt)
        smem = kernels.smem_bytes("bwd", H, bt, U, dtype, threads=cfg.threads)
        for q_range in launching.phase_ranges(rt, cfg.blocks, 2 * T + 1):
            _launch_persistent(rt, "persistent_bwd", dtype, cfg, smem,
                               (w_hh_c, lnp, rmask, zone, c, gates, hhat, stats, dy, dz, da,
                                dl, dchat, dh_carry, dc_carry, part, lengths_k, rev,
                                q_range[0], q_range[1], U, bt, bits), q_range)
        dh0 = dh_carry
    else:
        dhrec = xp.zeros((B, H), dt)
        cprod = xp.empty((B, H), dt)
        rowstat = xp.empty((B, 2), dt)
        n = B * H
        g_h = params["layernorm_h_weight"]
        for s in range(T - 1, -1, -1):
            t = T - 1 - s if rev else s
            if s + 1 < T:
                xp.matmul(da[t + 1 - 2 * rev], w_hh_c, out=dhrec)
                if bits & LN_REC:
                    dhrec *= rmask
            _launch_pointwise(rt, "pointwise_bwd_c", dtype, n, cfg.threads,
                              (gates, c, stats, lnp, zone, dy, dhrec, dh_carry, dz, dl, dchat,
                               cprod, lengths_k, rev, s, bits), s)
            rowstat[:, 0] = dchat.mean(axis=1)
            rowstat[:, 1] = cprod.mean(axis=1)
            _launch_pointwise(rt, "pointwise_bwd_gates", dtype, n, cfg.threads,
                              (gates, c, stats, lnp, zone, hhat, dz, dchat, dc_carry, rowstat,
                               lengths_k, rev, s, bits), s)
            dhh = g_h * dz[t]
            m1 = dhh.mean(axis=1, keepdims=True)
            m2 = (dhh * hhat[t]).mean(axis=1, keepdims=True)
            da_t = stats[t, :, 3:4] * (dhh - m1 - hhat[t] * m2)
            da[t] = xp.where(active[t][:, None], da_t, 0)
        dh0 = dh_carry
        if T > 0:
            rec0 = xp.matmul(da[T - 1 if rev else 0], w_hh_c)
            dh0 = dh_carry + (rec0 * rmask if bits & LN_REC else rec0)

    TB = T * B
    seen = active[..., None]
    dz2, da2 = dz.reshape(TB, GH), da.reshape(TB, GH)
    xhat_s = xp.where(seen, xhat, 0)
    rstd_x = xp.where(active, stats[:, :, 1], 0)[..., None]
    dxhat = dz * params["layernorm_x_weight"]
    dxg = rstd_x * (dxhat - dxhat.mean(axis=-1, keepdims=True)
                    - xhat_s * (dxhat * xhat_s).mean(axis=-1, keepdims=True))
    dxg2 = dxg.reshape(TB, GH)
    x_seen = inputs_seen(x, lengths, xp).reshape(TB, I)
    h_in = h[rev: rev + T]
    if bits & LN_REC:
        h_in = h_in * rmask
    ct = gates[:, :, H:2 * H] * c[rev: rev + T] + gates[:, :, :H] * gates[:, :, 2 * H:3 * H]
    chat = xp.where(seen, (ct - stats[:, :, 4:5]) * stats[:, :, 5:6], 0)
    dx = xp.matmul(dxg2, w_ih).reshape(T, B, I)
    grads = {"weight_ih": xp.matmul(dxg2.T, x_seen),
             "weight_hh": xp.matmul(da2.T, h_in.reshape(TB, H))}
    if has_bias:
        db = dz2.sum(axis=0)
        grads["bias_ih"] = db
        grads["bias_hh"] = db.copy()
    grads["layernorm_x_weight"] = (dz * xhat_s).reshape(TB, GH).sum(axis=0)
    grads["layernorm_x_bias"] = dz2.sum(axis=0)
    grads["layernorm_h_weight"] = (dz * hhat).reshape(TB, GH).sum(axis=0)
    grads["layernorm_h_bias"] = dz2.sum(axis=0)
    grads["layernorm_c_weight"] = (dl * chat).reshape(TB, H).sum(axis=0)
    grads["layernorm_c_bias"] = dl.reshape(TB, H).sum(axis=0)
    grads = {k: xp.asarray(v, dtype=dt) for k, v in grads.items()}
    return dx.astype(dt, copy=False), dh0, dc_carry, grads
