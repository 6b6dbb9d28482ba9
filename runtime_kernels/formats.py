"""Packers: a dense weight with zeros in, a kernel's format out (and back, for checks).

BCSR Rx1 (see include/edgesparse/kernels.h): row blocks of R output channels; each nonzero block
is R values sharing one input column. R = 1 is plain CSR.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class BCSR:
    values: torch.Tensor  # float32 [nnz_blocks * R]
    col_idx: torch.Tensor  # int32 [nnz_blocks]
    row_ptr: torch.Tensor  # int32 [ceil(out / R) + 1]
    block_rows: int
    out_features: int
    in_features: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.values, self.col_idx, self.row_ptr))


def pack_bcsr(weight: torch.Tensor, block_rows: int) -> BCSR:
    """Pack a [out, in] weight; any R-row block with a nonzero element is stored whole."""
    weight = weight.detach().float()
    out, inp = weight.shape
    blocks = -(-out // block_rows)
    padded = torch.zeros(blocks * block_rows, inp)
    padded[:out] = weight
    grouped = padded.reshape(blocks, block_rows, inp)  # [row block, r, column]
    nonzero = grouped.ne(0).any(dim=1)  # [row block, column]
    rb, col = nonzero.nonzero(as_tuple=True)  # row-major order: by row block, then column
    values = grouped[rb, :, col].reshape(-1).contiguous()
    counts = nonzero.sum(dim=1)
    row_ptr = torch.zeros(blocks + 1, dtype=torch.int32)
    row_ptr[1:] = counts.cumsum(0)
    return BCSR(values, col.to(torch.int32), row_ptr, block_rows, out, inp)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (int8 [out, in], float32 scales [out]); weight ~= q * scale."""
    weight = weight.detach().float()
    amax = weight.abs().amax(dim=1)
    scales = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    return torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8), scales


def pack_qs8_bcsr(weight: torch.Tensor, block_rows: int) -> tuple[BCSR, torch.Tensor]:
    """int8 BCSR Rx1 (int8 values) and the per-output-channel scales."""
    q, scales = quantize_weight(weight)
    packed = pack_bcsr(q.float(), block_rows)
    packed.values = packed.values.to(torch.int8)
    return packed, scales


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row dynamic symmetric int8, the same float32 arithmetic as es_qs8_quantize_rows:
    (xq as float holding integers, scale [..., 1])."""
    amax = x.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    return torch.round(x * (1.0 / scale)).clamp(-127, 127), scale


def unpack_bcsr(values, col_idx, row_ptr, block_rows: int, in_features: int, out_features: int) -> torch.Tensor:
    """The dense [out, in] weight (torch ops only, so it also traces for the eager op)."""
    blocks = row_ptr.numel() - 1
    counts = (row_ptr[1:] - row_ptr[:-1]).long()
    rb = torch.repeat_interleave(torch.arange(blocks), counts)
    rows = rb[:, None] * block_rows + torch.arange(block_rows)[None, :]
    dense = torch.zeros(blocks * block_rows, in_features, dtype=values.dtype)
    dense[rows, col_idx.long()[:, None].expand_as(rows)] = values.reshape(-1, block_rows)
    return dense[:out_features]
