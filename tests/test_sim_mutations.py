"""Mutation tests: the strict simulator must catch a broken persistent kernel.

Each mutant is gpurnn/kernels/persistent.py with one barrier deleted (every `cuda.syncthreads()`
and every grid barrier, found by reading the source, so a new barrier is covered the day it is
written), or with blocks that own no unit returning early (which hangs a GPU at the next grid
barrier). A mutant is caught when some case — chosen so that the lane-split and the plain
paths, forward and backward, and idle blocks are all exercised — raises a simulator error or
disagrees with the NumPy reference. The unmutated source, rebuilt the same way, must pass
every case, so a catch is the mutation's doing. The regularised specializations (zoneout and
recurrent dropout, the same kernel bodies with the masks on) meet every mutation too, on cases
of their own run with all three masks.
"""
import inspect
import re
import types

import numpy as np
import pytest

from gpurnn import sim as strict
from gpurnn.backends import cuda as host
from gpurnn.backends import numpy as ref
from gpurnn.backends.sim import SimRuntime
from gpurnn.cells import GATES
from gpurnn.backends import numpy_lstm
from gpurnn.kernels import layout, persistent, registry
from gpurnn.variants import LSTMForm

pytestmark = pytest.mark.sim

SOURCE = inspect.getsource(persistent)
LINES = SOURCE.splitlines()
BARRIER = re.compile(r"^\s*(cuda\.syncthreads\(\)|_grid_group_sync\(grid\))\s*(#.*)?$")
BARRIER_LINES = [i for i, line in enumerate(LINES) if BARRIER.match(line)]

# (cell, T, B, H, P, threads, batch_tile): lane splits forward/backward
# (layout.lanes_per_output of the tile's outputs) and batch tiles that do not divide B
CASES = [
    ("lstm", 3, 2, 7, 2, 32, None),     # fwd L=1 (32 outputs, several rounds), bwd L=4
    ("gru", 3, 1, 7, 2, 64, None),      # fwd L=4, bwd L=16
    ("lstm", 2, 3, 7, 6, 32, None),     # P=6 over H=7: blocks 4 and 5 own no unit
    ("rnn_tanh", 3, 3, 33, 1, 32, None),  # one block, L=1 both ways, several rounds
    ("lstm", 3, 5, 7, 2, 32, 2),        # tiles of 2, 2, 1: fwd L=1, bwd L=4
    ("gru", 3, 5, 9, 3, 64, 2),         # tiles: fwd L=2, bwd L=8
    ("rnn_tanh", 2, 5, 33, 1, 32, 2),   # tiles with L=1 both ways
    # the LSTM variants' kernel cells run the same kernels (3 gates, the peephole vector):
    ("cifg_peephole", 3, 3, 7, 3, 32, None),  # fwd L=1, bwd L=2
    ("lstm_peephole", 3, 5, 7, 2, 64, 2),     # tiles of 2, 2, 1: fwd L=2, bwd L=8
]
# the regularised kernels (every mask on): both lane modes each way, tiles, idle blocks.
# With recurrent dropout on, the forward's update reads h_{t-1} from global memory (the staged
# copy is masked), which makes the barrier between batch tiles redundant for h_prev; the last
# case (zoneout only, tiles, L=1) is the one where that barrier guards the staged h.
REG_CASES = [
    ("lstm", 3, 2, 7, 2, 32, None),     # fwd L=1, bwd L=4
    ("gru", 3, 1, 7, 2, 64, None),      # fwd L=4, bwd L=16
    ("lstm", 2, 3, 7, 6, 32, None),     # blocks 4 and 5 own no unit
    ("rnn_tanh", 3, 3, 33, 1, 32, None),  # L=1 both ways, several rounds
    ("lstm", 3, 5, 7, 2, 32, 2),        # tiles of 2, 2, 1
    ("gru", 3, 5, 9, 3, 64, 2),         # tiles: fwd L=2, bwd L=8
    ("rnn_relu", 2, 5, 33, 1, 32, 2),   # tiles with L=1 both ways
    ("lstm", 3, 5, 7, 2, 32, 2, "zoneout"),   # tiles of 2, 2, 1, zoneout only
]
VARIANT_FORMS = {"cifg_peephole": LSTMForm(coupled=True, peephole=True),
                 "lstm_peephole": LSTMForm(peephole=True)}
def _lanes(cell, B, H, P, threads):
    U = layout.units_per_block(H, P)
    return (layout.lanes_per_output(B * GATES[cell] * U, threads),
            layout.lanes_per_output(B * U, threads))


@pytest.mark.parametrize("cases", [CASES, REG_CASES], ids=["plain", "regularised"])
def test_cases_cover_both_lane_modes_idle_blocks_and_tiles(cases):
    cases = [c[:7] for c in cases]
    modes = {(_lanes(c, bt or B, H, P, n), bool(bt)) for c, _, B, H, P, n, bt in cases}
    for tiled in (False, True):
        assert any(f == 1 for (f, _), t in modes if t == tiled)
        assert any(f > 1 for (f, _), t in modes if t == tiled)
        assert any(b == 1 for (_, b), t in modes if t == tiled)
        assert any(b > 1 for (_, b), t in modes if t == tiled)
    assert any(P * layout.units_per_block(H, P) - H >= layout.units_per_block(H, P)
               for _, _, _, H, P, _, _ in cases)
    assert all(B % bt for _, _, B, _, _, _, bt in cases if bt)


def test_the_source_has_the_barriers_the_docstring_promises():
    kinds = [BARRIER.match(LINES[i]).group(1) for i in BARRIER_LINES]
    assert kinds.count("_grid_group_sync(grid)") == 2          # one per kernel
    assert kinds.count("cuda.syncthreads()") == 7              # 4 forward, 3 backward


def _module(source, tag):
    mod = types.ModuleType(f"gpurnn.kernels._mutant_{tag}")
    mod.__package__ = "gpurnn.kernels"
    mod.__file__ = persistent.__file__
    exec(compile(source, f"<persistent.py {tag}>", "exec"), mod.__dict__)
    return mod


class MutantRuntime(SimRuntime):
    """The strict sim backend with the persistent kernels taken from a rebuilt module."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def kernel(self, cell, kind, dtype, regularised=False):
        if not kind.startswith("persistent"):
            return super().kernel(cell, kind, dtype, regularised)
        make = self.module.make_fwd if kind.endswith("fwd") else self.module.make_bwd
        return (registry.spec(cell, kind, dtype, regularised),
                strict.jit(make(cell, dtype, regularised)))


def _run_variant_case(rt, case, seed):
    cell, T, B, H, P, threads, batch_tile = case
    form = VARIANT_FORMS[cell]
    rng = np.random.default_rng(seed)
    I = 3

    def r(*shape):
        return (0.5 * rng.standard_normal(shape)).astype(np.float32)
    params = {name: r(*shape) for name, shape in form.param_shapes(I, H, True)}
    x, h0, c0 = r(T, B, I), r(B, H), r(B, H)
    dy, dh_n, dc_n = r(T, B, H), r(B, H), r(B, H)
    lengths = np.arange(B, dtype=np.int64) % T + 1
    opts = {"path": "persistent", "blocks": P, "threads": threads}
    if batch_tile is not None:
        opts["batch_tile"] = batch_tile
    out = host.run_lstm_forward(rt, form, x, params, h0, c0, lengths, False, True, opts)
    want = numpy_lstm.lstm_forward(form, x, params, h0, c0, lengths, False, True)
    grads = host.run_lstm_backward(rt, form, x, params, out[3], lengths, False, dy, dh_n, dc_n,
                                   opts)
    want_grads = numpy_lstm.lstm_backward(form, x, params, want[3], lengths, False, dy, dh_n,
                                          dc_n)
    pairs = [("y", out[0], want[0]), ("c_n", out[2], want[2]), ("dx", grads[0], want_grads[0]),
             ("dh0", grads[1], want_grads[1]), ("dc0", grads[2], want_grads[2]),
             ("dweight_ch", grads[3]["weight_ch"], want_grads[3]["weight_ch"])]
    for name, a, b in pairs:
        if not np.allclose(a, b, rtol=1e-4, atol=1e-5):
            return f"{name} differs from the reference"
    return None


def _noise(cell, T, B, H, rng, recurrent=True):
    """Every mask the cell takes (recurrent dropout unless not `recurrent`), each holding both
    of its values."""
    noise = {"zoneout_h": (rng.random((T, B, H)) < 0.4).astype(np.float32)}
    if recurrent:
        noise["recurrent"] = (rng.random((B, H)) < 0.7).astype(np.float32) / np.float32(0.7)
    if cell == "lstm":
        noise["zoneout_c"] = (rng.random((T, B, H)) < 0.4).astype(np.float32)
    for m in noise.values():
        m.flat[0], m.flat[-1] = 0, 1
    return noise


def _run_case(rt, case, seed, regularised=False):
    cell, T, B, H, P, threads, batch_tile = case[:7]
    if cell in VARIANT_FORMS:
        return _run_variant_case(rt, case, seed)
    rng = np.random.default_rng(seed)
    G, I = GATES[cell], 3

    def r(*shape):
        return (0.5 * rng.standard_normal(shape)).astype(np.float32)
    x, w_ih, w_hh, b_ih, b_hh, h0 = r(T, B, I), r(G * H, I), r(G * H, H), r(G * H), r(G * H), r(B, H)
    c0 = r(B, H) if cell == "lstm" else None
    dy, dh_n, dc_n = r(T, B, H), r(B, H), (r(B, H) if cell == "lstm" else None)
    lengths = np.arange(B, dtype=np.int64) % T + 1 if B > 1 else None
    opts = {"path": "persistent", "blocks": P, "threads": threads}
    if batch_tile is not None:
        opts["batch_tile"] = batch_tile
    noise = _noise(cell, T, B, H, rng, case[7:] != ("zoneout",)) if regularised else None
    out = host.run_forward(rt, cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, False, True, opts,
                           noise)
    want = ref.forward(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, False, True, noise=noise)
    grads = host.run_backward(rt, out[3], dy, dh_n, dc_n, None)
    want_grads = ref.backward(want[3], dy, dh_n, dc_n)
    pairs = [("y", out[0], want[0]), ("h_n", out[1], want[1])]
    pairs += [(n, getattr(grads, n), getattr(want_grads, n)) for n in ("dx", "dh0", "dw_hh")]
    for name, a, b in pairs:
        if not np.allclose(a, b, rtol=1e-4, atol=1e-5):
            return f"{name} differs from the reference"
    return None


def caught_by(source, tag, regularised=False):
    """The first case that catches this source (a simulator error or a wrong result), or None;
    regularised: REG_CASES on the regularised kernels."""
    rt = MutantRuntime(_module(source, tag))
    for n, case in enumerate(REG_CASES if regularised else CASES):
        try:
            wrong = _run_case(rt, case, seed=n, regularised=regularised)
        except strict.SimulatorError as err:
            return f"{case}: {type(err).__name__}: {str(err).splitlines()[0]}"
        if wrong:
            return f"{case}: {wrong}"
    return None


@pytest.mark.mutation
def test_unmutated_source_passes_every_case():
    assert caught_by(SOURCE, "original") is None
    assert caught_by(SOURCE, "original-regularised", regularised=True) is None


def test_regularised_cases_run_the_regularised_kernels(monkeypatch):
    seen = []
    rt = MutantRuntime(_module(SOURCE, "original-names"))
    monkeypatch.setattr(rt, "on_launch", lambda info: seen.append(info["name"]))
    assert _run_case(rt, REG_CASES[0], seed=0, regularised=True) is None
    assert seen == ["lstm_persistent_fwd_reg_f32", "lstm_persistent_bwd_reg_f32"]


def _delete(line_no):
    lines = list(LINES)
    indent = lines[line_no][: len(lines[line_no]) - len(lines[line_no].lstrip())]
    lines[line_no] = indent + "pass  # mutant: barrier deleted"
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("line_no", BARRIER_LINES,
                         ids=[f"L{i + 1}-{LINES[i].split('#')[0].strip()}" for i in BARRIER_LINES])
@pytest.mark.mutation
def test_deleting_any_barrier_is_caught(line_no):
    found = caught_by(_delete(line_no), f"L{line_no + 1}")
    assert found is not None, (f"deleting line {line_no + 1} ({LINES[line_no].strip()}) of "
                               f"persistent.py went unnoticed: redundant, or a gap in the checks")


@pytest.mark.parametrize("line_no", BARRIER_LINES,
                         ids=[f"L{i + 1}-{LINES[i].split('#')[0].strip()}" for i in BARRIER_LINES])
@pytest.mark.mutation
def test_deleting_any_barrier_is_caught_in_the_regularised_kernels(line_no):
    found = caught_by(_delete(line_no), f"L{line_no + 1}-reg", regularised=True)
    assert found is not None, (f"deleting line {line_no + 1} ({LINES[line_no].strip()}) of "
                               f"persistent.py went unnoticed by the regularised kernels")


@pytest.mark.mutation
@pytest.mark.parametrize("kernel", ["fwd", "bwd"])
def test_idle_blocks_returning_early_is_caught(kernel):
    # After `u0, nu = _owned_units(units, H)` in the chosen kernel: `if nu == 0: return`.
    anchor = "u0, nu = _owned_units(units, H)"
    hits = [i for i, line in enumerate(LINES) if line.strip() == anchor]
    assert len(hits) == 2
    i = hits[0 if kernel == "fwd" else 1]
    indent = LINES[i][: len(LINES[i]) - len(LINES[i].lstrip())]
    lines = LINES[: i + 1] + [indent + "if nu == 0:", indent + "    return"] + LINES[i + 1:]
    found = caught_by("\n".join(lines) + "\n", f"early-return-{kernel}")
    assert found is not None and "a GPU would hang here" in found, found
