"""The `gpurnn` command line run as a user runs it: a bad flag is one line on stderr naming the
flag, exit status 2, no traceback, and nothing is run; bench's output files are checked before
the run and written as each case finishes; a subcommand whose module fails to import stays
listed, and it and --help say which one and why (exit status 1 for it)."""
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


# A subcommand whose module fails to import stays on the command line and says why.

def _break_import(monkeypatch, name, exc):
    from gpurnn import cli
    real = cli.importlib.import_module

    def import_module(module, *args):
        if module == f"gpurnn.commands.{name}":
            raise exc
        return real(module, *args)
    monkeypatch.setattr(cli.importlib, "import_module", import_module)


@pytest.mark.parametrize("argv", [["bench"], ["bench", "--quick", "--threads", "2"], ["bench", "-h"]])
def test_broken_subcommand_says_why_and_fails(monkeypatch, capsys, argv):
    _break_import(monkeypatch, "bench", RuntimeError("planted: libfoo.so not found"))
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "gpurnn bench" in err and "gpurnn.commands.bench failed to import" in err
    assert "RuntimeError: planted: libfoo.so not found" in err


def test_help_lists_the_broken_subcommand_and_why(monkeypatch, capsys):
    _break_import(monkeypatch, "kernels", ImportError("planted: no module named 'nvidia'"))
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("    ")]
    assert listed == ["info", "check", "bench", "kernels"]            # still listed
    assert "ImportError: planted: no module named 'nvidia'" in out
    assert "gpurnn.commands.kernels failed to import" in out


def test_missing_command_module_is_reported(monkeypatch, capsys):
    # None in sys.modules makes the import raise ModuleNotFoundError for that very module
    # (what the command line used to skip in silence as "not written yet")
    monkeypatch.setitem(sys.modules, "gpurnn.commands.check", None)
    assert main(["check", "--backend", "numpy"]) == 1
    assert "ModuleNotFoundError" in capsys.readouterr().err
    assert main(["info", "--device", "H100", "--json"]) == 0          # the others still run


def test_broken_subcommand_from_the_shell(tmp_path):
    # as a user runs it: a command module that raises at import (planted through sys.modules)
    code = ("import sys, runpy; sys.modules['gpurnn.commands.info'] = None; "
            "sys.argv = ['gpurnn', 'info']; runpy.run_module('gpurnn', run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1, r.stderr
    assert "gpurnn.commands.info failed to import: ModuleNotFoundError" in r.stderr
    assert "Traceback" not in r.stderr
