"""torch.compile(fullgraph=True) on models using gpurnn.torch modules (CPU, torch 2.13): the
stack is the custom operator torch.ops.gpurnn.stack_forward with a fake implementation and a
registered backward, so Dynamo traces it without a graph break, and the compiled model gives
eager's losses and gradients. torch.nn.LSTM cannot do this: Dynamo refuses RNN modules."""
import pytest

torch = pytest.importorskip("torch")
from torch.library import opcheck  # noqa: E402

import gpurnn.torch as gt  # noqa: E402

I, H, C = 5, 7, 3
# inductor's own code generation imports a deprecated torch.jit API (torch 2.13's warning, not ours)
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")


class CharModel(torch.nn.Module):
    def __init__(self, dropout=0.0):
        super().__init__()
        self.rnn = gt.LSTM(I, H, num_layers=2, dropout=dropout, batch_first=True,
                           dtype=torch.float64, backend="numpy")
        self.head = torch.nn.Linear(H, C, dtype=torch.float64)

    def forward(self, x, target):
        y, (h_n, c_n) = self.rnn(x)
        logits = self.head(y)
        return torch.nn.functional.cross_entropy(logits.reshape(-1, C), target.reshape(-1)) \
            + 0.1 * (h_n.pow(2).mean() + c_n.pow(2).mean())


def _loss_and_grads(model, fn, x, target):
    model.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    loss = fn(x, target)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]


def test_two_layer_lstm_model_compiles_fullgraph_with_eager_losses_and_gradients():
    torch.manual_seed(0)
    model = CharModel()
    x = torch.randn(3, 4, I, dtype=torch.float64)
    target = torch.randint(0, C, (3, 4))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)   # a graph break would raise here
    for step in range(2):                             # the second call reuses the graph
        x_step = x + step
        loss_e, grads_e = _loss_and_grads(model, model, x_step, target)
        loss_c, grads_c = _loss_and_grads(model, compiled, x_step, target)
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-12, atol=0)
        for ge, gc in zip(grads_e, grads_c):
            torch.testing.assert_close(gc, ge, rtol=1e-10, atol=1e-12)


def test_compiled_dropout_model_trains_and_evaluates_like_eager():
    torch.manual_seed(1)
    model = CharModel(dropout=0.3)
    x = torch.randn(2, 5, I, dtype=torch.float64)
    target = torch.randint(0, C, (2, 5))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    loss, grads = _loss_and_grads(model, compiled, x, target)   # training: masks drawn in graph
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, target), model(x, target), rtol=1e-12, atol=0)


def test_torch_nn_lstm_cannot_compile_fullgraph():
    # why the custom op matters: torch.nn's RNN modules are a graph break in Dynamo
    torch._dynamo.reset()
    with pytest.raises(Exception, match="(?i)RNN, GRU, or LSTM"):
        torch.compile(torch.nn.LSTM(I, H), fullgraph=True)(torch.randn(3, 2, I))


@pytest.mark.parametrize("cell,states", [("lstm", 2), ("gru", 1), ("rnn_relu", 1)])
@pytest.mark.parametrize("keep", [True, False], ids=["train", "infer"])
def test_opcheck_stack_forward(cell, states, keep):
    """torch.library.opcheck: schema, fake (meta) shapes against the real op, autograd
    registration, AOT dispatch with static and dynamic shapes."""
    torch.manual_seed(2)
    m = {"lstm": gt.LSTM, "gru": gt.GRU, "rnn_relu": gt.RNN}[cell](
        I, H, num_layers=2, bidirectional=True, dtype=torch.float64,
        **({"nonlinearity": "relu"} if cell == "rnn_relu" else {}))
    # an inference forward keeps nothing for backward (so nothing may require a gradient)
    x = torch.randn(4, 3, I, dtype=torch.float64, requires_grad=keep)
    h0 = torch.randn(4, 3, H, dtype=torch.float64, requires_grad=keep)
    c0 = torch.randn(4, 3, H, dtype=torch.float64) if states == 2 else None
    masks = [torch.ones(4, 3, 2 * H, dtype=torch.float64) * 1.25]
    weights = [p if keep else p.detach() for p in m.parameters()]
    args = (x, h0, c0, torch.tensor([4, 1, 3]), weights, masks, [], "", cell, I, H, 2, True,
            True, "cpu", keep)
    opcheck(torch.ops.gpurnn.stack_forward.default, args)
