"""Layer behaviour of gpurnn.LSTM / GRU / RNN: parameters and state dicts, initialisation,
train/eval and dropout, gradient accumulation, batch_first, initial states, shapes."""
import numpy as np
import pytest

import gpurnn
import gpurnn.functional as F

T, B, I, H = 5, 3, 4, 6
KINDS = {"LSTM": gpurnn.LSTM, "GRU": gpurnn.GRU, "RNN": gpurnn.RNN}
CELL_OF = {"LSTM": "lstm", "GRU": "gru", "RNN": "rnn_tanh"}


def _state_grads(kind, rng, L, D, b=B):
    shape = (L * D, b, H)
    if kind == "LSTM":
        return rng.standard_normal(shape), rng.standard_normal(shape)
    return rng.standard_normal(shape)


def _as_dtype(state, dtype):
    if isinstance(state, tuple):
        return tuple(s.astype(dtype) for s in state)
    return state.astype(dtype)


def _h(state):
    return state[0] if isinstance(state, tuple) else state


# ---- parameters and state dicts ------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_state_dict_keys_and_shapes_match_torch(kind, bidirectional, bias):
    torch = pytest.importorskip("torch")
    tm = getattr(torch.nn, kind)(I, H, num_layers=2, bias=bias, bidirectional=bidirectional)
    m = KINDS[kind](I, H, num_layers=2, bias=bias, bidirectional=bidirectional)
    theirs, ours = tm.state_dict(), m.state_dict()
    assert list(ours) == list(theirs)
    for key in theirs:
        assert ours[key].shape == tuple(theirs[key].shape), key
    assert list(m.grads) == list(theirs)
    assert [p.shape for p in m.parameters()] == [tuple(p.shape) for p in tm.parameters()]


@pytest.mark.parametrize("kind", list(KINDS))
def test_state_dict_round_trip_through_torch(kind):
    torch = pytest.importorskip("torch")
    m = KINDS[kind](I, H, num_layers=2, bidirectional=True, seed=1)
    tm = getattr(torch.nn, kind)(I, H, num_layers=2, bidirectional=True)
    tm.load_state_dict({k: torch.from_numpy(v) for k, v in m.state_dict().items()})
    back = KINDS[kind](I, H, num_layers=2, bidirectional=True, seed=2)
    back.load_state_dict(tm.state_dict())
    for key, value in m.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[key], value, err_msg=key)


@pytest.mark.parametrize("kind", list(KINDS))
def test_state_dict_round_trip(kind):
    rng = np.random.default_rng(3)
    a = KINDS[kind](I, H, num_layers=2, bidirectional=True, seed=10)
    b = KINDS[kind](I, H, num_layers=2, bidirectional=True, seed=11)
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    a.eval(), b.eval()
    ya, _ = a(x)
    yb, _ = b(x)
    assert not np.array_equal(ya, yb)
    b.load_state_dict(a.state_dict())
    yb, _ = b(x)
    np.testing.assert_array_equal(yb, ya)


def test_state_dict_is_a_copy():
    m = gpurnn.LSTM(I, H, seed=0)
    sd = m.state_dict()
    sd["weight_ih_l0"][...] = 7.0
    assert not np.any(m.state_dict()["weight_ih_l0"] == 7.0)


def test_load_state_dict_converts_to_module_dtype_and_copies():
    m = gpurnn.GRU(I, H, dtype="float32")
    sd = {k: v.astype(np.float64) for k, v in m.state_dict().items()}
    m.load_state_dict(sd)
    assert all(p.dtype == np.float32 for p in m.parameters())
    assert all(p.flags.c_contiguous for p in m.parameters())
    sd["weight_hh_l0"][...] = 5.0         # the module must not alias the caller's arrays
    assert not np.any(m.state_dict()["weight_hh_l0"] == 5.0)


# ---- initialisation ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_init_is_uniform_within_bound(kind, dtype):
    hidden = 16
    m = KINDS[kind](I, hidden, num_layers=2, bidirectional=True, dtype=dtype, seed=5)
    bound = 1 / np.sqrt(hidden)
    values = np.concatenate([p.ravel() for p in m.parameters()])
    assert all(p.dtype == np.dtype(dtype) for p in m.parameters())
    assert np.abs(values).max() <= bound
    # spread over the whole interval, roughly uniformly (thousands of samples)
    assert values.min() < -0.95 * bound and values.max() > 0.95 * bound
    assert abs(values.mean()) < 0.05 * bound
    assert abs(values.std() - bound / np.sqrt(3)) < 0.05 * bound
    hist, _ = np.histogram(values, bins=4, range=(-bound, bound))
    assert hist.min() > 0.8 * values.size / 4


@pytest.mark.parametrize("kind", list(KINDS))
def test_seed_reproducibility(kind):
    a = KINDS[kind](I, H, num_layers=2, seed=123)
    b = KINDS[kind](I, H, num_layers=2, seed=123)
    c = KINDS[kind](I, H, num_layers=2, seed=124)
    for key, value in a.state_dict().items():
        np.testing.assert_array_equal(b.state_dict()[key], value, err_msg=key)
        assert not np.array_equal(c.state_dict()[key], value), key
    # the same seed also gives the same dropout masks
    x = np.random.default_rng(0).standard_normal((T, B, I)).astype(np.float32)
    a.dropout = b.dropout = 0.5
    ya, _ = a(x)
    yb, _ = b(x)
    np.testing.assert_array_equal(ya, yb)


def test_unseeded_modules_differ():
    a, b = gpurnn.LSTM(I, H), gpurnn.LSTM(I, H)
    assert not np.array_equal(a.state_dict()["weight_hh_l0"], b.state_dict()["weight_hh_l0"])


# ---- train / eval and dropout ------------------------------------------------------------------

def test_train_eval_flags_and_chaining():
    m = gpurnn.GRU(I, H)
    assert m.training
    assert m.eval() is m and not m.training
    assert m.train() is m and m.training
    assert m.train(False) is m and not m.training


@pytest.mark.parametrize("kind", list(KINDS))
def test_eval_keeps_no_reserve_and_turns_dropout_off(kind):
    rng = np.random.default_rng(4)
    m = KINDS[kind](I, H, num_layers=3, dropout=0.5, seed=6)
    plain = KINDS[kind](I, H, num_layers=3, dropout=0.0, seed=6)   # same parameters, no dropout
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    m.eval()
    y1, s1 = m(x)
    assert m._saved is None
    y2, _ = m(x)
    np.testing.assert_array_equal(y1, y2)
    y_plain, s_plain = plain(x)                    # training mode, but dropout 0
    np.testing.assert_array_equal(y1, y_plain)
    np.testing.assert_array_equal(_h(s1), _h(s_plain))
    m.train()
    y_train, _ = m(x)
    assert m._saved is not None
    assert not np.allclose(y_train, y1)


@pytest.mark.parametrize("p", [0.25, 0.5, 0.8])
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_dropout_masks_are_inverted_and_between_layers_only(kind, p):
    rng = np.random.default_rng(7)
    m = KINDS[kind](I, H, num_layers=2, bidirectional=True, dropout=p, dtype="float64", seed=8)
    x = rng.standard_normal((T, 4 * B, I))
    y, state = m(x)
    masks = m._saved[1].masks
    assert len(masks) == 1                           # never after the last layer
    mask = masks[0]
    assert mask.shape == (T, 4 * B, 2 * H)
    values = np.unique(mask)
    np.testing.assert_array_equal(values, [0.0, 1.0 / (1.0 - p)])
    dropped = np.mean(mask == 0)
    assert abs(dropped - p) < 0.15, f"dropped fraction {dropped:.2f} for p = {p}"

    # the last layer saw (layer-0 output) * mask: recompute it through the functional API
    sd = m.state_dict()
    layer0 = [F.forward(CELL_OF[kind], x, sd[f"weight_ih_l0{s}"], sd[f"weight_hh_l0{s}"],
                        sd[f"bias_ih_l0{s}"], sd[f"bias_hh_l0{s}"], reverse=bool(d), training=False)[0]
              for d, s in enumerate(["", "_reverse"])]
    layer1_in = np.concatenate(layer0, axis=2) * mask
    layer1 = [F.forward(CELL_OF[kind], layer1_in, sd[f"weight_ih_l1{s}"], sd[f"weight_hh_l1{s}"],
                        sd[f"bias_ih_l1{s}"], sd[f"bias_hh_l1{s}"], reverse=bool(d), training=False)[0]
              for d, s in enumerate(["", "_reverse"])]
    np.testing.assert_allclose(y, np.concatenate(layer1, axis=2), rtol=1e-13, atol=1e-14)


def test_dropout_never_touches_the_recurrence():
    # one layer: dropout applies to nothing, so training output equals eval output
    m = gpurnn.LSTM(I, H, num_layers=1, dropout=0.9, seed=9)
    x = np.random.default_rng(9).standard_normal((T, B, I)).astype(np.float32)
    y_train, (h_train, c_train) = m(x)
    assert m._saved[1].masks == []
    m.eval()
    y_eval, (h_eval, c_eval) = m(x)
    np.testing.assert_array_equal(y_train, y_eval)
    np.testing.assert_array_equal(h_train, h_eval)
    np.testing.assert_array_equal(c_train, c_eval)


@pytest.mark.parametrize("kind", list(KINDS))
def test_dropout_one_zeroes_the_layer_input(kind):
    rng = np.random.default_rng(10)
    m = KINDS[kind](I, H, num_layers=2, bidirectional=True, dropout=1.0, dtype="float64", seed=11)
    x1 = rng.standard_normal((T, B, I))
    x2 = rng.standard_normal((T, B, I))
    y1, s1 = m(x1)
    assert np.all(m._saved[1].masks[0] == 0)
    assert np.isfinite(y1).all() and np.isfinite(_h(s1)).all()
    m.zero_grad()
    dx, dstate = m.backward(np.ones_like(y1))     # no state gradient: only y depends on layer 1
    assert np.isfinite(dx).all() and np.all(dx == 0)
    for key, g in m.grads.items():
        assert np.isfinite(g).all(), key
        if "_l0" in key:
            assert np.all(g == 0), f"{key} gets gradient through a fully dropped connection"
    assert any(np.abs(g).sum() > 0 for k, g in m.grads.items() if "_l1" in k)
    y2, _ = m(x2)                                  # the last layer saw zeros whatever x was
    np.testing.assert_array_equal(y1, y2)


# ---- gradients accumulate -------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(KINDS))
def test_grads_accumulate_and_zero_grad_clears(kind):
    rng = np.random.default_rng(12)
    m = KINDS[kind](I, H, num_layers=2, bidirectional=True, dtype="float64", seed=13)
    x = rng.standard_normal((T, B, I))
    dy = rng.standard_normal((T, B, 2 * H))
    dstate = _state_grads(kind, rng, 2, 2)
    assert all(np.all(g == 0) for g in m.grads.values())
    m(x)
    m.backward(dy, dstate)
    first = {k: g.copy() for k, g in m.grads.items()}
    assert all(np.abs(g).sum() > 0 for g in first.values())
    m(x)
    m.backward(dy, dstate)
    for key, g in m.grads.items():
        np.testing.assert_array_equal(g, 2 * first[key], err_msg=key)
    grads_before = {k: id(g) for k, g in m.grads.items()}
    m.zero_grad()
    for key, g in m.grads.items():
        assert np.all(g == 0), key
        assert id(g) == grads_before[key], f"zero_grad should clear {key} in place"
        assert g.shape == m.state_dict()[key].shape and g.dtype == np.float64


# ---- batch_first, initial state, shapes -------------------------------------------------------------

@pytest.mark.parametrize("lengths", [None, [T, 2, 4]], ids=["full", "lengths"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_batch_first_is_the_transpose_of_time_major(kind, lengths):
    rng = np.random.default_rng(14)
    tm = KINDS[kind](I, H, num_layers=2, bidirectional=True, dtype="float64", seed=15)
    bf = KINDS[kind](I, H, num_layers=2, bidirectional=True, dtype="float64", seed=15, batch_first=True)
    x = rng.standard_normal((T, B, I))
    hx = _state_grads(kind, rng, 2, 2)
    y, s = tm(x, hx, lengths)
    y_bf, s_bf = bf(x.transpose(1, 0, 2), hx, lengths)
    assert y_bf.shape == (B, T, 2 * H)
    np.testing.assert_array_equal(y_bf, y.transpose(1, 0, 2))
    np.testing.assert_array_equal(_h(s_bf), _h(s))           # states stay (L*D, B, H)
    dy = rng.standard_normal((T, B, 2 * H))
    dx, ds = tm.backward(dy)
    dx_bf, ds_bf = bf.backward(dy.transpose(1, 0, 2))
    np.testing.assert_array_equal(dx_bf, dx.transpose(1, 0, 2))
    np.testing.assert_array_equal(_h(ds_bf), _h(ds))
    for key in tm.grads:
        np.testing.assert_array_equal(bf.grads[key], tm.grads[key], err_msg=key)


@pytest.mark.parametrize("kind", list(KINDS))
def test_hx_none_equals_zeros(kind):
    rng = np.random.default_rng(16)
    m = KINDS[kind](I, H, num_layers=2, bidirectional=True, seed=17)
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    zeros = np.zeros((4, B, H), np.float32)
    hx = (zeros, zeros.copy()) if kind == "LSTM" else zeros
    m.eval()
    y_none, s_none = m(x)
    y_zero, s_zero = m(x, hx)
    np.testing.assert_array_equal(y_none, y_zero)
    if kind == "LSTM":
        np.testing.assert_array_equal(s_none[0], s_zero[0])
        np.testing.assert_array_equal(s_none[1], s_zero[1])
    else:
        np.testing.assert_array_equal(s_none, s_zero)
    y_rand, _ = m(x, _as_dtype(_state_grads(kind, rng, 2, 2), np.float32))
    assert not np.allclose(y_rand, y_none)          # a given hx is actually used


@pytest.mark.parametrize("D", [1, 2], ids=["uni", "bi"])
@pytest.mark.parametrize("L", [1, 2, 3], ids=["L1", "L2", "L3"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_output_shapes(kind, L, D):
    m = KINDS[kind](I, H, num_layers=L, bidirectional=D == 2, seed=18)
    x = np.random.default_rng(19).standard_normal((T, B, I)).astype(np.float32)
    y, state = m(x)
    assert y.shape == (T, B, D * H) and y.dtype == np.float32
    if kind == "LSTM":
        h_n, c_n = state
        assert c_n.shape == (L * D, B, H) and c_n.dtype == np.float32
    else:
        h_n = state
    assert h_n.shape == (L * D, B, H) and h_n.dtype == np.float32
    dx, dstate = m.backward(np.ones_like(y))
    assert dx.shape == x.shape and dx.dtype == np.float32
    if kind == "LSTM":
        assert dstate[0].shape == dstate[1].shape == (L * D, B, H)
    else:
        assert dstate.shape == (L * D, B, H)


@pytest.mark.parametrize("kind", list(KINDS))
def test_bidirectional_layout_matches_functional(kind):
    # y = [forward, backward] on the feature axis; h_n ordered layer-major, direction-minor
    rng = np.random.default_rng(20)
    m = KINDS[kind](I, H, num_layers=2, bidirectional=True, dtype="float64", seed=21)
    x = rng.standard_normal((T, B, I))
    lengths = [3, T, 1]
    hx = _state_grads(kind, rng, 2, 2)
    m.eval()
    y, state = m(x, hx, lengths)
    sd = m.state_dict()
    h0 = _h(hx)
    c0 = hx[1] if kind == "LSTM" else None
    layer_in, h_n, c_n = x, [], []
    for layer in range(2):
        outs = []
        for d, sfx in enumerate(["", "_reverse"]):
            k = f"_l{layer}{sfx}"
            yd, hd, cd, _ = F.forward(CELL_OF[kind], layer_in, sd["weight_ih" + k], sd["weight_hh" + k],
                                      sd["bias_ih" + k], sd["bias_hh" + k], h0[2 * layer + d],
                                      None if c0 is None else c0[2 * layer + d], lengths,
                                      reverse=bool(d), training=False)
            outs.append(yd)
            h_n.append(hd)
            c_n.append(cd)
        layer_in = np.concatenate(outs, axis=2)
    np.testing.assert_array_equal(y, layer_in)
    np.testing.assert_array_equal(_h(state), np.stack(h_n))
    if kind == "LSTM":
        np.testing.assert_array_equal(state[1], np.stack(c_n))
    for b, n in enumerate(lengths):
        assert np.all(y[n:, b] == 0)


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_rnn_nonlinearity(nonlinearity):
    m = gpurnn.RNN(I, H, nonlinearity=nonlinearity, seed=22)
    assert m.nonlinearity == nonlinearity and m.cell == f"rnn_{nonlinearity}"
    x = np.random.default_rng(23).standard_normal((T, B, I)).astype(np.float32) * 3
    y, _ = m(x)
    if nonlinearity == "relu":
        assert y.min() == 0 and y.max() > 1
    else:
        assert -1 <= y.min() < 0 < y.max() <= 1


def test_repr_names_non_default_options():
    assert repr(gpurnn.LSTM(I, H)) == f"LSTM({I}, {H})"
    assert repr(gpurnn.GRU(I, H, num_layers=2, bidirectional=True, dropout=0.5)) == \
        f"GRU({I}, {H}, num_layers=2, dropout=0.5, bidirectional=True)"
