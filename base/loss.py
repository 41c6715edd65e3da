"""The output head and its cross-entropy, without ever holding float32 logits for the whole batch.

`linear_cross_entropy(x, weight, targets)` is the mean over labelled rows (targets != -100) of
`cross_entropy(x @ weight.T, targets)`. The 70M model's head is 448 x 100,352: one micro-batch of
16 x 1024 positions would need 6.6 GB of float32 logits, and as much again for their gradient.

Both training paths run the head in chunks of rows and form d(loss)/d(logits) = (softmax -
onehot) / n inside the forward, reducing it at once into the gradients of `x` and `weight`. That
needs neither the logits kept for backward (what autograd would do) nor a second head matmul to
recompute them (activation checkpointing): the FLOPs of the unchunked head, one chunk alive.
Which path runs is the tensors' choice, not the user's:

- CPU, eager: `_CpuLinearCrossEntropy`, tuned for caches and page faults: two chunk-sized buffers
  reused by every chunk (`out=` variants), one softmax pass giving both the loss and the gradient,
  and the rare row whose target probability underflows looked at again from its logits.
- CUDA, or anything under `torch.compile`: `_SyncFreeLinearCrossEntropy`, plain out-of-place ops
  with no host synchronisation and no `out=` buffers, so torch.compile traces it whole (no graph
  break) and fuses each chunk's softmax, loss and gradient into a few kernels, and the GPU never
  waits for the Python loop.

Without gradients both use a plain chunked `F.cross_entropy`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

# Rows per chunk. On a CPU the chunk's float32 logits should stay near CPU_CHUNK_BYTES, whatever
# the vocabulary: a 6 x 128 model's train step on 2 cores ran at 1,896 / 2,390 / 2,284 tokens/s
# with 512 / 256 / 128-row chunks over 40,945 ids (AVX2), 2,585 / 2,735 / 2,782 (AVX-512), and
# over 100,352 ids the head took 185 / 192 / 177 ms per 512 positions at 128 / 512 / 1024 rows.
# Under bf16 autocast every chunk also makes a vocab x n_embd temporary for the weight gradient
# (a bf16 product cannot be accumulated into the float32 gradient in place), a cost per chunk
# whatever its rows, so the chunks are LOW_PRECISION_CHUNK_FACTOR times larger: the 70M model's
# step ran at 311 / 401 / 424 / 431 tokens/s with 128 / 256 / 512 / 2048-row chunks (AMX Xeon);
# in float32 at 330 / 339 / 335 with 128 / 512 / 1024.
# On a GPU a chunk is a matrix product of its own and larger ones keep the tensor cores busy;
# 2048 rows x 100,352 is 0.4 GB of bf16 logits (0.8 GB in flight with the gradient), so a
# 16 x 1024 micro-batch of the 70M model is 8 chunks.
CPU_CHUNK_BYTES = 40 << 20
LOW_PRECISION_CHUNK_FACTOR = 4
GPU_CHUNK_ROWS = 2048


def cpu_chunk_rows(vocab: int, head_dtype: torch.dtype = torch.float32) -> int:
    """The power of two nearest to CPU_CHUNK_BYTES of float32 logits per chunk (times
    LOW_PRECISION_CHUNK_FACTOR when the head runs below float32), in [64, 4096]."""
    rows = CPU_CHUNK_BYTES / (4 * vocab)
    if head_dtype.itemsize < 4:
        rows *= LOW_PRECISION_CHUNK_FACTOR
    return 1 << min(12, max(6, round(math.log2(rows))))


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_rows: int | None = None) -> torch.Tensor:
    """mean over targets != -100 of cross_entropy(x @ weight.T, targets); 0 when no row is labelled.

    x (N, C), weight (V, C), targets (N,). Under autocast the head runs in the autocast dtype, as
    autograd's matmul would; the loss and the softmax are always float32. `chunk_rows` overrides
    the device's chunk size (tests use it to cross chunk boundaries)."""
    on_cpu_eager = x.device.type == "cpu" and not torch.compiler.is_compiling()
    rows = chunk_rows or (cpu_chunk_rows(weight.shape[0], _head_dtype(x)) if on_cpu_eager else GPU_CHUNK_ROWS)
    if not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return _chunked_loss_without_grad(x, weight, targets, rows)
    if on_cpu_eager:
        return _CpuLinearCrossEntropy.apply(x, weight, targets, rows)
    return _SyncFreeLinearCrossEntropy.apply(x, weight, targets, rows)


def _head_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmuls run in: autocast's when it is on. The casts are explicit
    because autograd Functions and out= variants are outside autocast's reach."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _chunked_loss_without_grad(x, weight, targets, rows):
    head = weight.to(_head_dtype(x))
    total = x.new_zeros((), dtype=torch.float32)
    for start in range(0, x.shape[0], rows):
        logits = x[start : start + rows].to(head.dtype) @ head.T
        total += F.cross_entropy(logits.float(), targets[start : start + rows], ignore_index=IGNORE_INDEX,
                                 reduction="sum")
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)


class _SyncFreeLinearCrossEntropy(torch.autograd.Function):
    """The GPU and torch.compile path: every chunk is a fixed sequence of tensor ops.

    The loss of a row is logsumexp(logits) - logit[target], exact however small the target's
    probability; the gradient is exp(logits - logsumexp) minus one at the target, times the row's
    weight (1/n, or 0 without a label), cast to the head dtype for the two gradient matmuls."""

    @staticmethod
    def forward(ctx, x, weight, targets, rows):
        head = weight.to(_head_dtype(x))
        acc_dtype = torch.promote_types(head.dtype, torch.float32)
        labelled = targets != IGNORE_INDEX
        row_weight = labelled.to(acc_dtype) / labelled.sum().clamp(min=1)
        safe_targets = targets.clamp(min=0)[:, None]
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight, dtype=acc_dtype) if ctx.needs_input_grad[1] else None
        minus_one = x.new_full((rows, 1), -1.0, dtype=acc_dtype)
        loss = x.new_zeros((), dtype=acc_dtype)
        for start in range(0, x.shape[0], rows):
            xs = x[start : start + rows].to(head.dtype)
            weights, ts = row_weight[start : start + rows, None], safe_targets[start : start + rows]
            logits = (xs @ head.T).to(acc_dtype)
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)
            loss = loss + ((lse - logits.gather(1, ts)) * weights).sum()
            # In place on the float32 logits this chunk owns: eager GPU code keeps one chunk-sized
            # float32 tensor alive, not four; torch.compile fuses the chain either way.
            grad = logits.sub_(lse).exp_().scatter_add_(1, ts, minus_one[: len(ts)]).mul_(weights).to(head.dtype)
            if grad_x is not None:
                grad_x[start : start + rows] = grad @ head
            if grad_w is not None:
                grad_w += grad.T @ xs
        ctx.save_for_backward(grad_x, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        return _scaled_gradients(ctx, grad_output)


class _CpuLinearCrossEntropy(torch.autograd.Function):
    """The CPU path: two chunk x vocab buffers reused by every chunk (a fresh 200 MB tensor per
    chunk costs its page faults again, about a fifth of the head's time), and one softmax pass
    that is both the loss (-log p at the target) and most of the gradient (p minus one at the
    target); log_softmax then exp would be two passes."""

    @staticmethod
    def forward(ctx, x, weight, targets, rows):
        n_labelled = (targets != IGNORE_INDEX).sum().clamp(min=1)
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        acc_dtype = torch.promote_types(x.dtype, torch.float32)
        grad_w = torch.zeros_like(weight, dtype=acc_dtype) if ctx.needs_input_grad[1] else None
        total = x.new_zeros((), dtype=acc_dtype)
        compute_dtype = _head_dtype(x)
        head = weight.to(compute_dtype)
        buffer_rows = min(rows, x.shape[0])
        logits_buffer = x.new_empty((buffer_rows, weight.shape[0]), dtype=compute_dtype)
        probs_buffer = x.new_empty((buffer_rows, weight.shape[0]), dtype=acc_dtype)
        for start in range(0, x.shape[0], rows):
            xs, ts = x[start : start + rows], targets[start : start + rows]
            labelled = ts != IGNORE_INDEX
            safe_ts = ts.clamp(min=0)[:, None]
            logits = torch.mm(xs.to(compute_dtype), head.T, out=logits_buffer[: len(xs)])
            probs = torch.ops.aten.softmax.int_out(logits, -1, acc_dtype, out=probs_buffer[: len(xs)])
            target_nll = -probs.gather(1, safe_ts).squeeze(1).log()
            # A probability that underflowed (a logit ~100 below the row's largest) has no
            # logarithm left to take; those rare rows get theirs from the logits.
            lost = labelled & ~torch.isfinite(target_nll)
            if lost.any():
                lost_logits = logits[lost].to(acc_dtype)
                exact = torch.logsumexp(lost_logits, dim=-1) - lost_logits.gather(1, safe_ts[lost]).squeeze(1)
                target_nll = target_nll.masked_scatter(lost, exact)
            total += torch.where(labelled, target_nll, 0.0).sum()
            # The per-row weight (1/n, or 0 without a label) scales the small matrices, not the logits.
            grad = probs.scatter_add_(1, safe_ts, -torch.ones_like(probs[:, :1])).to(compute_dtype)
            row_weight = (labelled.to(acc_dtype) / n_labelled)[:, None]
            if grad_x is not None:
                grad_x[start : start + rows] = (grad @ head) * row_weight
            if grad_w is not None:
                scaled_x = (xs * row_weight.to(xs.dtype)).to(compute_dtype)
                if grad.dtype == grad_w.dtype:
                    grad_w.addmm_(grad.T, scaled_x)  # no chunk-sized temporary in fp32
                else:
                    grad_w += grad.T @ scaled_x
        ctx.save_for_backward(grad_x, grad_w)
        ctx.weight_dtype = weight.dtype
        return total / n_labelled

    @staticmethod
    def backward(ctx, grad_output):
        return _scaled_gradients(ctx, grad_output)


def _scaled_gradients(ctx, grad_output):
    """The gradients formed in the forward, times the upstream gradient of the loss."""
    grad_x, grad_w = ctx.saved_tensors
    grad_x = grad_x * grad_output if grad_x is not None else None
    grad_w = (grad_w * grad_output).to(ctx.weight_dtype) if grad_w is not None else None
    return grad_x, grad_w, None, None
