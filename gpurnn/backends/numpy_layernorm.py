"""NumPy reference (the oracle) of the LayerNormLSTM and its regularisers, float32 and float64.
The math, the parameters, the `noise` dict and the saved layout (h, c, gates, xhat, hhat, stats)
are gpurnn/layernorm.py's; the habits are gpurnn/backends/numpy.py's: the input projection is
one GEMM over all T*B rows and its layer norm one pass over those rows, each step one GEMM
(h_{t-1} W_hh^T), its layer norm over the 4H features and pointwise work into preallocated
buffers, and backward forms every weight gradient with large GEMMs or sums after its loop.

Layer norm (eps = gpurnn.layernorm.EPS) with the two-pass statistics: mean, then the mean of the
squared deviations (no E[v^2] - E[v]^2 cancellation). Its backward, for vhat = (v - mean)*rstd:
    dv = rstd * (dvhat - mean(dvhat) - vhat * mean(dvhat * vhat))
Sigmoid is 0.5*tanh(a/2) + 0.5 (gpurnn.backends.numpy._sigmoid). Backward recomputes from the
saved gates what the forward did not keep: c~ = f*c_{t-1} + i*g (the saved c is c_t after
zoneout), its normalised form from the saved statistics, and tanh(LN(c~)).

Masked steps (t >= lengths[b]) copy h and c through and output exact zeros; whatever padded x
holds (NaN) stays out of every output and gradient (the parameter sums and the x-side layer-norm
backward read zeros for the padded rows' normalised projection and statistics). Nothing given is
written into: backward can be re-run on the same saved tuple and masks.

Import through gpurnn.backends.numpy (which re-exports layernorm_forward and layernorm_backward);
this module reads that one's helpers at its end, so either may be imported first.
"""
from __future__ import annotations

import numpy as np

from ..layernorm import EPS

__all__ = ["layernorm_forward", "layernorm_backward"]

# NaN/Inf in inputs propagate as IEEE arithmetic says (gpurnn.backends.numpy._ieee)
_IEEE = dict(over="ignore", invalid="ignore", divide="ignore")
NAME = "layernorm_lstm"


def layernorm_forward(x, params, h0, c0, lengths, reverse, need_saved, *, noise=None,
                      options=None):
    """(y (T, B, H), h_n (B, H), c_n (B, H), saved (h, c, gates, xhat, hhat, stats) | None);
    see gpurnn.layernorm."""
    check_options(options)
    noise = check_noise(NAME, noise)
    with np.errstate(**_IEEE):
        return _forward(x, params, h0, c0, lengths, reverse, need_saved, noise)


def layernorm_backward(x, params, saved, lengths, reverse, dy, dh_n, dc_n, *, noise=None,
                       options=None):
    """(dx, dh0, dc0, {param name: gradient}) of a layernorm_forward run with the same noise;
    see gpurnn.layernorm."""
    check_options(options)
    noise = check_noise(NAME, noise)
    with np.errstate(**_IEEE):
        return _backward(x, params, tuple(saved), lengths, reverse, dy, dh_n, dc_n, noise)


def _normalise(v, out, square):
    """Row statistics of v over its last axis and out = (v - mean) * rstd; (mean, rstd).
    `square` is scratch of v's shape."""
    mean = v.mean(axis=-1)
    np.subtract(v, mean[..., None], out=out)
    np.square(out, out=square)
    var = square.mean(axis=-1)
    var += EPS
    rstd = np.sqrt(var, out=var)
    np.divide(1, rstd, out=rstd)
    out *= rstd[..., None]
    return mean, rstd


def _normalise_backward(dhat, hat, rstd, out):
    """out = rstd * (dhat - mean(dhat) - hat * mean(dhat * hat)) over the last axis: the
    gradient of v given that of hat = (v - mean(v)) * rstd(v). out may be dhat."""
    scratch = np.multiply(dhat, hat)
    proj = scratch.mean(axis=-1)
    centre = dhat.mean(axis=-1)
    np.multiply(hat, proj[..., None], out=scratch)
    np.subtract(dhat, scratch, out=out)
    out -= centre[..., None]
    out *= rstd[..., None]
    return out


def _sizes(x, params):
    T, B, I = x.shape
    GH, H = params["weight_hh"].shape
    return T, B, I, H, GH


def _forward(x, params, h0, c0, lengths, reverse, need_saved, noise):
    T, B, I, H, GH = _sizes(x, params)
    dtype = x.dtype
    rev = 1 if reverse else 0
    rec_mask, zone_h, keep_h, zone_c, keep_c = _noise_parts(noise, dtype)

    # x side: one GEMM over all T*B rows, then every row's layer norm over its 4H features
    gx = np.matmul(x.reshape(T * B, I), params["weight_ih"].T)
    xhat = np.empty((T, B, GH), dtype)
    mean_x, rstd_x = _normalise(gx, xhat.reshape(T * B, GH), gx)   # gx's storage as scratch
    bias = params["layernorm_x_bias"] + params["layernorm_h_bias"]
    if "bias_ih" in params:
        bias = bias + params["bias_ih"] + params["bias_hh"]
    pre_x = np.multiply(xhat, params["layernorm_x_weight"])       # LN_x + every bias, (T, B, 4H)
    pre_x += bias
    g_h = params["layernorm_h_weight"]
    g_c, b_c = params["layernorm_c_weight"], params["layernorm_c_bias"]
    w_hh_t = np.ascontiguousarray(params["weight_hh"].T)            # a new array: (H, 4H)

    h = np.empty((T + 1, B, H), dtype)
    c = np.empty((T + 1, B, H), dtype)
    h[T if rev else 0] = h0
    c[T if rev else 0] = c0
    gates = np.empty((T, B, GH), dtype) if need_saved else None
    hhat = np.empty((T, B, GH), dtype) if need_saved else None
    stats = np.empty((T, B, 6), dtype)
    stats[:, :, 0] = mean_x.reshape(T, B)
    stats[:, :, 1] = rstd_x.reshape(T, B)
    step_gates = np.empty((B, GH), dtype)      # used when nothing is saved
    step_hhat = np.empty((B, GH), dtype)
    rec = np.empty((B, GH), dtype)
    square = np.empty((B, GH), dtype)
    h_masked = np.empty((B, H), dtype) if rec_mask is not None else None
    c_new = np.empty((B, H), dtype)             # c~
    c_hat = np.empty((B, H), dtype)
    tmp = np.empty((B, H), dtype)
    idle_rows = _masks(lengths, T)

    for s in range(T):
        t = T - 1 - s if rev else s
        h_in, h_out = h[t + rev], h[t + 1 - rev]
        c_in, c_out = c[t + rev], c[t + 1 - rev]
        if rec_mask is None:
            np.matmul(h_in, w_hh_t, out=rec)
        else:           # variational dropout: only the product with W_hh sees the mask
            np.multiply(h_in, rec_mask, out=h_masked)
            np.matmul(h_masked, w_hh_t, out=rec)
        hh = hhat[t] if hhat is not None else step_hhat
        stats[t, :, 2], stats[t, :, 3] = _normalise(rec, hh, square)
        a = gates[t] if gates is not None else step_gates
        np.multiply(hh, g_h, out=a)
        a += pre_x[t]
        i, f, g, o = a[:, :H], a[:, H: 2 * H], a[:, 2 * H: 3 * H], a[:, 3 * H:]
        _sigmoid(a[:, : 2 * H], a[:, : 2 * H])
        np.tanh(g, out=g)
        _sigmoid(o, o)
        np.multiply(f, c_in, out=c_new)
        np.multiply(i, g, out=tmp)
        c_new += tmp
        stats[t, :, 4], stats[t, :, 5] = _normalise(c_new, c_hat, tmp)
        c_hat *= g_c
        c_hat += b_c
        np.tanh(c_hat, out=h_out)
        h_out *= o                              # h~ = o * tanh(LN(c~))
        # zoneout: c_t = d_c*c_{t-1} + (1-d_c)*c~ ; h_t = d_h*h_{t-1} + (1-d_h)*h~
        if zone_c is None:
            c_out[...] = c_new
        else:
            np.multiply(zone_c[t], c_in, out=tmp)
            np.multiply(c_new, keep_c[t], out=c_out)
            c_out += tmp
        if zone_h is not None:
            np.multiply(zone_h[t], h_in, out=tmp)
            h_out *= keep_h[t]
            h_out += tmp
        idle = idle_rows[t]
        if idle is not None:
            h_out[idle] = h_in[idle]
            c_out[idle] = c_in[idle]

    y = h[1 - rev: T + 1 - rev].copy()      # step t's output state, in time order
    if lengths is not None:
        y[np.arange(T)[:, None] >= np.asarray(lengths)[None, :]] = 0   # exact zeros, even for NaN
    h_n = h[0 if rev else T].copy()
    c_n = c[0 if rev else T].copy()
    saved = (h, c, gates, xhat, hhat, stats) if need_saved else None
    return y, h_n, c_n, saved


def _backward(x, params, saved, lengths, reverse, dy, dh_n, dc_n, noise):
    T, B, I, H, GH = _sizes(x, params)
    TB = T * B
    dtype = x.dtype
    rev = 1 if reverse else 0
    h, c, gates, xhat, hhat, stats = saved
    rec_mask, zone_h, keep_h, zone_c, keep_c = _noise_parts(noise, dtype)
    w_hh = params["weight_hh"]
    g_h, g_c = params["layernorm_h_weight"], params["layernorm_c_weight"]
    seen = _seen(lengths, T)
    h_in_all = h[rev: rev + T]                  # step t's input state, time order
    c_in_all = c[rev: rev + T]

    # What does not depend on the incoming gradient, for every step at once (time order):
    #   do = dh~*ko ; dLN(c~) = dh~*kn ; [di, df, dg] = dc~*k_ifg ; dc_{t-1} = dc~*f (+ zoneout)
    g4 = gates.reshape(T, B, 4, H)
    i, f, g, o = g4[:, :, 0], g4[:, :, 1], g4[:, :, 2], g4[:, :, 3]
    c_new = np.multiply(f, c_in_all)            # c~, as the forward formed it
    c_new += np.multiply(i, g)
    c_hat = np.subtract(c_new, stats[:, :, 4, None], out=c_new)
    c_hat *= stats[:, :, 5, None]
    rstd_c = stats[:, :, 5]
    tanh_n = np.multiply(c_hat, g_c)
    tanh_n += params["layernorm_c_bias"]
    np.tanh(tanh_n, out=tanh_n)
    ko = np.subtract(1, o)
    ko *= o
    ko *= tanh_n
    kn = np.multiply(tanh_n, tanh_n, out=tanh_n)
    np.subtract(1, kn, out=kn)
    kn *= o
    k_ifg = np.empty((T, B, 3, H), dtype)
    np.subtract(1, i, out=k_ifg[:, :, 0])
    k_ifg[:, :, 0] *= i
    k_ifg[:, :, 0] *= g
    np.subtract(1, f, out=k_ifg[:, :, 1])
    k_ifg[:, :, 1] *= f
    k_ifg[:, :, 1] *= c_in_all
    np.multiply(g, g, out=k_ifg[:, :, 2])
    np.subtract(1, k_ifg[:, :, 2], out=k_ifg[:, :, 2])
    k_ifg[:, :, 2] *= i

    dgates = np.empty((T, B, GH), dtype)        # gradient of the pre-activations
    dg4 = dgates.reshape(T, B, 4, H)
    drec = np.empty((T, B, GH), dtype)          # ... of h_{t-1} W_hh^T (before its layer norm)
    dnorm_c = np.empty((T, B, H), dtype)        # ... of LN(c~)
    dh = np.array(dh_n, dtype=dtype, copy=True)
    dc = np.array(dc_n, dtype=dtype, copy=True)
    dh_t = np.empty((B, H), dtype)
    dc_hat = np.empty((B, H), dtype)
    if zone_h is not None:
        held_h = np.empty((B, H), dtype)        # d_h * dh_t: what zoneout hands to h_{t-1}
    if zone_c is not None:
        held_c = np.empty((B, H), dtype)
    idle_rows = _masks(lengths, T)

    for t in (range(T) if rev else range(T - 1, -1, -1)):     # the forward's steps, last first
        idle = idle_rows[t]
        if idle is not None:
            carried_h = dh[idle].copy()
            carried_c = dc[idle].copy()
        np.add(dh, dy[t], out=dh_t)
        # zoneout splits the gradients of h_t and c_t: d*(.) to the previous state, (1-d)*(.)
        # to the cell's own h~ and c~ (dh_t and dc from here)
        if zone_h is not None:
            np.multiply(dh_t, zone_h[t], out=held_h)
            dh_t *= keep_h[t]
        if zone_c is not None:
            np.multiply(dc, zone_c[t], out=held_c)
            dc *= keep_c[t]
        dg = dg4[t]
        np.multiply(dh_t, ko[t], out=dg[:, 3])
        np.multiply(dh_t, kn[t], out=dnorm_c[t])
        np.multiply(dnorm_c[t], g_c, out=dc_hat)
        dc += _normalise_backward(dc_hat, c_hat[t], rstd_c[t], dc_hat)
        np.multiply(dc[:, None, :], k_ifg[t], out=dg[:, :3])
        dc *= f[t]
        if zone_c is not None:
            dc += held_c
        if idle is not None:
            # masked steps copied the state through: no gradient reaches their gates
            dgates[t, idle] = 0
            dnorm_c[t, idle] = 0
        np.multiply(dgates[t], g_h, out=drec[t])
        _normalise_backward(drec[t], hhat[t], stats[t, :, 3], drec[t])
        np.matmul(drec[t], w_hh, out=dh)
        if rec_mask is not None:
            dh *= rec_mask
        if zone_h is not None:
            dh += held_h
        if idle is not None:
            dh[idle] = carried_h
            dc[idle] = carried_c

    # the x side: padded rows (NaN x, say) read zeros, so their zero gradients stay zero
    xhat_seen, rstd_x = xhat, stats[:, :, 1]
    c_hat_seen = c_hat
    if seen is not None:
        xhat_seen = np.where(seen, xhat, 0)
        rstd_x = np.where(seen[..., 0], rstd_x, 0)
        c_hat_seen = np.where(seen, c_hat, 0)
    dg2 = dgates.reshape(TB, GH)
    dgx = np.multiply(dgates, params["layernorm_x_weight"])
    _normalise_backward(dgx, xhat_seen, rstd_x, dgx)
    dgx2 = dgx.reshape(TB, GH)
    dx = np.matmul(dgx2, params["weight_ih"]).reshape(T, B, I)
    h_seen = h_in_all if rec_mask is None else np.multiply(h_in_all, rec_mask)   # what W_hh saw
    db = dg2.sum(axis=0)
    grads = {"weight_ih": np.matmul(dgx2.T, inputs_seen(x, lengths, np).reshape(TB, I)),
             "weight_hh": np.matmul(drec.reshape(TB, GH).T, h_seen.reshape(TB, H))}
    if "bias_ih" in params:
        grads["bias_ih"] = db.copy()
        grads["bias_hh"] = db.copy()
    grads["layernorm_x_weight"] = np.einsum("tbk,tbk->k", dgates, xhat_seen)
    grads["layernorm_x_bias"] = db.copy()
    grads["layernorm_h_weight"] = np.einsum("tbk,tbk->k", dgates, hhat)
    grads["layernorm_h_bias"] = db
    grads["layernorm_c_weight"] = np.einsum("tbh,tbh->h", dnorm_c, c_hat_seen)
    grads["layernorm_c_bias"] = dnorm_c.reshape(TB, H).sum(axis=0)
    return dx, dh, dc, grads


# gpurnn.backends.numpy re-exports this module's entry points from its last line, so its helpers
# are imported here, after they are defined: either module may be imported first
from .numpy import (_masks, _noise_parts, _sigmoid, check_noise, check_options,  # noqa: E402
                    inputs_seen)
from .numpy_lstm import _seen  # noqa: E402
