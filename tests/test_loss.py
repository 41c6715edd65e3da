"""The head's loss (base/loss.py): both paths against the naive loss, and the compiled train step
whole, with no graph break (what makes the GPU path fast is guarded on CPU)."""

import pytest
import torch
import torch.nn.functional as F

from codegpt.base import loss as loss_module
from codegpt.base.loss import linear_cross_entropy
from codegpt.base.model import GPT
from tests.helpers import tiny_config

PATHS = {"cpu": loss_module._CpuLinearCrossEntropy, "sync-free": loss_module._SyncFreeLinearCrossEntropy}


def path_loss(path, x, w, t, rows):
    return PATHS[path].apply(x, w, t, rows)


def naive(x, w, t):
    return F.cross_entropy((x @ w.T).float(), t, ignore_index=-100)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rows", [1, 7, 64, 10_000])
def test_loss_and_gradients_equal_the_naive_loss(path, rows):
    torch.manual_seed(0)
    x = torch.randn(96, 16, requires_grad=True)
    w = torch.randn(300, 16, requires_grad=True)
    t = torch.randint(0, 300, (96,))
    t[:11] = -100
    loss = path_loss(path, x, w, t, rows)
    loss.backward()
    x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    reference = naive(x_ref, w_ref, t)
    reference.backward()
    torch.testing.assert_close(loss, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(w.grad, w_ref.grad, atol=1e-6, rtol=1e-4)


def test_model_loss_and_gradients_equal_the_naive_loss():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    idx, targets = torch.randint(0, 512, (3, 32)), torch.randint(0, 512, (3, 32))
    targets[0, :11] = -100
    model(idx, targets).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    reference = F.cross_entropy(model(idx).flatten(0, 1), targets.flatten(), ignore_index=-100)
    reference.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_loss_without_grad_equals_with_grad():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    idx, targets = torch.randint(0, 512, (2, 32)), torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        no_grad = model(idx, targets)
    assert abs(no_grad.item() - model(idx, targets).item()) < 1e-6


@pytest.mark.parametrize("path", PATHS)
def test_all_labels_ignored_gives_zero_loss_and_zero_gradient(path):
    x = torch.randn(5, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    loss = path_loss(path, x, w, torch.full((5,), -100), 2)
    loss.backward()
    assert loss.item() == 0.0 and x.grad.abs().sum() == 0 and w.grad.abs().sum() == 0


@pytest.mark.parametrize("path", PATHS)
def test_loss_of_a_confidently_wrong_row_is_exact(path):
    # Logits hundreds apart: the target's probability underflows to 0 in fp32, and its loss
    # (hundreds of nats) must still come out exact, as must the gradients.
    torch.manual_seed(0)
    x = (torch.randn(6, 8) * 60).requires_grad_()
    w = torch.randn(11, 8).requires_grad_()
    t = torch.randint(0, 11, (6,))
    loss = path_loss(path, x, w, t, 4)
    loss.backward()
    x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    reference = naive(x_ref, w_ref, t)
    reference.backward()
    assert reference.item() > 100
    torch.testing.assert_close(loss, reference)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(w.grad, w_ref.grad)


@pytest.mark.parametrize("path", PATHS)
def test_loss_under_autocast_runs_the_head_in_the_autocast_dtype(path):
    torch.manual_seed(0)
    x = torch.randn(40, 16, requires_grad=True)
    w = torch.randn(1000, 16, requires_grad=True)
    t = torch.randint(0, 1000, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = path_loss(path, x, w, t, 16)
    loss.backward()
    assert x.grad.dtype == w.grad.dtype == torch.float32
    bf16_logits = (x.detach().bfloat16() @ w.detach().bfloat16().T).float()
    fp32_loss = F.cross_entropy(x.detach() @ w.detach().T, t)
    torch.testing.assert_close(loss, F.cross_entropy(bf16_logits, t), atol=1e-5, rtol=1e-5)
    assert abs(loss.item() - fp32_loss.item()) > 1e-4


@pytest.mark.parametrize("path", PATHS)
def test_backward_scales_with_upstream_gradient(path):
    torch.manual_seed(0)
    x = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 11, (6,))
    assert torch.autograd.gradcheck(lambda a, b: 3.0 * PATHS[path].apply(a, b, t, 4), (x, w))


def test_eager_cpu_takes_the_cpu_path_and_compiling_the_sync_free_one(monkeypatch):
    taken = []
    for name, cls in PATHS.items():
        monkeypatch.setattr(cls, "apply", lambda *args, name=name: taken.append(name))
    x, w, t = torch.randn(4, 8, requires_grad=True), torch.randn(11, 8), torch.randint(0, 11, (4,))
    linear_cross_entropy(x, w, t)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    linear_cross_entropy(x, w, t)
    assert taken == ["cpu", "sync-free"]


def test_compiled_train_step_has_no_graph_break_and_matches_eager():
    # fullgraph=True raises at the first graph break: the forward, the loss (plain and packed
    # rows) and the backward each compile as one graph, as they must to be fast on a GPU.
    torch.manual_seed(0)
    eager = GPT(tiny_config(dropout=0.0, n_layer=1))
    compiled_model = GPT(tiny_config(dropout=0.0, n_layer=1))
    compiled_model.load_state_dict(eager.state_dict())
    step = torch.compile(compiled_model, fullgraph=True)
    idx, targets = torch.randint(0, 512, (2, 32)), torch.randint(0, 512, (2, 32))
    targets[1, :5] = -100
    segments = torch.cat([torch.zeros(2, 12, dtype=torch.long), torch.ones(2, 20, dtype=torch.long)], dim=1)
    for kwargs in ({}, {"segments": segments}):
        for model in (eager, compiled_model):
            model.zero_grad()
        step(idx, targets, **kwargs).backward()
        reference = eager(idx, targets, **kwargs)
        reference.backward()
        for (name, p), q in zip(eager.named_parameters(), compiled_model.parameters()):
            torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_a_softmax_over_the_active_ids_equals_the_full_softmax_with_the_others_removed():
    torch.manual_seed(0)
    model = GPT(tiny_config(active_vocab=200))
    model.active_ids.copy_(torch.randperm(512)[:200].sort().values)
    idx = torch.randint(0, 512, (2, 32))
    targets = model.active_ids[torch.randint(0, 200, (2, 32))]
    targets[0, :3] = -100
    targets[1, 0] = int(model.inactive().nonzero()[0])  # never in the data: not counted
    loss = model(idx, targets)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(idx)  # the inactive ids at -inf
    assert torch.isinf(logits[..., model.inactive()]).all() and torch.isfinite(logits[..., model.active_ids]).all()
    kept = targets.clone()
    kept[1, 0] = -100
    reference = F.cross_entropy(logits.flatten(0, 1), kept.flatten(), ignore_index=-100)
    reference.backward()
    torch.testing.assert_close(loss, reference)
    for name, param in model.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_cpu_chunks_hold_about_40_mb_of_logits_and_grow_under_a_low_precision_head():
    from codegpt.base.loss import cpu_chunk_rows

    assert cpu_chunk_rows(100_352) == 128 and cpu_chunk_rows(40_945) == 256
    # Under bf16 each chunk costs a vocab x n_embd temporary whatever its rows: fewer, larger ones.
    assert cpu_chunk_rows(100_352, torch.bfloat16) == 4 * cpu_chunk_rows(100_352)
    assert cpu_chunk_rows(10, torch.bfloat16) == 4096 and cpu_chunk_rows(10**9) == 64
