"""gpurnn's stack as torch operators: `torch.ops.gpurnn.stack_forward` and `stack_backward`,
registered with torch.library (custom ops with fake implementations and an autograd formula),
so a model using gpurnn.torch modules compiles with `torch.compile(model, fullgraph=True)`:
Dynamo sees two opaque operators with known output shapes instead of Python it must trace.

    outs = torch.ops.gpurnn.stack_forward(x, h0, c0, lengths, weights, masks, noise,
                                          noise_keys, cell, input_size, hidden_size,
                                          num_layers, bias, bidirectional, backend, keep)
    y, h_n, c_n, *saved = outs        # c_n is empty for cells without a cell state

x is time-major (T, B, I); h0, c0 (L*D, B, H) or None; lengths a CPU int64 (B,) tensor or None;
weights in gpurnn.stack.Stack.param_shapes order; masks one (T, B, D*H) dropout mask per layer
but the last, or []; noise the regularisers' masks (gpurnn.layernorm), flat: per
layer-direction the keys of the comma-separated noise_keys in order ("" and [] for none).
`keep` makes the forward save what backward needs (`saved`: plain tensors,
gpurnn.stack.Saved.arrays(), so autograd keeps them and a second backward works). `backend` is
already resolved ('numpy', 'cpu', 'sim' or 'cuda').

Outputs never alias inputs or each other (torch.library's rule): a backend result that shares
memory with one is copied.
"""
from __future__ import annotations

import functools
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .arrays import Call, lengths_array, torch_stream
from .stack import Run, make_stack

__all__ = ["stack_forward", "stack_backward"]


@functools.lru_cache(maxsize=256)
def _stack(cell, input_size, hidden_size, num_layers, bias, bidirectional):
    # dropout arrives as masks, so the stack itself runs with dropout 0
    return make_stack(cell, input_size, hidden_size, num_layers, bias, 0.0, bidirectional)


def _torch_dtype(dt):
    return getattr(torch, np.dtype(dt).name)


def _numpy_name(dtype):
    return str(dtype).removeprefix("torch.")


def _named(stack, x, states, weights, masks, noise, noise_keys):
    named = {"x": x, **states}
    named.update(zip((n for n, _ in stack.param_shapes()), weights))
    named.update((f"dropout mask {i}", m) for i, m in enumerate(masks))
    named.update((f"noise {name}", a) for name, a in zip(_noise_names(stack, noise_keys), noise))
    return named


def _noise_names(stack, noise_keys):
    """The names of the flat noise list: per layer-direction, the keys in noise_keys' order."""
    keys = [k for k in noise_keys.split(",") if k]
    return [f"{i} {k}" for i in range(stack.num_layers * stack.directions) for k in keys]


def _noise(stack, call, noise_keys):
    """The per layer-direction noise dicts (gpurnn.layernorm) of a call, or None."""
    keys = [k for k in noise_keys.split(",") if k]
    if not keys:
        return None
    return [{k: call[f"noise {i} {k}"] for k in keys}
            for i in range(stack.num_layers * stack.directions)]


def _unaliased(outs, inputs):
    """Copy every output whose storage is an input's or an earlier output's."""
    seen = {t.untyped_storage().data_ptr() for t in inputs if t is not None and t.numel()}
    result = []
    for t in outs:
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:
                t = t.clone()
                ptr = t.untyped_storage().data_ptr()
            seen.add(ptr)
        result.append(t)
    return result


def _empty(x):
    return x.new_empty((0,))


@torch.library.custom_op("gpurnn::stack_forward", mutates_args=())
def stack_forward(x: Tensor, h0: Optional[Tensor], c0: Optional[Tensor],
                  lengths: Optional[Tensor], weights: list[Tensor], masks: list[Tensor],
                  noise: list[Tensor], noise_keys: str, cell: str, input_size: int,
                  hidden_size: int, num_layers: int, bias: bool, bidirectional: bool,
                  backend: str, keep: bool) -> list[Tensor]:
    stack = _stack(cell, input_size, hidden_size, num_layers, bias, bidirectional)
    with torch_stream(x):
        call = Call(_named(stack, x, {"h0": h0, "c0": c0}, weights, masks, noise, noise_keys),
                    backend)
        run = Run(call.backend, call.xp, None, lengths_array(lengths, x.shape[0], x.shape[1]),
                  need_saved=keep)
        params = {n: call[n] for n, _ in stack.param_shapes()}
        y, h_n, c_n, saved = stack.forward(run, call["x"], params, call["h0"], call["c0"],
                                           [call[f"dropout mask {i}"] for i in range(len(masks))],
                                           _noise(stack, call, noise_keys))
        outs = [call.back(y), call.back(h_n), _empty(x) if c_n is None else call.back(c_n)]
        outs += [call.back(a) for a in saved.arrays()] if saved is not None else []
    return _unaliased(outs, [x, h0, c0, *weights, *masks, *noise])


@stack_forward.register_fake
def _(x, h0, c0, lengths, weights, masks, noise, noise_keys, cell, input_size, hidden_size,
      num_layers, bias, bidirectional, backend, keep):
    stack = _stack(cell, input_size, hidden_size, num_layers, bias, bidirectional)
    T, B = x.shape[0], x.shape[1]
    outs = [x.new_empty((T, B, stack.directions * stack.state_width)),
            x.new_empty(stack.state_shape(B)),
            x.new_empty(stack.state_shape(B, "c")) if stack.layer.cell.has_cell_state else _empty(x)]
    if keep:
        outs += [x.new_empty(shape, dtype=_torch_dtype(dt))
                 for shape, dt in stack.saved_specs(Run(backend), T, B, _numpy_name(x.dtype))]
    return outs


@torch.library.custom_op("gpurnn::stack_backward", mutates_args=())
def stack_backward(dy: Tensor, dh_n: Tensor, dc_n: Optional[Tensor], x: Tensor,
                   lengths: Optional[Tensor], weights: list[Tensor], masks: list[Tensor],
                   noise: list[Tensor], noise_keys: str, saved: list[Tensor], cell: str,
                   input_size: int, hidden_size: int, num_layers: int, bias: bool,
                   bidirectional: bool, backend: str) -> list[Tensor]:
    stack = _stack(cell, input_size, hidden_size, num_layers, bias, bidirectional)
    with torch_stream(x):
        named = _named(stack, x, {"dy": dy, "dh_n": dh_n, "dc_n": dc_n}, weights, masks, noise,
                       noise_keys)
        named.update((f"saved {i}", s) for i, s in enumerate(saved))
        call = Call(named, backend)
        run = Run(call.backend, call.xp, None, lengths_array(lengths, x.shape[0], x.shape[1]))
        params = {n: call[n] for n, _ in stack.param_shapes()}
        kept = stack.saved_from(call["x"], [call[f"saved {i}"] for i in range(len(saved))],
                                [call[f"dropout mask {i}"] for i in range(len(masks))],
                                _noise(stack, call, noise_keys))
        dx, dh0, dc0, grads = stack.backward(run, kept, params, call["dy"], call["dh_n"],
                                             call["dc_n"])
        outs = [call.back(dx), call.back(dh0), _empty(x) if dc0 is None else call.back(dc0)]
        outs += [call.back(grads[n]) for n, _ in stack.param_shapes()]
    return _unaliased(outs, [dy, dh_n, dc_n, x, *weights, *masks, *noise, *saved])


@stack_backward.register_fake
def _(dy, dh_n, dc_n, x, lengths, weights, masks, noise, noise_keys, saved, cell, input_size,
      hidden_size, num_layers, bias, bidirectional, backend):
    return [torch.empty_like(x), torch.empty_like(dh_n),
            torch.empty_like(dc_n) if dc_n is not None else _empty(x)] + \
        [torch.empty_like(w) for w in weights]


def _setup_context(ctx, inputs, output):
    x, h0, c0, lengths, weights, masks, noise, noise_keys, *static = inputs
    ctx.static = tuple(static[:-1])    # cell, input/hidden size, layers, bias, bidir, backend
    ctx.keep = static[-1]
    ctx.noise_keys = noise_keys
    ctx.has_states = (h0 is not None, c0 is not None)
    ctx.counts = (len(weights), len(masks), len(noise))
    ctx.has_c = _stack(*ctx.static[:6]).layer.cell.has_cell_state
    saved = output[3:] if ctx.keep else []
    ctx.save_for_backward(x, lengths, *weights, *masks, *noise, *saved)


def _backward(ctx, grads):
    if not ctx.keep:
        raise RuntimeError("gpurnn: backward through a forward run in eval mode (or with "
                           "autograd off) is not supported, as with cuDNN; call "
                           "module.train() before the forward you differentiate")
    x, lengths, *rest = ctx.saved_tensors
    n_w, n_m, n_n = ctx.counts
    weights, masks = rest[:n_w], rest[n_w:n_w + n_m]
    noise, saved = rest[n_w + n_m:n_w + n_m + n_n], rest[n_w + n_m + n_n:]
    stack = _stack(*ctx.static[:6])
    T, B = x.shape[0], x.shape[1]
    dy, dh_n, dc_n = grads[0], grads[1], grads[2]
    if dy is None:
        dy = x.new_zeros((T, B, stack.directions * stack.state_width))
    if dh_n is None:
        dh_n = x.new_zeros(stack.state_shape(B))
    if ctx.has_c and dc_n is None:
        dc_n = x.new_zeros(stack.state_shape(B, "c"))
    outs = torch.ops.gpurnn.stack_backward(
        dy.contiguous(), dh_n.contiguous(), dc_n.contiguous() if ctx.has_c else None, x, lengths,
        list(weights), list(masks), list(noise), ctx.noise_keys, list(saved), *ctx.static)
    dx, dh0, dc0, dweights = outs[0], outs[1], outs[2], outs[3:]
    has_h0, has_c0 = ctx.has_states
    return (dx, dh0 if has_h0 else None, dc0 if has_c0 else None, None, list(dweights),
            [None] * n_m, [None] * n_n, None, None, None, None, None, None, None, None, None)


torch.library.register_autograd("gpurnn::stack_forward", _backward, setup_context=_setup_context)
