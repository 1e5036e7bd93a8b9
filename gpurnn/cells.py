"""The cells gpurnn runs, written down once: gate order, gate counts and reserve layout.

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

# cell name -> number of gates G (rows of W_ih / W_hh are G*H)
GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
# cell name -> gate slots S saved in the reserve per hidden unit
RESERVE_GATES = {"lstm": 4, "gru": 4, "rnn_tanh": 0, "rnn_relu": 0}
CELLS = tuple(GATES)


def rnn_cell(nonlinearity):
    """Cell name of an Elman RNN with the given nonlinearity ('tanh' or 'relu')."""
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"nonlinearity must be 'tanh' or 'relu'; got {nonlinearity!r}")
    return f"rnn_{nonlinearity}"
