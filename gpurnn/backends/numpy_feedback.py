"""NumPy reference (the oracle) of the gated-feedback RNN (gpurnn/feedback.py: the math, the
parameters and the saved layout), float32 and float64, forward and BPTT backward.

    y, h_n, c_n, saved = feedback_forward(cell, x, params, h0, c0, lengths, masks, need_saved)
    dx, dh0, dc0, grads = feedback_backward(cell, x, params, saved, lengths, masks, dy, dh_n, dc_n)

cell is one of gpurnn.feedback.CELLS; x (T, B, I); params maps the full names (weight_ih_l0, ...)
to arrays; h0, c0 (L, B, H) or None (zeros; c0 for gf_lstm only); lengths None or (B,) ints in
[0, T]; masks None or one (T, B, H) dropout mask per layer but the first (an entry may be None:
no dropout there), fixed by the caller; dy (T, B, H), dh_n, dc_n (L, B, H) or None (zeros).
options: None or {} (the reference has none). saved is the tuple of gpurnn.feedback's layout:
  gf_rnn_*  (h, fbgate)            h (T+1, B, L*H) boundary states of every layer, h[t] the
  gf_gru    (h, gates, fbgate)       step-t input h*_{t-1}, layer l at [..., l*H:(l+1)*H]
  gf_lstm   (h, c, gates, fbgate)  c as h; gates (T, B, L*4H) activated, per layer GRU
                                     [r, z, n, hn = fb + b_hn], LSTM [i, f, g, o];
                                     fbgate (T, B, L*L), [t, b, j*L + i] = g^{i->j}
The step loop runs time outside, layers inside (layer j at step t needs h_t^{j-1} and every
layer's h_{t-1}); the first layer's input projections are one GEMM over all T*B rows, the
others' are per step (their input is made in the loop), and backward forms every weight
gradient with large GEMMs after its loop. The feedback of layer j is one GEMM:
fb = (h*_{t-1} * [g^{1->j} 1_H, ..., g^{L->j} 1_H]) W_fb^T.

Padded steps: the forward computes on x with its padded steps zeroed (so whatever they held,
NaN say, never enters a saved value), then copies every layer's state through; backward zeroes
the padded rows' gate gradients and carries the state gradients through. Nothing given is
written into: backward can be re-run on the same saved tuple. Every argument is checked
(ValueError/TypeError naming it) before anything is computed: this module is called directly
by the tests and, later, as the kernels' oracle.
"""
from __future__ import annotations

import numpy as np

from ..feedback import CANDIDATE, DTYPES, FACTS, check_cell, param_shapes, saved_specs
from .numpy import _masks as _idle_rows
from .numpy import _sigmoid, inputs_seen

__all__ = ["feedback_forward", "feedback_backward"]

_IEEE = dict(over="ignore", invalid="ignore", divide="ignore")


# ---- argument checks -------------------------------------------------------------------------
def _check_options(options):
    if options is not None and not isinstance(options, dict):
        raise TypeError(f"options must be a dict or None; got {type(options).__name__}")
    if options:
        raise ValueError(f"options has keys {sorted(options, key=str)}; the NumPy reference of "
                         f"the gated-feedback cells takes none (expected None or {{}})")


def _check_array(name, a, shape, dtype, form):
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array; got {type(a).__name__}")
    if a.shape != tuple(shape):
        raise ValueError(f"{name} has shape {a.shape}; expected {form} = {tuple(shape)}")
    if a.dtype != dtype:
        raise TypeError(f"{name} has dtype {a.dtype}; expected {dtype} (the dtype of x)")


def _check_call(cell, x, params, h0, c0, lengths, masks):
    """(T, B, I, L, H) of a call, every argument checked."""
    check_cell(cell)
    if not isinstance(x, np.ndarray):
        raise TypeError(f"x must be a NumPy array; got {type(x).__name__}")
    if x.ndim != 3 or x.shape[0] == 0 or x.shape[1] == 0 or x.shape[2] == 0:
        raise ValueError(f"x has shape {x.shape}; expected (T, B, I) with T, B, I >= 1")
    if x.dtype.name not in DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; the gated-feedback reference runs in {DTYPES}")
    T, B, I = x.shape
    if not isinstance(params, dict):
        raise TypeError(f"params must be a dict of parameter name -> array; got "
                        f"{type(params).__name__}")
    fb = params.get("weight_fb_l0")
    if not isinstance(fb, np.ndarray) or fb.ndim != 2 or fb.shape[0] == 0 or \
            fb.shape[1] % fb.shape[0]:
        raise ValueError(f"params['weight_fb_l0'] must be an (H, L*H) array; got "
                         f"{getattr(fb, 'shape', type(fb).__name__)}")
    H, L = fb.shape[0], fb.shape[1] // fb.shape[0]
    bias = "bias_ih_l0" in params
    expected = {f"{n}_l{k}": s for k in range(L)
                for n, s in param_shapes(cell, I, H, L, bias, k)}
    missing = [n for n in expected if n not in params]
    unexpected = sorted(set(params) - set(expected), key=str)
    if missing or unexpected:
        raise ValueError(f"params do not match {cell} with L = {L}, H = {H}, input_size = {I}, "
                         f"bias = {bias}: missing {missing}, unexpected {unexpected}")
    for n, s in expected.items():
        _check_array(f"params[{n!r}]", params[n], s, x.dtype, "its shape")
    for name, s in (("h0", h0), ("c0", c0)):
        if s is not None:
            if name == "c0" and not FACTS[cell].has_cell_state:
                raise ValueError(f"c0 must be None for {cell} (it has no cell state)")
            _check_array(name, s, (L, B, H), x.dtype, "(L, B, H)")
    if lengths is not None:
        if not isinstance(lengths, np.ndarray) or not np.issubdtype(lengths.dtype, np.integer) \
                or lengths.dtype == np.bool_:
            raise TypeError(f"lengths must be None or an integer NumPy array; got "
                            f"{getattr(lengths, 'dtype', type(lengths).__name__)}")
        if lengths.shape != (B,):
            raise ValueError(f"lengths has shape {lengths.shape}; expected (B,) = ({B},)")
        if lengths.size and (lengths.min() < 0 or lengths.max() > T):
            raise ValueError(f"lengths must lie in [0, T] = [0, {T}]; got min {lengths.min()}, "
                             f"max {lengths.max()}")
    if masks is not None:
        if not isinstance(masks, (list, tuple)) or len(masks) != L - 1:
            raise ValueError(f"masks must be None or a list of L - 1 = {L - 1} dropout masks "
                             f"(T, B, H), one per layer but the first; got "
                             f"{len(masks) if isinstance(masks, (list, tuple)) else type(masks).__name__}")
        for k, m in enumerate(masks):
            if m is not None:
                _check_array(f"masks[{k}]", m, (T, B, H), x.dtype, "(T, B, H)")
    return T, B, I, L, H


def _check_grads_in(cell, x, L, H, saved, dy, dh_n, dc_n):
    T, B, _ = x.shape
    specs = saved_specs(cell, T, B, L, H, x.dtype)
    if not isinstance(saved, (tuple, list)) or len(saved) != len(specs):
        raise ValueError(f"saved must be the tuple {tuple(n for n, _, _ in specs)} of a "
                         f"feedback_forward of {cell}; got "
                         f"{len(saved) if isinstance(saved, (tuple, list)) else type(saved).__name__}")
    for a, (n, shape, dt) in zip(saved, specs):
        _check_array(f"saved {n}", a, shape, dt, "its layout")
    _check_array("dy", dy, (T, B, H), x.dtype, "(T, B, H)")
    if dh_n is not None:
        _check_array("dh_n", dh_n, (L, B, H), x.dtype, "(L, B, H)")
    if dc_n is not None:
        if not FACTS[cell].has_cell_state:
            raise ValueError(f"dc_n must be None for {cell} (it has no cell state)")
        _check_array("dc_n", dc_n, (L, B, H), x.dtype, "(L, B, H)")


# ---- helpers -----------------------------------------------------------------------------------
def _layer_params(params, l, bias):
    p = {n: params.get(f"{n}_l{l}") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh",
                                              "weight_fb", "weight_gx", "weight_gh", "bias_g")}
    if not bias:
        for n in ("bias_ih", "bias_hh", "bias_g"):
            p[n] = None
    return p


def _input_bias(cell, p, H):
    """The bias added to the input projection: b_ih + b_hh but GRU's b_hn (inside r*(.))."""
    if p["bias_ih"] is None:
        return None
    folded = p["bias_ih"] + p["bias_hh"]
    if cell == "gf_gru":
        folded[2 * H:] = p["bias_ih"][2 * H:]
    return folded


def _layer_input(h4, masks, l, t=None):
    """Layer l's input at step t (all steps when t is None): h_t^{l-1}, times its mask."""
    below = h4[1:, :, l - 1] if t is None else h4[t + 1, :, l - 1]
    m = None if masks is None else masks[l - 1]
    if m is None:
        return below
    return np.multiply(below, m if t is None else m[t])


# ---- forward ----------------------------------------------------------------------------------
def feedback_forward(cell, x, params, h0, c0, lengths, masks, need_saved, *, options=None):
    """(y (T, B, H), h_n (L, B, H), c_n (L, B, H) or None, saved tuple or None); the layout of
    saved is the module docstring's (gpurnn.feedback)."""
    _check_options(options)
    _check_call(cell, x, params, h0, c0, lengths, masks)
    with np.errstate(**_IEEE):
        return _forward(cell, x, params, h0, c0, lengths, masks, bool(need_saved))


def _forward(cell, x, params, h0, c0, lengths, masks, need_saved):
    T, B, I = x.shape
    H = params["weight_fb_l0"].shape[0]
    L = params["weight_fb_l0"].shape[1] // H
    LH, G = L * H, FACTS[cell].gates
    S = FACTS[cell].reserve_gates
    dtype = x.dtype
    lstm, gru = cell == "gf_lstm", cell == "gf_gru"
    bias = "bias_ih_l0" in params
    x_seen = inputs_seen(x, lengths, np)

    h = np.empty((T + 1, B, LH), dtype)
    h4 = h.reshape(T + 1, B, L, H)
    h4[0] = 0 if h0 is None else h0.transpose(1, 0, 2)
    c = c4 = None
    if lstm:
        c = np.empty((T + 1, B, LH), dtype)
        c4 = c.reshape(T + 1, B, L, H)
        c4[0] = 0 if c0 is None else c0.transpose(1, 0, 2)
    gates = np.empty((T, B, L * S * H), dtype) if (S and need_saved) else None
    gates4 = None if gates is None else gates.reshape(T, B, L, S * H)
    fbgate = np.empty((T, B, L * L), dtype) if need_saved else None
    fbgate4 = None if fbgate is None else fbgate.reshape(T, B, L, L)
    step_gates = np.empty((B, max(S, G) * H), dtype)
    step_fbgate = np.empty((B, L), dtype)

    layers = []
    for l in range(L):
        p = _layer_params(params, l, bias)
        layers.append({
            "w_ih_t": p["weight_ih"].T, "b_in": _input_bias(cell, p, H),
            "w_hh_t": None if p["weight_hh"] is None else p["weight_hh"].T,
            "b_hn": p["bias_hh"][2 * H:] if (gru and bias) else None,
            "w_fb_t": p["weight_fb"].T, "w_gx_t": p["weight_gx"].T, "w_gh_t": p["weight_gh"].T,
            "b_g": p["bias_g"]})
    # the first layer's input side for every step at once: one GEMM each
    first = layers[0]
    gx0 = np.matmul(x_seen.reshape(T * B, I), first["w_ih_t"]).reshape(T, B, G * H)
    gs0 = np.matmul(x_seen.reshape(T * B, I), first["w_gx_t"]).reshape(T, B, L)
    if first["b_in"] is not None:
        gx0 += first["b_in"]
        gs0 += first["b_g"]
    idle_rows = _idle_rows(lengths, T)
    tmp = np.empty((B, H), dtype)

    for t in range(T):
        hp = h[t]                               # h*_{t-1} (B, L*H)
        hp3 = h4[t]                             # (B, L, H)
        idle = idle_rows[t]
        for l in range(L):
            w = layers[l]
            if l == 0:
                gx, gs = gx0[t].copy(), gs0[t].copy()
            else:
                xl = _layer_input(h4, masks, l, t)
                gx = np.matmul(xl, w["w_ih_t"])
                gs = np.matmul(xl, w["w_gx_t"])
                if w["b_in"] is not None:
                    gx += w["b_in"]
                    gs += w["b_g"]
            # the global reset gates into layer l, then the gated feedback
            gs += np.matmul(hp, w["w_gh_t"])
            g = fbgate4[t, :, l] if fbgate4 is not None else step_fbgate
            _sigmoid(gs, g)
            gated = np.multiply(hp3, g[:, :, None]).reshape(B, LH)
            fb = np.matmul(gated, w["w_fb_t"])
            h_in, h_out = h4[t, :, l], h4[t + 1, :, l]
            if cell in ("gf_rnn_tanh", "gf_rnn_relu"):
                np.add(gx, fb, out=tmp)
                if cell == "gf_rnn_tanh":
                    np.tanh(tmp, out=h_out)
                else:
                    np.maximum(tmp, 0, out=h_out)
            elif gru:
                a = gates4[t, :, l] if gates4 is not None else step_gates
                rz = gx[:, :2 * H] + np.matmul(h_in, w["w_hh_t"])
                _sigmoid(rz, a[:, :2 * H])
                r, z = a[:, :H], a[:, H:2 * H]
                n, hn = a[:, 2 * H:3 * H], a[:, 3 * H:]
                hn[...] = fb
                if w["b_hn"] is not None:
                    hn += w["b_hn"]
                np.multiply(r, hn, out=n)
                n += gx[:, 2 * H:]
                np.tanh(n, out=n)
                np.subtract(h_in, n, out=tmp)       # h' = n + z*(h - n)
                tmp *= z
                np.add(tmp, n, out=h_out)
            else:
                a = gates4[t, :, l] if gates4 is not None else step_gates
                rec = np.matmul(h_in, w["w_hh_t"])   # (B, 3H): i, f, o
                a[...] = gx
                a[:, :2 * H] += rec[:, :2 * H]
                a[:, 3 * H:] += rec[:, 2 * H:]
                a[:, 2 * H:3 * H] += fb
                _sigmoid(a[:, :2 * H], a[:, :2 * H])
                _sigmoid(a[:, 3 * H:], a[:, 3 * H:])
                np.tanh(a[:, 2 * H:3 * H], out=a[:, 2 * H:3 * H])
                i, f, gg, o = (a[:, q * H:(q + 1) * H] for q in range(4))
                c_in, c_out = c4[t, :, l], c4[t + 1, :, l]
                np.multiply(f, c_in, out=c_out)
                np.multiply(i, gg, out=tmp)
                c_out += tmp
                np.tanh(c_out, out=h_out)
                h_out *= o
            if idle is not None:                # padded rows copy the state through
                h_out[idle] = h_in[idle]
                if lstm:
                    c4[t + 1, idle, l] = c4[t, idle, l]

    y = h4[1:, :, L - 1].copy()
    if lengths is not None:
        y[np.arange(T)[:, None] >= lengths[None, :]] = 0     # exact zeros
    h_n = h4[T].transpose(1, 0, 2).copy()
    c_n = c4[T].transpose(1, 0, 2).copy() if lstm else None
    saved = None
    if need_saved:
        saved = (h,) + ((c,) if lstm else ()) + ((gates,) if S else ()) + (fbgate,)
    return y, h_n, c_n, saved


# ---- backward ---------------------------------------------------------------------------------
def feedback_backward(cell, x, params, saved, lengths, masks, dy, dh_n, dc_n, *, options=None):
    """(dx (T, B, I), dh0 (L, B, H), dc0 (L, B, H) or None, {param name: gradient}) of a
    feedback_forward whose saved tuple is `saved` (read only)."""
    _check_options(options)
    T, B, I, L, H = _check_call(cell, x, params, None, None, lengths, masks)
    _check_grads_in(cell, x, L, H, saved, dy, dh_n, dc_n)
    with np.errstate(**_IEEE):
        return _backward(cell, x, params, tuple(saved), lengths, masks, dy, dh_n, dc_n)


def _backward(cell, x, params, saved, lengths, masks, dy, dh_n, dc_n):
    T, B, I = x.shape
    H = params["weight_fb_l0"].shape[0]
    L = params["weight_fb_l0"].shape[1] // H
    LH, G = L * H, FACTS[cell].gates
    dtype = x.dtype
    lstm, gru = cell == "gf_lstm", cell == "gf_gru"
    rnn = not (lstm or gru)
    bias = "bias_ih_l0" in params
    h = saved[0]
    c = saved[1] if lstm else None
    gates = saved[-2] if not rnn else None
    fbgate = saved[-1]
    h4 = h.reshape(T + 1, B, L, H)
    c4 = None if c is None else c.reshape(T + 1, B, L, H)
    gates4 = None if gates is None else gates.reshape(T, B, L, 4 * H)
    fbgate4 = fbgate.reshape(T, B, L, L)
    P = [_layer_params(params, l, bias) for l in range(L)]

    # per layer: the input-side pre-activation gradients (rows of weight_ih / bias_ih), the
    # feedback's (fb), and the global reset gates' pre-activations
    dgx = [np.empty((T, B, G * H), dtype) for _ in range(L)]
    dfb = [d[:, :, CANDIDATE[cell] * H:(CANDIDATE[cell] + 1) * H] for d in dgx] if not gru \
        else [np.empty((T, B, H), dtype) for _ in range(L)]      # GRU: d(hn), r*dan
    ds = [np.empty((T, B, L), dtype) for _ in range(L)]
    dx = np.empty((T, B, I), dtype)

    carry_h = np.zeros((B, L, H), dtype) if dh_n is None else dh_n.transpose(1, 0, 2).copy()
    carry_c = None
    if lstm:
        carry_c = np.zeros((B, L, H), dtype) if dc_n is None else dc_n.transpose(1, 0, 2).copy()
    idle_rows = _idle_rows(lengths, T)

    for t in range(T - 1, -1, -1):
        idle = idle_rows[t]
        hp3 = h4[t]                                  # h*_{t-1}
        new_h = np.zeros((B, L, H), dtype)           # the gradient reaching h*_{t-1}
        new_c = np.zeros((B, L, H), dtype) if lstm else None
        d_in = None                                  # of layer l+1's input, from above
        for l in range(L - 1, -1, -1):
            p = P[l]
            dh = carry_h[:, l] + dy[t] if l == L - 1 else carry_h[:, l].copy()
            if d_in is not None:
                m = None if masks is None else masks[l]
                dh += d_in if m is None else d_in * m[t]
            h_in, h_out = h4[t, :, l], h4[t + 1, :, l]
            da = dgx[l][t]
            if rnn:
                if cell == "gf_rnn_tanh":
                    np.multiply(dh, 1 - h_out * h_out, out=da)
                else:
                    np.multiply(dh, h_out > 0, out=da)
            elif gru:
                r, z, n, hn = (gates4[t, :, l, q * H:(q + 1) * H] for q in range(4))
                dan = da[:, 2 * H:]
                np.multiply(dh * (1 - z), 1 - n * n, out=dan)
                np.multiply(dh * (h_in - n), z * (1 - z), out=da[:, H:2 * H])
                np.multiply(dan * hn, r * (1 - r), out=da[:, :H])
                np.multiply(dan, r, out=dfb[l][t])
                new_h[:, l] += dh * z + np.matmul(da[:, :2 * H], p["weight_hh"])
            else:
                i, f, g, o = (gates4[t, :, l, q * H:(q + 1) * H] for q in range(4))
                tanh_c = np.tanh(c4[t + 1, :, l])
                dc = carry_c[:, l] + dh * o * (1 - tanh_c * tanh_c)
                np.multiply(dh * tanh_c, o * (1 - o), out=da[:, 3 * H:])
                np.multiply(dc * g, i * (1 - i), out=da[:, :H])
                np.multiply(dc * c4[t, :, l], f * (1 - f), out=da[:, H:2 * H])
                np.multiply(dc * i, 1 - g * g, out=da[:, 2 * H:3 * H])
                new_c[:, l] = dc * f
                w_hh = p["weight_hh"]                # rows i, f, o
                new_h[:, l] += (np.matmul(da[:, :2 * H], w_hh[:2 * H])
                                + np.matmul(da[:, 3 * H:], w_hh[2 * H:]))
            # the feedback: fb = (h* gated) W_fb^T, gate g_i = sigmoid(s_i)
            g_fb = fbgate4[t, :, l]                  # (B, L)
            d_gated = np.matmul(dfb[l][t], p["weight_fb"]).reshape(B, L, H)
            new_h += d_gated * g_fb[:, :, None]
            d_g = np.einsum("bih,bih->bi", d_gated, hp3)
            np.multiply(d_g, g_fb * (1 - g_fb), out=ds[l][t])
            if idle is not None:                     # padded rows: no gradient through the cell
                da[idle] = 0
                if gru:
                    dfb[l][t, idle] = 0
                ds[l][t, idle] = 0
            new_h += np.matmul(ds[l][t], p["weight_gh"]).reshape(B, L, H)
            d_in = np.matmul(da, p["weight_ih"]) + np.matmul(ds[l][t], p["weight_gx"])
        dx[t] = d_in
        if idle is not None:                         # the state was copied through
            new_h[idle] = carry_h[idle]
            if lstm:
                new_c[idle] = carry_c[idle]
        carry_h, carry_c = new_h, new_c

    # every weight gradient: GEMMs over all T*B rows (padded rows hold zero gradients and
    # finite inputs: x is read with its padded steps zeroed)
    TB = T * B
    grads = {}
    hp_all = h[:T].reshape(TB, LH)
    for l in range(L):
        p = P[l]
        sfx = f"_l{l}"
        xl = (inputs_seen(x, lengths, np) if l == 0 else _layer_input(h4, masks, l)).reshape(TB, -1)
        dg2 = dgx[l].reshape(TB, G * H)
        ds2 = ds[l].reshape(TB, L)
        grads["weight_ih" + sfx] = np.matmul(dg2.T, xl)
        if gru:
            grads["weight_hh" + sfx] = np.matmul(dg2[:, :2 * H].T, h4[:T, :, l].reshape(TB, H))
        elif lstm:
            d_ifo = np.concatenate([dg2[:, :2 * H], dg2[:, 3 * H:]], axis=1)
            grads["weight_hh" + sfx] = np.matmul(d_ifo.T, h4[:T, :, l].reshape(TB, H))
        if bias:
            grads["bias_ih" + sfx] = dg2.sum(axis=0)
            if gru:
                grads["bias_hh" + sfx] = np.concatenate(
                    [grads["bias_ih" + sfx][:2 * H], dfb[l].reshape(TB, H).sum(axis=0)])
            else:
                grads["bias_hh" + sfx] = grads["bias_ih" + sfx].copy()
        gated_all = np.multiply(h4[:T], fbgate4[:, :, l, :, None]).reshape(TB, LH)
        grads["weight_fb" + sfx] = np.matmul(dfb[l].reshape(TB, H).T, gated_all)
        grads["weight_gx" + sfx] = np.matmul(ds2.T, xl)
        grads["weight_gh" + sfx] = np.matmul(ds2.T, hp_all)
        if bias:
            grads["bias_g" + sfx] = ds2.sum(axis=0)
    order = [f"{n}_l{l}" for l in range(L)
             for n, _ in param_shapes(cell, I, H, L, bias, l)]
    grads = {n: grads[n] for n in order}
    dh0 = carry_h.transpose(1, 0, 2).copy()
    dc0 = carry_c.transpose(1, 0, 2).copy() if lstm else None
    return dx, dh0, dc0, grads

