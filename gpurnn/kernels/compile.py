"""Static GPU checks without a GPU: compile every kernel specialization for real architectures and
read its resources (registers, spills, stack, static shared memory) off ptxas / nvlink.

Pipeline per (spec, arch): `numba.cuda.compile_ptx(spec.func, spec.signature, cc=...)` (NVVM from
numba-cuda[cu13]) -> the pip ptxas of nvidia-cuda-nvcc 13.x (the system ptxas 13.0 rejects
NVVM 13.5's PTX 9.5) with -v. Kernels without grid sync are assembled whole-program, as the
driver JIT does when numba loads them. Grid-sync kernels call into cudadevrt, so they are
assembled relocatable (-c) and linked with `nvlink -lcudadevrt`, as numba does; the final
register count and stack come from nvlink -v (relocatable ptxas cannot see the callees).
Static shared memory is what the PTX declares (nvlink's figure adds the 1 KB per block the
system reserves on sm_80+, which the opt-in limit already excludes). Dynamic shared memory
never shows here: the plan accounts for it.

compile_ptx cannot run once numba.cuda was imported in simulator mode, and importing numba.cuda
fixes the mode for the whole process, so `check_kernels` runs the work in a subprocess
(`python -m gpurnn.kernels.compile --json`) without NUMBA_ENABLE_CUDASIM unless this process
already has numba.cuda in GPU mode. Nothing is cached on disk: temporaries only.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Optional

ARCHS = ("sm_80", "sm_90")
DEFAULT_SPECS = "gpurnn.kernels.registry:specializations"


@dataclass(frozen=True)
class KernelResources:
    """One kernel specialization assembled for one architecture."""
    kernel: str
    arch: str
    cell: str
    kind: str
    dtype: str
    grid_sync: bool
    linked_cudadevrt: bool
    registers: Optional[int] = None
    spill_stores: Optional[int] = None     # bytes
    spill_loads: Optional[int] = None      # bytes
    stack_bytes: Optional[int] = None
    local_bytes: Optional[int] = None      # nvlink's lmem (linked kernels only)
    static_smem: Optional[int] = None      # bytes declared .shared in the PTX
    error: Optional[str] = None

    @property
    def spill_bytes(self) -> int:
        return (self.spill_stores or 0) + (self.spill_loads or 0)

    @property
    def ok(self) -> bool:
        return self.error is None and self.spill_bytes == 0


class Toolkit:
    """ptxas, nvlink and libcudadevrt from the nvidia-cuda-nvcc / cuda-runtime wheels."""

    def __init__(self, root):
        self.root = root
        self.ptxas = os.path.join(root, "bin", "ptxas")
        self.nvlink = os.path.join(root, "bin", "nvlink")
        self.libdir = os.path.join(root, "lib")


def find_toolkit() -> Optional[Toolkit]:
    """The CUDA 13 toolkit wheels' tools, or None when ptxas is not installed."""
    try:
        import nvidia
    except ImportError:
        return None
    for base in nvidia.__path__:
        tk = Toolkit(os.path.join(base, "cu13"))
        if os.access(tk.ptxas, os.X_OK):
            return tk
    return None


def _require_toolkit() -> Toolkit:
    tk = find_toolkit()
    if tk is None:
        raise RuntimeError("ptxas from the nvidia-cuda-nvcc wheel was not found (expected under "
                           "nvidia/cu13/bin); install it with pip install 'cuda-toolkit[nvcc]==13.*'")
    return tk


def _cc(arch: str) -> tuple:
    m = re.fullmatch(r"sm_(\d+)(\d)", arch)
    if not m:
        raise ValueError(f"arch must look like 'sm_80' or 'sm_90'; got {arch!r}")
    return int(m.group(1)), int(m.group(2))


_ENTRY = re.compile(r"\.entry\s+([\w$]+)\s*\(")
_SHARED = re.compile(r"^\s*(?:\.visible\s+|\.global\s+)?\.shared\s+(?:\.align\s+\d+\s+)?"
                     r"\.[bsuf](\d+)\s+[\w$]+\[(\d+)\]", re.M)
_PTXAS_FUNC = re.compile(r"Function properties for ([\w$]+)")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers")
_NVLINK = re.compile(r"Function properties for '([\w$]+)':\s*\n\s*nvlink info\s*:\s*used (\d+) "
                     r"registers.*?, (\d+) stack, (\d+) bytes smem.*?, (\d+) bytes lmem")


def ptx_static_smem(ptx: str) -> int:
    """Bytes of static (non-extern) .shared arrays a PTX module declares."""
    return sum(int(bits) // 8 * int(n) for bits, n in _SHARED.findall(ptx))


def parse_ptxas(log: str) -> dict:
    """ptxas -v output -> {function: {stack, spill_stores, spill_loads[, registers]}}."""
    funcs, current, entry = {}, None, None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([\w$]+)'", line)
        if m:
            entry = m.group(1)
            continue
        m = _PTXAS_FUNC.search(line)
        if m:
            current = m.group(1)
            funcs.setdefault(current, {})
            continue
        m = _PTXAS_SPILL.search(line)
        if m and current is not None:
            funcs[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                                  spill_loads=int(m.group(3)))
            continue
        m = _PTXAS_USED.search(line)
        if m:
            name = entry or current
            funcs.setdefault(name, {})["registers"] = int(m.group(1))
    return funcs


def parse_nvlink(log: str, entry: str) -> dict:
    """nvlink -v output -> the linked entry's registers, stack, smem and lmem."""
    for name, regs, stack, smem, lmem in _NVLINK.findall(log):
        if name == entry:
            return {"registers": int(regs), "stack": int(stack), "smem": int(smem),
                    "lmem": int(lmem)}
    raise RuntimeError(f"nvlink -v reported no properties for {entry}")


def _run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{os.path.basename(cmd[0])} exited {r.returncode}: "
                           f"{(r.stderr or r.stdout).strip()[-2000:]}")
    return r.stderr + r.stdout


def assemble(ptx: str, arch: str, grid_sync: bool, tk: Toolkit, workdir: str, stem: str) -> dict:
    """Run ptxas (and nvlink for grid-sync kernels) on one PTX module; return its resources."""
    entries = _ENTRY.findall(ptx)
    if len(entries) != 1:
        raise RuntimeError(f"expected one .entry in the PTX; found {len(entries)}")
    entry = entries[0]
    path = os.path.join(workdir, f"{stem}.ptx")
    with open(path, "w") as f:
        f.write(ptx)
    obj = path[:-4] + (".o" if grid_sync else ".cubin")
    log = _run([tk.ptxas, f"-arch={arch}", "-v"] + (["-c"] if grid_sync else []) + [path, "-o", obj])
    funcs = parse_ptxas(log)
    if entry not in funcs or "registers" not in funcs[entry]:
        raise RuntimeError(f"ptxas -v reported no register count for {entry}")
    # A spill anywhere in the module (a non-inlined device function too) counts.
    res = {"registers": funcs[entry]["registers"],
           "spill_stores": sum(f.get("spill_stores", 0) for f in funcs.values()),
           "spill_loads": sum(f.get("spill_loads", 0) for f in funcs.values()),
           "stack_bytes": funcs[entry].get("stack", 0),
           "static_smem": ptx_static_smem(ptx), "linked_cudadevrt": False, "local_bytes": None}
    if grid_sync:
        link = _run([tk.nvlink, "-v", f"-arch={arch}", obj, f"-L{tk.libdir}", "-lcudadevrt",
                     "-o", path[:-4] + ".cubin"])
        linked = parse_nvlink(link, entry)
        res.update(registers=linked["registers"], stack_bytes=linked["stack"],
                   local_bytes=linked["lmem"], linked_cudadevrt=True)
    return res


def load_specs(specs: str = DEFAULT_SPECS):
    """Call 'package.module:function' or '/path/to/file.py:function' for a list of KernelSpec."""
    target, _, attr = specs.rpartition(":")
    if not target or not attr:
        raise ValueError(f"specs must be 'module:function' or 'file.py:function'; got {specs!r}")
    if target.endswith(".py"):
        spec = importlib.util.spec_from_file_location(os.path.basename(target)[:-3], target)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    return list(getattr(module, attr)())


def _check_in_process(specs: str, archs) -> list:
    from numba import cuda
    from numba.cuda.core import config
    if config.ENABLE_CUDASIM:
        raise RuntimeError("numba.cuda runs in simulator mode in this process (NUMBA_ENABLE_CUDASIM"
                           "=1), where compile_ptx does not work; use check_kernels(), which "
                           "compiles in a subprocess")
    tk = _require_toolkit()
    ccs = [(arch, _cc(arch)) for arch in archs]
    jobs, rows = [], []
    for spec in load_specs(specs):
        func = getattr(spec.func, "py_func", spec.func)
        opts = getattr(spec.func, "targetoptions", {}) or {}
        for arch, cc in ccs:
            base = dict(kernel=spec.name, arch=arch, cell=spec.cell, kind=spec.kind,
                        dtype=spec.dtype, grid_sync=spec.grid_sync,
                        linked_cudadevrt=False)
            try:
                ptx, _ = cuda.compile_ptx(func, spec.signature, cc=cc,
                                          fastmath=bool(opts.get("fastmath", False)))
            except Exception as exc:  # reported per kernel: the table shows every failure
                rows.append(KernelResources(**base, error=f"compile_ptx: {type(exc).__name__}: {exc}"))
                continue
            jobs.append((base, ptx))
            rows.append(None)

    with tempfile.TemporaryDirectory(prefix="gpurnn-ptx-") as tmp:
        def run(i_job):
            i, (base, ptx) = i_job
            try:
                res = assemble(ptx, base["arch"], base["grid_sync"], tk, tmp, f"k{i}")
            except RuntimeError as exc:
                return KernelResources(**base, error=str(exc))
            base = {**base, "linked_cudadevrt": res.pop("linked_cudadevrt")}
            return KernelResources(**base, **res)

        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            assembled = iter(pool.map(run, enumerate(jobs)))
            rows = [r if r is not None else next(assembled) for r in rows]
    return rows


def _in_gpu_mode_already() -> bool:
    if "numba.cuda" not in sys.modules:
        return False
    from numba.cuda.core import config
    return not config.ENABLE_CUDASIM


def check_kernels(archs=ARCHS, specs: str = DEFAULT_SPECS, *, isolate: Optional[bool] = None,
                  timeout: float = 1200) -> list:
    """Compile every specialization (`specs`, default the registry's) for each arch and return
    one KernelResources per (kernel, arch). Per-kernel failures are rows with `error` set.

    isolate: run in a subprocess (default: unless numba.cuda is already imported in GPU mode
    here, so this process's simulator/GPU mode is never fixed as a side effect)."""
    archs = tuple(archs)
    for arch in archs:
        _cc(arch)
    if isolate is None:
        isolate = not _in_gpu_mode_already()
    if not isolate:
        return _check_in_process(specs, archs)
    _require_toolkit()
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "gpurnn.kernels.compile", "--json", "--specs", specs,
           "--arch", *archs]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if r.returncode not in (0, 1):  # 1: ran, some kernel failed; the rows say which
        raise RuntimeError(f"static compile subprocess exited {r.returncode}:\n{r.stderr[-4000:]}")
    try:
        data = json.loads(r.stdout)
    except json.JSONDecodeError as exc:
        raise RuntimeError(f"static compile subprocess printed no JSON ({exc}):\n"
                           f"{r.stdout[-2000:]}\n{r.stderr[-2000:]}") from exc
    return [KernelResources(**row) for row in data]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gpurnn.kernels.compile",
                                 description="Compile kernel specializations for real GPUs (no GPU "
                                             "needed) and print their resources.")
    ap.add_argument("--arch", nargs="+", default=list(ARCHS))
    ap.add_argument("--specs", default=DEFAULT_SPECS)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rows = _check_in_process(args.specs, args.arch)
    if args.json:
        print(json.dumps([asdict(r) for r in rows]))
    else:
        for r in rows:
            print(r)
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
