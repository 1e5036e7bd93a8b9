"""The persistent grid search every kernel family's plan shares (the plain cells, the projection,
the mLSTM, the LayerNormLSTM, ...): only the shared memory a block needs differs between them,
so each passes in a function that builds its fit for a grid of P blocks and a batch tile.

A fit is any object with `smem` (bytes per block, the larger direction), `blocks` (P) and
`coop` (the co-resident limit: SMs x resident blocks per SM at that shared memory).
"""
from __future__ import annotations

from ..kernels.layout import units_per_block


def fits(f, dev):
    """Whether fit f launches on dev: its shared memory within the opt-in limit per block and
    its grid co-resident."""
    return f.smem <= dev.smem_per_block_optin and 1 <= f.blocks <= f.coop


def best_tile(fit_tile, batch, dev, tile=None):
    """The fit of one grid: with `tile` rows staged at once if given, else with the largest
    tile (the whole batch first) that fits; else the one-row attempt, which explains why
    nothing does. fit_tile(t) builds the fit for tile t; shared memory grows with the tile, so
    a bisection finds the largest."""
    if tile is not None:
        return fit_tile(tile)
    whole = fit_tile(batch)
    if fits(whole, dev) or batch == 1:
        return whole
    one = fit_tile(1)
    if not fits(one, dev):
        return one
    lo, hi = 1, batch          # fits at lo, not at hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(fit_tile(mid), dev):
            lo = mid
        else:
            hi = mid
    return fit_tile(lo)


def search(fit_at, hidden, batch, cap, dev, tile=None):
    """The persistent grid with the smallest slice per block: P = min(H, SMs x k) for the most
    resident blocks per SM k that still fit, then U = ceil(H/P) and P = ceil(H/U) (no empty
    block) — first staging the whole batch at once, then in the largest batch tiles that fit
    (so the weights, not the batch, decide whether a layer is persistent). fit_at(P, t) is the
    fit of a grid of P blocks with tile t (None: best_tile's choice). Returns the fit, or the
    k = 1 attempt (which explains the failure)."""
    tries = (tile,) if tile is not None else (batch, None)
    first = None
    for t in tries:
        for k in range(max(cap, 1), 0, -1):
            units = units_per_block(hidden, min(hidden, dev.sm_count * k))
            f = fit_at(-(-hidden // units), t)
            if fits(f, dev):
                return f
            if k == 1:
                first = f
    return first
