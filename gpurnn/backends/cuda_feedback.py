"""The gated-feedback RNN (gpurnn/feedback.py) on the kernel backends (cuda, and sim through its
Runtime): the host side of gpurnn/kernels/feedback.py, written once against `rt.xp`.

  forward   layer 1's x W_ih^T + bias and x W_gx^T + bias_g (two GEMMs over all T*B rows, of x
            with its padded steps zeroed), then the persistent kernel (ONE launch for the whole
            stack, 1 + L grid barriers a step), or per step and layer: the host's GEMMs (the
            reset gates' h* W_gh^T and x W_gx^T, the gated feedback, x W_ih^T, h W_hh^T) and
            the cell's pointwise kernel
  backward  pfb = U^{i->j} h^i_{t-1} for every step (L*L GEMMs: the reset gates' gradients
            need it), then the persistent kernel (one launch, L grid barriers a step), or per
            step and layer: the pointwise backward and the host's GEMMs; then dx and every
            weight gradient as GEMMs over all T*B rows (gpurnn.backends.numpy_feedback's)
Entry points (gpurnn.feedback.FeedbackStack's sim/cuda backends), with exactly the returns and
saved layout of gpurnn.backends.numpy_feedback.feedback_forward / feedback_backward (either
backward takes either forward's saved tuple):
    run_forward(rt, cell, x, params, h0, c0, lengths, masks, need_saved, options)
        -> (y, h_n, c_n | None, saved | None)
    run_backward(rt, cell, x, params, saved, lengths, masks, dy, dh_n, dc_n, options)
        -> (dx, dh0, dc0 | None, {param name: gradient})
options: None or the cuda backend's {"path", "blocks", "threads"} ('batch_tile' is refused:
these kernels stage no batch tile). The saved tuple carries no launch: backward plans again
from the same options. Arguments are the reference's (the caller, FeedbackStack, checks them).
"""
from __future__ import annotations

import numpy as np

from . import cuda as host
from . import launching
from .numpy import inputs_seen
from ..feedback import param_shapes
from ..kernels import feedback as kernels
from ..kernels import layout

_kernel = launching.KernelCache(kernels.spec)     # (rt, kind, cell, dtype) -> (spec, kernel)


def choose_launch(cell, input_size, hidden, num_layers, batch, dtype, device, options,
                  backend=host.NAME):
    """(path, blocks, threads, units, plan): options where given, the plan for the rest."""
    from ..planning import feedback as planning
    options = host.check_options(options, backend)
    if options.get("batch_tile") is not None:
        raise ValueError(f"options['batch_tile'] is not taken by the gated-feedback kernels "
                         f"(they stage no batch tile); got {options['batch_tile']!r}")
    blocks, threads = options.get("blocks"), options.get("threads")
    p = planning.plan(cell, input_size, hidden, num_layers, batch, dtype, device,
                      blocks=None if blocks is None else int(blocks),
                      threads=None if threads is None else int(threads))
    path = options.get("path", "persistent" if blocks is not None else p.path)
    if path == "persistent" and not p.persistent_fits:
        said = f"options['blocks']={int(blocks)}: " if blocks is not None else ""
        why = [r for r in p.reasons if "forced by the caller" not in r and "model" not in r]
        raise ValueError(f"{said}the persistent path cannot run {cell} L={num_layers} H={hidden} "
                         f"B={batch} {dtype} on {p.device.name}: " + "; ".join(why))
    P = int(blocks) if blocks is not None else p.blocks
    return path, P, p.threads, layout.units_per_block(hidden, P), p


def _launch_persistent(rt, kind, cell, dtype, blocks, threads, smem, args, q_range):
    sp, kern = _kernel(rt, kind, cell, dtype)
    launching.launch_persistent(rt, sp, kern, kind, blocks, threads, smem, args, q_range,
                                single_step=q_range[1] - q_range[0] == 1)


def _launch_pointwise(rt, kind, cell, dtype, n, threads, args, step):
    sp, kern = _kernel(rt, kind, cell, dtype)
    launching.launch_pointwise(rt, sp, kern, kind, n, threads, args, step)


def _sigmoid(xp, a):
    return 0.5 * xp.tanh(0.5 * a) + 0.5


class _Stack:
    """The parameters of one call, packed as the kernels take them."""

    def __init__(self, xp, cell, x, params):
        self.xp = xp
        T, B, I = x.shape
        fb0 = params["weight_fb_l0"]
        H, L = fb0.shape[0], fb0.shape[1] // fb0.shape[0]
        self.T, self.B, self.I, self.H, self.L = T, B, I, H, L
        self.G, self.HH = kernels.GATES[cell], kernels.HH_GATES[cell]
        self.cell, self.dt = cell, x.dtype
        self.bias = "bias_ih_l0" in params
        dt, G, HH = x.dtype, self.G, self.HH
        self.p = [{n: params.get(f"{n}_l{k}") for n in (
            "weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_fb", "weight_gx", "weight_gh",
            "bias_g")} for k in range(L)]
        zeros = xp.zeros
        self.b_in = zeros((L, G * H), dt)
        self.b_hn = zeros((L, H), dt)
        self.b_g = zeros((L, L), dt)
        for k, p in enumerate(self.p):
            if self.bias:
                self.b_in[k] = p["bias_ih"] + p["bias_hh"]
                if cell == "gf_gru":
                    self.b_in[k, 2 * H:] = p["bias_ih"][2 * H:]
                    self.b_hn[k] = p["bias_hh"][2 * H:]
                self.b_g[k] = p["bias_g"]
        Lm = max(L - 1, 1)
        self.w_ih = zeros((Lm, G * H, H), dt)
        self.w_gx = zeros((Lm, L, H), dt)
        for k in range(1, L):
            self.w_ih[k - 1] = self.p[k]["weight_ih"]
            self.w_gx[k - 1] = self.p[k]["weight_gx"]
        self.w_hh = zeros((L, max(HH, 1) * H, H), dt)
        if HH:
            for k in range(L):
                self.w_hh[k] = self.p[k]["weight_hh"]
        self.w_fb = xp.ascontiguousarray(xp.stack([p["weight_fb"] for p in self.p]))
        self.w_gh = xp.ascontiguousarray(xp.stack([p["weight_gh"] for p in self.p]))

    def masks(self, masks):
        """(array (Lm, T, B, H) or a placeholder, use_mask): absent entries are ones."""
        xp, T, B, H, L = self.xp, self.T, self.B, self.H, self.L
        if masks is None or all(m is None for m in masks):
            return xp.zeros((1, 1, 1, 1), self.dt), 0
        out = xp.ones((L - 1, T, B, H), self.dt)
        for k, m in enumerate(masks):
            if m is not None:
                out[k] = m
        return out, 1


def run_forward(rt, cell, x, params, h0, c0, lengths, masks, need_saved, options):
    xp = rt.xp
    st = _Stack(xp, cell, x, params)
    T, B, I, H, L, G, HH = st.T, st.B, st.I, st.H, st.L, st.G, st.HH
    LH, dt = L * H, x.dtype
    dtype = np.dtype(dt).name
    lstm = cell == "gf_lstm"
    SG = kernels.SAVED_GATES[cell]
    path, P, threads, U, _ = choose_launch(cell, I, H, L, B, dtype, rt.device, options, rt.name)

    x_seen = inputs_seen(x, lengths, xp).reshape(T * B, I)
    first = st.p[0]
    gx0 = xp.matmul(x_seen, first["weight_ih"].T).reshape(T, B, G * H)
    gs0 = xp.matmul(x_seen, first["weight_gx"].T).reshape(T, B, L)
    if st.bias:
        gx0 += st.b_in[0]
        gs0 += st.b_g[0]
    gx0, gs0 = xp.ascontiguousarray(gx0), xp.ascontiguousarray(gs0)
    h = xp.empty((T + 1, B, LH), dt)
    h[0] = 0 if h0 is None else h0.transpose(1, 0, 2).reshape(B, LH)
    placeholder = xp.zeros((1, 1, 1), dt)
    c = placeholder
    if lstm:
        c = xp.empty((T + 1, B, LH), dt)
        c[0] = 0 if c0 is None else c0.transpose(1, 0, 2).reshape(B, LH)
    save = 1 if need_saved else 0
    gates = xp.empty((T, B, L * 4 * H), dt) if (SG and save) else placeholder
    fbgate = xp.empty((T, B, L * L), dt) if save else placeholder
    mask_arr, use_mask = st.masks(masks)
    lengths_k = host._kernel_lengths(xp, lengths, T, B)

    if path == "persistent":
        pfb = xp.empty((L, L, B, H), dt)
        rec = xp.empty((L, B, max(HH, 1) * H), dt)
        sh = xp.empty((B, L * L), dt)
        gxl = xp.empty((B, G * H), dt)
        smem = kernels.smem_bytes("fwd", cell, H, L, B, U, P, dtype)
        for q_range in launching.phase_ranges(rt, P, T * (L + 1)):
            _launch_persistent(rt, "persistent_fwd", cell, dtype, P, threads, smem,
                               (gx0, gs0, st.w_ih, st.w_hh, st.w_fb, st.w_gx, st.w_gh, st.b_in,
                                st.b_hn, st.b_g, mask_arr, h, c, gates, fbgate, pfb, rec, sh, gxl,
                                lengths_k, q_range[0], q_range[1], U, save, use_mask), q_range)
    else:
        rec = xp.zeros((B, max(HH, 1) * H), dt)
        step_g = xp.empty((B, L), dt)
        for t in range(T):
            hp = h[t]
            for j in range(L):
                p = st.p[j]
                if j == 0:
                    pre, gs = gx0[t].copy(), gs0[t].copy()
                else:
                    xl = h[t + 1, :, (j - 1) * H:j * H]
                    if use_mask:
                        xl = xl * mask_arr[j - 1, t]
                    pre = xp.matmul(xl, p["weight_ih"].T) + st.b_in[j]
                    gs = xp.matmul(xl, p["weight_gx"].T) + st.b_g[j]
                gs += xp.matmul(hp, p["weight_gh"].T)
                g = _sigmoid(xp, gs)
                if save:
                    fbgate[t, :, j * L:(j + 1) * L] = g
                else:
                    step_g[...] = g
                gated = (hp.reshape(B, L, H) * g[:, :, None]).reshape(B, LH)
                fb = xp.ascontiguousarray(xp.matmul(gated, p["weight_fb"].T))
                if HH:
                    rec = xp.ascontiguousarray(xp.matmul(h[t, :, j * H:(j + 1) * H],
                                                         p["weight_hh"].T))
                _launch_pointwise(rt, "pointwise_fwd", cell, dtype, B * H, threads,
                                  (xp.ascontiguousarray(pre), fb, rec, st.b_hn[j], h, c, gates,
                                   lengths_k, t, j, save), t)

    y = h[1:, :, (L - 1) * H:].copy()
    if lengths is not None:
        idle = np.arange(T)[:, None] >= np.asarray(lengths)[None, :]
        y[xp.asarray(idle)] = 0                  # exact zeros
    h_n = h[T].reshape(B, L, H).transpose(1, 0, 2).copy()
    c_n = c[T].reshape(B, L, H).transpose(1, 0, 2).copy() if lstm else None
    saved = None
    if need_saved:
        saved = (h,) + ((c,) if lstm else ()) + ((gates,) if SG else ()) + (fbgate,)
    return y, h_n, c_n, saved


def run_backward(rt, cell, x, params, saved, lengths, masks, dy, dh_n, dc_n, options):
    xp = rt.xp
    st = _Stack(xp, cell, x, params)
    T, B, I, H, L, G, HH = st.T, st.B, st.I, st.H, st.L, st.G, st.HH
    LH, TB, dt = L * H, st.T * st.B, x.dtype
    dtype = np.dtype(dt).name
    lstm, gru = cell == "gf_lstm", cell == "gf_gru"
    SG = kernels.SAVED_GATES[cell]
    path, P, threads, U, _ = choose_launch(cell, I, H, L, B, dtype, rt.device, options, rt.name)
    saved = tuple(xp.ascontiguousarray(a) for a in saved)
    h = saved[0]
    placeholder = xp.zeros((1, 1, 1), dt)
    c = saved[1] if lstm else placeholder
    gates = saved[-2] if SG else placeholder
    fbgate = saved[-1]
    mask_arr, use_mask = st.masks(masks)
    lengths_k = host._kernel_lengths(xp, lengths, T, B)
    dy = xp.ascontiguousarray(dy)

    # pfb[j, i, t] = h^i_{t-1} U^{i->j}^T: what each source layer's state feeds layer j
    pfb = xp.empty((L, L, T, B, H), dt)
    for j in range(L):
        for i in range(L):
            pfb[j, i] = xp.matmul(h[:T, :, i * H:(i + 1) * H].reshape(TB, H),
                                  st.w_fb[j][:, i * H:(i + 1) * H].T).reshape(T, B, H)
    dgx = xp.empty((L, T, B, G * H), dt)
    dfb = xp.empty((L, T, B, H), dt)
    ds = xp.empty((L, T, B, L), dt)
    carry_h = (xp.zeros((B, LH), dt) if dh_n is None
               else dh_n.transpose(1, 0, 2).reshape(B, LH).copy())    # written: never a view
    carry_c = xp.zeros((1, 1), dt)
    if lstm:
        carry_c = (xp.zeros((B, LH), dt) if dc_n is None
                   else dc_n.transpose(1, 0, 2).reshape(B, LH).copy())

    if path == "persistent":
        smem = kernels.smem_bytes("bwd", cell, H, L, B, U, P, dtype)
        for q_range in launching.phase_ranges(rt, P, T * (L + 1)):
            _launch_persistent(rt, "persistent_bwd", cell, dtype, P, threads, smem,
                               (st.w_ih, st.w_hh, st.w_fb, st.w_gx, st.w_gh, mask_arr, h, c,
                                gates, fbgate, pfb, dy, dgx, dfb, ds, carry_h, carry_c,
                                lengths_k, q_range[0], q_range[1], U, use_mask), q_range)
    else:
        lens = np.full(B, T) if lengths is None else np.asarray(lengths)
        direct = xp.empty((B, H), dt)
        for t in range(T - 1, -1, -1):
            active = xp.asarray((t < lens)[:, None])
            hp3 = h[t].reshape(B, L, H)
            new_h = carry_h.copy()
            terms = xp.zeros((B, LH), dt)
            d_in = None
            for l in range(L - 1, -1, -1):
                p = st.p[l]
                dh = carry_h[:, l * H:(l + 1) * H] + (dy[t] if l == L - 1 else 0)
                if d_in is not None:
                    dh = dh + (d_in * mask_arr[l, t] if use_mask else d_in)
                _launch_pointwise(rt, "pointwise_bwd", cell, dtype, B * H, threads,
                                  (h, c, gates, xp.ascontiguousarray(dh), dgx, dfb, carry_c,
                                   direct, lengths_k, t, l), t)
                g = fbgate[t, :, l * L:(l + 1) * L]
                d_gated = xp.matmul(dfb[l, t], st.w_fb[l]).reshape(B, L, H)
                ds[l, t] = (d_gated * hp3).sum(axis=2) * (g * (1 - g))
                terms += (d_gated * g[:, :, None]).reshape(B, LH)
                terms += xp.matmul(ds[l, t], st.w_gh[l])
                if gru:
                    terms[:, l * H:(l + 1) * H] += direct + xp.matmul(dgx[l, t, :, :2 * H],
                                                                      p["weight_hh"])
                elif lstm:
                    terms[:, l * H:(l + 1) * H] += (
                        xp.matmul(dgx[l, t, :, :2 * H], p["weight_hh"][:2 * H])
                        + xp.matmul(dgx[l, t, :, 3 * H:], p["weight_hh"][2 * H:]))
                if l > 0:
                    d_in = xp.matmul(dgx[l, t], p["weight_ih"]) + xp.matmul(ds[l, t],
                                                                            p["weight_gx"])
            carry_h = xp.ascontiguousarray(xp.where(active, terms, new_h))

    # dx and every weight gradient: GEMMs over all T*B rows (padded rows hold exact zero
    # gradients and finite inputs: x is read with its padded steps zeroed)
    x_seen = inputs_seen(x, lengths, xp)
    h4 = h.reshape(T + 1, B, L, H)
    hp_all = h[:T].reshape(TB, LH)
    grads = {}
    for l in range(L):
        p = st.p[l]
        sfx = f"_l{l}"
        if l == 0:
            xl = x_seen.reshape(TB, I)
        else:
            xl = h4[1:, :, l - 1]
            if use_mask:
                xl = xl * mask_arr[l - 1]
            xl = xl.reshape(TB, H)
        dg2 = dgx[l].reshape(TB, G * H)
        ds2 = ds[l].reshape(TB, L)
        dfb2 = dfb[l].reshape(TB, H)
        grads["weight_ih" + sfx] = xp.matmul(dg2.T, xl)
        h_own = h4[:T, :, l].reshape(TB, H)
        if gru:
            grads["weight_hh" + sfx] = xp.matmul(dg2[:, :2 * H].T, h_own)
        elif lstm:
            d_ifo = xp.concatenate([dg2[:, :2 * H], dg2[:, 3 * H:]], axis=1)
            grads["weight_hh" + sfx] = xp.matmul(d_ifo.T, h_own)
        if st.bias:
            grads["bias_ih" + sfx] = dg2.sum(axis=0)
            if gru:
                grads["bias_hh" + sfx] = xp.concatenate([grads["bias_ih" + sfx][:2 * H],
                                                         dfb2.sum(axis=0)])
            else:
                grads["bias_hh" + sfx] = grads["bias_ih" + sfx].copy()
        gated_all = (h4[:T] * fbgate.reshape(T, B, L, L)[:, :, l, :, None]).reshape(TB, LH)
        grads["weight_fb" + sfx] = xp.matmul(dfb2.T, gated_all)
        grads["weight_gx" + sfx] = xp.matmul(ds2.T, xl)
        grads["weight_gh" + sfx] = xp.matmul(ds2.T, hp_all)
        if st.bias:
            grads["bias_g" + sfx] = ds2.sum(axis=0)
    dx = (xp.matmul(dgx[0].reshape(TB, G * H), st.p[0]["weight_ih"])
          + xp.matmul(ds[0].reshape(TB, L), st.p[0]["weight_gx"])).reshape(T, B, I)
    order = [f"{n}_l{l}" for l in range(L)
             for n, _ in param_shapes(cell, I, H, L, st.bias, l)]
    grads = {n: grads[n] for n in order}
    dh0 = carry_h.reshape(B, L, H).transpose(1, 0, 2).copy()
    dc0 = carry_c.reshape(B, L, H).transpose(1, 0, 2).copy() if lstm else None
    return dx, dh0, dc0, grads


__all__ = ["run_forward", "run_backward", "choose_launch"]
