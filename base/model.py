"""The CodeGPT model: a GPT-2 style decoder, as in the seed (CodeGPT-70M).

Learned positions, pre-LayerNorm blocks, fused QKV projection, GELU MLP 4x, token embedding tied
to the output head, attention through `F.scaled_dot_product_attention`. Parameter names follow
GPT-2 / nanoGPT so their checkpoints load (see `base/checkpoint.py`).

Three things differ from nanoGPT's model.py:
- with targets, the head and the loss run together in `base/loss.py`, which never holds float32
  logits for the whole batch; the model hands it the head's operands (`Head.operands`);
- rows may pack several examples (`segments`): attention and positions stay inside each one;
- inference continues from a KV cache (`GPT.cached_hidden_states`): each attention layer hands
  its new keys and values to its layer's cache, which stores them and returns those to attend
  to. The caches live in `base/slots.py`: rows of one cache, each with its own length, and a
  decoding step with fixed shapes that a GPU replays as a CUDA graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from codegpt.base.errors import InvalidValue
from codegpt.base.loss import IGNORE_INDEX, linear_cross_entropy


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
    # How many ids the softmax covers when it is trained over the ids its data holds (the
    # `active_ids` buffer, set by `data.vocab_subset`); None: all vocab_size ids.
    active_vocab: int | None = None
    # Trained on fill-in-the-middle examples (data.fim_rate > 0, or an SFT task in FIM form):
    # what the <|fim_*|> tokens mean is known to it. Set by training, read by infilling.
    fim: bool = False

    def validate(self) -> None:
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise InvalidValue(name, f"must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise InvalidValue("n_embd", f"{self.n_embd} is not divisible by n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise InvalidValue("dropout", f"must be in [0, 1), got {self.dropout}")
        if self.active_vocab is not None and not 0 < self.active_vocab <= self.vocab_size:
            raise InvalidValue("active_vocab", f"must be in [1, vocab_size={self.vocab_size}], got {self.active_vocab}")


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, cache=None):
        """`mask` (B, 1, T, keys), True = attend; None = causal. With `cache` (an object whose
        `update(k, v)` stores this step's keys and values and returns the keys and values to
        attend to), decoding continues from the earlier ones."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.update(k, v)
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None)
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

    def forward(self, x, mask=None, cache=None):
        x = x + self.attn(self.ln_1(x), mask, cache)
        return x + self.mlp(self.ln_2(x))


class Head(nn.Linear):
    """The output projection. `operands(x)` is the pair (features, weight) whose product
    features @ weight.T is the logits, which the loss multiplies chunk by chunk; a replacement
    head (a LoRA adapter) provides its own pair."""

    def operands(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, self.weight


class GPT(nn.Module):
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
        self.lm_head = Head(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight
        # The ids the softmax covers, sorted, when it covers only those its training data holds.
        self.register_buffer("active_ids", torch.zeros(config.active_vocab or 0, dtype=torch.long),
                             persistent=config.active_vocab is not None)
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

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                segments: torch.Tensor | None = None) -> torch.Tensor:
        """With `targets` (B, T; -100 = no label): the mean cross-entropy over labelled positions.
        Without: the logits (B, T, vocab). `segments` (B, T) numbers the examples packed into each
        row: attention stays inside an example and positions restart at each one, so a packed row
        computes what separate rows would."""
        x = self.hidden_states(idx, segments)
        if targets is None:
            logits = self.lm_head(x)
            return logits if self.config.active_vocab is None else logits.masked_fill(self.inactive(), float("-inf"))
        features, weight = self.lm_head.operands(x.flatten(0, 1))
        targets = targets.flatten()
        if self.config.active_vocab is not None:
            # The softmax over the active ids only: a head with a fraction of the rows. A target
            # outside them (never in the pretraining data) cannot be learned and is not counted.
            index = torch.full((self.config.vocab_size,), IGNORE_INDEX, device=targets.device)
            index[self.active_ids] = torch.arange(len(self.active_ids), device=targets.device)
            weight, targets = weight[self.active_ids], torch.where(targets < 0, targets, index[targets.clamp(min=0)])
        return linear_cross_entropy(features, weight, targets)

    def inactive(self) -> torch.Tensor | None:
        """Bool (vocab_size,): the ids outside the softmax (never predicted), or None when all
        are inside."""
        if self.config.active_vocab is None:
            return None
        mask = torch.ones(self.config.vocab_size, dtype=torch.bool, device=self.active_ids.device)
        mask[self.active_ids] = False
        return mask

    def hidden_states(self, idx: torch.Tensor, segments: torch.Tensor | None = None) -> torch.Tensor:
        """Final-LayerNorm outputs (B, T, n_embd) of whole rows, plain or packed."""
        T = idx.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
        if segments is None:
            pos, mask = torch.arange(T, device=idx.device), None
        else:
            pos, mask = segment_positions_and_mask(segments)
        return self._blocks(idx, pos, mask, [None] * self.config.n_layer)

    def cached_hidden_states(self, idx: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None,
                             caches: list) -> torch.Tensor:
        """Final-LayerNorm outputs (B, T, n_embd) of `idx` at positions `pos`, continuing sequences
        whose keys and values `caches` (one per block; see base/slots.py) hold. `mask` (B, 1, T,
        keys), True = attend; None = causal over this call's tokens."""
        return self._blocks(idx, pos, mask, caches)

    def _blocks(self, idx, pos, mask, caches) -> torch.Tensor:
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block, cache in zip(self.transformer.h, caches):
            x = block(x, mask, cache)
        return self.transformer.ln_f(x)


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
