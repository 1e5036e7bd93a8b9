"""The `gpurnn` command line run as a user runs it: a bad flag is one line on stderr naming the
flag, exit status 2, no traceback, and nothing is run; bench's output files are checked before
the run and written as each case finishes."""
import json
import os
import subprocess
import sys

import pytest

from gpurnn.cli import main

BAD_FLAGS = [
    (["info", "--device", "bogus"], "--device", "H100"),
    (["info", "--batch", "0"], "--batch", "'0'"),
    (["info", "--batch", "x"], "--batch", "'x'"),
    (["bench", "--threads", "-1"], "--threads", "'-1'"),
    (["bench", "--threads", "0"], "--threads", "'0'"),        # was silently "default"
    (["bench", "--repeat", "-2"], "--repeat", "'-2'"),
    (["bench", "--repeat", "0"], "--repeat", "'0'"),          # was silently "default"
    (["bench", "--shape", "1,2,3"], "--shape", "'1,2,3'"),
    (["bench", "--shape", "8,0,4,4"], "--shape", "'8,0,4,4'"),
    (["bench", "--json", "no/such/folder/x.json"], "--json", "does not exist"),
    (["bench", "--plot", "no/such/folder/x.png"], "--plot", "does not exist"),
    (["bench", "--json", "."], "--json", "is a folder"),
    (["bench", "--cell", "peephole"], "--cell", "'peephole'"),
    (["kernels", "--arch", "sm_1"], "--arch", "'sm_1'"),
    (["kernels", "--arch", "compute_90"], "--arch", "'compute_90'"),
    (["check", "--seed", "-1"], "--seed", "'-1'"),
    (["check", "--backend", "tpu"], "--backend", "'tpu'"),
]


def _gpurnn(args, cwd):
    return subprocess.run([sys.executable, "-m", "gpurnn", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("args,flag,actual", BAD_FLAGS, ids=[" ".join(a) for a, _, _ in BAD_FLAGS])
def test_bad_flag_is_one_line_exit_2(args, flag, actual, tmp_path):
    r = _gpurnn(args, tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stdout == ""                          # nothing ran
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert f"argument {flag}" in lines[0] and actual in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == []          # and nothing was written


def test_good_flags_still_run(tmp_path):
    r = _gpurnn(["info", "--device", "h100", "--batch", "2", "--json"], tmp_path)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["profile"].startswith("H100") and "B2" in info["capacity"][0]


def test_bench_writes_json_after_every_case(tmp_path, monkeypatch):
    # the second case dies (as an interrupted run would): the first one's results are on disk
    from gpurnn import bench
    real = bench.make_runner
    seen = []

    def runner(impl, case, seed=0):
        seen.append(case.id)
        if len(set(seen)) > 1:
            raise KeyboardInterrupt
        return real(impl, case, seed)
    monkeypatch.setattr(bench, "make_runner", runner)
    out = tmp_path / "bench.json"
    with pytest.raises(KeyboardInterrupt):
        main(["bench", "--impl", "gpurnn-numpy", "--cell", "lstm", "--mode", "fwd", "--shape",
              "3,2,4,5", "--shape", "3,1,4,5", "--repeat", "1", "--no-progress", "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["complete"] is False and data["cases_planned"] == 2
    assert [c["case"] for c in data["cases"]] == ["lstm-fwd-f32-T3-B2-I4-H5"]
    assert data["cases"][0]["median_s"] > 0
    assert not os.path.exists(f"{out}.partial")


def test_bench_json_complete_at_the_end(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--impl", "gpurnn-numpy", "--cell", "gru", "--mode", "fwdbw", "--shape",
                 "3,2,4,5", "--repeat", "1", "--no-progress", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["complete"] is True and len(data["cases"]) == data["cases_planned"] == 1
    assert f"wrote {out}" in capsys.readouterr().out
