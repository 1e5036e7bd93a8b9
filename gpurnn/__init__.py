"""gpurnn: fused persistent GPU kernels for LSTM, GRU and Elman RNN, with a NumPy reference."""
from ._version import __version__
from . import functional
from .layers import GRU, LSTM, RNN

__all__ = ["LSTM", "GRU", "RNN", "plan", "functional", "__version__"]


def __getattr__(name):
    # plan imports the kernels' capacity model lazily: `import gpurnn` stays light.
    if name == "plan":
        from .plan import plan
        return plan
    raise AttributeError(f"module 'gpurnn' has no attribute {name!r}")
