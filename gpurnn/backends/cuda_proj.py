"""The LSTM projection (gpurnn.variants: torch.nn.LSTM's proj_size) on the kernel backends: the
host side, written once against a runtime `rt` (gpurnn.backends.cuda.Runtime on a GPU,
gpurnn.backends.sim's runtimes in the simulators), called by cuda.run_lstm_forward /
run_lstm_backward for every form with proj_size > 0 (cells lstm, lstm_peephole, cifg,
cifg_peephole).

  forward   Gx = x W_ih^T + b_ih + b_hh (one GEMM) -> the persistent projection kernel over
            all steps (two grid barriers a step: the cell per hidden unit, the projection per
            feature; gpurnn/kernels/projection.py), or per step the GEMM h_in W_hh^T, the
            pointwise cell kernel, the GEMM m W_hr^T and the masked copy (stepwise)
  backward  the persistent kernel over T+1 phases, or per step dh = carry + dgh_next W_hh + dy
            with the masking, dm = dhp W_hr, the pointwise backward kernel; then GEMMs:
            dx = dgh W_ih, dW_ih = dgh^T x, dW_hh = dgh^T h_in, dW_hr = dhp^T m (m =
            o*tanh(c_t) recomputed from the saved gates and c), db = sum dgh, dW_ch from dgh
            and c (cuda.peephole_grads)
The launch comes from gpurnn.planning.projection.plan unless `options` forces it:
{"path": "persistent" | "stepwise", "blocks": P, "threads": n, "batch_tile": bt}.
Scratch beyond the saved (h, c, gates): forward m (T+1, B, H) and fwd_unit's unused y
(T, B, H); backward dgh (T, B, G*H), dhp (T, B, R), dm (T, B, H).
"""
from __future__ import annotations

import numpy as np

from . import cuda as host
from . import launching
from .numpy import inputs_seen
from ..kernels import projection as kproj

_COMPILED = {}      # (id(rt), cell, kind, dtype) -> (rt, spec, compiled kernel)


def kernel(rt, cell, kind, dtype):
    """(spec, compiled kernel) of a projection kernel on runtime rt; a runtime may supply its
    own through a `projection_kernel(cell, kind, dtype)` method (the mutation tests do)."""
    own = getattr(rt, "projection_kernel", None)
    if own is not None:
        return own(cell, kind, dtype)
    key = (id(rt), cell, kind, dtype)
    if key not in _COMPILED:
        sp = kproj.spec(cell, kind, dtype)
        _COMPILED[key] = (rt, sp, rt.compile(sp))
    return _COMPILED[key][1:]


def _launch_persistent(rt, cell, kind, dtype, cfg, smem, args, step_range):
    sp, kern = kernel(rt, cell, kind, dtype)
    launching.launch_persistent(rt, sp, kern, kind, cfg.blocks, cfg.threads, smem, args,
                                step_range)


def _launch_pointwise(rt, cell, kind, dtype, n, threads, args, step):
    sp, kern = kernel(rt, cell, kind, dtype)
    launching.launch_pointwise(rt, sp, kern, kind, n, threads, args, step)


def choose(rt, form, I, H, B, dtype, options):
    """The projection plan (gpurnn.planning.projection.Plan) with the options' forcing; a
    ValueError where a forced persistent launch cannot run."""
    from ..planning import projection as pplan
    options, kw = launching.forced(options, B)
    p = pplan.plan(form.kernel_cell, I, H, form.proj_size, B, dtype, device=rt.device, **kw)
    path = launching.chosen_path(options, p, kw)
    if path == "persistent" and not p.persistent_fits:
        raise ValueError(f"the persistent projection kernel cannot run {form.name} H={H} "
                         f"R={form.proj_size} B={B} {dtype} on {p.device.name}: "
                         + "; ".join(p.failures))
    if path == "persistent" and rt.per_step_grid and p.blocks > 1:
        raise ValueError("the projection's persistent kernel needs a real grid barrier twice a "
                         "step; Numba's stock simulator has none: use the strict simulator, "
                         "blocks=1 or path='stepwise'")
    return p.with_path(path)


def _lengths(xp, lengths, T, B):
    host_l = np.full(B, T, np.int32) if lengths is None else np.asarray(lengths).astype(np.int32)
    return host_l, xp.asarray(host_l)


def _check_form(form):
    if not form.proj_size or form.multiplicative:
        raise ValueError(f"cuda_proj runs the projected LSTM forms; got {form.name}")


def _call(rt, form, x, params, reverse, options):
    """What run_forward and run_backward start from: (T, B, I, H, the dtype's name, rev, the
    plan), the form checked."""
    _check_form(form)
    T, B, I = x.shape
    dtype = np.dtype(x.dtype).name
    H = params["weight_hr"].shape[1]
    return T, B, I, H, dtype, 1 if reverse else 0, choose(rt, form, I, H, B, dtype, options)


def run_forward(rt, form, x, params, h0, c0, lengths, reverse, need_saved, options):
    """gpurnn.variants' lstm_forward for a projected form: (y (T, B, R), h_n (B, R),
    c_n (B, H), (h, c, gates) | None)."""
    T, B, I, H, dtype, rev, cfg = _call(rt, form, x, params, reverse, options)
    xp, dt = rt.xp, x.dtype
    cell, G, R = form.kernel_cell, form.gates, form.proj_size
    w_ih, w_hh, w_hr = params["weight_ih"], params["weight_hh"], params["weight_hr"]

    gx = xp.matmul(x.reshape(T * B, I), w_ih.T).reshape(T, B, G * H)
    if params.get("bias_ih") is not None:
        gx += params["bias_ih"] + params["bias_hh"]
    gx = xp.ascontiguousarray(gx)
    b_rec = (xp.ascontiguousarray(params["weight_ch"]) if form.peephole else xp.zeros(1, dt))
    w_hh_c, w_hr_c = xp.ascontiguousarray(w_hh), xp.ascontiguousarray(w_hr)
    h = xp.empty((T + 1, B, R), dt)
    h[T if rev else 0] = h0
    c = xp.empty((T + 1, B, H), dt)
    c[T if rev else 0] = c0
    save = 1 if need_saved else 0
    gates = xp.empty((T, B, G * H), dt) if save else xp.zeros((1, 1, 1), dt)
    y = xp.empty((T, B, R), dt)
    m = xp.empty((T + 1, B, H), dt)
    m_y = xp.empty((T, B, H), dt)
    lengths_h, lengths_k = _lengths(xp, lengths, T, B)

    if cfg.path == "persistent":
        smem = kproj.smem_bytes("fwd", G, H, R, cfg.batch_tile, cfg.blocks, dtype,
                                threads=cfg.threads)
        _launch_persistent(rt, cell, "proj_persistent_fwd", dtype, cfg, smem,
                           (gx, w_hh_c, w_hr_c, b_rec, h, c, gates, y, m, m_y, lengths_k, rev, 0,
                            T, cfg.units_per_block, cfg.feats_per_block, save, cfg.batch_tile),
                           (0, T))
    else:
        w_hh_t, w_hr_t = xp.ascontiguousarray(w_hh.T), xp.ascontiguousarray(w_hr.T)
        gh = xp.empty((B, G * H), dt)
        for s in range(T):
            t = T - 1 - s if rev else s
            t_in, t_out = t + rev, t + 1 - rev
            xp.matmul(h[t_in], w_hh_t, out=gh)
            _launch_pointwise(rt, cell, "proj_pointwise_fwd", dtype, B * H, cfg.threads,
                              (gx, gh, b_rec, m, c, gates, m_y, lengths_k, rev, s, save), s)
            hp = xp.matmul(m[t_out], w_hr_t)
            active = xp.asarray(t < lengths_h)[:, None]
            h[t_out] = xp.where(active, hp, h[t_in])
            y[t] = xp.where(active, hp, 0)

    h_n = h[0 if rev else T].copy()
    c_n = c[0 if rev else T].copy()
    return y, h_n, c_n, ((h, c, gates) if need_saved else None)


def run_backward(rt, form, x, params, saved, lengths, reverse, dy, dh_n, dc_n, options):
    """gpurnn.variants' lstm_backward for a projected form: (dx, dh0, dc0, {name: grad})."""
    T, B, I, H, dtype, rev, cfg = _call(rt, form, x, params, reverse, options)
    xp, dt = rt.xp, x.dtype
    cell, G, R = form.kernel_cell, form.gates, form.proj_size
    w_ih, w_hh, w_hr = params["weight_ih"], params["weight_hh"], params["weight_hr"]
    GH = G * H
    h, c, gates = (xp.ascontiguousarray(a) for a in saved[:3])
    b_rec = (xp.ascontiguousarray(params["weight_ch"]) if form.peephole else xp.zeros(1, dt))
    w_hh_c, w_hr_c = xp.ascontiguousarray(w_hh), xp.ascontiguousarray(w_hr)
    dy = xp.zeros((T, B, R), dt) if dy is None else xp.ascontiguousarray(dy)
    dh_carry = (xp.zeros((B, R), dt) if dh_n is None
                else xp.array(dh_n, dtype=dt, copy=True, order="C"))
    dc_carry = (xp.zeros((B, H), dt) if dc_n is None
                else xp.array(dc_n, dtype=dt, copy=True, order="C"))
    dgh = xp.empty((T, B, GH), dt)
    dhp = xp.empty((T, B, R), dt)
    dm = xp.empty((T, B, H), dt)
    dh_unit = xp.empty((B, H), dt)
    h_shape = xp.zeros((1, 1, H), dt)
    dgx = xp.zeros((1, 1, 1), dt)
    lengths_h, lengths_k = _lengths(xp, lengths, T, B)

    def time_of(s):
        return T - 1 - s if rev else s

    if cfg.path == "persistent":
        smem = kproj.smem_bytes("bwd", G, H, R, cfg.batch_tile, cfg.blocks, dtype,
                                threads=cfg.threads)
        _launch_persistent(rt, cell, "proj_persistent_bwd", dtype, cfg, smem,
                           (w_hh_c, w_hr_c, b_rec, h_shape, c, gates, dy, dgh, dgx, dhp, dm,
                            dh_carry, dh_unit, dc_carry, lengths_k, rev, 0, T + 1,
                            cfg.units_per_block, cfg.feats_per_block, cfg.batch_tile), (0, T + 1))
        dh0 = dh_carry
    else:
        for s in range(T - 1, -1, -1):
            t = time_of(s)
            dh = dh_carry + xp.matmul(dgh[time_of(s + 1)], w_hh_c) if s + 1 < T else dh_carry
            active = xp.asarray(t < lengths_h)[:, None]
            dhp[t] = xp.where(active, dh + dy[t], 0)
            dh_carry = xp.where(active, 0, dh).astype(dt, copy=False)
            xp.matmul(dhp[t], w_hr_c, out=dm[t])
            _launch_pointwise(rt, cell, "proj_pointwise_bwd", dtype, B * H, cfg.threads,
                              (b_rec, h_shape, c, gates, dm, dgh, dgx, dh_unit, dc_carry,
                               lengths_k, rev, s), s)
        dh0 = dh_carry + xp.matmul(dgh[time_of(0)], w_hh_c)

    TB = T * B
    dgh2 = dgh.reshape(TB, GH)
    c_out = c[1 - rev: 1 - rev + T]
    m = gates[:, :, (G - 1) * H:] * xp.tanh(c_out)            # o*tanh(c_t); o is the last gate
    if lengths is not None:         # padded steps never reach h (NaN there must stay out)
        seen = xp.asarray(np.arange(T)[:, None] < lengths_h[None, :])[..., None]
        m = xp.where(seen, m, 0)
    x_seen = inputs_seen(x, lengths, xp).reshape(TB, I)
    grads = {"weight_ih": xp.matmul(dgh2.T, x_seen),
             "weight_hh": xp.matmul(dgh2.T, h[rev: rev + T].reshape(TB, R))}
    if params.get("bias_ih") is not None:
        db = dgh2.sum(axis=0)
        grads["bias_ih"], grads["bias_hh"] = db, db.copy()
    if form.peephole:
        grads["weight_ch"] = host.peephole_grads(xp, form, dgh, c, rev)
    grads["weight_hr"] = xp.matmul(dhp.reshape(TB, R).T, m.reshape(TB, H))
    dx = xp.matmul(dgh2, w_ih).reshape(T, B, I)

    def out(a):
        return xp.ascontiguousarray(a.astype(dt, copy=False))
    return out(dx), out(dh0), out(dc_carry), {name: out(g) for name, g in grads.items()}
