"""What the strict-simulator test files of the kernel families (test_sim_mlstm, _layernorm,
_projection, _wavefront) share: the static-compile setup and the checks over its rows, the
barrier-deletion mutation harness (the kernel source and its barrier lines, the rebuilt module
and runtime, the first case that catches a mutant, and the harness's three tests), random cases,
the launch log, and the fresh-process run of a stock-simulator script.

Plain functions, no tests of its own: pytest collects only test_*.py; the test files import it
from the tests folder (pytest puts that folder on sys.path, as for `from conftest import ...`).
Most helpers return what the tests assert on, so the assertions stay in the test files (where
pytest rewrites them); those that assert themselves (mutation_tests' tests,
assert_close_with_finite_grads) say what failed in their messages.
"""
import contextlib
import inspect
import os
import re
import subprocess
import sys
import types
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from gpurnn import sim as strict
from gpurnn.backends import sim
from gpurnn.backends.sim import SimRuntime
from gpurnn.kernels import compile as kcompile
from gpurnn.testing import GRAD_TOL, TOL, assert_close

# ---------------------------------------------------------------- static compilation

ARCHS = ("sm_80", "sm_90")
PROFILE = {"sm_80": "A100", "sm_90": "H100"}

needs_ptxas = pytest.mark.skipif(
    kcompile.find_toolkit() is None,
    reason="ptxas from the nvidia-cuda-nvcc wheel is not installed "
           "(pip install 'cuda-toolkit[nvcc]==13.*')")


def compile_rows(specs, per_arch=False):
    """kcompile.check_kernels over ARCHS for `specs` ("module:function"): one compile for both,
    or (per_arch) one subprocess per arch side by side; the rows of every arch either way."""
    if not per_arch:
        return kcompile.check_kernels(ARCHS, specs)
    with ThreadPoolExecutor(max_workers=len(ARCHS)) as pool:
        parts = list(pool.map(lambda arch: kcompile.check_kernels((arch,), specs), ARCHS))
    return [r for part in parts for r in part]


def by_kernel(rows):
    """{kernel: {arch: row}}."""
    out = {}
    for r in rows:
        out.setdefault(r.kernel, {})[r.arch] = r
    return out


def compile_errors(rows):
    return [(r.kernel, r.arch, r.error) for r in rows if r.error]


def spilled(rows):
    return [(r.kernel, r.arch) for r in rows if r.spill_bytes or r.local_bytes]


def compiled_pairs(rows):
    """{(kernel, arch)} of the rows."""
    return {(r.kernel, r.arch) for r in rows}


def wanted_pairs(names):
    """{(kernel, arch)} for every name and every arch."""
    return {(n, a) for n in names for a in ARCHS}


def devrt_mismatches(rows, grid_synced):
    """The (kernel, arch) whose linking with cudadevrt or grid sync is not grid_synced(row)."""
    return [(r.kernel, r.arch) for r in rows
            if not r.linked_cudadevrt == r.grid_sync == grid_synced(r)]


def over_budget(rows, plan_for):
    """(kernel, arch, registers) of the rows whose register count is unknown, 0, or above the
    regs_per_thread of plan_for(row)."""
    return [(r.kernel, r.arch, r.registers) for r in rows
            if not (r.registers is not None and 0 < r.registers <= plan_for(r).regs_per_thread)]


def smem_overflows(rows, plan_at, persistent=lambda r: r.kind.startswith("persistent"),
                   forward=lambda r: r.kind == "persistent_fwd", batches=(1, 8)):
    """For each persistent row (persistent(r)) on its arch's device profile and each batch, the
    plan at capacity, plan_at(r, device, batch) -> (h, plan): where it is not persistent,
    ("not persistent", kernel, arch, h, batch); where the kernel's static shared memory plus the
    plan's dynamic (forward(r): the forward's, else the backward's) is over the opt-in limit,
    ("smem", kernel, arch, h, batch). [] where every one fits."""
    from gpurnn.planning import device_profile
    bad = []
    for r in rows:
        if not persistent(r):
            continue
        dev = device_profile(PROFILE[r.arch])
        for batch in batches:
            h, p = plan_at(r, dev, batch)
            if not p.persistent_fits:
                bad.append(("not persistent", r.kernel, r.arch, h, batch))
                continue
            dyn = p.smem_bytes_fwd if forward(r) else p.smem_bytes_bwd
            if not r.static_smem + dyn <= dev.smem_per_block_optin:
                bad.append(("smem", r.kernel, r.arch, h, batch))
    return bad


# ---------------------------------------------------------------- cases

def normal_draws(rng, dtype):
    """rand(*shape): 0.5 * standard normal draws from rng, as dtype."""
    def rand(*shape):
        return (0.5 * rng.standard_normal(shape)).astype(dtype)
    return rand


def lstm_case(form, T, B, I, H, dtype, bias, seed):
    """(args, cot) of a random single-layer case for an LSTMForm (a projection's h is R =
    form.proj_size wide, else H): params, x, h0, c0, then dy, dh_n, dc_n, drawn in that order."""
    rand = normal_draws(np.random.default_rng(seed), dtype)
    R = form.proj_size or H
    params = {name: rand(*shape) for name, shape in form.param_shapes(I, H, bias)}
    args = dict(x=rand(T, B, I), params=params, h0=rand(B, R), c0=rand(B, H))
    cot = dict(dy=rand(T, B, R), dh_n=rand(B, R), dc_n=rand(B, H))
    return args, cot


def nan_padded(args, lengths):
    """Sets args["x"] to NaN past each sequence's length (in place) and returns a copy of args
    with zeros there instead."""
    clean = {**args, "x": args["x"].copy()}
    for b, n in enumerate(lengths):
        clean["x"][n:, b] = 0
        args["x"][n:, b] = np.nan
    return clean


def assert_close_with_finite_grads(out, grads, want, want_grads, dtype):
    """y, h_n, c_n within TOL[dtype] of the wanted; dx, dh0, dc0 and every parameter's gradient
    within GRAD_TOL[dtype], each parameter's gradient finite."""
    for name, a, b in zip(("y", "h_n", "c_n"), out[:3], want[:3]):
        assert_close(a, b, TOL[dtype], name)
    for name, a, b in zip(("dx", "dh0", "dc0"), grads[:3], want_grads[:3]):
        assert_close(a, b, GRAD_TOL[dtype], name)
    for name, g in want_grads[3].items():
        if not np.all(np.isfinite(grads[3][name])):
            raise AssertionError(name)
        assert_close(grads[3][name], g, GRAD_TOL[dtype], name)


@contextlib.contextmanager
def launches_logged():
    """The launch infos (a list, filled as they come) of the strict sim backend while within;
    its launch hook unset on the way out."""
    launches = []
    sim.RUNTIME.launch_hook = launches.append
    try:
        yield launches
    finally:
        sim.RUNTIME.launch_hook = None


# ---------------------------------------------------------------- fresh process

def run_fresh(script, timeout):
    """`python -c script` in a fresh process without NUMBA_ENABLE_CUDASIM (Numba's own simulator
    is chosen there by the script); the CompletedProcess, output captured as text."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=timeout)


# ---------------------------------------------------------------- barrier-deletion mutants

BARRIER = re.compile(r"^\s*(cuda\.syncthreads\(\)|_grid_group_sync\(grid\))\s*(#.*)?$")


def kernel_source(module):
    """(source, its lines, the indices of the lines that are a barrier and nothing else)."""
    source = inspect.getsource(module)
    lines = source.splitlines()
    return source, lines, [i for i, line in enumerate(lines) if BARRIER.match(line)]


def barrier_kinds(lines, barrier_lines):
    """The barrier call on each barrier line, in order."""
    return [BARRIER.match(lines[i]).group(1) for i in barrier_lines]


def barriers_before_and_after(lines, barrier_lines, marker="def make_bwd"):
    """(how many barriers stand before the first line starting with `marker`, how many after)."""
    start = next(i for i, line in enumerate(lines) if line.startswith(marker))
    before = [i for i in barrier_lines if i < start]
    return len(before), len(barrier_lines) - len(before)


def barrier_ids(lines, barrier_lines):
    """pytest ids for the barrier lines: L<line number>-<the call>."""
    return [f"L{i + 1}-{lines[i].split('#')[0].strip()}" for i in barrier_lines]


def mutant_module(source, tag, like, name):
    """`source` executed as a fresh module in gpurnn.kernels (gpurnn.kernels._<name>_mutant_<tag>),
    standing in for the module `like` (its __file__; its file name and the tag as the code's
    file name)."""
    mod = types.ModuleType(f"gpurnn.kernels._{name}_mutant_{tag}")
    mod.__package__ = "gpurnn.kernels"
    mod.__file__ = like.__file__
    exec(compile(source, f"<{os.path.basename(like.__file__)} {tag}>", "exec"), mod.__dict__)
    return mod


class MutantRuntime(SimRuntime):
    """The strict sim backend with one family's kernels taken from a rebuilt module: a spec with
    owns(spec) is built from build(module, spec) (a kernel function), any other as usual."""

    def __init__(self, module, owns, build):
        super().__init__()
        self.module = module
        self.owns = owns
        self.build = build

    def compile(self, spec):
        if not self.owns(spec):
            return super().compile(spec)
        return strict.jit(self.build(self.module, spec), name=spec.name)


def first_catch(cases, check, prepare=None):
    """Run check(n, case) for each case in turn (prepare(n, case) first, outside the catch, where
    given); the first that finds something, as "<case>: <what>": a simulator error (its type and
    first line) or check's own message. None where every case passes."""
    for n, case in enumerate(cases):
        if prepare is not None:
            prepare(n, case)
        try:
            wrong = check(n, case)
        except strict.SimulatorError as err:
            return f"{case}: {type(err).__name__}: {str(err).splitlines()[0]}"
        if wrong:
            return f"{case}: {wrong}"
    return None


def first_difference(pairs, rtol=1e-4, atol=1e-5):
    """"<name> differs from the reference" for the first (name, got, want) not allclose, or None."""
    for name, a, b in pairs:
        if not np.allclose(a, b, rtol=rtol, atol=atol):
            return f"{name} differs from the reference"
    return None


def _indent(line):
    return line[: len(line) - len(line.lstrip())]


def delete_line(lines, line_no):
    """The source with line line_no (0-based) replaced by a `pass` at its indent."""
    lines = list(lines)
    lines[line_no] = _indent(lines[line_no]) + "pass  # mutant: barrier deleted"
    return "\n".join(lines) + "\n"


def unnoticed(lines, line_no, filename):
    """The failure message for a deleted line that no case caught."""
    return (f"deleting line {line_no + 1} ({lines[line_no].strip()}) of {filename} went "
            f"unnoticed: redundant, or a gap in the checks")


def anchor_hits(lines, anchor):
    """The indices of the lines that are `anchor`, white space around either aside."""
    return [i for i, line in enumerate(lines) if line.strip() == anchor.strip()]


def with_return(lines, i, condition, before=False):
    """The source with `if <condition>: return` at line i's indent, after line i (or before)."""
    indent = _indent(lines[i])
    at = i if before else i + 1
    return "\n".join(lines[:at] + [indent + f"if {condition}:", indent + "    return"]
                     + lines[at:]) + "\n"


def staggered_lengths(T, B):
    """The mutant cases' lengths: 1, 2, ..., T, 1, ... over the batch; None for one sequence."""
    return np.arange(B, dtype=np.int64) % T + 1 if B > 1 else None


def mutation_tests(caught_by, source, lines, barrier_lines, filename, anchor, condition):
    """The three tests of a family's barrier-deletion harness, for the test module to bind to its
    test names (pytest collects them there): the unmutated source passes every case; deleting
    any one barrier line (0-based indices barrier_lines of `lines`) is caught; and `if
    <condition>: return` after the forward's (fwd) or the backward's (bwd) line `anchor` (an
    idle block leaving early: a GPU would hang at the next grid barrier, which the other blocks
    still reach) is caught as a hang. caught_by(source, tag) is the family's: None, or what
    caught the mutant."""

    @pytest.mark.mutation
    def unmutated_source_passes():
        found = caught_by(source, "original")
        assert found is None, found

    @pytest.mark.mutation
    @pytest.mark.parametrize("line_no", barrier_lines, ids=barrier_ids(lines, barrier_lines))
    def deleting_any_barrier_is_caught(line_no):
        found = caught_by(delete_line(lines, line_no), f"L{line_no + 1}")
        assert found is not None, unnoticed(lines, line_no, filename)

    @pytest.mark.mutation
    @pytest.mark.parametrize("kernel", ["fwd", "bwd"])
    def returning_early_is_caught(kernel):
        hits = anchor_hits(lines, anchor)
        assert len(hits) == 2, hits
        mutant = with_return(lines, hits[0 if kernel == "fwd" else 1], condition)
        found = caught_by(mutant, f"early-return-{kernel}")
        assert found is not None and "a GPU would hang here" in found, found

    return unmutated_source_passes, deleting_any_barrier_is_caught, returning_early_is_caught
