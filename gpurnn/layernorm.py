"""The layer-normalised LSTM (Ba et al. 2016, in the formulation Haste uses) as a `Layer` of the
stack core, and the regularisers every recurrent cell takes: zoneout (Krueger et al. 2017) and
variational recurrent dropout (Gal & Ghahramani 2016). The math is written down here once.

Layer normalisation over the feature axis, eps = 1e-5, the biased (population) variance:
    LN(v; g, b) = g * (v - mean(v)) / sqrt(var(v) + eps) + b
LayerNormLSTM, gate order i, f, g, o (torch's), per layer and direction:
    gates = LN(x_t W_ih^T; g_x, b_x) + LN(h_{t-1} W_hh^T; g_h, b_h) + b_ih + b_hh   (over 4H)
    c_t = f*c_{t-1} + i*g ;  h_t = o * tanh(LN(c_t; g_c, b_c))                      (over H)
Parameters: torch.nn.LSTM's four (weight_ih (4H, I), weight_hh (4H, H), bias_ih, bias_hh (4H,))
then layernorm_x_weight, layernorm_x_bias (4H,), layernorm_h_weight, layernorm_h_bias (4H,),
layernorm_c_weight, layernorm_c_bias (H,), each with the stack's _l{k}[_reverse] suffix; the
LN weights start at 1 and the LN biases at 0.

What a training forward saves (the same layout on every backend, float32/float64):
  h      (T+1, B, H)  boundary states, gpurnn.cells' convention (masked steps copy h, c)
  c      (T+1, B, H)  cell states (after zoneout, when there is zoneout)
  gates  (T, B, 4H)   activated gates i, f, g, o
  xhat   (T, B, 4H)   (x_t W_ih^T - mean) * rstd, the normalised input projection
  hhat   (T, B, 4H)   the normalised recurrent projection of each step
  stats  (T, B, 6)    [mean_x, rstd_x, mean_h, rstd_h, mean_c, rstd_c] of each step
                      (rstd = 1/sqrt(var + eps); the c statistics are those of the LN(c) that
                      produced h, i.e. of c-tilde below when zoneout is on)

Regularisers (`noise`: one dict per layer-direction, drawn by the module on the host from its
seeded generator and handed to the backend, which keeps it for the backward; a key that is
absent means that regulariser is off). Arrays are in the compute dtype (float32 for 16-bit
storage); time index t is the step's time (not the processing order):
  "recurrent"  (B, R)     variational recurrent dropout: 0 or 1/(1-p), fixed over time; the
                          recurrent product uses (h_{t-1} * mask) W_hh^T. Nothing else sees the
                          mask: GRU's z*h_{t-1}, zoneout's h_{t-1} and y use the unmasked state.
                          Training only.
  "zoneout_h"  (T, B, R)  d_h: 1 keeps the unit's previous state (training: Bernoulli(p_h));
  "zoneout_c"  (T, B, H)  d_c, LSTMs only. In evaluation the module passes both filled with p,
                          which is exactly the expectation p*prev + (1-p)*new.
  On an active step (t < lengths[b]), with c~ and h~ the cell's own new values:
    LSTM      c~ = f*c_{t-1} + i*g ; h~ = o*tanh(c~)   (LayerNormLSTM: o*tanh(LN(c~)))
              c_t = d_c*c_{t-1} + (1-d_c)*c~ ;  h_t = d_h*h_{t-1} + (1-d_h)*h~
    GRU, RNN  h_t = d_h*h_{t-1} + (1-d_h)*h~
  y_t = h_t. Padded steps copy the state through and output 0 whatever the masks hold.

Backend entry points:
  the kernel cells: forward(cell, ..., *, options=None, noise=None) (gpurnn.backends), the
      Reserve keeping `noise` for backward;
  LayerNormLSTM: layernorm_forward(x, params, h0, c0, lengths, reverse, need_saved, *,
      noise=None, options=None) -> (y, h_n, c_n, saved tuple | None) and
      layernorm_backward(x, params, saved, lengths, reverse, dy, dh_n, dc_n, *, noise=None,
      options=None) -> (dx, dh0, dc0, {param name: gradient}).
"""
from __future__ import annotations

import numpy as np

from . import cells
from .stack import Layer, register

__all__ = ["LayerNormLSTMLayer", "EPS", "NOISE_KEYS", "DTYPES", "layer_flops"]

EPS = 1e-5
NOISE_KEYS = ("recurrent", "zoneout_h", "zoneout_c")
DTYPES = ("float32", "float64")
NAME = "layernorm_lstm"


# FLOPs per normalised element (gpurnn.planning's counting: every +, -, *, sqrt one FLOP):
# the mean (1), the variance (3), normalising (2) and the affine map (2)
LN_FLOPS = 8


def layer_flops(steps, batch, input_size, hidden, *, backward=False):
    """FLOPs of one LayerNormLSTM layer and direction: the LSTM's (gpurnn.planning.layer_flops)
    plus LN_FLOPS per normalised element (4H for x W_ih^T, 4H for h W_hh^T, H for c) per row
    and step; backward 3x the forward, as the plan's model."""
    from .planning import layer_flops as lstm_flops
    extra = steps * batch * LN_FLOPS * 9 * hidden
    return lstm_flops("lstm", steps, batch, input_size, hidden, backward=backward) + \
        (3 * extra if backward else extra)


class LayerNormLSTMLayer(Layer):
    """One layer-direction of the LayerNormLSTM, run by the backends' layernorm_forward/backward."""
    cell = cells.Cell(NAME, 4, 4, "LSTM", states=("h", "c"))
    dtypes = DTYPES
    takes_noise = True

    def param_shapes(self, input_size, hidden_size, bias):
        G, H = 4, hidden_size
        shapes = [("weight_ih", (G * H, input_size)), ("weight_hh", (G * H, H))]
        if bias:
            shapes += [("bias_ih", (G * H,)), ("bias_hh", (G * H,))]
        return shapes + [("layernorm_x_weight", (G * H,)), ("layernorm_x_bias", (G * H,)),
                         ("layernorm_h_weight", (G * H,)), ("layernorm_h_bias", (G * H,)),
                         ("layernorm_c_weight", (H,)), ("layernorm_c_bias", (H,))]

    def initial_value(self, name, shape, dtype):
        """LN weights start at 1, LN biases at 0; None: the stack's uniform rule."""
        if name.startswith("layernorm_"):
            return np.full(shape, 1.0 if name.endswith("_weight") else 0.0, dtype)
        return None

    @staticmethod
    def _check_dtype(x):
        if np.dtype(x.dtype).name not in DTYPES:
            raise TypeError(f"x has dtype {x.dtype}; the LayerNormLSTM runs in {DTYPES}")

    def forward(self, run, x, params, h0, c0, reverse, noise=None):
        from .backends import get_backend
        self._check_dtype(x)
        y, h_n, c_n, saved = get_backend(run.backend).layernorm_forward(
            x, params, h0, c0, run.lengths, bool(reverse), run.need_saved, noise=noise,
            options=run.options)
        return y, h_n, c_n, (tuple(saved) if saved is not None else ())

    def backward(self, run, x, params, saved, reverse, dy, dh_n, dc_n, noise=None):
        from .backends import get_backend
        return get_backend(run.backend).layernorm_backward(
            x, params, tuple(saved), run.lengths, bool(reverse), dy, dh_n, dc_n, noise=noise,
            options=run.options)

    def saved_specs(self, run, T, B, I, H, dtype):
        dt = np.dtype(dtype)
        return [((T + 1, B, H), dt), ((T + 1, B, H), dt), ((T, B, 4 * H), dt),
                ((T, B, 4 * H), dt), ((T, B, 4 * H), dt), ((T, B, 6), dt)]


register(NAME, LayerNormLSTMLayer())
