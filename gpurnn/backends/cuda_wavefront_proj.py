"""The layer wavefront of the LSTM with projection, host side (kernels:
gpurnn/kernels/wavefront_proj.py, plan: gpurnn/planning/wavefront_proj.py): a whole stacked
unidirectional projected LSTM (lstm / lstm_peephole / cifg / cifg_peephole with proj_size R,
gpurnn.variants) in ONE persistent launch forward and ONE backward, written against `rt.xp` as
gpurnn.backends.cuda_proj is, so the CUDA runtime and the strict simulator
(gpurnn.backends.sim.RUNTIME) run the same code; Numba's stock simulator gets one launch per
half-stage (its grid barrier is a block barrier).

  forward   Gx_0 = x W_ih0^T + b_ih0 + b_hh0 (one GEMM, as cuda_proj) -> the wavefront kernel:
            T+L-1 stages of two phases (the cell, the projection), a grid barrier after each
            but the last; layers l > 0 form their input product in the launch
  backward  the reverse wavefront: T+L stages (the last only finishes layer 0's dh0); it writes
            every lower layer's dy (the upper layer's dx); then per layer the GEMMs of
            cuda_proj.run_backward in its order: dW_ih = dgh^T x_l, dW_hh = dgh^T h_in, db,
            dW_ch (cuda.peephole_grads), dW_hr = dhp^T m, and the stack's dx = dgh_0 W_ih0
No dropout between layers (the caller keeps per-layer launches when dropout > 0); every layer
of one H and one R (layer 0's input size I is free; layer l > 0's is R).
Entry points:
    run_stack_forward(rt, cell, x, layers, h0, c0, lengths, need_saved, options)
        -> (y (T, B, R), h_n (L, B, R), c_n (L, B, H), reserves, outputs)
        reserves: per layer (h (T+1, B, R), c (T+1, B, H), gates (T, B, G*H)), gpurnn.variants'
        saved layout, or None when not need_saved; outputs: per layer its y_l (T, B, R)
    run_stack_backward(rt, cell, x, layers, saved, lengths, dy, dh_n, dc_n, options)
        -> (dx, dh0 (L, B, R), dc0 (L, B, H), [per layer {weight_ih, weight_hh, bias_ih?,
        bias_hh?, weight_ch?, weight_hr}]); saved = (reserves, outputs) of the forward
cell: "lstm_proj{R}", "lstm_peephole_proj{R}", "cifg_proj{R}", "cifg_peephole_proj{R}"
(gpurnn.variants.form_of); layers: per layer a dict of the form's parameter names without
suffix (weight_ih, weight_hh, bias_ih?, bias_hh?, weight_ch (peephole), weight_hr).
h0 (L, B, R), c0 (L, B, H) or None (zeros); dy, dh_n, dc_n may be None (zeros).
options: {"blocks": P per layer, "threads", "batch_tile"} (and "path": "persistent" only); the
rest from gpurnn.planning.wavefront_proj.fit. Backward plans again from the same options.
_stack_forward / _stack_backward return everything the kernels wrote (the stacked gx, dy, dgh,
dhp), for the tests' bit-level comparison with the per-layer projection kernels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import cuda as host
from . import launching
from .cuda_wavefront import _rows, _stacked_lengths
from .numpy import inputs_seen
from ..kernels import wavefront_proj as kernels
from ..variants import form_of

_kernel = launching.KernelCache(kernels.spec)     # (rt, cell, kind, dtype) -> (spec, kernel)


@dataclass(frozen=True)
class WavefrontProjLaunch:
    blocks_per_layer: int
    threads: int
    units: int          # U = ceil(H / P)
    feats: int          # Q = ceil(R / P)
    batch_tile: int
    fit: Any


def projected_form(cell):
    """The gpurnn.variants.LSTMForm of a projected cell name; a ValueError for any other."""
    form = form_of(cell)
    if form is None or not form.proj_size or form.multiplicative:
        raise ValueError(f"the projection wavefront runs lstm_proj<R>, lstm_peephole_proj<R>, "
                         f"cifg_proj<R> and cifg_peephole_proj<R>; got {cell!r}")
    return form


def choose_launch(cell, hidden, batch, layers, dtype, device, options, backend=host.NAME):
    """The launch (blocks per layer, threads, U, Q, tile) of options and the plan; a ValueError
    where it cannot run."""
    from ..planning import wavefront_proj as planning
    options = host.check_options(options, backend)
    if options.get("path", "persistent") != "persistent":
        raise ValueError(f"the wavefront is one persistent launch; options['path'] must be "
                         f"'persistent' or absent, got {options['path']!r}")
    options, kw = launching.forced(options, batch, backend)
    f = planning.fit(cell, hidden, batch, layers, dtype, device, **kw)
    if not f.fits:
        raise ValueError(f"the wavefront cannot run {layers} x {cell} H={hidden} B={batch} "
                         f"{dtype} on {f.device.name}: " + "; ".join(f.reasons))
    return WavefrontProjLaunch(f.blocks_per_layer, f.threads, f.units, f.feats, f.batch_tile, f)


def _launch(rt, cell, kind, dtype, cfg, layers, G, H, R, args, half_stages):
    """The kernel `kind` of the kernel cell `cell` (form.kernel_cell) over `half_stages`
    half-stages (one launch, or one a half-stage where the grid barrier cannot be trusted);
    args(q0, q1) are the launch's arguments."""
    sp, kern = _kernel(rt, cell, kind, dtype)
    blocks = layers * cfg.blocks_per_layer
    smem = kernels.smem_bytes("fwd" if kind.endswith("fwd") else "bwd", G, H, R, cfg.batch_tile,
                              cfg.blocks_per_layer, dtype, threads=cfg.threads)
    for q0, q1 in launching.phase_ranges(rt, blocks, half_stages):
        launching.launch_persistent(rt, sp, kern, kind, blocks, cfg.threads, smem, args(q0, q1),
                                    (q0, q1), single_step=q1 - q0 == 1)


def _shape(p, key):
    a = p.get(key)
    return None if a is None else tuple(a.shape)


def _check_layers(form, x, layers):
    """(H, R) of the stack; a ValueError naming the layer and the parameter otherwise."""
    if not isinstance(layers, (list, tuple)) or not layers:
        raise ValueError("layers must be a non-empty list of per-layer parameter dicts")
    if x.ndim != 3:
        raise ValueError(f"x must be (T, B, I); got shape {tuple(x.shape)}")
    if _shape(layers[0], "weight_hr") is None or len(layers[0]["weight_hr"].shape) != 2:
        raise ValueError(f"layer 0: {form.name} needs weight_hr of shape (R, H); got "
                         f"{_shape(layers[0], 'weight_hr')}")
    R, H = layers[0]["weight_hr"].shape
    if R != form.proj_size:
        raise ValueError(f"layer 0: weight_hr has shape {(R, H)}; {form.name} needs R = "
                         f"{form.proj_size} rows")
    bias = layers[0].get("bias_ih") is not None
    for l, p in enumerate(layers):
        want = dict(form.param_shapes(x.shape[2] if l == 0 else R, H, bias))
        for name, shape in want.items():
            if _shape(p, name) != shape:
                raise ValueError(f"layer {l}: {name} has shape {_shape(p, name)}; expected "
                                 f"{shape} (one H = {H} and R = {R} for the whole stack)")
        extra = {"bias_ih", "bias_hh"} & {k for k, v in p.items() if v is not None} - set(want)
        if extra:
            raise ValueError(f"layer {l}: has {sorted(extra)} but layer 0 has no bias; every "
                             f"layer of the stack must have biases or none")
    return H, R


def _stacked(xp, arrays, dt):
    return xp.ascontiguousarray(xp.concatenate([xp.asarray(a).astype(dt, copy=False)
                                                for a in arrays], axis=0))


def _weights(xp, form, layers, dt, H, R):
    """(W_hh of every layer, W_ih of layers 1.. (zeros for one layer), W_hr of every layer,
    the peephole vectors (or one placeholder per layer)), stacked along rows."""
    GH = form.gates * H
    w_hh = _stacked(xp, [p["weight_hh"] for p in layers], dt)
    w_ih = (_stacked(xp, [p["weight_ih"] for p in layers[1:]], dt) if len(layers) > 1
            else xp.zeros((GH, R), dt))
    w_hr = _stacked(xp, [p["weight_hr"] for p in layers], dt)
    b_rec = (_stacked(xp, [p["weight_ch"] for p in layers], dt) if form.peephole
             else xp.zeros(len(layers), dt))
    return w_hh, w_ih, w_hr, b_rec


def _call(rt, cell, x, layers, options):
    """What _stack_forward and _stack_backward start from: (form, T, B, H, R, L, dtype name,
    the launch), the layers checked."""
    form = projected_form(cell)
    dtype = np.dtype(x.dtype).name
    if dtype not in kernels.DTYPES:
        raise ValueError(f"x must be one of {kernels.DTYPES}; got {dtype}")
    H, R = _check_layers(form, x, layers)
    T, B, _ = x.shape
    L = len(layers)
    cfg = choose_launch(cell, H, B, L, dtype, rt.device, options, rt.name)
    return form, T, B, H, R, L, dtype, cfg


@dataclass
class ForwardState:
    """Everything the forward kernel wrote, stacked along the batch (kernels docstring)."""
    gx: Any
    h: Any
    c: Any
    gates: Any
    y: Any
    m: Any
    launch: WavefrontProjLaunch


def _stack_forward(rt, cell, x, layers, h0, c0, lengths, need_saved, options):
    xp = rt.xp
    form, T, B, H, R, L, dtype, cfg = _call(rt, cell, x, layers, options)
    dt = x.dtype
    G = form.gates
    GH = G * H
    gx = xp.empty((T, L * B, GH), dt)
    gx0 = xp.matmul(x.reshape(T * B, -1), layers[0]["weight_ih"].T).reshape(T, B, GH)
    bias = xp.zeros(L * GH, dt)
    if layers[0].get("bias_ih") is not None:
        gx0 += layers[0]["bias_ih"] + layers[0]["bias_hh"]      # as cuda_proj.run_forward
        for l in range(1, L):
            bias[l * GH:(l + 1) * GH] = layers[l]["bias_ih"] + layers[l]["bias_hh"]
    gx[:, :B] = gx0
    w_hh, w_ih, w_hr, b_rec = _weights(xp, form, layers, dt, H, R)
    h = xp.empty((T + 1, L * B, R), dt)
    h[0] = 0 if h0 is None else xp.asarray(h0).reshape(L * B, R)
    c = xp.empty((T + 1, L * B, H), dt)
    c[0] = 0 if c0 is None else xp.asarray(c0).reshape(L * B, H)
    save = 1 if need_saved else 0
    gates = xp.empty((T, L * B, GH), dt) if save else xp.zeros((1, 1, 1), dt)
    y = xp.empty((T, L * B, R), dt)
    m = xp.empty((T + 1, L * B, H), dt)
    m_y = xp.empty((T, L * B, H), dt)
    lengths_k = _stacked_lengths(xp, lengths, T, B, L)
    U, Q, bt = cfg.units, cfg.feats, cfg.batch_tile
    _launch(rt, form.kernel_cell, "wavefront_proj_fwd", dtype, cfg, L, G, H, R,
            lambda q0, q1: (gx, w_hh, w_ih, w_hr, bias, b_rec, h, c, gates, y, m, m_y, lengths_k,
                            L, q0, q1, U, Q, save, bt), 2 * (T + L - 1))
    return ForwardState(gx=gx, h=h, c=c, gates=gates, y=y, m=m, launch=cfg)


def _forward_results(xp, st, x, L, need_saved):
    """run_stack_forward's results from the stacked arrays of the launch."""
    T, B, _ = x.shape
    outputs = [_rows(xp, st.y, l, B) for l in range(L)]
    h_n = st.h[T].reshape(L, B, -1).copy()
    c_n = st.c[T].reshape(L, B, -1).copy()
    reserves = None
    if need_saved:
        reserves = [(_rows(xp, st.h, l, B), _rows(xp, st.c, l, B), _rows(xp, st.gates, l, B))
                    for l in range(L)]
    return outputs[-1], h_n, c_n, reserves, outputs


def run_stack_forward(rt, cell, x, layers, h0, c0, lengths, need_saved, options):
    st = _stack_forward(rt, cell, x, layers, h0, c0, lengths, need_saved, options)
    return _forward_results(rt.xp, st, x, len(layers), need_saved)


@dataclass
class BackwardState:
    dy: Any
    dgh: Any
    dhp: Any
    dh0: Any
    dc0: Any
    launch: WavefrontProjLaunch


def _stack_backward(rt, cell, x, layers, saved, lengths, dy, dh_n, dc_n, options):
    xp = rt.xp
    form, T, B, H, R, L, dtype, cfg = _call(rt, cell, x, layers, options)
    dt = x.dtype
    G = form.gates
    GH = G * H
    reserves = saved[0] if saved is not None else None
    if reserves is None or len(reserves) != L:
        raise ValueError("saved must be the (reserves, outputs) of a training forward of the "
                         "same stack")
    c = xp.ascontiguousarray(xp.concatenate([r[1] for r in reserves], axis=1))
    gates = xp.ascontiguousarray(xp.concatenate([r[2] for r in reserves], axis=1))
    w_hh, w_ih, w_hr, b_rec = _weights(xp, form, layers, dt, H, R)
    dy_all = xp.zeros((T, L * B, R), dt)    # the lower layers' rows: written by the kernel
    if dy is not None:
        dy_all[:, (L - 1) * B:] = dy
    dgh = xp.empty((T, L * B, GH), dt)
    dhp = xp.empty((T, L * B, R), dt)
    dm = xp.empty((T, L * B, H), dt)
    dh_carry = (xp.zeros((L * B, R), dt) if dh_n is None
                else xp.array(xp.asarray(dh_n).reshape(L * B, R), dtype=dt, copy=True, order="C"))
    dc_carry = (xp.zeros((L * B, H), dt) if dc_n is None
                else xp.array(xp.asarray(dc_n).reshape(L * B, H), dtype=dt, copy=True, order="C"))
    dh_unit = xp.empty((L * B, H), dt)
    h_shape = xp.zeros((1, 1, H), dt)
    dgx = xp.zeros((1, 1, 1), dt)
    lengths_k = _stacked_lengths(xp, lengths, T, B, L)
    U, Q, bt = cfg.units, cfg.feats, cfg.batch_tile
    # 2*(T+L) half-stages, less the last stage's phase B (no layer has a step there)
    _launch(rt, form.kernel_cell, "wavefront_proj_bwd", dtype, cfg, L, G, H, R,
            lambda q0, q1: (w_hh, w_ih, w_hr, b_rec, h_shape, c, gates, dy_all, dgh, dgx, dhp,
                            dm, dh_carry, dh_unit, dc_carry, lengths_k, L, q0, q1, U, Q, bt),
            2 * (T + L) - 1)
    return BackwardState(dy=dy_all, dgh=dgh, dhp=dhp, dh0=dh_carry.reshape(L, B, R),
                         dc0=dc_carry.reshape(L, B, H), launch=cfg)


def run_stack_backward(rt, cell, x, layers, saved, lengths, dy, dh_n, dc_n, options):
    st = _stack_backward(rt, cell, x, layers, saved, lengths, dy, dh_n, dc_n, options)
    return _backward_results(rt.xp, cell, st, x, layers, saved, lengths)


def _backward_results(xp, cell, st, x, layers, saved, lengths):
    """run_stack_backward's results: per layer cuda_proj.run_backward's GEMMs, in its order."""
    form = projected_form(cell)
    T, B, _ = x.shape
    dt = x.dtype
    G = form.gates
    TB = T * B
    reserves, outputs = saved
    lengths_h = None if lengths is None else np.asarray(lengths).astype(np.int32)

    def out(a):
        return xp.ascontiguousarray(a.astype(dt, copy=False))
    grads = []
    dx = None
    for l, p in enumerate(layers):
        x_l = x if l == 0 else outputs[l - 1]
        h, c, gates = reserves[l]
        H = c.shape[2]
        dgh = _rows(xp, st.dgh, l, B)
        dhp = _rows(xp, st.dhp, l, B)
        dgh2 = dgh.reshape(TB, G * H)
        m = gates[:, :, (G - 1) * H:] * xp.tanh(c[1:T + 1])  # o*tanh(c_t); o is the last gate
        if lengths is not None:     # padded steps never reach h (NaN there must stay out)
            seen = xp.asarray(np.arange(T)[:, None] < lengths_h[None, :])[..., None]
            m = xp.where(seen, m, 0)
        x_seen = inputs_seen(x_l, lengths, xp).reshape(TB, -1)
        g = {"weight_ih": xp.matmul(dgh2.T, x_seen),
             "weight_hh": xp.matmul(dgh2.T, h[0:T].reshape(TB, -1))}
        if p.get("bias_ih") is not None:
            db = dgh2.sum(axis=0)
            g["bias_ih"], g["bias_hh"] = db, db.copy()
        if form.peephole:
            g["weight_ch"] = host.peephole_grads(xp, form, dgh, c, 0)
        g["weight_hr"] = xp.matmul(dhp.reshape(TB, -1).T, m.reshape(TB, H))
        if l == 0:      # the stack's dx; the lower layers' dx were the kernel's
            dx = xp.matmul(dgh2, p["weight_ih"]).reshape(T, B, -1)
        grads.append({name: out(a) for name, a in g.items()})
    return out(dx), out(st.dh0), out(st.dc0), grads


__all__ = ["run_stack_forward", "run_stack_backward", "choose_launch", "projected_form"]
