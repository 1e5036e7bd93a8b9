"""NumPy backend: the CPU fallback and the reference every kernel is tested against.

Plain and readable on purpose, but not wasteful: the input projection is one GEMM over all
T*B rows before the time loop, the loop does one (B, H) x (H, G*H) GEMM plus pointwise work per
step writing into preallocated buffers, and backward forms every weight gradient with large
GEMMs after its loop (docs/design.md §2). Conventions and reserve layout: gpurnn/cells.py.

NaN/Inf in inputs propagate to the outputs as IEEE arithmetic says (see _ieee). Padded steps
(t >= lengths[b]) never touch the results, whatever they contain.

Regularisers (`noise`, gpurnn/layernorm.py's contract): the recurrent dropout mask multiplies
h_{t-1} where it enters W_hh (a (B, H) product before the step's GEMM; dW_hh reads the masked
states), zoneout mixes each active step's new state with the previous one after the cell's own
math. The extra work is written so that all-zero zoneout masks and an all-one recurrent mask
give the plain cell's results bit for bit (multiplying by 1 and adding 0*x are exact), and with
noise=None none of it runs. Backward recomputes what zoneout hides: LSTM's c~ = f*c_{t-1} + i*g
from the saved gates (the forward's own arithmetic, so bitwise), and the RNN's h~, whose
activation derivative the plain cell reads off h_t, as (h_t - d*h_{t-1}) / (1 - d): exact for
the 0/1 masks of training (where d = 1 the value is unused, (1 - d) = 0 multiplies it), and
rounded where d is strictly between 0 and 1 (evaluation's p-filled masks).
"""
from __future__ import annotations

import functools

import numpy as np

from . import Grads, Reserve
from ..cells import GATES, RESERVE_GATES

NAME = "numpy"


def _sigmoid(a, out):
    # 0.5*tanh(a/2) + 0.5 is sigmoid without the overflow of exp(-a) for very negative a.
    np.multiply(a, 0.5, out=out)
    np.tanh(out, out=out)
    out *= 0.5
    out += 0.5
    return out


def input_bias(cell, b_ih, b_hh):
    """The bias folded into the input projection Gx (all of b_hh except GRU's b_hn)."""
    if b_ih is None:
        return None
    if cell != "gru":
        return b_ih + b_hh
    H = b_hh.shape[0] // 3
    folded = b_ih.copy()
    folded[: 2 * H] += b_hh[: 2 * H]
    return folded


def inputs_seen(x, lengths, xp):
    """x with its padded steps (t >= lengths[b]) zeroed: they never reached the recurrence, so
    whatever they hold (NaN, say) must stay out of dW_ih even though their gate gradients are 0."""
    if lengths is None:
        return x
    T = x.shape[0]
    seen = (np.arange(T)[:, None] < np.asarray(lengths)[None, :])[..., None]
    return xp.where(xp.asarray(seen), x, 0)


def _masks(lengths, T):
    """Per step: None where every sequence is active, else the indices of the inactive rows."""
    if lengths is None:
        return [None] * T
    out = []
    for t in range(T):
        idle = np.flatnonzero(lengths <= t)
        out.append(idle if idle.size else None)
    return out


def _ieee(fn):
    """NaN/Inf in inputs propagate as IEEE arithmetic says; producing NaN from Inf is the
    documented behaviour here, so numpy's floating-point warnings are not raised."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            return fn(*args, **kwargs)
    return wrapped


def check_options(options):
    """The NumPy backend has no options: launch settings ('path', 'blocks', 'threads') belong
    to the kernel backends, and ignoring them silently would hide a typo or a wrong backend."""
    if options is not None and not isinstance(options, dict):
        raise TypeError(f"backend_options must be a dict or None; got {type(options).__name__}")
    if options:
        raise ValueError(f"backend_options has keys {sorted(options, key=str)}; the numpy backend "
                         f"takes none (expected None or {{}}; 'path', 'blocks' and 'threads' "
                         f"configure the kernel backends 'sim' and 'cuda', 'blas', 'split' and "
                         f"'threads' the 'cpu' backend)")
    return {}


NOISE_KEYS = ("recurrent", "zoneout_h", "zoneout_c")     # gpurnn.layernorm.NOISE_KEYS


def check_noise(cell, noise):
    """`noise` as the reference uses it: None when there is no regulariser (None or an empty
    dict), else the dict itself. Unknown keys, and zoneout_c for a cell without a cell state,
    are a ValueError: silently ignoring a mask would train a different model."""
    if not noise:
        return None
    unknown = sorted(set(noise) - set(NOISE_KEYS), key=str)
    if unknown:
        raise ValueError(f"noise has unknown keys {unknown}; expected a subset of {NOISE_KEYS}")
    if "zoneout_c" in noise and cell not in ("lstm", "layernorm_lstm"):
        raise ValueError(f"noise has 'zoneout_c' but the {cell} cell has no cell state")
    return noise


def _noise_parts(noise, dtype):
    """(recurrent mask, d_h, 1 - d_h, d_c, 1 - d_c), None for each regulariser that is off."""
    if noise is None:
        return None, None, None, None, None
    zone_h, zone_c = noise.get("zoneout_h"), noise.get("zoneout_c")
    keep_h = None if zone_h is None else np.subtract(1, zone_h, dtype=dtype)
    keep_c = None if zone_c is None else np.subtract(1, zone_c, dtype=dtype)
    return noise.get("recurrent"), zone_h, keep_h, zone_c, keep_c


def reserve_dtypes(dtype):
    """(h, c, gates): the storage dtype, float32 for 16-bit storage (computed in float32)."""
    dt = np.dtype(dtype)
    wide = np.dtype(np.float32) if dt.itemsize == 2 else dt
    return wide, wide, wide


def _widen(a):
    return None if a is None else a.astype(np.float32)


def _narrow(a, dtype):
    return None if a is None else a.astype(dtype)


def forward(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, reverse, need_reserve, *,
            options=None, noise=None):
    check_options(options)
    noise = check_noise(cell, noise)
    if x.dtype.itemsize != 2:
        return _forward(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, reverse, need_reserve,
                        noise)
    # 16-bit storage (float16, bfloat16): the reference computes in float32 on the 16-bit
    # values and hands results back in the caller's dtype; its reserve stays float32 (and the
    # noise masks come in float32, the compute dtype).
    y, h_n, c_n, reserve = _forward(cell, *map(_widen, (x, w_ih, w_hh, b_ih, b_hh, h0, c0)),
                                    lengths, reverse, need_reserve, noise)
    if reserve is not None:
        reserve.storage = x.dtype
    return _narrow(y, x.dtype), _narrow(h_n, x.dtype), _narrow(c_n, x.dtype), reserve


def backward(reserve, dy, dh_n, dc_n, *, options=None):
    check_options(options)
    check_noise(reserve.cell, getattr(reserve, "noise", None))
    if reserve.storage is None:
        return _backward(reserve, dy, dh_n, dc_n)
    grads = _backward(reserve, _widen(dy), _widen(dh_n), _widen(dc_n))
    return Grads(*(_narrow(g, reserve.storage) for g in grads))


@_ieee
def _forward(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, reverse, need_reserve, noise=None):
    T, B, I = x.shape
    H = w_hh.shape[1]
    G = GATES[cell]
    dtype = x.dtype
    rev = 1 if reverse else 0

    gx = np.matmul(x.reshape(T * B, I), w_ih.T).reshape(T, B, G * H)
    bias = input_bias(cell, b_ih, b_hh)
    if bias is not None:
        gx += bias
    # (H, G*H): h @ w_hh_t. A copy, never a view: LSTM scales it in place below, and
    # ascontiguousarray(w_hh.T) is w_hh itself when H = 1 (the caller's weights, issue 16).
    w_hh_t = np.array(w_hh.T, order="C", copy=True)
    b_hn = b_hh[2 * H:] if (cell == "gru" and b_hh is not None) else None
    if cell == "lstm":
        # sigmoid(a) = 0.5*tanh(a/2) + 0.5. Halving the i, f, o columns of both projections
        # (exact in binary floating point) lets one tanh and one affine map activate all four
        # gates of a step: gate = tanh(a') * gate_scale + gate_shift.
        gate_scale = np.full(G * H, 0.5, dtype)
        gate_scale[2 * H: 3 * H] = 1
        gate_shift = np.full(G * H, 0.5, dtype)
        gate_shift[2 * H: 3 * H] = 0
        gx *= gate_scale
        w_hh_t *= gate_scale

    h = np.empty((T + 1, B, H), dtype)
    h[T if rev else 0] = h0
    c = None
    if cell == "lstm":
        c = np.empty((T + 1, B, H), dtype)
        c[T if rev else 0] = c0
    S = RESERVE_GATES[cell]
    gates = np.empty((T, B, S * H), dtype) if (S and need_reserve) else None
    step_gates = np.empty((B, max(S, G) * H), dtype)   # used when no reserve is kept
    rec = np.empty((B, G * H), dtype)
    tmp = np.empty((B, H), dtype)
    idle_rows = _masks(lengths, T)
    rec_mask, zone_h, keep_h, zone_c, keep_c = _noise_parts(noise, dtype)
    h_masked = np.empty((B, H), dtype) if rec_mask is not None else None

    for s in range(T):
        t = T - 1 - s if rev else s
        h_in, h_out = h[t + rev], h[t + 1 - rev]
        if rec_mask is None:
            np.matmul(h_in, w_hh_t, out=rec)
        else:           # variational dropout: only the product with W_hh sees the mask
            np.multiply(h_in, rec_mask, out=h_masked)
            np.matmul(h_masked, w_hh_t, out=rec)
        if cell == "lstm":
            a = gates[t] if gates is not None else step_gates
            np.add(rec, gx[t], out=a)
            np.tanh(a, out=a)
            a *= gate_scale
            a += gate_shift
            i, f, g, o = a[:, :H], a[:, H: 2 * H], a[:, 2 * H: 3 * H], a[:, 3 * H:]
            c_in, c_out = c[t + rev], c[t + 1 - rev]
            np.multiply(f, c_in, out=c_out)
            np.multiply(i, g, out=tmp)
            c_out += tmp
            np.tanh(c_out, out=h_out)
            h_out *= o
        elif cell == "gru":
            a = gates[t] if gates is not None else step_gates
            if b_hn is not None:
                rec[:, 2 * H:] += b_hn
            np.add(rec[:, : 2 * H], gx[t, :, : 2 * H], out=a[:, : 2 * H])
            _sigmoid(a[:, : 2 * H], a[:, : 2 * H])
            r, z = a[:, :H], a[:, H: 2 * H]
            n, hn = a[:, 2 * H: 3 * H], a[:, 3 * H:]
            hn[...] = rec[:, 2 * H:]
            np.multiply(r, hn, out=n)
            n += gx[t, :, 2 * H:]
            np.tanh(n, out=n)
            np.subtract(h_in, n, out=h_out)    # h' = n + z*(h - n)
            h_out *= z
            h_out += n
        else:
            np.add(rec, gx[t], out=h_out)
            if cell == "rnn_tanh":
                np.tanh(h_out, out=h_out)
            else:
                np.maximum(h_out, 0, out=h_out)
        # zoneout, after h~ = o*tanh(c~) was formed from the new cell c~:
        # c_t = d_c*c_{t-1} + (1-d_c)*c~ ; h_t = d_h*h_{t-1} + (1-d_h)*h~
        if zone_c is not None:
            np.multiply(zone_c[t], c_in, out=tmp)
            c_out *= keep_c[t]
            c_out += tmp
        if zone_h is not None:
            np.multiply(zone_h[t], h_in, out=tmp)
            h_out *= keep_h[t]
            h_out += tmp
        idle = idle_rows[t]
        if idle is not None:
            h_out[idle] = h_in[idle]
            if c is not None:
                c_out[idle] = c_in[idle]

    y = h[1 - rev: T + 1 - rev].copy()      # step t's output state, in time order
    if lengths is not None:
        y[np.arange(T)[:, None] >= lengths[None, :]] = 0     # exact zeros, even for a NaN state
    h_n = h[0 if rev else T].copy()
    c_n = c[0 if rev else T].copy() if c is not None else None
    reserve = None
    if need_reserve:
        reserve = Reserve(cell=cell, backend=NAME, reverse=bool(reverse), x=x, w_ih=w_ih, w_hh=w_hh,
                          has_bias=b_ih is not None, lengths=lengths, h=h, c=c, gates=gates,
                          noise=noise)
    return y, h_n, c_n, reserve


def _backward_factors(cell, gates, c_out, c_in, h_in, h_out, H):
    """The parts of each step's gate gradients that do not depend on the incoming gradient,
    for a block of steps (time order), with as few temporaries as NumPy allows:
      LSTM  do = dh*dh_o ; dc += dh*dh_c ; [di, df, dg] = dc*dc_ifg ; dc_prev = dc*f
      GRU   dn = dh*dh_n ; dz = dh*dh_z ; dr = dn*dn_r ; dgh_n = dn*r ; dh_prev += dh*z
      RNN   da = dh*dh (the activation's derivative, read off the output state)"""
    if cell == "lstm":
        i, f, g, o = (gates[..., q * H: (q + 1) * H] for q in range(4))
        tanh_c = np.tanh(c_out)
        dh_o = np.subtract(1, o)
        dh_o *= o
        dh_o *= tanh_c
        dh_c = np.multiply(tanh_c, tanh_c, out=tanh_c)
        np.subtract(1, dh_c, out=dh_c)
        dh_c *= o
        dc_ifg = np.empty(i.shape[:2] + (3, H), i.dtype)
        di, df, dg = dc_ifg[:, :, 0], dc_ifg[:, :, 1], dc_ifg[:, :, 2]
        np.subtract(1, i, out=di)
        di *= i
        di *= g
        np.subtract(1, f, out=df)
        df *= f
        df *= c_in
        np.multiply(g, g, out=dg)
        np.subtract(1, dg, out=dg)
        dg *= i
        return {"dh_o": dh_o, "dh_c": dh_c, "dc_ifg": dc_ifg, "f": f}
    if cell == "gru":
        r, z, n, hn = (gates[..., q * H: (q + 1) * H] for q in range(4))
        dh_n = np.multiply(n, n)
        np.subtract(1, dh_n, out=dh_n)
        one_minus_z = np.subtract(1, z)
        dh_n *= one_minus_z
        dh_z = np.subtract(h_in, n)
        one_minus_z *= z
        dh_z *= one_minus_z
        dn_r = np.subtract(1, r)
        dn_r *= r
        dn_r *= hn
        return {"dh_n": dh_n, "dh_z": dh_z, "dn_r": dn_r, "r": r, "z": z}
    if cell == "rnn_tanh":
        d = np.multiply(h_out, h_out)
        np.subtract(1, d, out=d)
        return {"dh": d}
    return {"dh": (h_out > 0).astype(h_out.dtype)}


def _lstm_new_cell(gates, c_in, H):
    """c~ = f*c_{t-1} + i*g of a block of steps, as the forward formed it (bit for bit): the
    saved c holds c_t after zoneout, the backward's tanh needs the cell's own c~."""
    i, f, g = (gates[..., q * H: (q + 1) * H] for q in range(3))
    c_new = np.multiply(f, c_in)
    c_new += np.multiply(i, g)
    return c_new


def _rnn_new_state(h_out, h_in, zone_h, keep_h):
    """h~ = act(a) of a block of RNN steps, recovered from h_t = d*h_{t-1} + (1-d)*h~ as
    (h_t - d*h_{t-1}) / (1 - d). Exact where d = 0; where d = 1 the value is unused (the
    gradient reaching h~ is (1-d)*dh = 0) and made finite by dividing by 1; rounded in between."""
    h_new = np.multiply(zone_h, h_in)
    np.subtract(h_out, h_new, out=h_new)
    h_new /= np.where(keep_h == 0, 1, keep_h)
    return h_new


@_ieee
def _backward(reserve, dy, dh_n, dc_n):
    cell, x, w_ih, w_hh, h, c, gates = (reserve.cell, reserve.x, reserve.w_ih, reserve.w_hh,
                                        reserve.h, reserve.c, reserve.gates)
    T, B, I, H = reserve.shape
    G = GATES[cell]
    rev = 1 if reserve.reverse else 0
    dtype = x.dtype

    dgx = np.empty((T, B, G * H), dtype)                       # input-side gate gradients
    dgh = np.empty((T, B, G * H), dtype) if cell == "gru" else dgx   # recurrent side
    dgx4 = dgx.reshape(T, B, G, H)
    dh = dh_n.astype(dtype, copy=True)
    dc = dc_n.astype(dtype, copy=True) if cell == "lstm" else None
    dh_t = np.empty((B, H), dtype)
    tmp = np.empty((B, H), dtype)
    idle_rows = _masks(reserve.lengths, T)
    h_in_all = h[rev: rev + T]                  # step t's input state, time order
    h_out_all = h[1 - rev: T + 1 - rev]         # ... and its output state
    rec_mask, zone_h, keep_h, zone_c, keep_c = _noise_parts(getattr(reserve, "noise", None), dtype)
    if zone_h is not None:
        held_h = np.empty((B, H), dtype)        # d_h * dh_t: what zoneout hands to h_{t-1}
    if zone_c is not None:
        held_c = np.empty((B, H), dtype)

    # Everything that does not depend on the incoming gradient is formed for a chunk of steps
    # at once, so the sequential loop is a handful of (B, H) operations and one GEMM per step.
    # Chunks of ~64K elements keep those factors in cache at large B*H while still amortising
    # NumPy's per-call overhead at small B*H.
    chunk = max(1, min(T, (1 << 16) // (B * H)))
    order = range(T) if rev else range(T - 1, -1, -1)      # the forward's steps, last first
    for first in range(0, T, chunk):
        steps = order[first: first + chunk]
        lo, hi = min(steps), max(steps) + 1
        c_new = c[lo + 1 - rev: hi + 1 - rev] if c is not None else None
        h_new = h_out_all[lo:hi]
        if zone_c is not None:
            c_new = _lstm_new_cell(gates[lo:hi], c[lo + rev: hi + rev], H)
        if zone_h is not None and cell in ("rnn_tanh", "rnn_relu"):
            h_new = _rnn_new_state(h_new, h_in_all[lo:hi], zone_h[lo:hi], keep_h[lo:hi])
        k = _backward_factors(cell, gates[lo:hi] if gates is not None else None, c_new,
                              c[lo + rev: hi + rev] if c is not None else None,
                              h_in_all[lo:hi], h_new, H)
        for t in steps:
            j = t - lo
            idle = idle_rows[t]
            if idle is not None:
                carried_h = dh[idle].copy()
                carried_c = dc[idle].copy() if dc is not None else None
            np.add(dh, dy[t], out=dh_t)
            # zoneout splits the gradients of h_t and c_t: d*(.) goes straight to the previous
            # state, (1-d)*(.) to the cell's own new values h~ and c~ (dh_t and dc from here)
            if zone_h is not None:
                np.multiply(dh_t, zone_h[t], out=held_h)
                dh_t *= keep_h[t]
            if zone_c is not None:
                np.multiply(dc, zone_c[t], out=held_c)
                dc *= keep_c[t]
            dg4 = dgx4[t]
            if cell == "lstm":
                np.multiply(dh_t, k["dh_o"][j], out=dg4[:, 3])
                np.multiply(dh_t, k["dh_c"][j], out=tmp)
                dc += tmp
                np.multiply(dc[:, None, :], k["dc_ifg"][j], out=dg4[:, :3])
                dc *= k["f"][j]
                if zone_c is not None:
                    dc += held_c
                np.matmul(dgx[t], w_hh, out=dh)
                if rec_mask is not None:
                    dh *= rec_mask
            elif cell == "gru":
                dn = dg4[:, 2]
                np.multiply(dh_t, k["dh_n"][j], out=dn)
                np.multiply(dh_t, k["dh_z"][j], out=dg4[:, 1])
                np.multiply(dn, k["dn_r"][j], out=dg4[:, 0])
                dgr = dgh[t]
                dgr[:, : 2 * H] = dgx[t, :, : 2 * H]
                np.multiply(dn, k["r"][j], out=dgr[:, 2 * H:])   # recurrent side of n: r*hn
                np.matmul(dgr, w_hh, out=dh)
                if rec_mask is not None:
                    dh *= rec_mask                  # z*h_{t-1} below saw the unmasked state
                np.multiply(dh_t, k["z"][j], out=tmp)
                dh += tmp
            else:
                np.multiply(dh_t, k["dh"][j], out=dgx[t])
                np.matmul(dgx[t], w_hh, out=dh)
                if rec_mask is not None:
                    dh *= rec_mask
            if zone_h is not None:
                dh += held_h
            if idle is not None:
                # masked steps copied the state through and output zeros
                dgx[t, idle] = 0
                if dgh is not dgx:
                    dgh[t, idle] = 0
                dh[idle] = carried_h
                if dc is not None:
                    dc[idle] = carried_c

    TB = T * B
    dgx2, dgh2 = dgx.reshape(TB, G * H), dgh.reshape(TB, G * H)
    dx = np.matmul(dgx2, w_ih).reshape(T, B, I)
    dw_ih = np.matmul(dgx2.T, inputs_seen(x, reserve.lengths, np).reshape(TB, I))
    h_seen = h_in_all if rec_mask is None else np.multiply(h_in_all, rec_mask)   # what W_hh saw
    dw_hh = np.matmul(dgh2.T, h_seen.reshape(TB, H))
    db_ih = db_hh = None
    if reserve.has_bias:
        db_ih = dgx2.sum(axis=0)
        db_hh = dgh2.sum(axis=0) if dgh is not dgx else db_ih.copy()
    return Grads(dx=dx, dh0=dh, dc0=dc, dw_ih=dw_ih, dw_hh=dw_hh, db_ih=db_ih, db_hh=db_hh)

# the LSTM family (gpurnn.variants); last, as numpy_lstm reads this module's helpers
from .numpy_lstm import lstm_forward, lstm_backward  # noqa: E402,F401
# the LayerNormLSTM (gpurnn.layernorm), read from its own module in the same way
from .numpy_layernorm import layernorm_forward, layernorm_backward  # noqa: E402,F401
