"""The cells gpurnn runs, written down once: gate order, gate counts, reserve layout and the
torch.nn class each one stands in for. Every other module reads these facts from here (the
kernels, the plan, the commands, the module families).

Gate order is torch/cuDNN's, so torch weights load unchanged:
  LSTM  i, f, g, o        gates = x W_ih^T + b_ih + h W_hh^T + b_hh
                          c' = f*c + i*g ; h' = o*tanh(c')
  GRU   r, z, n           r = sig(.), z = sig(.), n = tanh(x W_in^T + b_in + r*(h W_hn^T + b_hn))
                          h' = (1-z)*n + z*h
  RNN   (one gate)        h' = act(x W_ih^T + b_ih + h W_hh^T + b_hh), act = tanh | relu

Bias folding: the input projection Gx = x W_ih^T + b_ih (+ b_hh except for GRU, whose b_hn must
stay inside the reset product) is one GEMM over all T*B rows; GRU keeps b_hh in the recurrent
pre-activation Gh = h W_hh^T + b_hh.

Reserve layout (what forward saves for backward; the same for every backend):
  h      (T+1, B, H)  boundary states. Forward reads h[t] and writes h[t+1] at step t; reverse
                      reads h[t+1] and writes h[t]. So step t's input state is h[t + rev] and its
                      output h[t + 1 - rev]; h0 sits at h[0] (forward) or h[T] (reverse).
                      Masked steps (t >= lengths[b]) copy the state through.
  c      (T+1, B, H)  LSTM cell state, same convention; None for GRU/RNN.
  gates  (T, B, S*H)  activated gates in time order: LSTM [i, f, g, o] (S=4); GRU [r, z, n, hn]
                      with hn = h W_hn^T + b_hn (S=4); RNN saves none (the derivative of tanh
                      and relu is read off h itself).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Cell:
    """One cell's facts. `states` names the recurrent state (LSTM: h and c); `torch_class` and
    `torch_kwargs` build the torch.nn module it matches (the commands and tests use them)."""
    name: str
    gates: int                     # G: rows of W_ih / W_hh are G*H
    reserve_gates: int             # S: gate slots the reserve keeps per hidden unit
    torch_class: str               # "LSTM" | "GRU" | "RNN"
    torch_kwargs: dict = field(default_factory=dict)
    states: tuple = ("h",)

    @property
    def has_cell_state(self):
        return "c" in self.states


REGISTRY = {
    "lstm": Cell("lstm", 4, 4, "LSTM", states=("h", "c")),
    "gru": Cell("gru", 3, 4, "GRU"),
    "rnn_tanh": Cell("rnn_tanh", 1, 0, "RNN", {"nonlinearity": "tanh"}),
    "rnn_relu": Cell("rnn_relu", 1, 0, "RNN", {"nonlinearity": "relu"}),
}
CELLS = tuple(REGISTRY)
# Kernel-only cells: the per-unit math of the LSTM variants (gpurnn.variants: LSTMForm.kernel_cell)
# that the kernels and the plan run, but no torch.nn class stands for (so not in REGISTRY/CELLS,
# which the torch-parity commands and tests iterate over). Gate order as gpurnn.variants:
#   lstm_peephole  i, f, g, o (G = S = 4); the peephole vector [w_ci; w_cf; w_co] (3H,)
#   cifg           i, g, o    (G = S = 3); f = 1 - i
#   cifg_peephole  i, g, o    (G = S = 3); the peephole vector [w_ci; w_co] (2H,)
KERNEL_REGISTRY = {
    "lstm_peephole": Cell("lstm_peephole", 4, 4, "LSTM", states=("h", "c")),
    "cifg": Cell("cifg", 3, 3, "LSTM", states=("h", "c")),
    "cifg_peephole": Cell("cifg_peephole", 3, 3, "LSTM", states=("h", "c")),
}
KERNEL_CELLS = tuple(KERNEL_REGISTRY)
# every cell a kernel runs: the torch-facing ones, then the kernel-only ones
ALL_CELLS = CELLS + KERNEL_CELLS
# the same facts as plain maps, for the kernels' and the plan's arithmetic (every kernel cell)
GATES = {name: c.gates for name, c in {**REGISTRY, **KERNEL_REGISTRY}.items()}
RESERVE_GATES = {name: c.reserve_gates for name, c in {**REGISTRY, **KERNEL_REGISTRY}.items()}
# how many peephole vectors of H the cell's b_rec kernel argument carries (0: none)
PEEPHOLES = {"lstm_peephole": 3, "cifg_peephole": 2}


def has_cell_state(name):
    """True for the cells with a cell state c (LSTM and its kernel variants)."""
    cell = REGISTRY.get(name) or KERNEL_REGISTRY.get(name)
    return cell is not None and cell.has_cell_state


def kernel_cell(name):
    """The Cell of any kernel cell (torch-facing or kernel-only); ValueError otherwise."""
    cell = REGISTRY.get(name) or KERNEL_REGISTRY.get(name)
    if cell is None:
        raise ValueError(f"kernel cell must be one of {ALL_CELLS}; got {name!r}")
    return cell


def get(name):
    """The Cell called `name`; a ValueError naming the choices otherwise."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"cell must be one of {CELLS}; got {name!r}") from None


def rnn_cell(nonlinearity):
    """Cell name of an Elman RNN with the given nonlinearity ('tanh' or 'relu')."""
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"nonlinearity must be 'tanh' or 'relu'; got {nonlinearity!r}")
    return f"rnn_{nonlinearity}"
