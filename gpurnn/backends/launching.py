"""What the kernel families' host sides share (cuda_mlstm, cuda_layernorm, cuda_proj,
cuda_wavefront, cuda_feedback): the per-runtime cache of compiled kernels, the options' forcing of a plan,
the launch choice of a one-layer family, and the launches themselves (each reported to
rt.on_launch, Numba's small-grid warning silenced as gpurnn.backends.cuda does).
"""
from __future__ import annotations

import weakref

from . import cuda as host
from ..kernels import layout


class KernelCache:
    """(spec, compiled kernel) per runtime and key: spec(*key) compiled by rt.compile on first
    use, kept while the runtime lives."""

    def __init__(self, spec):
        self._spec = spec
        self._compiled = weakref.WeakKeyDictionary()     # Runtime -> {key: (spec, kernel)}

    def __call__(self, rt, *key):
        cache = self._compiled.setdefault(rt, {})
        if key not in cache:
            sp = self._spec(*key)
            cache[key] = (sp, rt.compile(sp))
        return cache[key]

    def persistent(self, rt, kind, dtype, cfg, smem, args, q_range):
        """One persistent launch of a one-layer family's kernel (key (kind, dtype)) over the
        (half-)steps q_range, with cfg's grid."""
        sp, kern = self(rt, kind, dtype)
        launch_persistent(rt, sp, kern, kind, cfg.blocks, cfg.threads, smem, args, q_range,
                          single_step=q_range[1] - q_range[0] == 1)

    def pointwise(self, rt, kind, dtype, n, threads, args, step):
        """One pointwise launch of a one-layer family's kernel (key (kind, dtype))."""
        sp, kern = self(rt, kind, dtype)
        launch_pointwise(rt, sp, kern, kind, n, threads, args, step)


def forced(options, batch, backend=host.NAME):
    """(the checked options, the plan's keyword arguments blocks / threads / batch_tile: the
    options' where given, else None); a ValueError for a batch tile over the batch."""
    options = host.check_options(options, backend)
    blocks, threads, tile = options.get("blocks"), options.get("threads"), options.get("batch_tile")
    if tile is not None and tile > batch:
        raise ValueError(f"options['batch_tile'] must be <= the batch ({batch}); got {tile}")
    return options, dict(blocks=None if blocks is None else int(blocks),
                         threads=None if threads is None else int(threads),
                         batch_tile=None if tile is None else int(tile))


def chosen_path(options, p, kw):
    """options['path'] if given, else persistent where a grid or a tile was forced, else the
    plan's."""
    was_forced = kw["blocks"] is not None or kw["batch_tile"] is not None
    return options.get("path", "persistent" if was_forced else p.path)


def choose_layer_launch(planning, input_size, hidden, batch, dtype, device, options,
                        backend=host.NAME):
    """The launch configuration (gpurnn.backends.cuda.LaunchConfig) of a one-layer family whose
    plan is planning.plan(input_size, hidden, batch, dtype, device, blocks=, threads=,
    batch_tile=) (planning.NAME names it): options where given, the plan for the rest."""
    options, kw = forced(options, batch, backend)
    p = planning.plan(input_size, hidden, batch, dtype, device, **kw)
    path = chosen_path(options, p, kw)
    blocks = kw["blocks"]
    if path == "persistent" and not p.persistent_fits:
        said = f"options['blocks']={blocks}: " if blocks is not None else ""
        why = [r for r in p.reasons if "forced by the caller" not in r and "model" not in r]
        raise ValueError(f"{said}the persistent path cannot run {planning.NAME} H={hidden} "
                         f"B={batch} {dtype} on {p.device.name}: " + "; ".join(why))
    P = blocks if blocks is not None else p.blocks
    return host.LaunchConfig(path=path, blocks=P, threads=p.threads,
                             units_per_block=layout.units_per_block(hidden, P), plan=p,
                             batch_tile=p.batch_tile)


def phase_ranges(rt, blocks, n):
    """Step (or half-step) ranges of the persistent launches: all n in one launch, or one per
    launch where the grid barrier cannot be trusted across blocks (Numba's stock simulator)."""
    if rt.per_step_grid and blocks > 1:
        return [(q, q + 1) for q in range(n)]
    return [(0, n)]


def launch_persistent(rt, sp, kern, kind, blocks, threads, smem, args, step_range,
                      single_step=False):
    """One persistent launch of kernel `kern` (spec sp) over step_range."""
    from ..kernels.launch import launch_persistent as launch
    rt.on_launch(dict(name=sp.name, kind=kind, blocks=blocks, threads=threads, smem=smem,
                      step_range=step_range))
    with host._small_grids_allowed():
        launch(kern, (blocks, threads, smem), rt.stream(), args,
               direction="fwd" if kind.endswith("fwd") else "bwd",
               signature=None if rt.per_step_grid else sp.signature, single_step=single_step)


def launch_pointwise(rt, sp, kern, kind, n, threads, args, step):
    """One pointwise launch of kernel `kern` (spec sp): n threads, at step `step`."""
    blocks = -(-n // threads)
    rt.on_launch(dict(name=sp.name, kind=kind, blocks=blocks, threads=threads, smem=0,
                      step_range=(step, step + 1)))
    with host._small_grids_allowed():
        kern[blocks, threads, rt.stream(), 0](*args)


__all__ = ["KernelCache", "forced", "chosen_path", "choose_layer_launch", "phase_ranges",
           "launch_persistent", "launch_pointwise"]
