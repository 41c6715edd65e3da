"""Linear layers with weights prepacked for MKL, for decoding several rows at once on a CPU.

A decoding step over a few rows multiplies a (rows, n_embd) activation by every weight of the
blocks. At one row MKL takes a matrix-vector path; at a few rows its GEMM first copies the whole
weight into its blocked layout, on every call. On an AVX2 CPU that copy costs as much as the
product: the blocks' 40 products of the 70M model at 8 rows took 8.9 ms against 2.2 ms at one row
(this repository's Xeon capped to AVX2). `torch.ops.mkl._mkl_reorder_linear_weight` does the copy
once (for a given row count, the path inductor takes for frozen CPU graphs); the same 8 rows then
took 4.9 ms.

`PackedLinears` holds those copies and, while active (a `TorchFunctionMode`), routes each
`F.linear` over one of the packed weights (from `nn.Linear` or a LoRA layer alike) to them. A
weight changed in place (trained, a LoRA merged) or given new storage is packed again before its
next use. `packed_linears` makes one only where it is measured faster here, at run time: CPUs
differ.
"""

from __future__ import annotations

import contextlib
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode


def available(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkl.is_available()


def body_weights(model: nn.Module) -> list[torch.Tensor]:
    """The matrices of the blocks' linear layers, plain or with LoRA (not the head: the decoding
    head has its own path)."""
    found = {id(module.weight): module.weight for module in model.transformer.h.modules()
             if isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2}
    return list(found.values())


class PackedLinears(TorchFunctionMode):
    """`F.linear` over `weights` through copies packed for inputs of `rows` rows. Given fewer
    rows, MKL's packed product is slower than for `rows` itself: callers with at least
    `min_rows` rows (3/4 of them) pad to `rows`; with fewer they take the usual path (`serves`)."""

    def __init__(self, weights: list[torch.Tensor], rows: int):
        super().__init__()
        self.weights, self.rows, self.min_rows = weights, rows, rows - rows // 4
        self.packed: dict[int, torch.Tensor] = {}
        self.versions: dict[int, tuple[int, int]] = {}
        self.refresh()

    def serves(self, rows: int) -> bool:
        return rows >= self.min_rows

    def refresh(self) -> None:
        """Pack again the weights changed in place (or given new storage) since they were packed."""
        for weight in self.weights:
            state = (weight._version, weight.data_ptr())
            if self.versions.get(id(weight)) != state:
                if available(weight):
                    self.packed[id(weight)] = torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), self.rows)
                else:  # moved off fp32 on a CPU: the usual path
                    self.packed.pop(id(weight), None)
                self.versions[id(weight)] = state

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            packed = self.packed.get(id(args[1]))
            if packed is not None:
                bias = args[2] if len(args) > 2 else kwargs.get("bias")
                return torch.ops.mkl._mkl_linear(args[0], packed, args[1], bias, self.rows)
        return func(*args, **kwargs)


def packed_linears(model: nn.Module, rows: int, measure: bool = True, repeats: int = 7) -> PackedLinears | None:
    """Packed copies of `model`'s block weights for `rows` rows where MKL can serve them (CPU,
    fp32, more than one row) and, with `measure`, their products at that many rows beat the usual
    path by a tenth here (both timed, interleaved, median of `repeats`); else None."""
    weights = body_weights(model)
    if rows < 2 or not weights or not all(available(w) for w in weights):
        return None
    packed = PackedLinears(weights, rows)
    if not measure:
        return packed
    inputs = {w.shape[1]: torch.randn(rows, 1, w.shape[1]) for w in weights}

    def products():
        for weight in weights:
            F.linear(inputs[weight.shape[1]], weight)

    timings: dict[bool, list[float]] = {False: [], True: []}
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first round allocates
            for prepacked in (False, True):
                started = time.perf_counter()
                with packed if prepacked else contextlib.nullcontext():
                    products()
                timings[prepacked].append(time.perf_counter() - started)
    usual, prepacked = (statistics.median(timings[k][1:]) for k in (False, True))
    return packed if prepacked < 0.9 * usual else None
