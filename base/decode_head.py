"""The head decoding multiplies by: the plain head, or a cheap ranking of the vocabulary followed
by exact logits for each row's best candidates.

A decoding step reads the whole head matrix: most of a small model's weight bytes (180 of 278 MB
for the 70M in fp32), and on a CPU decoding is bound by those bytes, for one row as for a batch
of 16 (`python -m bench.decode_batch` measures both heads at each batch size). A quantised copy
of the head ranks the vocabulary reading fewer of them; only each row's top `CANDIDATES` logits
are then recomputed from the fp32 rows, and the rest are -inf. Greedy decoding and top-k sampling with
k <= CANDIDATES only ever look at those, so they get the plain head's logits and tokens (unless a
quantisation error exceeded the gap between the k-th and the 128th logit). Which copy ranks is
decided at run time, from what this PyTorch build and CPU have:

- int8 (per-row scales), multiplied by the quantised engine PyTorch ships for x86 (fbgemm, with
  AVX2 or AVX-512 kernels): a quarter of the fp32 bytes;
- else bf16, on CPUs with AVX512-BF16 (elsewhere bf16 arithmetic is emulated and slower than fp32);
- else none: the plain head. So on GPUs, for LoRA heads, and for sampling from the whole
  vocabulary.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
import torch.nn.functional as F

from codegpt.base.model import GPT, Head

CANDIDATES = 128

Ranker = Callable[[torch.Tensor], torch.Tensor]


def has_fast_bf16(device: torch.device) -> bool:
    """True where a bf16 matrix-vector product runs at memory speed: CPUs with AVX512-BF16, with
    PyTorch's kernels allowed to use AVX-512 (ATEN_CPU_CAPABILITY=avx2 keeps them off it, and bf16
    is then emulated)."""
    return (device.type == "cpu" and getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
            and torch.backends.cpu.get_cpu_capability().startswith("AVX512"))


def has_int8_engine() -> bool:
    return any(engine in torch.backends.quantized.supported_engines for engine in ("x86", "fbgemm"))


def int8_ranker(weight: torch.Tensor) -> Ranker | None:
    """hidden (B, C) -> approximate logits (B, V) from an int8 copy of `weight`, or None where
    this PyTorch cannot build one."""
    try:
        # PyTorch marks its quantised tensors deprecated in favour of torchao; they still ship
        # fbgemm's int8 kernels, and the fallback below covers a build without them.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            w = weight.detach().float()
            scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).double()
            zero_points = torch.zeros(w.shape[0], dtype=torch.long)
            packed = torch.ops.quantized.linear_prepack(
                torch.quantize_per_channel(w, scales, zero_points, 0, torch.qint8), None)
    except (AttributeError, RuntimeError):
        return None
    return lambda hidden: torch.ops.quantized.linear_dynamic(hidden.float(), packed)


def bf16_ranker(weight: torch.Tensor) -> Ranker:
    half = weight.detach().to(torch.bfloat16)
    return lambda hidden: (hidden.to(torch.bfloat16) @ half.T).float()


def ranker_for(weight: torch.Tensor) -> Ranker | None:
    """The cheapest ranking copy of `weight` this machine multiplies fast, or None."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return None
    # Kept on the weight and rebuilt when it changes (its version counter moves): a server
    # quantises the head once, not once per request.
    cached = getattr(weight, "_decode_ranker", None)
    if cached is not None and cached[0] == weight._version:
        return cached[1]
    ranker = int8_ranker(weight) if has_int8_engine() else None
    if ranker is None and has_fast_bf16(weight.device):
        ranker = bf16_ranker(weight)
    weight._decode_ranker = (weight._version, ranker)
    return ranker


def top_indices(scores: torch.Tensor, k: int, block: int = 128) -> torch.Tensor:
    """The indices of each row's k largest scores (B, k), best first, as `topk` gives them, at
    half its cost on a vocabulary-sized row: each of the k largest lies in one of the k blocks
    of `block` scores with the largest maxima (a block outside them has k maxima above its own),
    so `topk` runs over the blocks' maxima and then over those k blocks alone."""
    rows, width = scores.shape
    if width % block or width < 4 * k * block:
        return scores.topk(k, dim=-1).indices
    grouped = scores.view(rows, width // block, block)
    blocks = grouped.amax(dim=-1).topk(k, dim=-1).indices
    within = grouped.gather(1, blocks[:, :, None].expand(rows, k, block)).view(rows, k * block).topk(k, dim=-1).indices
    return blocks.gather(1, within // block) * block + within % block


class RankedHead:
    """Next-token logits (B, V) from hidden states (B, C): each row's CANDIDATES best ids by the
    ranking copy get their exact logits, every other id -inf. `top` gives those candidates and
    logits alone, which is all greedy decoding needs."""

    def __init__(self, rank: Ranker, weight: torch.Tensor, banned: torch.Tensor):
        self.rank, self.weight, self.banned = rank, weight, banned
        # A vocabulary with fewer than CANDIDATES allowed ids ranks banned ones too: they are masked again.
        self.few_allowed = int((~banned).sum()) < CANDIDATES

    def _ranked(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        approx = self.rank(hidden).masked_fill_(self.banned, float("-inf"))
        candidates = top_indices(approx, min(CANDIDATES, approx.shape[1]))
        exact = torch.bmm(F.embedding(candidates, self.weight), hidden[:, :, None].to(self.weight.dtype))[..., 0]
        if self.few_allowed:
            exact.masked_fill_(self.banned[candidates], float("-inf"))
        return approx, candidates, exact

    def top(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, exact logits), each (B, CANDIDATES)."""
        _, candidates, exact = self._ranked(hidden)
        return candidates, exact

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        approx, candidates, exact = self._ranked(hidden)
        return approx.fill_(float("-inf")).scatter_(1, candidates, exact)  # the ranking's buffer, reused


def next_token_head(model: GPT, only_top: int | None, banned: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function from final hidden states (B, C) to next-token logits (B, V), `banned` ids at
    -inf. `only_top`: the most candidates the sampler looks at (1 for greedy, k for top-k, None
    for the whole vocabulary); within CANDIDATES, the rows are ranked by `ranker_for` (a
    `RankedHead`)."""

    def exact(hidden: torch.Tensor) -> torch.Tensor:
        return model.lm_head(hidden).masked_fill(banned, float("-inf"))

    if only_top is None or only_top > CANDIDATES or type(model.lm_head) is not Head:
        return exact
    rank = ranker_for(model.lm_head.weight)
    return exact if rank is None else RankedHead(rank, model.lm_head.weight, banned)
