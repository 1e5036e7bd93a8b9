"""The per-step memory-traffic model of a Plan: the global-memory bytes and FLOPs of one forward
step of either path, the DRAM-bandwidth floor under it, and what the persistent path saves.
"""
from __future__ import annotations

from typing import Optional

from ..cells import PEEPHOLES, RESERVE_GATES, has_cell_state
from .choose import Plan
from .cost import _noise_keys, step_flops


def _check_plan(plan):
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a gpurnn.planning.Plan (what gpurnn.plan(...) returns); got "
                        f"{type(plan).__name__} {plan!r}")


def step_traffic(plan: Plan, path: Optional[str] = None, *, training: bool = True,
                 noise=None) -> dict:
    """Global-memory bytes and FLOPs of one forward step of `path` (default: plan.path).

    Returns a dict: path; bytes (breakdown: name -> bytes); global_bytes (every load and store
    the kernels issue to global memory, i.e. what passes through L2); dram_bytes (each tensor
    region touched in the step counted once per read and once per write: what DRAM moves if
    nothing survives in L2 between steps); flops; launches (kernels per step); w_hh_bytes and
    w_hh_fits_l2.

    Model (s = itemsize, G gates, S reserve gate slots, P blocks):
      both    read Gx_t (B*G*H*s, produced by the input GEMM before the recurrence), read
              c_{t-1} (the LSTM family), write h_t (also y_t: the output is a view of the
              reserve's h), write c_t (the LSTM family), write the reserve gates B*S*H*s when
              training; GRU reads b_hh (G*H*s) every step; the peephole cells read their n
              peephole vectors (n = 3 lstm_peephole, 2 cifg_peephole) once per (row, unit):
              B*n*H*s loads, of which DRAM sees the n*H*s vector at most. FLOPs: cost.step_flops (the recurrent product and
              the pointwise update, cost.POINTWISE_FLOPS per row and unit).
      persistent  W_hh stays in shared memory (its one load per launch, G*H*H*s, is not
              counted per step); every block stages the whole h_{t-1}: P*B*H*s through L2, of
              which DRAM sees B*H*s at most. One launch for all steps.
      stepwise  the GEMM reads W_hh (G*H*H*s) and h_{t-1} (B*H*s) and writes the pre-
              activations Gh (B*G*H*s), which the pointwise kernel reads back. Two launches.
      noise   (default plan.noise: the regularisers gpurnn.plan was told of) their masks, in
              the compute dtype (m = 4 bytes for 16-bit storage, else s): each zoneout mask
              B*H*m; recurrent dropout persistent: every block reads the mask of the h it
              stages (P*B*H*m, DRAM B*H*m) and re-reads the unmasked h_{t-1} of its own units
              for the update (B*H*s, an L2 hit: not in dram_bytes); stepwise: one more elementwise kernel reads h_{t-1} and
              the mask and writes the masked copy the GEMM reads (B*H*(s + 2m), a launch).
    Not modelled: the input GEMM and dW/dX GEMMs (the same for both paths), tile re-reads
    inside the GEMM, the backward pass, and L2 hits across steps (when w_hh_fits_l2 the
    stepwise W_hh re-read is served by L2, so its real DRAM cost is lower than dram_bytes).
    """
    _check_plan(plan)
    path = plan.path if path is None else path
    if path not in ("persistent", "stepwise"):
        raise ValueError(f"path must be 'persistent', 'stepwise' or None; got {path!r}")
    s, G, H, B = plan.itemsize, plan.gates, plan.hidden_size, plan.batch
    S = RESERVE_GATES[plan.cell]
    lstm = has_cell_state(plan.cell)
    n_peep = PEEPHOLES.get(plan.cell, 0)
    state = B * H * s
    common = {
        "read gx_t": B * G * H * s,
        "read c_prev": state if lstm else 0,
        "read b_hh": G * H * s if plan.cell == "gru" else 0,
        "write h_t": state,
        "write c_t": state if lstm else 0,
        "write reserve gates": B * S * H * s if training else 0,
        "read peephole weights": B * n_peep * H * s,
    }
    if path == "persistent":
        per_path = {"read h_prev (every block)": plan.blocks * state}
        dram_extra = {"read h_prev (every block)": state}
        launches = 1
    else:
        gh = B * G * H * s
        per_path = {"gemm read w_hh": G * H * H * s, "gemm read h_prev": state,
                    "gemm write gh": gh, "pointwise read gh": gh}
        dram_extra = per_path
        launches = 2
    keys = _noise_keys(plan.noise if noise is None else noise)
    m = max(s, 4)
    mask = B * H * m
    common["read zoneout masks"] = mask * len(keys & {"zoneout_h", "zoneout_c"})
    if "recurrent" in keys:
        if path == "persistent":
            per_path["read recurrent mask (every block)"] = plan.blocks * mask
            dram_extra["read recurrent mask (every block)"] = mask
            per_path["read h_prev (unmasked, own units)"] = state     # DRAM: staged already
        else:
            per_path["mask h_prev (read h, mask; write copy)"] = state + 2 * mask
            launches += 1
    breakdown = {k: v for k, v in {**common, **per_path}.items() if v}
    w_bytes = G * H * H * s
    l2 = plan.device.l2_bytes
    return {
        "path": path,
        "bytes": breakdown,
        "global_bytes": sum(breakdown.values()),
        "dram_bytes": (sum(common.values()) + sum(dram_extra.values())
                       - (B - 1) * n_peep * H * s),     # the peephole vector once
        "flops": step_flops(plan.cell, B, H),
        "launches": launches,
        "w_hh_bytes": w_bytes,
        "w_hh_fits_l2": bool(l2) and w_bytes <= l2,
    }


def step_floor_seconds(plan: Plan, path: Optional[str] = None, *, training: bool = True) -> float:
    """A lower bound on one forward step's time: its dram_bytes (step_traffic) at the device's
    DRAM bandwidth. It ignores compute, latency and launch overhead, and counts the persistent
    h broadcast at its DRAM cost (the other P-1 copies are L2 hits); at small B the persistent
    step is latency-bound (a grid barrier per step), far above this floor."""
    _check_plan(plan)
    bw = plan.device.mem_bandwidth
    if not bw:
        raise ValueError(f"device profile {plan.device.name!r} has no mem_bandwidth; pass a "
                         f"DeviceProfile with mem_bandwidth in bytes/s")
    return step_traffic(plan, path, training=training)["dram_bytes"] / bw


def traffic_saving(plan: Plan, *, training: bool = True) -> dict:
    """Bytes per forward step the persistent path saves over the stepwise one (positive: fewer).
    The plan's own path does not matter; the persistent grid it considered is used."""
    _check_plan(plan)
    p = step_traffic(plan, "persistent", training=training)
    q = step_traffic(plan, "stepwise", training=training)
    return {"global_bytes": q["global_bytes"] - p["global_bytes"],
            "dram_bytes": q["dram_bytes"] - p["dram_bytes"],
            "launches": q["launches"] - p["launches"]}


__all__ = ["step_traffic", "step_floor_seconds", "traffic_saving"]
