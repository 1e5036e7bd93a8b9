"""`gpurnn kernels`: compile every kernel specialization for real GPU architectures (no GPU
needed) and print its resources next to what the plan assumes; exit 1 on any spill, register
count above the plan's budget, or compile failure."""
from __future__ import annotations

import argparse
import json
import re

# The plan's dynamic shared memory is shown at this reference shape, on the profile of each arch.
REFERENCE = {"input_size": 512, "hidden_size": 512, "batch": 8}
ARCH_PROFILE = {"sm_80": "A100", "sm_90": "H100", "sm_89": "RTX4090"}


def add_parser(sub):
    p = sub.add_parser("kernels", help="static GPU checks: registers, spills, shared memory",
                       description=__doc__)
    p.add_argument("--arch", nargs="+", default=["sm_80", "sm_90"], type=arch,
                   help="architectures to compile for (default: sm_80 sm_90)")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    p.set_defaults(func=run)
    return p


def arch(text):
    """An argparse type: a real GPU architecture name, sm_<major><minor> (sm_80, sm_90, ...).
    Whether NVVM supports it is reported per kernel, as any compile failure."""
    if not re.fullmatch(r"sm_[1-9]\d*\d", text):
        raise argparse.ArgumentTypeError(f"must look like sm_80 or sm_90 (sm_<major><minor>); "
                                         f"got {text!r}")
    return text


def reference_plan(row):
    """The plan for the row's cell/dtype at REFERENCE on the arch's profile (None if unknown)."""
    from gpurnn import planning as planmod
    device = ARCH_PROFILE.get(row.arch)
    if device is None:
        return None
    return planmod.plan(row.cell, REFERENCE["input_size"], REFERENCE["hidden_size"],
                        REFERENCE["batch"], row.dtype, device)


def assess(rows):
    """Each row as a dict with the plan's assumptions and the problems found (empty: fine)."""
    out = []
    for r in rows:
        p = reference_plan(r)
        dyn = None
        if p is not None and not (r.kind.startswith("persistent") and not p.persistent_fits):
            # A persistent kernel that does not fit at this shape assumes nothing; one that fits
            # is sized even where the step-time model prefers the stepwise path.
            dyn = {"persistent_fwd": p.smem_bytes_fwd, "persistent_bwd": p.smem_bytes_bwd}.get(r.kind, 0)
        problems = []
        if r.error:
            problems.append(r.error)
        if r.spill_bytes:
            problems.append(f"{r.spill_bytes} B of register spills")
        if p is not None and r.registers is not None and r.registers > p.regs_per_thread:
            problems.append(f"{r.registers} registers > the plan's budget {p.regs_per_thread} "
                            f"({p.threads} threads per block)")
        if (p is not None and r.static_smem is not None and dyn is not None
                and r.static_smem + dyn > p.device.smem_per_block_optin):
            problems.append(f"static {r.static_smem} B + dynamic {dyn} B shared memory > "
                            f"{p.device.smem_per_block_optin} B opt-in limit")
        out.append({"kernel": r.kernel, "arch": r.arch, "registers": r.registers,
                    "regs_budget": p.regs_per_thread if p is not None else None,
                    "spill_bytes": r.spill_bytes, "stack_bytes": r.stack_bytes,
                    "static_smem": r.static_smem, "plan_dynamic_smem": dyn,
                    "plan_path": p.path if p is not None else None,
                    "linked_cudadevrt": r.linked_cudadevrt, "problems": problems})
    return out


def run(args):
    from gpurnn.kernels.compile import check_kernels, find_toolkit
    if find_toolkit() is None:
        print("gpurnn kernels: ptxas from the nvidia-cuda-nvcc wheel is not installed; "
              "pip install 'cuda-toolkit[nvcc]==13.*'")
        return 2
    rows = assess(check_kernels(args.arch))
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        shape = ", ".join(f"{k}={v}" for k, v in REFERENCE.items())
        header = ("kernel", "arch", "regs", "spill B", "stack B", "static smem", "plan dyn smem",
                  "cudadevrt", "status")
        table = [header]
        for r in rows:
            table.append((r["kernel"], r["arch"], _s(r["registers"]), str(r["spill_bytes"]),
                          _s(r["stack_bytes"]), _s(r["static_smem"]), _dyn(r),
                          "yes" if r["linked_cudadevrt"] else "no",
                          "ok" if not r["problems"] else "FAIL: " + "; ".join(r["problems"])))
        widths = [max(len(t[i]) for t in table) for i in range(len(header) - 1)]
        for t in table:
            print("  ".join(c.ljust(w) for c, w in zip(t, widths)) + "  " + t[-1])
        print(f"\nplan dyn smem: dynamic shared memory per block the plan assumes at {shape} "
              f"({', '.join(f'{a}: {d}' for a, d in ARCH_PROFILE.items())}); 'stepwise': the "
              f"persistent kernels do not fit there; stack includes the grid-sync call frame")
    return 1 if any(r["problems"] for r in rows) else 0


def _s(v):
    return "-" if v is None else str(v)


def _dyn(r):
    if r["plan_dynamic_smem"] is None:
        return "stepwise" if r["plan_path"] == "stepwise" else "-"
    return str(r["plan_dynamic_smem"])
