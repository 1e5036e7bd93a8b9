"""`gpurnn check`: a self-test that runs forward and backward of every cell on every available
backend at small sizes and compares it with a reference, printing a pass table.

The NumPy backend (the reference itself) is checked against directional finite differences in
float64 and, when torch is installed, against torch.nn in float64; every other backend is checked
against the NumPy backend in float32. Exit status 1 on any mismatch.
"""
from __future__ import annotations

import time
import warnings

import numpy as np

from gpurnn.cells import CELLS, REGISTRY
from gpurnn.testing import FD_TOL, TOL, rel_err

from . import int_at_least


def add_parser(sub):
    p = sub.add_parser("check", help="self-test every cell on every available backend",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", action="append", choices=("numpy", "cpu", "sim", "cuda"),
                   help="check only these backends (repeatable); default: every available one")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="seed of the random problems")
    p.set_defaults(func=run)
    return p


def _problem(cell, dtype, rng, T=5, B=3, I=4, H=6):
    G, has_c = REGISTRY[cell].gates, REGISTRY[cell].has_cell_state
    args = {
        "x": rng.standard_normal((T, B, I)), "w_ih": rng.uniform(-0.5, 0.5, (G * H, I)),
        "w_hh": rng.uniform(-0.5, 0.5, (G * H, H)), "b_ih": rng.uniform(-0.5, 0.5, G * H),
        "b_hh": rng.uniform(-0.5, 0.5, G * H), "h0": rng.standard_normal((B, H)),
        "c0": rng.standard_normal((B, H)) if has_c else None,
    }
    args = {k: (v.astype(dtype) if v is not None else None) for k, v in args.items()}
    lengths = np.array([T, 2, T - 1][:B])
    seeds = {"dy": rng.standard_normal((T, B, H)).astype(dtype),
             "dh": rng.standard_normal((B, H)).astype(dtype),
             "dc": rng.standard_normal((B, H)).astype(dtype) if has_c else None}
    return args, lengths, seeds


def _run(cell, args, lengths, seeds, backend, reverse=True):
    from gpurnn import functional as F
    y, h_n, c_n, res = F.forward(cell, **args, lengths=lengths, reverse=reverse, backend=backend)
    g = F.backward(res, seeds["dy"], seeds["dh"], seeds["dc"])
    outs = {"y": y, "h_n": h_n, "c_n": c_n}
    grads = {"dx": g.dx, "dh0": g.dh0, "dc0": g.dc0, "dw_ih": g.dw_ih, "dw_hh": g.dw_hh,
             "db_ih": g.db_ih, "db_hh": g.db_hh}
    return outs, grads


def _objective(outs, seeds):
    total = float(np.sum(outs["y"] * seeds["dy"]) + np.sum(outs["h_n"] * seeds["dh"]))
    if outs["c_n"] is not None:
        total += float(np.sum(outs["c_n"] * seeds["dc"]))
    return total


def _check_numpy_fd(cell, rng):
    """Directional finite difference of the objective against <grad, direction>, float64."""
    from gpurnn import functional as F
    args, lengths, seeds = _problem(cell, np.float64, rng)
    _, grads = _run(cell, args, lengths, seeds, "numpy")
    names = {"x": "dx", "w_ih": "dw_ih", "w_hh": "dw_hh", "b_ih": "db_ih", "b_hh": "db_hh",
             "h0": "dh0", "c0": "dc0"}
    direction = {k: rng.standard_normal(v.shape) for k, v in args.items() if v is not None}
    eps = 1e-6

    def value(sign):
        moved = {k: (v + sign * eps * direction[k] if v is not None else None) for k, v in args.items()}
        y, h_n, c_n, _ = F.forward(cell, **moved, lengths=lengths, reverse=True, training=False,
                                   backend="numpy")
        return _objective({"y": y, "h_n": h_n, "c_n": c_n}, seeds)

    numeric = (value(1) - value(-1)) / (2 * eps)
    analytic = sum(float(np.sum(grads[names[k]] * d)) for k, d in direction.items())
    return rel_err(analytic, numeric)


def _check_numpy_torch(cell, rng):
    try:
        import torch
    except ImportError:
        return None
    args, lengths, seeds = _problem(cell, np.float64, rng)
    outs, grads = _run(cell, args, lengths, seeds, "numpy", reverse=False)
    spec = REGISTRY[cell]
    T, B, I = args["x"].shape
    H = args["h0"].shape[1]
    m = getattr(torch.nn, spec.torch_class)(I, H, **spec.torch_kwargs).double()
    with torch.no_grad():
        for name, key in (("weight_ih_l0", "w_ih"), ("weight_hh_l0", "w_hh"), ("bias_ih_l0", "b_ih"),
                          ("bias_hh_l0", "b_hh")):
            getattr(m, name).copy_(torch.from_numpy(args[key]))
    t = {k: torch.tensor(v, requires_grad=True) for k, v in args.items() if k in ("x", "h0", "c0") and v is not None}
    packed = torch.nn.utils.rnn.pack_padded_sequence(t["x"], torch.tensor(lengths), enforce_sorted=False)
    hx = (t["h0"][None], t["c0"][None]) if spec.has_cell_state else t["h0"][None]
    out, state = m(packed, hx)
    y, _ = torch.nn.utils.rnn.pad_packed_sequence(out, total_length=T)
    states = state if spec.has_cell_state else (state,)
    loss = (y * torch.from_numpy(seeds["dy"])).sum() + (states[0][0] * torch.from_numpy(seeds["dh"])).sum()
    if spec.has_cell_state:
        loss = loss + (states[1][0] * torch.from_numpy(seeds["dc"])).sum()
    loss.backward()
    errs = [rel_err(outs["y"], y.detach().numpy()), rel_err(outs["h_n"], states[0][0].detach().numpy()),
            rel_err(grads["dx"], t["x"].grad.numpy()), rel_err(grads["dh0"], t["h0"].grad.numpy()),
            rel_err(grads["dw_ih"], m.weight_ih_l0.grad.numpy()), rel_err(grads["dw_hh"], m.weight_hh_l0.grad.numpy()),
            rel_err(grads["db_ih"], m.bias_ih_l0.grad.numpy()), rel_err(grads["db_hh"], m.bias_hh_l0.grad.numpy())]
    return max(errs)


def _check_against_numpy(cell, backend, rng):
    args, lengths, seeds = _problem(cell, np.float32, rng)
    ref_o, ref_g = _run(cell, args, lengths, seeds, "numpy")
    o, g = _run(cell, args, lengths, seeds, backend)
    to_host = (lambda a: a.get()) if backend == "cuda" else (lambda a: a)
    errs = [rel_err(to_host(o[k]), ref_o[k]) for k in ref_o if ref_o[k] is not None]
    errs += [rel_err(to_host(g[k]), ref_g[k]) for k in ref_g if ref_g[k] is not None]
    return max(errs)


# the LSTM family (gpurnn.variants), checked through the stack core: one bidirectional layer
# (so reverse too) with lengths; the projections at proj_size 3
VARIANT_CELLS = ("lstm_peephole", "cifg", "cifg_peephole", "mlstm", "lstm_proj3",
                 "lstm_peephole_proj3", "layernorm_lstm", "lstm+zoneout+recdrop",
                 "gru+zoneout+recdrop", "layernorm_lstm+zoneout", "gf_lstm", "gf_gru",
                 "gf_rnn_tanh")
# the layer wavefront (gpurnn/kernels/wavefront.py): a two-layer unidirectional stack in one
# launch each way (backend_options {"wavefront": True}), on the kernel backends against the
# NumPy reference's per-layer stack
WAVEFRONT_ROWS = {"lstm-wavefront": "lstm", "gru-wavefront": "gru",
                  "cifg_peephole-wavefront": "cifg_peephole", "mlstm-wavefront": "mlstm",
                  "lstm_peephole_proj3-wavefront": "lstm_peephole_proj3"}
VARIANT_CELLS += tuple(WAVEFRONT_ROWS)
# the rows' stacks: (cell, keywords); the regularised rows draw their masks once per problem
_STACKS = {"lstm+zoneout+recdrop": ("lstm", {"zoneout": (0.3, 0.2), "recurrent_dropout": 0.25}),
           "gru+zoneout+recdrop": ("gru", {"zoneout": 0.3, "recurrent_dropout": 0.25}),
           "layernorm_lstm+zoneout": ("layernorm_lstm", {"zoneout": (0.3, 0.2)})}


def _variant_stack(row, I, H):
    """The stack of a row: one bidirectional layer (so reverse too), or for the
    gated-feedback cells (unidirectional by nature) two layers."""
    from gpurnn.stack import make_stack
    if row in WAVEFRONT_ROWS:
        return make_stack(WAVEFRONT_ROWS[row], I, H, 2)
    cell, kw = _STACKS.get(row, (row, {}))
    if cell.startswith("gf_"):
        return make_stack(cell, I, H, 2)
    return make_stack(cell, I, H, 1, bidirectional=True, **kw)


def runs_on(row, backend):
    """Whether `backend` runs this row (the gated-feedback cells: NumPy and cpu so far)."""
    if row.startswith("gf_"):
        from gpurnn.feedback import BACKENDS
        return backend in BACKENDS
    return True


def _variant_problem(cell, dtype, rng, T=5, B=3, I=4, H=6):
    from gpurnn.stack import draw_noise
    st = _variant_stack(cell, I, H)
    R, S = st.state_width, st.num_layers * st.directions
    data = {"x": rng.standard_normal((T, B, I)), "h0": rng.standard_normal((S, B, R))}
    if st.layer.cell.has_cell_state:
        data["c0"] = rng.standard_normal((S, B, H))
    data.update((n, rng.uniform(-0.5, 0.5, shape)) for n, shape in st.param_shapes())
    seeds = {"dy": rng.standard_normal((T, B, st.directions * R)),
             "dh": rng.standard_normal((S, B, R)), "dc": rng.standard_normal((S, B, H))}
    conv = lambda d: {k: v.astype(dtype) for k, v in d.items()}   # noqa: E731
    noise = draw_noise(st.noise_specs(T, B, True), rng.random, lambda shape, p: np.full(shape, p),
                       lambda a: np.asarray(a, dtype=dtype))
    seeds = conv(seeds)
    seeds["noise"] = noise            # the same masks for every run of this problem
    return st, conv(data), np.array([T, 2, T - 1][:B]), seeds


def _variant_run(st, data, lengths, seeds, backend, training=True, options=None):
    """(objective, {name: gradient}) of one forward (+ backward) through the stack."""
    from gpurnn.stack import Run
    from gpurnn.backends import check_options
    run = Run(backend, np, check_options(backend, options), lengths, need_saved=training)
    params = {n: data[n] for n, _ in st.param_shapes()}
    has_c = st.layer.cell.has_cell_state
    y, h_n, c_n, saved = st.forward(run, data["x"], params, data["h0"], data.get("c0"),
                                    noise=seeds["noise"])
    outs = {"y": y, "h_n": h_n, "c_n": c_n if has_c else None}
    if not training:
        return _objective(outs, seeds), outs, None
    dx, dh0, dc0, grads = st.backward(run, saved, params, seeds["dy"], seeds["dh"],
                                      seeds["dc"] if has_c else None)
    grads = {"x": dx, "h0": dh0, **({"c0": dc0} if has_c else {}), **grads}
    return _objective(outs, seeds), outs, grads


def _check_variant_fd(cell, rng):
    """Directional finite difference of every gradient (parameters, x, h0, c0), float64."""
    st, data, lengths, seeds = _variant_problem(cell, np.float64, rng)
    _, _, grads = _variant_run(st, data, lengths, seeds, "numpy")
    direction = {k: rng.standard_normal(v.shape) for k, v in data.items()}
    eps = 1e-6

    def value(sign):
        moved = {k: v + sign * eps * direction[k] for k, v in data.items()}
        return _variant_run(st, moved, lengths, seeds, "numpy", training=False)[0]
    numeric = (value(1) - value(-1)) / (2 * eps)
    analytic = sum(float(np.sum(grads[k] * d)) for k, d in direction.items())
    return rel_err(analytic, numeric)


def _check_variant_torch(cell, rng):
    """The projections against torch.nn.LSTM(proj_size) in float64; None for the cells torch
    does not have (or without torch)."""
    from gpurnn.variants import form_of
    form = form_of(cell)
    if form is None or form.base != "lstm" or not form.proj_size:
        return None
    try:
        import torch
    except ImportError:
        return None
    st, data, lengths, seeds = _variant_problem(cell, np.float64, rng)
    _, outs, grads = _variant_run(st, data, lengths, seeds, "numpy")
    T = data["x"].shape[0]
    m = torch.nn.LSTM(st.input_size, st.hidden_size, proj_size=form.proj_size,
                      bidirectional=True, dtype=torch.float64)
    m.load_state_dict({n: torch.from_numpy(data[n]) for n, _ in st.param_shapes()})
    t = {k: torch.tensor(data[k], requires_grad=True) for k in ("x", "h0", "c0")}
    packed = torch.nn.utils.rnn.pack_padded_sequence(t["x"], torch.tensor(lengths),
                                                     enforce_sorted=False)
    with warnings.catch_warnings():     # torch: "LSTM with projections is not supported with
        warnings.simplefilter("ignore")   # oneDNN" (it runs its default implementation)
        out, (h_n, c_n) = m(packed, (t["h0"], t["c0"]))
    y, _ = torch.nn.utils.rnn.pad_packed_sequence(out, total_length=T)
    got = {"y": y, "h_n": h_n, "c_n": c_n}
    loss = sum((got[k] * torch.from_numpy(seeds[s])).sum()
               for k, s in (("y", "dy"), ("h_n", "dh"), ("c_n", "dc")))
    loss.backward()
    errs = [rel_err(outs[k], got[k].detach().numpy()) for k in got]
    errs += [rel_err(grads[k], t[k].grad.numpy()) for k in t]
    errs += [rel_err(grads[n], p.grad.numpy()) for n, p in m.named_parameters()]
    return max(errs)


def _check_variant_against_numpy(cell, backend, rng):
    st, data, lengths, seeds = _variant_problem(cell, np.float32, rng)
    _, ref_o, ref_g = _variant_run(st, data, lengths, seeds, "numpy")
    options = {"wavefront": True} if cell in WAVEFRONT_ROWS else None
    _, o, g = _variant_run(st, data, lengths, seeds, backend, options=options)
    errs = [rel_err(o[k], ref_o[k]) for k in ref_o if ref_o[k] is not None]
    errs += [rel_err(g[k], ref_g[k]) for k in ref_g]
    return max(errs)


def _checks(name, cell, rng):
    """[(what, error, tolerance)] of one cell on one backend."""
    variant = cell in VARIANT_CELLS
    if name != "numpy":
        err = (_check_variant_against_numpy(cell, name, rng) if variant
               else _check_against_numpy(cell, name, rng))
        return [("NumPy backend f32", err, TOL["float32"])]
    checks = [("finite differences f64",
               _check_variant_fd(cell, rng) if variant else _check_numpy_fd(cell, rng), FD_TOL)]
    err = _check_variant_torch(cell, rng) if variant else _check_numpy_torch(cell, rng)
    if err is not None:
        checks.append(("torch.nn f64", err, TOL["float64"]))
    return checks


def run(args):
    from gpurnn.backends import availability
    rng = np.random.default_rng(args.seed)
    # cuda first: on a GPU machine the real kernels are the ones worth checking (the strict
    # simulator runs in the same process whatever numba.cuda's mode)
    wanted = args.backend or ["numpy", "cpu", "cuda", "sim"]
    rows, failed = [], False
    print("gpurnn check: forward + backward (BPTT) of every cell at T=5, B=3, I=4, H=6, "
          "lengths (5, 2, 4), reverse, with biases; the LSTM variants as one bidirectional "
          "layer (proj_size 3)")
    for name in wanted:
        ok, why = availability(name)
        if not ok:
            rows.append((name, "-", "skipped", "-", why))
            if args.backend:
                failed = True  # explicitly asked for and not there
            continue
        for cell in CELLS + VARIANT_CELLS:
            if name == "cuda" and cell in VARIANT_CELLS:
                # the stack runs on host arrays here; the cuda backend's variants are checked
                # by the GPU test suite (tests/test_gpu_suite.py)
                continue
            if cell in WAVEFRONT_ROWS and name != "sim":
                continue        # a kernel launch: the host-array kernel backend is the sim
            if not runs_on(cell, name):
                rows.append((name, cell, "-", "-", "no kernels for this cell yet"))
                continue
            start = time.perf_counter()
            checks = _checks(name, cell, rng)
            ms = (time.perf_counter() - start) * 1e3
            for what, err, tol in checks:
                good = err <= tol
                failed |= not good
                rows.append((name, cell, "PASS" if good else "FAIL", f"{err:.1e} <= {tol:.0e}" if good
                             else f"{err:.1e} > {tol:.0e}", f"vs {what} ({ms:.0f} ms)"))
    widths = [max(len(str(r[i])) for r in rows + [("backend", "cell", "result", "rel. error", "against")])
              for i in range(5)]
    header = ("backend", "cell", "result", "rel. error", "against")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    print("FAILED" if failed else "all checks passed")
    return 1 if failed else 0
