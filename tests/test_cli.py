"""The `gpurnn` command line: info, check, bench (output shape, exit codes, JSON schema, PNG)."""
import importlib.util
import json

import numpy as np
import pytest

from gpurnn.cli import main


def test_info_text(capsys):
    assert main(["info", "--device", "H100"]) == 0
    out = capsys.readouterr().out
    assert "backends:" in out and "numpy  yes" in out
    assert "persistent capacity on H100" in out
    assert "lstm      float32" in out


def test_info_json_schema(capsys):
    assert main(["info", "--device", "A100", "--batch", "1", "--batch", "16", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info) >= {"gpurnn", "backends", "devices", "profile", "capacity", "traffic"}
    assert info["backends"]["numpy"]["available"] is True
    for b in info["backends"].values():
        assert isinstance(b["why"], str) and b["why"]
    assert info["profile"].startswith("A100")
    caps = {(r["cell"], r["dtype"]): r for r in info["capacity"]}
    assert len(caps) == 16
    # wider elements leave room for fewer hidden units; the batch does not (it is tiled)
    for cell in ("lstm", "gru", "rnn_tanh"):
        assert caps[(cell, "float32")]["B1"] == caps[(cell, "float32")]["B16"] > 0  # tiled
        assert caps[(cell, "float64")]["B1"] < caps[(cell, "float32")]["B1"] < caps[(cell, "bfloat16")]["B1"]
        assert caps[(cell, "float16")]["B1"] == caps[(cell, "bfloat16")]["B1"]
    assert caps[("lstm", "float32")]["B1"] < caps[("gru", "float32")]["B1"] < caps[("rnn_tanh", "float32")]["B1"]
    for r in info["traffic"]:
        assert r["stepwise_dram_bytes"] > r["persistent_dram_bytes"] > 0


def test_info_rejects_unknown_profile(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["info", "--device", "Z80"])
    assert exc.value.code == 2
    assert "argument --device: must be one of H100" in capsys.readouterr().err


def test_check_numpy_passes(capsys):
    assert main(["check", "--backend", "numpy"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("numpy ")]
    cells = {line.split()[1] for line in rows}
    assert cells == {"lstm", "gru", "rnn_tanh", "rnn_relu", "lstm_peephole", "cifg",
                     "cifg_peephole", "mlstm", "lstm_proj3", "lstm_peephole_proj3",
                     "layernorm_lstm", "lstm+zoneout+recdrop", "gru+zoneout+recdrop",
                     "layernorm_lstm+zoneout", "gf_lstm", "gf_gru", "gf_rnn_tanh"}
    assert all(" PASS " in line for line in rows)
    # the projection is also checked against torch.nn.LSTM(proj_size), when torch is there
    against = {(line.split()[1], line.split("vs ")[1].split(" (")[0]) for line in rows}
    assert ("lstm_peephole", "finite differences f64") in against
    if importlib.util.find_spec("torch") is not None:
        assert ("lstm_proj3", "torch.nn f64") in against
    assert "all checks passed" in out


def test_check_fails_on_a_wrong_variant_gradient(monkeypatch, capsys):
    from gpurnn.backends import numpy as npb
    real = npb.lstm_backward

    def skewed(*args, **kwargs):
        dx, dh0, dc0, grads = real(*args, **kwargs)
        if "weight_ch" in grads:
            grads = dict(grads, weight_ch=grads["weight_ch"] * 1.001)
        return dx, dh0, dc0, grads
    monkeypatch.setattr(npb, "lstm_backward", skewed)
    assert main(["check", "--backend", "numpy"]) == 1
    fails = [line for line in capsys.readouterr().out.splitlines() if " FAIL " in line]
    assert {line.split()[1] for line in fails} == {"lstm_peephole", "cifg_peephole",
                                                   "lstm_peephole_proj3"}


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN:UserWarning")
def test_bench_runs_lstm_variants_against_the_reference_and_torch(capsys):
    from gpurnn import bench
    cases = [bench.Case(c, "fwdbw", 4, 2, 3, 5) for c in ("lstm_peephole_proj2", "mlstm", "lstm_proj2",
                                                          "layernorm_lstm", "gf_lstm")]
    impls = ["gpurnn-numpy"] + (["torch-cpu"] if importlib.util.find_spec("torch") else [])
    results = bench.run_cases(cases, impls, repeat=1, rounds=1, warmup_s=0)
    ran = {(r["cell"], r["impl"]) for r in results}
    # torch has the projection, none of the other variants
    assert ("lstm_proj2", "gpurnn-numpy") in ran and ("mlstm", "gpurnn-numpy") in ran
    assert ("mlstm", "torch-cpu") not in ran and ("lstm_peephole_proj2", "torch-cpu") not in ran
    assert ("layernorm_lstm", "gpurnn-numpy") in ran and ("gf_lstm", "gpurnn-numpy") in ran
    assert ("gf_lstm", "torch-cpu") not in ran
    if "torch-cpu" in impls:
        assert ("lstm_proj2", "torch-cpu") in ran
    for r in results:
        assert r["max_rel_err"] <= bench.CHECK_TOL["float32"] and r["median_s"] > 0
    from gpurnn.variants import form_of, layer_flops
    assert bench.flops(cases[1]) == layer_flops(form_of("mlstm"), 4, 2, 3, 5, backward=True)
    # the variant's model adds its products to the plain LSTM's
    assert bench.flops(bench.Case("lstm_proj2", "fwd", 4, 2, 3, 5)) == \
        4 * 2 * (2 * (4 * 5 * 3 + 4 * 5 * 2 + 2 * 5) + 21 * 5)
    with pytest.raises(SystemExit):
        main(["bench", "--cell", "peephole_lstm"])
    assert "LSTM variant" in capsys.readouterr().err


def test_check_fails_on_a_wrong_gradient(monkeypatch, capsys):
    from gpurnn.backends import numpy as npb
    real = npb.backward

    def skewed(*args, **kwargs):
        g = real(*args, **kwargs)
        return g._replace(dw_hh=g.dw_hh * 1.001)
    monkeypatch.setattr(npb, "backward", skewed)
    assert main(["check", "--backend", "numpy"]) == 1
    out = capsys.readouterr().out
    assert " FAIL " in out and "FAILED" in out


def test_bench_quick_json_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    js, png = tmp_path / "bench.json", tmp_path / "bench.png"
    rc = main(["bench", "--quick", "--cell", "lstm", "--cell", "gru", "--repeat", "1",
               "--no-progress", "--json", str(js), "--plot", str(png), "--threads", "2"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "lstm-fwdbw-f32-T32-B8-I64-H64" in out and "gpurnn-numpy" in out
    data = json.loads(js.read_text())
    assert data["schema"] == "gpurnn-bench/1"
    assert {"environment", "device", "implementations", "not_timed", "cases"} <= set(data)
    assert "gpurnn-numpy" in data["implementations"]
    cases = data["cases"]
    assert len(cases) == 2 * 2 * 3 * len(data["implementations"])
    for c in cases:
        assert c["median_s"] > 0 and c["tokens_per_s"] > 0 and c["gflops"] > 0
        assert c["tokens_per_s"] == pytest.approx(c["T"] * c["B"] / c["median_s"])
    if "torch-cpu" in data["implementations"]:
        mine = [c for c in cases if c["impl"] == "gpurnn-numpy"]
        assert all(c["peer"] == "torch-cpu" and c["ratio_to_peer"] > 0 for c in mine)
    import matplotlib.image
    img = matplotlib.image.imread(str(png))
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert np.ptp(img) > 0          # not a blank canvas


def test_bench_rejects_unknown_impl(capsys):
    assert main(["bench", "--quick", "--impl", "nope"]) == 2
    assert "unknown --impl" in capsys.readouterr().err


def test_bench_flop_model():
    from gpurnn.bench import Case, flops
    c = Case("lstm", "fwd", 10, 2, 3, 5)
    assert flops(c) == 2 * 10 * 2 * 4 * 5 * (3 + 5) + 21 * 10 * 2 * 5
    bw = Case("lstm", "fwdbw", 10, 2, 3, 5)
    assert flops(bw) == 3 * 2 * 10 * 2 * 4 * 5 * (3 + 5) + 3 * 21 * 10 * 2 * 5


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "usage" in capsys.readouterr().out


def test_traffic_floor_for_gpu_forward_cases():
    from gpurnn import planning as planmod
    from gpurnn.bench import Case, traffic_floor
    case = Case("lstm", "fwd", 100, 8, 512, 512)
    floor = traffic_floor(case, "gpurnn-cuda", device="H100")
    p = planmod.plan("lstm", 512, 512, 8, "float32", "H100")
    assert p.path == "persistent"
    assert floor == pytest.approx(100 * planmod.step_floor_seconds(p, "persistent", training=False))
    stepwise = traffic_floor(case, "torch-cudnn", device="H100")
    assert stepwise == pytest.approx(100 * planmod.step_floor_seconds(p, "stepwise", training=False))
    assert stepwise > floor > 0
    assert traffic_floor(case, "gpurnn-numpy", device="H100") is None
    assert traffic_floor(Case("lstm", "fwdbw", 100, 8, 512, 512), "gpurnn-cuda", device="H100") is None
