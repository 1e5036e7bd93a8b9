"""Property-based tests (Hypothesis): random problems, every output and every gradient.

NumPy backend (the modules, so layers, directions, batch_first and hx are in play) against
torch.nn in float64 on the same rounded inputs: float64 within 1e-10; float32 within twice
torch.nn's own float32 error against that float64 reference (never below the float32 budget of
gpurnn.testing.TOL). Sequences of length 0, which torch cannot pack, are checked against what
they must give: zero outputs, the initial state passed through, zero input gradients.
A smaller profile runs the kernels on the simulator against the NumPy backend the same way.

Seeded (derandomize: the same examples on every run), no deadline, a bounded number of examples;
the data of an example comes from a drawn seed, so Hypothesis shrinks the sizes and flags.
"""
import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

import gpurnn  # noqa: E402
import gpurnn.functional as F  # noqa: E402
from gpurnn.backends import availability  # noqa: E402
from gpurnn.cells import CELLS, GATES, REGISTRY  # noqa: E402
from gpurnn.testing import TOL, rel_err  # noqa: E402

PROFILE = dict(deadline=None, derandomize=True, database=None,
               suppress_health_check=[HealthCheck.too_slow])
KIND = {name: (c.torch_class, c.torch_kwargs) for name, c in REGISTRY.items()}


@st.composite
def problems(draw, max_size=9, max_layers=3):
    T = draw(st.integers(1, max_size))
    B = draw(st.integers(1, max_size))
    lengths = draw(st.one_of(st.none(), st.lists(st.integers(0, T), min_size=B, max_size=B)))
    return dict(cell=draw(st.sampled_from(CELLS)), dtype=draw(st.sampled_from(["float32", "float64"])),
                T=T, B=B, I=draw(st.integers(1, max_size)), H=draw(st.integers(1, max_size)),
                layers=draw(st.integers(1, max_layers)), bidirectional=draw(st.booleans()),
                bias=draw(st.booleans()), batch_first=draw(st.booleans()), hx=draw(st.booleans()),
                lengths=lengths, seed=draw(st.integers(0, 2 ** 32 - 1)))


def _budget(dtype, err_same_precision_ref):
    if dtype == "float64":
        return TOL[dtype]
    return max(2 * err_same_precision_ref, TOL[dtype])


# ---- NumPy backend against torch.nn ----------------------------------------------------------

def _torch_run(torch, p, params, x, h0, c0, seeds, tdtype):
    """torch.nn on the sequences of nonzero length; results scattered back to all B rows."""
    T, B, H, L, D = p["T"], p["B"], p["H"], p["layers"], 2 if p["bidirectional"] else 1
    lengths = None if p["lengths"] is None else np.array(p["lengths"])
    keep = np.arange(B) if lengths is None else np.flatnonzero(lengths > 0)
    out = {"y": np.zeros((T, B, D * H)), "h_n": h0.astype(np.float64).copy(),
           "dx": np.zeros(x.shape), "dh0": seeds["dh"].astype(np.float64).copy()}
    if p["cell"] == "lstm":
        out["c_n"], out["dc0"] = c0.astype(np.float64).copy(), seeds["dc"].astype(np.float64).copy()
    out.update({f"d{k}": np.zeros(v.shape) for k, v in params.items()})
    if keep.size == 0:
        return out
    name, kw = KIND[p["cell"]]
    m = getattr(torch.nn, name)(p["I"], H, num_layers=L, bias=p["bias"],
                                bidirectional=p["bidirectional"], **kw).to(tdtype)
    with torch.no_grad():
        for k, v in params.items():
            getattr(m, k).copy_(torch.from_numpy(v))
    t = lambda a: torch.tensor(a[..., keep, :] if a.ndim == 3 else a, dtype=tdtype, requires_grad=True)  # noqa: E731
    xt, h0t = t(x), t(h0)
    c0t = t(c0) if p["cell"] == "lstm" else None
    hx = (h0t, c0t) if p["cell"] == "lstm" else h0t
    if lengths is None:
        y, state = m(xt, hx)
    else:
        packed = torch.nn.utils.rnn.pack_padded_sequence(xt, torch.from_numpy(lengths[keep]),
                                                         enforce_sorted=False)
        y, state = m(packed, hx)
        y, _ = torch.nn.utils.rnn.pad_packed_sequence(y, total_length=T)
    states = state if p["cell"] == "lstm" else (state,)
    g = lambda a: torch.tensor(a[..., keep, :], dtype=tdtype)  # noqa: E731
    loss = (y * g(seeds["dy"])).sum() + (states[0] * g(seeds["dh"])).sum()
    if p["cell"] == "lstm":
        loss = loss + (states[1] * g(seeds["dc"])).sum()
    loss.backward()
    n = lambda a: a.detach().double().numpy()  # noqa: E731
    out["y"][:, keep], out["h_n"][:, keep] = n(y), n(states[0])
    out["dx"][:, keep], out["dh0"][:, keep] = n(xt.grad), n(h0t.grad)
    if p["cell"] == "lstm":
        out["c_n"][:, keep], out["dc0"][:, keep] = n(states[1]), n(c0t.grad)
    for k in params:
        out[f"d{k}"] = n(getattr(m, k).grad)
    return out


def _gpurnn_run(p, params, x, h0, c0, seeds):
    name, kw = KIND[p["cell"]]
    m = getattr(gpurnn, name)(p["I"], p["H"], num_layers=p["layers"], bias=p["bias"],
                              batch_first=p["batch_first"], bidirectional=p["bidirectional"],
                              dtype=p["dtype"], backend="numpy", **kw)
    m.load_state_dict(params)
    lstm = p["cell"] == "lstm"
    hx = None
    if p["hx"]:
        hx = (h0, c0) if lstm else h0
    bf = (lambda a: np.ascontiguousarray(a.transpose(1, 0, 2))) if p["batch_first"] else (lambda a: a)
    y, state = m(bf(x), hx, p["lengths"])
    dhx = (seeds["dh"], seeds["dc"]) if lstm else seeds["dh"]
    dx, dstate = m.backward(bf(seeds["dy"]), dhx)
    out = {"y": bf(y), "h_n": state[0] if lstm else state, "dx": bf(dx),
           "dh0": dstate[0] if lstm else dstate}
    if lstm:
        out["c_n"], out["dc0"] = state[1], dstate[1]
    out.update({f"d{k}": v for k, v in m.grads.items()})
    return out


@settings(max_examples=100, **PROFILE)
@given(p=problems())
def test_numpy_backend_matches_torch(p):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(p["seed"])
    dtype, T, B, I, H = p["dtype"], p["T"], p["B"], p["I"], p["H"]
    G, L, D = GATES[p["cell"]], p["layers"], 2 if p["bidirectional"] else 1
    k = 1 / np.sqrt(H)
    params = {}
    for layer in range(L):
        for d in range(D):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            params[f"weight_ih{sfx}"] = rng.uniform(-k, k, (G * H, I if layer == 0 else D * H))
            params[f"weight_hh{sfx}"] = rng.uniform(-k, k, (G * H, H))
            if p["bias"]:
                params[f"bias_ih{sfx}"] = rng.uniform(-k, k, G * H)
                params[f"bias_hh{sfx}"] = rng.uniform(-k, k, G * H)
    # every array rounded to the example's dtype once: all three runs see the same numbers
    params = {key: v.astype(dtype) for key, v in params.items()}
    x = rng.standard_normal((T, B, I)).astype(dtype)
    state = (L * D, B, H)
    h0 = rng.standard_normal(state).astype(dtype) if p["hx"] else np.zeros(state, dtype)
    c0 = (rng.standard_normal(state).astype(dtype) if p["hx"] else np.zeros(state, dtype)) \
        if p["cell"] == "lstm" else None
    seeds = {"dy": rng.standard_normal((T, B, D * H)).astype(dtype),
             "dh": rng.standard_normal(state).astype(dtype),
             "dc": rng.standard_normal(state).astype(dtype) if p["cell"] == "lstm" else None}

    mine = _gpurnn_run(p, params, x, h0, c0, seeds)
    ref64 = _torch_run(torch, p, {key: v.astype(np.float64) for key, v in params.items()},
                       x.astype(np.float64), h0.astype(np.float64),
                       None if c0 is None else c0.astype(np.float64),
                       {key: None if v is None else v.astype(np.float64) for key, v in seeds.items()},
                       torch.float64)
    same = ref64 if dtype == "float64" else _torch_run(torch, p, params, x, h0, c0, seeds, torch.float32)
    assert set(mine) == set(ref64)
    for name, want in ref64.items():
        err = rel_err(mine[name], want)
        budget = _budget(dtype, rel_err(same[name], want))
        assert err <= budget, f"{name}: relative error {err:.2e} > {budget:.1e} for {p}"


# ---- the kernels (simulator) against the NumPy backend ----------------------------------------

@pytest.mark.sim
@settings(max_examples=8, **PROFILE)
@given(p=problems(max_size=4, max_layers=1), reverse=st.booleans())
def test_sim_backend_matches_numpy(p, reverse):
    ok, why = availability("sim")
    if not ok:
        pytest.skip(f"the simulator is not available here: {why}")
    rng = np.random.default_rng(p["seed"])
    cell, dtype, T, B, I, H = p["cell"], p["dtype"], p["T"], p["B"], p["I"], p["H"]
    G = GATES[cell]
    a = {"x": rng.standard_normal((T, B, I)), "w_ih": rng.uniform(-0.6, 0.6, (G * H, I)),
         "w_hh": rng.uniform(-0.6, 0.6, (G * H, H)),
         "b_ih": rng.uniform(-0.3, 0.3, G * H) if p["bias"] else None,
         "b_hh": rng.uniform(-0.3, 0.3, G * H) if p["bias"] else None,
         "h0": rng.standard_normal((B, H)) if p["hx"] else None,
         "c0": rng.standard_normal((B, H)) if p["hx"] and cell == "lstm" else None}
    a = {key: None if v is None else v.astype(dtype) for key, v in a.items()}
    seeds = {"dy": rng.standard_normal((T, B, H)).astype(dtype),
             "dh_n": rng.standard_normal((B, H)).astype(dtype),
             "dc_n": rng.standard_normal((B, H)).astype(dtype) if cell == "lstm" else None}

    def run(backend, arrays, grads):
        y, h_n, c_n, res = F.forward(cell, **arrays, lengths=p["lengths"], reverse=reverse,
                                     backend=backend)
        out = {"y": y, "h_n": h_n, "c_n": c_n}
        out.update(F.backward(res, **grads)._asdict())
        return out

    as64 = lambda d: {key: None if v is None else v.astype(np.float64) for key, v in d.items()}  # noqa: E731
    ref64 = run("numpy", as64(a), as64(seeds))
    same = run("numpy", a, seeds)
    sim = run("sim", a, seeds)
    for name, want in ref64.items():
        if want is None:
            assert sim[name] is None, name
            continue
        err = rel_err(sim[name], want)
        budget = _budget(dtype, rel_err(same[name], want))
        assert err <= budget, f"{name}: relative error {err:.2e} > {budget:.1e} for {p}, reverse={reverse}"
