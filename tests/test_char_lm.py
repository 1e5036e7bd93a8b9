"""examples/char_lm.py: the same char-LM trained with gpurnn.torch.LSTM and with torch.nn.LSTM
from the same initial weights on the same batches gives the same loss at every step; a run
resumed from a checkpoint continues exactly as an uninterrupted one."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "char_lm.py"
TINY = {"embed": 16, "hidden": 32, "layers": 2}
SEQ, BATCH, STEPS = 16, 8, 50
# per-step relative agreement of the loss curves, per dtype
LOSS_TOL = {torch.float64: 1e-8, torch.float32: 1e-4}


@pytest.fixture(scope="module")
def lm():
    spec = importlib.util.spec_from_file_location("char_lm", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def corpus(lm):
    text, _ = lm.load_text(max_chars=20_000, use_package=False)
    return lm.Corpus(text)


def _run(lm, corpus, impl, dtype, start=0, stop=STEPS, model=None, optimizer=None):
    if model is None:
        model = lm.build_model(len(corpus.vocab), impl=impl, dtype=dtype, seed=3, **TINY)
        optimizer = lm.make_optimizer(model)
    losses = lm.train(model, optimizer, corpus.ids, start, stop, SEQ, BATCH, seed=5)
    return model, optimizer, losses


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_gpurnn_and_torch_lstm_train_identically(lm, corpus, dtype):
    ref = lm.build_model(len(corpus.vocab), impl="torch", dtype=dtype, seed=3, **TINY)
    mine = lm.build_model(len(corpus.vocab), impl="gpurnn", dtype=dtype, seed=3, **TINY)
    assert type(mine.lstm).__module__ == "gpurnn.torch" and type(ref.lstm) is torch.nn.LSTM
    for key, value in ref.state_dict().items():          # identical initial weights
        assert torch.equal(mine.state_dict()[key], value), key
    _, _, loss_ref = _run(lm, corpus, "torch", dtype)
    _, _, loss_mine = _run(lm, corpus, "gpurnn", dtype)
    assert len(loss_mine) == len(loss_ref) == STEPS
    rel = np.abs(np.array(loss_mine) - loss_ref) / np.abs(loss_ref)
    worst = int(rel.argmax())
    assert rel.max() <= LOSS_TOL[dtype], (f"step {worst}: loss {loss_mine[worst]!r} (gpurnn) vs "
                                          f"{loss_ref[worst]!r} (torch), rel {rel.max():.2e}")
    assert loss_mine[-1] < 0.85 * loss_mine[0]          # and it is actually learning


def test_resume_from_checkpoint_continues_identically(lm, corpus, tmp_path):
    _, _, straight = _run(lm, corpus, "gpurnn", torch.float64, stop=10)
    model, opt, first = _run(lm, corpus, "gpurnn", torch.float64, stop=5)
    path = tmp_path / "lm.pt"
    config = {"vocab": corpus.vocab, "hidden": TINY["hidden"]}
    lm.save_checkpoint(path, model, opt, 5, first, config)
    fresh = lm.build_model(len(corpus.vocab), impl="gpurnn", dtype=torch.float64, seed=99, **TINY)
    fresh_opt = lm.make_optimizer(fresh)
    step, history = lm.load_checkpoint(path, fresh, fresh_opt, config)
    assert step == 5 and history == first
    _, _, rest = _run(lm, corpus, "gpurnn", torch.float64, 5, 10, fresh, fresh_opt)
    assert first + rest == straight
    with pytest.raises(ValueError, match="--resume: hidden is 64 but the checkpoint .* was made with 32"):
        lm.load_checkpoint(path, fresh, fresh_opt, {**config, "hidden": 64})


def test_batches_depend_only_on_seed_and_step(lm, corpus):
    a = lm.batch_at(corpus.ids, 7, SEQ, BATCH, seed=1)
    b = lm.batch_at(corpus.ids, 7, SEQ, BATCH, seed=1)
    c = lm.batch_at(corpus.ids, 8, SEQ, BATCH, seed=1)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    assert a[0].shape == (BATCH, SEQ) and torch.equal(a[0][:, 1:], a[1][:, :-1])   # targets shift by one


def test_main_trains_samples_and_plots(lm, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    ckpt, png = tmp_path / "lm.pt", tmp_path / "loss.png"
    args = ["--steps", "3", "--seq-len", "8", "--batch", "2", "--hidden", "8", "--embed", "4",
            "--sample", "20", "--no-package", "--max-chars", "5000", "--checkpoint", str(ckpt),
            "--plot", str(png)]
    losses = lm.main(args)
    assert len(losses) == 3 and ckpt.exists() and png.stat().st_size > 0
    resumed = lm.main(args[:1] + ["5"] + args[2:] + ["--resume"])
    assert resumed[:3] == losses and len(resumed) == 5
    out = capsys.readouterr().out
    assert "resumed from" in out and "tokens/s" in out


@pytest.mark.parametrize("cell,regularised", [("lstm", True), ("layernorm_lstm", True),
                                              ("cifg", False)])
def test_main_runs_gpurnn_cells_with_zoneout_and_reports_validation(lm, cell, regularised, capsys):
    args = ["--steps", "3", "--seq-len", "8", "--batch", "2", "--hidden", "8", "--embed", "4",
            "--sample", "0", "--no-package", "--max-chars", "3000", "--cell", cell]
    if regularised:
        args += ["--zoneout", "0.1", "0.05", "--recurrent-dropout", "0.1"]
    losses = lm.main(args)
    assert len(losses) == 3 and all(np.isfinite(losses))
    out = capsys.readouterr().out
    assert f"gpurnn {cell}, 2 layers" in out
    assert ("zoneout (0.1, 0.05)" in out) == regularised
    line = next(s for s in out.splitlines() if s.startswith("validation:"))
    nats = float(line.split()[1])
    assert 0 < nats < 2 * np.log(62) and "bits/char" in line
    with pytest.raises(SystemExit):
        lm.parse_args(["--impl", "torch", "--zoneout", "0.1", "0.05"])
    with pytest.raises(SystemExit):
        lm.parse_args(["--impl", "torch", "--cell", "layernorm_lstm"])


def test_evaluate_is_the_mean_cross_entropy_of_consecutive_windows(lm, corpus):
    model = lm.build_model(len(corpus.vocab), impl="gpurnn", dtype=torch.float64, seed=1, **TINY)
    _, val = lm.split(corpus.ids)
    ids = val[:8 * 5 + 1]
    want = []
    with torch.no_grad():
        for k in range(5):
            chunk = torch.from_numpy(ids[k * 8: k * 8 + 9])[None]
            logits, _ = model(chunk[:, :-1])
            want.append(torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:]).item())
    assert lm.evaluate(model, ids, seq_len=8, batch=2) == pytest.approx(np.mean(want), rel=1e-12)
