"""DistributedDataParallel wraps a model built from gpurnn.torch modules, unchanged: two real
processes (gloo over loopback), half the batch each, give after backward the gradients one
process gets for the mean loss over the full batch.

The file is also the worker: `python test_ddp.py RANK WORLD RENDEZVOUS OUT` (run by the test).

Robust on a loaded machine (CI once failed here under load, and it aborted now and then even
when quiet):
- rendezvous through a file (torch's FileStore), not a TCP port: a port found free and then
  released can be taken by anyone before the workers bind it, and rank 0 no longer hosts a
  TCPStore server thread;
- a worker leaves with os._exit(0) once its gradients are written and the process group is
  destroyed: torch's C++ teardown at interpreter exit intermittently aborted a worker that had
  finished its work ("terminate called without an active exception", exit -6, seen with torch
  2.13 CPU after destroy_process_group had returned);
- warnings are errors in the workers for gpurnn's own code (what this test answers for); a
  warning torch.distributed prints on a slow machine is shown in the log, not a failure;
- generous timeouts: they only bound a real hang.
"""
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from gpurnn.testing import TOL, rel_err

torch = pytest.importorskip("torch") if __name__ != "__main__" else __import__("torch")

WORLD = 2
T, B, I, H, SEED = 6, 6, 5, 7, 1234
TIMEOUT_S = 600            # a hang, not a slow start: torch's import alone can take a minute under load


def _build():
    import gpurnn.torch as gt

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = gt.LSTM(I, H, num_layers=2, bidirectional=True, batch_first=True,
                                dtype=torch.float64)
            self.gru = gt.GRU(2 * H, H, batch_first=True, dtype=torch.float64)
            self.head = torch.nn.Linear(H, 1, dtype=torch.float64)

        def forward(self, x, lengths):
            packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True,
                                                             enforce_sorted=False)
            out, _ = self.lstm(packed)
            out, _ = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=T)
            _, h_n = self.gru(out)
            return self.head(h_n[-1]).squeeze(1)

    torch.manual_seed(SEED)
    model = Model()
    g = torch.Generator().manual_seed(SEED + 1)
    x = torch.randn(B, T, I, dtype=torch.float64, generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    target = torch.randn(B, dtype=torch.float64, generator=g)
    return model, x, lengths, target


def _loss(model, x, lengths, target):
    return ((model(x, lengths) - target) ** 2).mean()


def _worker(rank, world, rendezvous, out):
    import datetime
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    warnings.filterwarnings("error", module=r"gpurnn(\.|$)")
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        model, x, lengths, target = _build()
        ddp = DistributedDataParallel(model)
        part = slice(rank * B // world, (rank + 1) * B // world)
        _loss(ddp, x[part], lengths[part], target[part]).backward()
        np.savez(out, **{k: p.grad.numpy() for k, p in model.named_parameters()})
        del ddp                 # the reducer holds the process group: let it go first
        dist.barrier()          # both ranks are done with every collective before teardown
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_match_one_process_on_full_batch(tmp_path):
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               OPENBLAS_NUM_THREADS="1")
    env.pop("PYTHONWARNINGS", None)       # the worker sets its own filter (see the docstring)
    rendezvous = f"file://{tmp_path / 'rendezvous'}"
    outs = [tmp_path / f"rank{r}.npz" for r in range(WORLD)]
    procs = [subprocess.Popen([sys.executable, __file__, str(r), str(WORLD), rendezvous, str(outs[r])],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(WORLD)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for p in procs:          # on a timeout, do not leave a worker waiting for its peer
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} exited with {p.returncode}:\n{log}"

    model, x, lengths, target = _build()
    _loss(model, x, lengths, target).backward()
    expected = {k: p.grad.numpy() for k, p in model.named_parameters()}
    for r, out in enumerate(outs):
        with np.load(out) as got:
            assert sorted(got.files) == sorted(expected)
            for k, g in expected.items():
                err = rel_err(got[k], g)
                assert err <= TOL["float64"], (f"rank {r}: grad of {k} differs from one process: "
                                               f"rel {err:.2e}")
    # halves of the batch really differ: without the all-reduce the ranks would disagree
    model.zero_grad()
    _loss(model, x[:B // 2], lengths[:B // 2], target[:B // 2]).backward()
    half = model.head.weight.grad.numpy()
    assert np.linalg.norm(half - expected["head.weight"]) > 1e-3 * np.linalg.norm(half)


if __name__ == "__main__":
    rank, world, rendezvous, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    _worker(rank, world, rendezvous, out)        # an exception here exits 1 with its traceback
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)                                  # skip torch's exit-time teardown (docstring)
