"""`gpurnn info`: version, which backends run here and why the others do not, the CUDA devices,
the plan's capacity table (largest hidden size the persistent kernels take, per cell and dtype),
and the per-step traffic model for a few reference shapes."""
from __future__ import annotations

import argparse
import json

from gpurnn.cells import CELLS
from gpurnn.kernels.dtypes import STORAGE as DTYPES     # 16-bit: storage, fp32 compute

from . import int_at_least

TRAFFIC_SHAPES = ((256, 1), (512, 8), (1024, 8), (1024, 64))


def add_parser(sub):
    p = sub.add_parser("info", help="versions, backends, devices, persistent capacity",
                       description=__doc__)
    p.add_argument("--device", type=profile_name, help="a named profile (H100, H200, A100, "
                   "RTX4090, ...) instead of the current CUDA device")
    p.add_argument("--batch", type=int_at_least(1), action="append", help="batch sizes for the "
                   "capacity table (repeatable; default 1 and 8)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=run)
    return p


def profile_name(text):
    """An argparse type: a device profile of gpurnn.planning, by name (any case)."""
    from gpurnn.planning import PROFILES
    for name in PROFILES:
        if name.lower() == text.lower():
            return name
    raise argparse.ArgumentTypeError(f"must be one of {', '.join(PROFILES)}; got {text!r}")


def collect(device=None, batches=(1, 8)):
    from gpurnn import __version__
    from gpurnn.backends import BACKENDS, availability
    from gpurnn import planning as planmod
    info = {"gpurnn": __version__, "backends": {}, "devices": [], "profile": None,
            "capacity": [], "traffic": []}
    for name in BACKENDS:
        ok, why = availability(name)
        info["backends"][name] = {"available": ok, "why": why}
    if info["backends"]["cuda"]["available"]:
        from numba import cuda
        for dev in cuda.list_devices():
            with dev:
                prof = planmod.profile_from_numba_device(cuda.get_current_device())
            info["devices"].append({"id": dev.id, "name": prof.name, "sm_count": prof.sm_count,
                                    "smem_per_block_optin": prof.smem_per_block_optin,
                                    "smem_per_sm": prof.smem_per_sm,
                                    "compute_capability": list(prof.compute_capability)})
    if device is None:
        device = None if info["devices"] else "H100"
    prof = planmod.device_profile(device)
    info["profile"] = str(prof)
    info["profile_is_named"] = device is not None
    for cell in CELLS:
        for dtype in DTYPES:
            row = {"cell": cell, "dtype": dtype}
            for b in batches:
                row[f"B{b}"] = planmod.capacity(cell, dtype, prof, batch=b)
            info["capacity"].append(row)
    for H, B in TRAFFIC_SHAPES:
        p = planmod.plan("lstm", H, H, B, "float32", prof)
        per = planmod.step_traffic(p, "persistent")
        stp = planmod.step_traffic(p, "stepwise")
        row = {"cell": "lstm", "H": H, "B": B, "dtype": "float32", "path": p.path,
               "persistent_dram_bytes": per["dram_bytes"], "stepwise_dram_bytes": stp["dram_bytes"]}
        if prof.mem_bandwidth:
            row["persistent_floor_us"] = planmod.step_floor_seconds(p, "persistent") * 1e6
            row["stepwise_floor_us"] = planmod.step_floor_seconds(p, "stepwise") * 1e6
        for path in ("persistent", "stepwise"):     # the step-time model (gpurnn.planning.cost)
            fwd, bwd = p.predicted_step(path, "fwd"), p.predicted_step(path, "bwd")
            if fwd is not None:
                row[f"{path}_model_fwd_us"] = fwd.total * 1e6
                row[f"{path}_model_fwdbw_us"] = (fwd.total + bwd.total) * 1e6
        info["traffic"].append(row)
    return info


def _table(header, rows):
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in [header] + rows)


def run(args):
    batches = tuple(args.batch or (1, 8))
    info = collect(args.device, batches)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"gpurnn {info['gpurnn']}")
    print("backends:")
    for name, b in info["backends"].items():
        print(f"  {name:6s} {'yes' if b['available'] else 'no '}  {b['why']}")
    if info["devices"]:
        print("devices:")
        for d in info["devices"]:
            print(f"  [{d['id']}] {d['name']}: {d['sm_count']} SMs, cc {d['compute_capability'][0]}."
                  f"{d['compute_capability'][1]}, {d['smem_per_block_optin'] // 1024} KB opt-in shared "
                  f"memory per block")
    else:
        print("devices: none (the tables below are for a named profile)")
    print(f"\npersistent capacity on {info['profile']}")
    print("largest hidden size H the persistent kernels take (16-bit: weights stored in 16 bits "
          "in shared memory, fp32 compute; the batch is tiled, so B does not set it):")
    header = ("cell", "dtype") + tuple(f"B={b}" for b in batches)
    rows = [(r["cell"], r["dtype"]) + tuple(r[f"B{b}"] for b in batches) for r in info["capacity"]]
    print(_table(header, rows))
    print("\nper-step forward traffic model, LSTM float32 (DRAM bytes; floor = bytes / bandwidth):")
    header = ("H", "B", "plan", "persistent", "stepwise", "floor persistent", "floor stepwise",
              "model persistent", "model stepwise")
    rows = []
    for r in info["traffic"]:
        rows.append((r["H"], r["B"], r["path"], f"{r['persistent_dram_bytes'] / 1024:.1f} KiB",
                     f"{r['stepwise_dram_bytes'] / 1024:.1f} KiB",
                     f"{r.get('persistent_floor_us', float('nan')):.3f} us",
                     f"{r.get('stepwise_floor_us', float('nan')):.3f} us",
                     f"{r.get('persistent_model_fwd_us', float('nan')):.2f} us",
                     f"{r.get('stepwise_model_fwd_us', float('nan')):.2f} us"))
    print(_table(header, rows))
    print("model: gpurnn.planning.cost's predicted forward step (unmeasured until `gpurnn bench` runs on a "
          "GPU)")
    return 0
