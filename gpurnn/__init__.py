"""gpurnn: fused persistent GPU kernels for LSTM, GRU and Elman RNN, with a NumPy reference."""
from ._version import __version__
from . import functional
from .planning import plan                # gpurnn.plan(...); the rest is gpurnn.planning
from .layers import GFGRU, GFLSTM, GFRNN, GRU, LSTM, MLSTM, RNN, LayerNormLSTM

__all__ = ["LSTM", "GRU", "RNN", "MLSTM", "LayerNormLSTM", "GFLSTM", "GFGRU", "GFRNN", "plan", "functional", "__version__"]
