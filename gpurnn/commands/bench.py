"""`gpurnn bench`: forward and forward+backward of LSTM/GRU/RNN over a grid of (T, B, I, H) for
every available gpurnn backend and peer (torch CPU; on a GPU torch cuDNN and gpurnn's stepwise
path), with median time, tokens/s, GFLOP/s from an explicit FLOP model (gpurnn.bench), and the
ratio to the peer timed in the same run.

Each implementation's result is checked against the float64 NumPy reference before it is timed;
then implementations are timed in blocks (untimed calls first, the order rotating over
--rounds rounds of --repeat timed calls each, medians), and the share of CPU time other
processes used during each one's blocks is reported (see gpurnn.bench)."""
from __future__ import annotations

import argparse
import json
import os
import sys

from gpurnn.cells import CELLS

from . import int_at_least, output_file

DEFAULT_CELLS = ("lstm", "gru", "rnn_tanh")


def add_parser(sub):
    p = sub.add_parser("bench", help="time gpurnn against torch (CPU, cuDNN) on a case grid",
                       description=__doc__)
    p.add_argument("--quick", action="store_true", help="a small grid (under a minute on a CPU)")
    p.add_argument("--cell", action="append", type=cell_name, metavar="CELL",
                   help=f"repeatable; one of {', '.join(CELLS)} or an LSTM variant "
                   f"({', '.join(VARIANT_EXAMPLES)}, lstm_proj<P>, lstm_peephole_proj<P>, ...); "
                   f"default {', '.join(DEFAULT_CELLS)}")
    p.add_argument("--mode", action="append", choices=("fwd", "fwdbw"), help="repeatable; default both")
    p.add_argument("--impl", action="append", help="implementations to time (repeatable); default: every "
                   "available one except gpurnn-sim")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--shape", action="append", type=shape, metavar="T,B,I,H",
                   help="custom case shape (repeatable)")
    p.add_argument("--repeat", type=int_at_least(1), default=None,
                   help="timed calls per block (default 5)")
    p.add_argument("--rounds", type=int_at_least(1), default=None,
                   help="blocks per implementation, the order rotating (default 3; 2 with --quick)")
    p.add_argument("--warmup", type=seconds, default=None, metavar="SECONDS",
                   help="untimed calls before each block, at least this long (default 0.2; "
                   "0.05 with --quick)")
    p.add_argument("--threads", type=int_at_least(1), default=None,
                   help="CPU threads for torch, NumPy's BLAS and gpurnn's cpu backend (OpenMP)")
    p.add_argument("--json", metavar="FILE", type=output_file, help="write machine-readable "
                   "results, rewritten as each case finishes (an interrupted run keeps them)")
    p.add_argument("--plot", metavar="FILE.png", type=output_file,
                   help="draw throughput against batch size (matplotlib)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)
    return p


def seconds(text):
    """An argparse type: a number of seconds >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0; got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0; got {text!r}")
    return value


VARIANT_EXAMPLES = ("lstm_peephole", "cifg", "cifg_peephole", "mlstm", "layernorm_lstm",
                    "gf_lstm", "gf_gru", "gf_rnn_tanh")


def cell_name(text):
    """An argparse type: a cell of gpurnn.cells or a name of gpurnn.variants."""
    from gpurnn.feedback import CELLS as FEEDBACK
    from gpurnn.layernorm import NAME as LAYERNORM
    from gpurnn.variants import form_of
    if text in CELLS or text in FEEDBACK or text == LAYERNORM or form_of(text) is not None:
        return text
    raise argparse.ArgumentTypeError(f"must be one of {CELLS} or an LSTM variant such as "
                                     f"{VARIANT_EXAMPLES} or lstm_proj64; got {text!r}")


def shape(text):
    """An argparse type: T,B,I,H, four integers >= 1."""
    try:
        T, B, I, H = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be T,B,I,H (four integers); got {text!r}") from None
    if min(T, B, I, H) < 1:
        raise argparse.ArgumentTypeError(f"values must be >= 1; got {text!r}")
    return T, B, I, H


def format_table(results):
    header = ("case", "impl", "median ms", "tokens/s", "GFLOP/s", "vs peer")
    with_floor = any(r.get("times_floor") is not None for r in results)
    with_share = any(r.get("other_cpu_share") is not None for r in results)
    if with_share:
        header += ("other CPU",)
    if with_floor:
        header += ("x traffic floor",)
    with_model = any(r.get("times_model") is not None for r in results)
    if with_model:
        header += ("measured/model",)
    rows = []
    for r in results:
        ratio = (f"{r['ratio_to_peer']:.2f}x {r['peer']}" if r.get("ratio_to_peer") is not None
                 and r["impl"] != r.get("peer") else "")
        row = (r["case"], r["impl"], f"{r['median_s'] * 1e3:.2f}", f"{r['tokens_per_s']:.3g}",
               f"{r['gflops']:.2f}", ratio)
        if with_share:
            row += ("" if r.get("other_cpu_share") is None else f"{100 * r['other_cpu_share']:.0f}%",)
        if with_floor:
            row += ("" if r.get("times_floor") is None else f"{r['times_floor']:.1f}x",)
        if with_model:
            row += ("" if r.get("times_model") is None else f"{r['times_model']:.2f}",)
        rows.append(row)
    widths = [max(len(x[i]) for x in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def plot(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("gpurnn bench: --plot needs matplotlib (pip install 'gpurnn[bench]')")
    panels = sorted({(r["cell"], r["mode"], r["T"], r["I"], r["H"]) for r in results})
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, key in zip(axes.flat, panels):
        sel = [r for r in results if (r["cell"], r["mode"], r["T"], r["I"], r["H"]) == key]
        for impl in sorted({r["impl"] for r in sel}):
            pts = sorted((r["B"], r["tokens_per_s"]) for r in sel if r["impl"] == impl)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size B")
        ax.set_ylabel("tokens/s")
        ax.set_title(f"{key[0]} {key[1]} T={key[2]} I={key[3]} H={key[4]}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args):
    from gpurnn import bench
    avail = bench.available_impls()
    if args.impl:
        unknown = [i for i in args.impl if i not in bench.IMPLS]
        if unknown:
            print(f"gpurnn bench: unknown --impl {unknown}; choose from {list(bench.IMPLS)}", file=sys.stderr)
            return 2
        missing = [f"{i} ({avail[i][1]})" for i in args.impl if not avail[i][0]]
        if missing:
            print(f"gpurnn bench: not available here: {'; '.join(missing)}", file=sys.stderr)
            return 2
        impls = list(args.impl)
    else:
        impls = [i for i in bench.IMPLS if avail[i][0] and i != "gpurnn-sim"]
    skipped = {i: avail[i][1] for i in bench.IMPLS if i not in impls}
    cells = tuple(args.cell or DEFAULT_CELLS)
    modes = tuple(args.mode or ("fwd", "fwdbw"))
    if args.shape:
        cases = [bench.Case(c, m, *s, args.dtype) for c in cells for m in modes for s in args.shape]
    else:
        cases = bench.grid(args.quick, cells, modes, args.dtype)
    repeat = args.repeat if args.repeat is not None else 5
    rounds = args.rounds if args.rounds is not None else (2 if args.quick else 3)
    warmup = args.warmup if args.warmup is not None else (0.05 if args.quick else 0.2)
    if args.plot:
        try:
            import matplotlib  # noqa: F401  (checked before the run, not after it)
        except ImportError:
            print("gpurnn bench: --plot needs matplotlib (pip install 'gpurnn[bench]')", file=sys.stderr)
            return 2

    limiter = None
    if args.threads is not None:
        try:
            import torch
            torch.set_num_threads(args.threads)
        except ImportError:
            pass  # torch absent: nothing to limit on its side
        try:
            import threadpoolctl
            limiter = threadpoolctl.threadpool_limits(limits=args.threads)
        except ImportError:
            print("gpurnn bench: threadpoolctl is not installed; NumPy's BLAS threads not limited",
                  file=sys.stderr)

    bar = None
    if not args.no_progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=len(cases) * len(impls), desc="gpurnn bench", unit="case", file=sys.stderr)
        except ImportError:
            bar = None

    def progress(case, impl):
        if bar is not None:
            bar.set_postfix_str(f"{case.id} {impl}")
            bar.update(1)

    env, device = bench.environment(), _device()
    results = []

    def write_json(complete):
        # the whole file again after every case, replaced in one step: an interrupted run (or a
        # crash in a later case) leaves every case measured so far in a readable file
        data = {"schema": "gpurnn-bench/1", "environment": env, "device": device,
                "implementations": impls, "not_timed": skipped, "repeat": repeat,
                "rounds": rounds, "warmup_s": warmup,
                "complete": complete, "cases_planned": len(cases) * len(impls), "cases": results}
        partial = f"{args.json}.partial"
        with open(partial, "w") as fh:
            json.dump(data, fh, indent=1)
        os.replace(partial, args.json)

    def case_done(case, case_results):
        results.extend(case_results)
        if args.json:
            write_json(complete=False)

    try:
        bench.run_cases(cases, impls, repeat=repeat, rounds=rounds, warmup_s=warmup,
                        progress=progress, on_case=case_done)
    finally:
        if bar is not None:
            bar.close()
        if limiter is not None:
            limiter.unregister()

    print(f"gpurnn bench: {len(cases)} cases x {len(impls)} implementations, each checked against "
          f"the float64 reference, then timed in {rounds} rounds of {repeat} calls (order rotating, "
          f"at least {warmup:g} s of untimed calls before each block), medians; "
          f"{env['cpu_count']} CPUs, torch threads {env.get('torch_threads')}")
    for impl, why in skipped.items():
        print(f"  not timed: {impl}: {why}")
    print(format_table(results))
    print("Read it: 'vs peer' is this implementation's median time over its peer's in the same run "
          "(below 1.00x = faster). GFLOP/s uses the FLOP model in gpurnn.bench for every implementation."
          + (" 'other CPU' is the share of the machine's CPU time other processes used during "
             "that implementation's timed blocks (high: the numbers are not to be trusted)."
             if any(r.get("other_cpu_share") is not None for r in results) else "")
          + (" 'x traffic floor' is the time over the plan's DRAM-traffic floor for the recurrence "
             "(gpurnn.planning.step_floor_seconds; forward cases on a GPU)." if any(
                 r.get("times_floor") is not None for r in results) else "")
          + (" 'measured/model' is the time over the step-time model's prediction (gpurnn.planning.cost; "
             "gpurnn's GPU rows): the first GPU run calibrates the model." if any(
                 r.get("times_model") is not None for r in results) else ""))
    if args.json:
        write_json(complete=True)
        print(f"wrote {args.json}")
    if args.plot:
        plot(results, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _device():
    from gpurnn.backends import availability
    ok, why = availability("cuda")
    if not ok:
        return {"kind": "cpu", "gpu": None, "why_no_gpu": why}
    import cupy
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    return {"kind": "gpu", "gpu": props["name"].decode() if isinstance(props["name"], bytes) else props["name"],
            "sm_count": props["multiProcessorCount"]}
