"""Planning: which path runs a layer on which device, and what it is predicted to cost.

One module per job, each importing only the ones above it:
  profiles   DeviceProfile, the named PROFILES, device_profile (the current device or a name)
  capacity   what fits: the persistent grid, batch tile and residency, what stops a launch,
             capacity() (the largest H the persistent path fits); the shared argument checks
  cost       the step-time model (Timing per device, StepTime, persistent_step, stepwise_step)
             and the one FLOP model (POINTWISE_FLOPS, step_flops, layer_flops)
  choose     Plan and plan(): the path, its grid and reasons, both paths' predictions
  traffic    step_traffic, step_floor_seconds, traffic_saving: bytes per step of a Plan

`gpurnn.plan` is plan() (a function); everything else is imported from here.
"""
from .capacity import KERNEL_DTYPES, capacity
from .choose import Plan, plan
from .cost import POINTWISE_FLOPS, StepTime, Timing, layer_flops, step_flops, timing_for
from .profiles import PROFILES, DeviceProfile, device_profile, profile_from_numba_device
from .traffic import step_floor_seconds, step_traffic, traffic_saving

__all__ = ["DeviceProfile", "PROFILES", "Plan", "plan", "capacity", "device_profile",
           "profile_from_numba_device", "step_traffic", "step_floor_seconds", "traffic_saving",
           "KERNEL_DTYPES", "StepTime", "Timing", "timing_for", "POINTWISE_FLOPS", "step_flops",
           "layer_flops"]
