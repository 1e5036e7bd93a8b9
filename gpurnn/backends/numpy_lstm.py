"""NumPy reference (the oracle) of the LSTM family of gpurnn.variants: plain, peephole, coupled
(CIFG), coupled + peephole, multiplicative (mLSTM) and the projection (proj_size), float32 and
float64. The math, the parameter shapes and the saved layout (h, c, gates[, mx, mh]) are
gpurnn/variants.py's; the habits are gpurnn/backends/numpy.py's: the input projections are one
GEMM over all T*B rows, each step one or two GEMMs plus pointwise work into preallocated
buffers, backward forms every weight gradient with large GEMMs after its loop, and what a
backward step needs that does not depend on the incoming gradient is formed for a chunk of
steps at once.

Gate arithmetic. sigma(a) = 0.5*tanh(a/2) + 0.5, with the sigmoid gates' columns of both
projections (and the peephole weights) halved up front, exact in binary floating point, so a
step activates its gates with one tanh and one affine map. Peepholes are added to the
pre-activations (i, f see c_{t-1}; o sees c_t, so o is activated after the new cell), and in
backward they are folded into the per-step factors (dc_prev = dc * (f + ki*w_ci + kf*w_cf),
dc += dh * (kh + ko*w_co)): the sequential loop is the plain cell's, and zero peephole weights
add exact zeros, giving the plain cell's results bit for bit.
  coupled  f = 1 - i ; c_t = c_{t-1} + i*(g - c_{t-1})
  mlstm    m_t = mx_t * mh_t, mx = x W_mx^T (one GEMM), mh_t = h_{t-1} W_mh^T (per step)
  proj     h_t = (o*tanh(c_t)) W_hr^T ; backward recomputes o*tanh(c_t) from gates and c

Masked steps (t >= lengths[b]) copy h and c through and output exact zeros; whatever padded x
holds (NaN) stays out of every gradient (the weight GEMMs read zeroed copies of padded x, mx*mh
and o*tanh(c)). Nothing given is written into: backward can be re-run on the same saved tuple.

Few big arrays: fresh pages are slow to fault in, at these sizes as slow as the extra FLOPs of
a variant, so the input projection is formed in the saved gates and activated there, and
backward keeps the gradients of x's projections side by side in one buffer.

gpurnn.backends.numpy re-exports lstm_forward and lstm_backward; this module reads that one's
helpers at its end, so either may be imported first.
"""
from __future__ import annotations

import numpy as np

__all__ = ["lstm_forward", "lstm_backward"]

# NaN/Inf in inputs propagate as IEEE arithmetic says (gpurnn.backends.numpy._ieee)
_IEEE = dict(over="ignore", invalid="ignore", divide="ignore")


def _sizes(form, x, params):
    """(T, B, I, G, H, R) of a call."""
    T, B, I = x.shape
    GH, R = params["weight_hh"].shape
    G = form.gates
    return T, B, I, G, GH // G, R


def _gate_affine(form, H, dtype):
    """(scale, shift) per gate column: gate = tanh(a * scale) * scale + shift, i.e. sigmoid for
    i, f, o (scale 0.5, shift 0.5) and tanh for g (1, 0). Coupled gates are [i, g, o]."""
    g = 1 if form.coupled else 2
    scale = np.full((form.gates, H), 0.5, dtype)
    shift = np.full((form.gates, H), 0.5, dtype)
    scale[g], shift[g] = 1, 0
    return scale.reshape(-1), shift.reshape(-1)


def _peepholes(form, params, H, factor=1):
    """(w_ci, w_cf, w_co) of weight_ch times `factor` (w_cf None for the coupled cell), or
    None without peepholes."""
    if not form.peephole:
        return None
    w = params["weight_ch"] * factor if factor != 1 else params["weight_ch"]
    if form.coupled:
        return w[:H], None, w[H:]
    return w[:H], w[H: 2 * H], w[2 * H:]


def _seen(lengths, T):
    """(T, B, 1) bool, True where step t is active for row b; None when all are."""
    if lengths is None:
        return None
    return (np.arange(T)[:, None] < np.asarray(lengths)[None, :])[..., None]


def lstm_forward(form, x, params, h0, c0, lengths, reverse, need_saved, *, options=None):
    """(y (T, B, R), h_n (B, R), c_n (B, H), saved (h, c, gates[, mx, mh]) | None); see
    gpurnn.variants."""
    check_options(options)
    with np.errstate(**_IEEE):
        return _forward(form, x, params, h0, c0, lengths, reverse, need_saved)


def lstm_backward(form, x, params, saved, lengths, reverse, dy, dh_n, dc_n, *, options=None):
    """(dx, dh0, dc0, {param name: gradient}) of an lstm_forward; see gpurnn.variants."""
    check_options(options)
    with np.errstate(**_IEEE):
        return _backward(form, x, params, saved, lengths, reverse, dy, dh_n, dc_n)


def _forward(form, x, params, h0, c0, lengths, reverse, need_saved):
    T, B, I, G, H, R = _sizes(form, x, params)
    GH = G * H
    dtype = x.dtype
    rev = 1 if reverse else 0
    scale, shift = _gate_affine(form, H, dtype)
    x2 = x.reshape(T * B, I)

    # The input projection, with the halved sigmoid columns folded into W_ih and the bias
    # (exact), lands in `gates` itself: each step adds its recurrent part and activates it in
    # place (no second (T, B, G*H) array: fresh pages are slow to fault in).
    gates = np.empty((T, B, GH), dtype)
    np.matmul(x2, (params["weight_ih"] * scale[:, None]).T, out=gates.reshape(T * B, GH))
    if "bias_ih" in params:
        gates += (params["bias_ih"] + params["bias_hh"]) * scale
    # (R or H, G*H), halved sigmoid columns; a new array, never a view of the caller's weights
    w_hh_t = np.multiply(params["weight_hh"].T, scale, out=np.empty((R, GH), dtype))
    peep = _peepholes(form, params, H, factor=0.5)
    if peep is not None:
        w_ci, w_cf, w_co = peep
        w_cif = np.stack([w_ci, w_cf]) if w_cf is not None else None
    mlstm, proj = form.multiplicative, form.proj_size > 0
    if mlstm:
        mx = np.matmul(x2, params["weight_mx"].T).reshape(T, B, H)
        w_mh_t = np.ascontiguousarray(params["weight_mh"].T)
        mh = np.empty((T, B, H), dtype) if need_saved else None
        mh_step = np.empty((B, H), dtype)
        m = np.empty((B, H), dtype)
    if proj:
        w_hr_t = np.ascontiguousarray(params["weight_hr"].T)       # (H, R)
        h_raw = np.empty((B, H), dtype)

    h = np.empty((T + 1, B, R), dtype)
    c = np.empty((T + 1, B, H), dtype)
    h[T if rev else 0] = h0
    c[T if rev else 0] = c0
    rec = np.empty((B, GH), dtype)
    tmp = np.empty((B, H), dtype)
    tmp2 = np.empty((B, 2, H), dtype)
    idle_rows = _masks(lengths, T)
    gi, gg = 0, (1 if form.coupled else 2)
    last = (G - 1) * H                     # columns before o

    for s in range(T):
        t = T - 1 - s if rev else s
        h_in, h_out = h[t + rev], h[t + 1 - rev]
        c_in, c_out = c[t + rev], c[t + 1 - rev]
        if mlstm:
            mh_t = mh[t] if mh is not None else mh_step
            np.matmul(h_in, w_mh_t, out=mh_t)
            np.multiply(mx[t], mh_t, out=m)
            np.matmul(m, w_hh_t, out=rec)
        else:
            np.matmul(h_in, w_hh_t, out=rec)
        a = gates[t]
        np.add(a, rec, out=a)
        a3 = a.reshape(B, G, H)
        i, g, o = a3[:, gi], a3[:, gg], a3[:, G - 1]
        if peep is None:
            np.tanh(a, out=a)
            a *= scale
            a += shift
        else:
            if w_cif is not None:
                np.multiply(c_in[:, None, :], w_cif, out=tmp2)
                a3[:, :2] += tmp2
            else:
                np.multiply(c_in, w_ci, out=tmp)
                i += tmp
            a_if = a[:, :last]
            np.tanh(a_if, out=a_if)
            a_if *= scale[:last]
            a_if += shift[:last]
        if form.coupled:
            np.subtract(g, c_in, out=tmp)
            tmp *= i
            np.add(c_in, tmp, out=c_out)
        else:
            np.multiply(a3[:, 1], c_in, out=c_out)
            np.multiply(i, g, out=tmp)
            c_out += tmp
        if peep is not None:                # the output gate sees the new cell
            np.multiply(c_out, w_co, out=tmp)
            o += tmp
            np.tanh(o, out=o)
            o *= 0.5
            o += 0.5
        if proj:
            np.tanh(c_out, out=h_raw)
            h_raw *= o
            np.matmul(h_raw, w_hr_t, out=h_out)
        else:
            np.tanh(c_out, out=h_out)
            h_out *= o
        idle = idle_rows[t]
        if idle is not None:
            h_out[idle] = h_in[idle]
            c_out[idle] = c_in[idle]

    y = h[1 - rev: T + 1 - rev].copy()      # step t's output state, in time order
    if lengths is not None:
        y[np.arange(T)[:, None] >= lengths[None, :]] = 0     # exact zeros, even for a NaN state
    h_n = h[0 if rev else T].copy()
    c_n = c[0 if rev else T].copy()
    saved = None
    if need_saved:
        saved = (h, c, gates) + ((mx, mh) if mlstm else ())
    return y, h_n, c_n, saved


def _backward_factors(form, gates, c_out, c_in, H, peep):
    """The parts of a block of steps' gate gradients that do not depend on the incoming
    gradient (time order). With dh the gradient of o*tanh(c_t) and dc that of c_t:
      do = dh*ko ; dc += dh*kh ; [di, (df,) dg] = dc*kc ; dc_prev = dc*carry
    and the peepholes folded in: kh += ko*w_co, carry += ki*w_ci (+ kf*w_cf)."""
    G = form.gates
    n, B = gates.shape[:2]
    g4 = gates.reshape(n, B, G, H)
    i, g, o = g4[:, :, 0], g4[:, :, G - 2], g4[:, :, G - 1]
    tanh_c = np.tanh(c_out)
    ko = np.subtract(1, o)
    ko *= o
    ko *= tanh_c
    kh = np.multiply(tanh_c, tanh_c, out=tanh_c)
    np.subtract(1, kh, out=kh)
    kh *= o
    kc = np.empty((n, B, G - 1, H), gates.dtype)
    ki, kg = kc[:, :, 0], kc[:, :, G - 2]
    np.subtract(1, i, out=ki)
    ki *= i
    if form.coupled:                      # c_t = c_{t-1} + i*(g - c_{t-1})
        carry = np.subtract(1, i)
        ki *= np.subtract(g, c_in)
    else:
        f = g4[:, :, 1]
        carry = f                         # a view of the saved gates: read only
        ki *= g
        kf = kc[:, :, 1]
        np.subtract(1, f, out=kf)
        kf *= f
        kf *= c_in
    np.multiply(g, g, out=kg)
    np.subtract(1, kg, out=kg)
    kg *= i
    if peep is not None:
        w_ci, w_cf, w_co = peep
        kh += ko * w_co
        folded = np.multiply(ki, w_ci)
        folded += carry
        if w_cf is not None:
            folded += kc[:, :, 1] * w_cf
        carry = folded
    return ko, kh, kc, carry


def _backward(form, x, params, saved, lengths, reverse, dy, dh_n, dc_n):
    T, B, I, G, H, R = _sizes(form, x, params)
    GH = G * H
    TB = T * B
    dtype = x.dtype
    rev = 1 if reverse else 0
    h, c, gates = saved[:3]
    mlstm, proj = form.multiplicative, form.proj_size > 0
    if mlstm:
        mx, mh = saved[3:5]
        w_mh = params["weight_mh"]
        dmh = np.empty((T, B, H), dtype)
    w_hh = params["weight_hh"]
    peep = _peepholes(form, params, H)
    if proj:
        w_hr = params["weight_hr"]
        dh_all = np.empty((T, B, R), dtype)      # gradient of each step's output h_t
        h_raw_all = np.empty((T, B, H), dtype)   # o*tanh(c_t), recomputed
        dh_raw = np.empty((B, H), dtype)
    else:
        dh_t = np.empty((B, R), dtype)

    # The gradients of x's projections side by side, [dgates | dmx] (mlstm: x W_ih^T and
    # x W_mx^T), so that dx is one GEMM. dmx's columns hold dm (the gradient of m_t) until the
    # loop is done.
    dxw = np.empty((T, B, GH + (H if mlstm else 0)), dtype)
    dgates = dxw[..., :GH]
    dg4 = dgates.reshape(T, B, G, H)
    if mlstm:
        dm = dxw[..., GH:]
    dh = np.array(dh_n, dtype=dtype, copy=True)
    dc = np.array(dc_n, dtype=dtype, copy=True)
    tmp = np.empty((B, H), dtype)
    idle_rows = _masks(lengths, T)
    h_in_all = h[rev: rev + T]                  # step t's input state, time order
    c_in_all, c_out_all = c[rev: rev + T], c[1 - rev: T + 1 - rev]

    # as gpurnn.backends.numpy: factors for chunks of ~64K elements, so they stay in cache
    chunk = max(1, min(T, (1 << 16) // max(1, B * H)))
    order = range(T) if rev else range(T - 1, -1, -1)      # the forward's steps, last first
    for first in range(0, T, chunk):
        steps = order[first: first + chunk]
        lo, hi = min(steps), max(steps) + 1
        ko, kh, kc, carry = _backward_factors(form, gates[lo:hi], c_out_all[lo:hi],
                                              c_in_all[lo:hi], H, peep)
        if proj:
            # o*tanh(c_t), the projection's input: not saved, recomputed (gpurnn.variants)
            np.tanh(c_out_all[lo:hi], out=h_raw_all[lo:hi])
            h_raw_all[lo:hi] *= gates[lo:hi, :, (G - 1) * H:]
        for t in steps:
            j = t - lo
            idle = idle_rows[t]
            if idle is not None:
                carried_h = dh[idle].copy()
                carried_c = dc[idle].copy()
            if proj:
                dh_t = dh_all[t]
                np.add(dh, dy[t], out=dh_t)
                np.matmul(dh_t, w_hr, out=dh_raw)
                d_out = dh_raw
            else:
                np.add(dh, dy[t], out=dh_t)
                d_out = dh_t
            dg = dg4[t]
            np.multiply(d_out, ko[j], out=dg[:, G - 1])
            np.multiply(d_out, kh[j], out=tmp)
            dc += tmp
            np.multiply(dc[:, None, :], kc[j], out=dg[:, : G - 1])
            dc *= carry[j]
            if mlstm:
                np.matmul(dgates[t], w_hh, out=dm[t])
                np.multiply(dm[t], mx[t], out=dmh[t])
                np.matmul(dmh[t], w_mh, out=dh)
            else:
                np.matmul(dgates[t], w_hh, out=dh)
            if idle is not None:
                # masked steps copied the state through and output zeros
                dxw[t, idle] = 0
                if mlstm:
                    dmh[t, idle] = 0
                if proj:
                    dh_all[t, idle] = 0
                dh[idle] = carried_h
                dc[idle] = carried_c

    padded = None if lengths is None else np.arange(T)[:, None] >= lengths[None, :]   # (T, B)
    dg2 = dgates.reshape(TB, GH)
    x_seen = inputs_seen(x, lengths, np).reshape(TB, I)
    if mlstm:
        dmx = np.multiply(dm, mh, out=dm)              # mh (from h) is finite where dm = 0
        dx = np.matmul(dxw.reshape(TB, GH + H),
                       np.concatenate([params["weight_ih"], params["weight_mx"]]))
    else:
        dx = np.matmul(dg2, params["weight_ih"])
    dx = dx.reshape(T, B, I)
    grads = {"weight_ih": np.matmul(dg2.T, x_seen)}
    if mlstm:
        grads["weight_mx"] = np.matmul(dmx.reshape(TB, H).T, x_seen)
        grads["weight_mh"] = np.matmul(dmh.reshape(TB, H).T, h_in_all.reshape(TB, H))
        m_all = np.multiply(mx, mh, out=dmh)           # dmh is spent: m_t, recomputed
        if padded is not None:
            m_all[padded] = 0                          # padded x reached mx
        grads["weight_hh"] = np.matmul(dg2.T, m_all.reshape(TB, H))
    else:
        grads["weight_hh"] = np.matmul(dg2.T, h_in_all.reshape(TB, R))
    if "bias_ih" in params:
        grads["bias_ih"] = dg2.sum(axis=0)
        grads["bias_hh"] = grads["bias_ih"].copy()
    if peep is not None:
        dw = [np.einsum("tbh,tbh->h", dg4[:, :, 0], c_in_all)]
        if not form.coupled:
            dw.append(np.einsum("tbh,tbh->h", dg4[:, :, 1], c_in_all))
        dw.append(np.einsum("tbh,tbh->h", dg4[:, :, G - 1], c_out_all))
        grads["weight_ch"] = np.concatenate(dw)
    if proj:
        if padded is not None:
            h_raw_all[padded] = 0                      # padded x reached o
        grads["weight_hr"] = np.matmul(dh_all.reshape(TB, R).T, h_raw_all.reshape(TB, H))
    return dx, dh, dc, grads


# gpurnn.backends.numpy re-exports this module's entry points from its last line, so its helpers
# are imported here, after they are defined: either module may be imported first
from .numpy import _masks, check_options, inputs_seen  # noqa: E402
