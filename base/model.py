"""The CodeGPT model: a GPT-2 style decoder, as in the seed (CodeGPT-70M).

Learned positions, pre-LayerNorm blocks, fused QKV projection, GELU MLP 4x, token embedding tied
to the output head, attention through `F.scaled_dot_product_attention`. Parameter names follow
GPT-2 / nanoGPT so their checkpoints load (see `base/checkpoint.py`).

Two things differ from nanoGPT's model.py:
- the loss never holds float32 logits for the whole batch: the head and the cross-entropy run
  in chunks of positions, and the gradient of each chunk is formed right away (`chunked_cross_entropy`);
- inference can run with a preallocated KV cache (`KVCache`), including batches of prompts of
  different lengths (left-padded, with the padding masked out).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from base.config import InvalidValue

IGNORE_INDEX = -100


@dataclass
class GPTConfig:
    """The architecture. Defaults are the seed's 70M model (69,560,064 parameters)."""

    block_size: int = 1024
    vocab_size: int = 100_352  # cl100k_base (100,277 ids) padded to a multiple of 128
    n_layer: int = 10
    n_head: int = 8
    n_embd: int = 448
    dropout: float = 0.1
    bias: bool = True
    # GPT-2 and build-nanogpt use the tanh approximation; nanoGPT's model.py uses exact GELU.
    activation: Literal["gelu_tanh", "gelu"] = "gelu_tanh"

    def validate(self) -> None:
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise InvalidValue(name, f"must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise InvalidValue("n_embd", f"{self.n_embd} is not divisible by n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise InvalidValue("dropout", f"must be in [0, 1), got {self.dropout}")


class KVCache:
    """Keys and values of every layer for up to `max_len` positions, allocated once.

    `key_valid` marks real (non-padding) positions; prompts of different lengths are left-padded,
    so each row's tokens get positions counted from its first real token.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device, dtype):
        head_dim = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.key_valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.max_len = max_len
        self.length = 0
        self.padded = False

    def append(self, valid: torch.Tensor) -> tuple[int, int]:
        """Reserve the next `valid.shape[1]` positions; returns their (start, end)."""
        start, end = self.length, self.length + valid.shape[1]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} requested")
        self.key_valid[:, start:end] = valid
        self.padded = self.padded or not bool(valid.all())
        self.length = end
        return start, end

    def positions(self, start: int, end: int) -> torch.Tensor:
        """Position ids of the slots start..end: the count of real tokens before each."""
        counts = self.key_valid[:, :end].long().cumsum(1) - 1
        return counts[:, start:end].clamp(min=0)

    def attention_mask(self, start: int, end: int) -> torch.Tensor | None:
        """Boolean (B, 1, T, end) mask: causal and not padding. None when `is_causal` suffices."""
        if not self.padded and (start == 0 or end - start == 1):
            return None
        query_pos = torch.arange(start, end, device=self.key_valid.device)[:, None]
        key_pos = torch.arange(end, device=self.key_valid.device)[None, :]
        causal = key_pos <= query_pos
        mask = causal[None] & self.key_valid[:, None, :end]
        # A padding query sees no real key; let it see itself so softmax stays finite.
        mask |= (key_pos == query_pos)[None]
        return mask[:, None]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0, span=None, mask=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is None:
            dropout = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None)
        else:
            start, end = span
            cache.k[layer, :, :, start:end] = k
            cache.v[layer, :, :, start:end] = v
            k, v = cache.k[layer, :, :, :end], cache.v[layer, :, :, :end]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh" if config.activation == "gelu_tanh" else "none")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, layer=0, span=None, mask=None):
        x = x + self.attn(self.ln_1(x), cache, layer, span, mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    # Rows of the (positions x vocab) logits formed at once by the loss: 512 x 100,352 float32
    # logits are about 200 MB, two such buffers are alive. Larger chunks read the head matrix
    # fewer times; on a 2-core CPU the 128-wide head took 185, 192 and 177 ms per 512 positions
    # in chunks of 128, 512 and 1024 rows, so 512 costs little speed and half the memory of 1024.
    loss_chunk_size = 512

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled so the residual stream's variance does not grow with depth.
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters counted once (the tied head is the embedding). `non_embedding` leaves out
        the token and position embeddings, as scaling-law FLOP counts do."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wte.weight.numel() + self.transformer.wpe.weight.numel()
        return n

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None, valid: torch.Tensor | None = None,
                      segments: torch.Tensor | None = None):
        """Final-LayerNorm outputs (B, T, n_embd) for token ids `idx` (B, T). `segments` (B, T)
        numbers the examples packed into each row: attention stays inside an example and
        positions restart at each one, so a packed row computes what separate rows would."""
        B, T = idx.shape
        span = mask = None
        if cache is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
            pos = torch.arange(T, device=idx.device)
            if segments is not None:
                pos, mask = segment_positions_and_mask(segments)
        else:
            valid = torch.ones_like(idx, dtype=torch.bool) if valid is None else valid
            span = cache.append(valid)
            pos = cache.positions(*span)
            mask = cache.attention_mask(*span)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for layer, block in enumerate(self.transformer.h):
            x = block(x, cache, layer, span, mask)
        return self.transformer.ln_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None,
                valid: torch.Tensor | None = None, segments: torch.Tensor | None = None):
        """With `targets` (B, T; -100 = no label): the mean cross-entropy over labelled positions.
        Without: logits (B, T, vocab) of the positions fed, optionally through `cache`."""
        x = self.hidden_states(idx, cache, valid, segments)
        if targets is None:
            return self.lm_head(x)
        # A head that is not a plain linear layer (LoRA) says which (features, weight) it multiplies.
        head_operands = getattr(self.lm_head, "as_linear_operands", lambda h: (h, self.lm_head.weight))
        features, weight = head_operands(x.flatten(0, 1))
        return chunked_cross_entropy(features, weight, targets.flatten(), self.loss_chunk_size)

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        weight = self.transformer.wte.weight
        return KVCache(self.config, batch_size, max_len or self.config.block_size, weight.device, weight.dtype)


def segment_positions_and_mask(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions counted from each segment's start, and the (B, 1, T, T) causal mask that keeps
    attention inside a segment."""
    T = segments.shape[1]
    index = torch.arange(T, device=segments.device)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    first = torch.where(starts, index, 0).cummax(dim=1).values
    causal = index[None, :, None] >= index[None, None, :]
    same = segments[:, :, None] == segments[:, None, :]
    return index - first, (causal & same)[:, None]


def chunked_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """mean over targets != -100 of cross_entropy(x @ weight.T, targets), never holding more than
    `chunk_size` rows of logits. Equal to the naive loss; when labelled rows are none, 0."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _ChunkedLinearCrossEntropy.apply(x, weight, targets, chunk_size)
    acc_dtype = torch.promote_types(x.dtype, torch.float32)
    total = x.new_zeros((), dtype=acc_dtype)
    for start in range(0, x.shape[0], chunk_size):
        logits = (x[start : start + chunk_size] @ weight.T).to(acc_dtype)
        total += F.cross_entropy(logits, targets[start : start + chunk_size], ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Head matmul + cross-entropy whose gradient is formed chunk by chunk during the forward.

    Keeping the logits for backward (what autograd would do) costs N x V floats; recomputing
    them in backward (activation checkpointing) costs a third more head FLOPs. Forming
    d(loss)/d(logits) = (softmax - onehot) / n in the forward and reducing it right away into
    d/dx and d/dW needs neither: the same FLOPs as the unchunked head, one chunk of logits alive.
    """

    @staticmethod
    def forward(ctx, x, weight, targets, chunk_size):
        n_labelled = (targets != IGNORE_INDEX).sum().clamp(min=1)
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        acc_dtype = torch.promote_types(x.dtype, torch.float32)
        grad_w = torch.zeros_like(weight, dtype=acc_dtype) if ctx.needs_input_grad[1] else None
        total = x.new_zeros((), dtype=acc_dtype)
        # Under autocast the head runs in the autocast dtype, as autograd's matmul would; the
        # explicit casts are needed because autocast leaves out= variants alone.
        autocast = torch.is_autocast_enabled(x.device.type)
        compute_dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
        head = weight.to(compute_dtype)
        # Two chunk x vocab buffers reused by every chunk: a fresh 200 MB tensor per chunk costs
        # its page faults again on CPU, about a fifth of the head's time.
        rows = min(chunk_size, x.shape[0])
        logits_buffer = x.new_empty((rows, weight.shape[0]), dtype=compute_dtype)
        probs_buffer = x.new_empty((rows, weight.shape[0]), dtype=acc_dtype)
        for start in range(0, x.shape[0], chunk_size):
            xs, ts = x[start : start + chunk_size], targets[start : start + chunk_size]
            labelled = ts != IGNORE_INDEX
            safe_ts = ts.clamp(min=0)[:, None]
            logits = torch.mm(xs.to(compute_dtype), head.T, out=logits_buffer[: len(xs)])
            # One pass over chunk x vocab floats gives the probabilities, which are both the loss
            # (-log p at the target) and most of the gradient; log_softmax then exp would be two.
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
            # probs become d(row loss)/d(logits) in place: softmax minus one at the target. The
            # per-row weight (1/n, or 0 without a label) scales the small matrices, not the logits.
            grad = probs.scatter_add_(1, safe_ts, -torch.ones_like(probs[:, :1])).to(compute_dtype)
            row_weight = (labelled.to(acc_dtype) / n_labelled)[:, None]
            if grad_x is not None:
                grad_x[start : start + chunk_size] = (grad @ head) * row_weight
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
        grad_x, grad_w = ctx.saved_tensors
        grad_x = grad_x * grad_output if grad_x is not None else None
        grad_w = (grad_w * grad_output).to(ctx.weight_dtype) if grad_w is not None else None
        return grad_x, grad_w, None, None
