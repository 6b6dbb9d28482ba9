"""Packers: a dense weight with zeros in, a kernel's format out (and back, for checks).

BCSR RxC (see include/edgesparse/kernels.h): blocks of R output channels by C input columns,
Rx1 (R in 1, 2, 4, 8) or 1xC (C in 2, 4, 8, 16); only nonzero blocks are stored; 1x1 is plain CSR.
N:M: per output row, N kept weights in every M consecutive inputs, each with its uint8 position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgesparse.errors import EdgesparseError


@dataclass
class BCSR:
    values: torch.Tensor  # float32 [nnz_blocks * R * C]
    col_idx: torch.Tensor  # int32 [nnz_blocks], first column of each block
    row_ptr: torch.Tensor  # int32 [ceil(out / R) + 1]
    block_rows: int
    out_features: int
    in_features: int
    block_cols: int = 1

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.values, self.col_idx, self.row_ptr))


def pack_bcsr(weight: torch.Tensor, block_rows: int, block_cols: int = 1) -> BCSR:
    """Pack a [out, in] weight; any RxC block with a nonzero element is stored whole."""
    weight = weight.detach().float()
    out, inp = weight.shape
    if inp % block_cols:
        raise EdgesparseError(f"1x{block_cols} blocks need the input size to be a multiple of {block_cols} (got {inp})")
    blocks = -(-out // block_rows)
    padded = torch.zeros(blocks * block_rows, inp)
    padded[:out] = weight
    # [row block, column block, r, j]
    grouped = padded.reshape(blocks, block_rows, inp // block_cols, block_cols).permute(0, 2, 1, 3)
    nonzero = grouped.ne(0).any(dim=(2, 3))  # [row block, column block]
    rb, cb = nonzero.nonzero(as_tuple=True)  # row-major order: by row block, then column
    values = grouped[rb, cb].reshape(-1).contiguous()
    row_ptr = torch.zeros(blocks + 1, dtype=torch.int32)
    row_ptr[1:] = nonzero.sum(dim=1).cumsum(0)
    return BCSR(values, (cb * block_cols).to(torch.int32), row_ptr, block_rows, out, inp, block_cols)


@dataclass
class NM:
    values: torch.Tensor  # float32 [out, in / m * n]
    idx: torch.Tensor  # uint8, same shape: position inside the group of m
    n: int
    m: int
    out_features: int
    in_features: int

    @property
    def nbytes(self) -> int:
        return self.values.numel() * 4 + self.idx.numel()


def pack_nm(weight: torch.Tensor, n: int, m: int) -> NM:
    """Pack a [out, in] weight with at most n nonzeros in every m consecutive inputs of a row
    (groups with fewer keep some zeros, so every group holds exactly n)."""
    weight = weight.detach().float()
    out, inp = weight.shape
    if inp % m:
        raise EdgesparseError(f"N:M {n}:{m} needs the input size to be a multiple of {m} (got {inp})")
    groups = weight.reshape(out, inp // m, m)
    if groups.numel() and int(groups.ne(0).sum(dim=-1).max()) > n:
        raise EdgesparseError(f"weight is not {n}:{m} sparse: some group of {m} inputs has more than {n} nonzeros")
    # nonzeros first (stable: then the earliest zeros), the chosen n kept in increasing position
    order = torch.sort(groups.ne(0).float(), dim=-1, descending=True, stable=True).indices[..., :n]
    idx = torch.sort(order, dim=-1).values
    values = torch.gather(groups, -1, idx)
    return NM(values.reshape(out, -1).contiguous(), idx.reshape(out, -1).to(torch.uint8).contiguous(), n, m, out, inp)


def unpack_nm(values, idx, n: int, m: int, in_features: int, out_features: int) -> torch.Tensor:
    """The dense [out, in] weight (torch ops only, so it also traces for the eager op)."""
    dense = torch.zeros(out_features, in_features // m, m, dtype=values.dtype)
    dense.scatter_(-1, idx.long().reshape(out_features, -1, n), values.reshape(out_features, -1, n))
    return dense.reshape(out_features, in_features)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (int8 [out, in], float32 scales [out]); weight ~= q * scale."""
    weight = weight.detach().float()
    amax = weight.abs().amax(dim=1)
    scales = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    return torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8), scales


def pack_qs8_bcsr(weight: torch.Tensor, block_rows: int) -> tuple[BCSR, torch.Tensor]:
    """int8 BCSR Rx1 in groups of four blocks (the dot-product layout of kernels.h: each row
    block padded to a multiple of 4 blocks with zero blocks at its last column, then row r's four
    weights of a group stored together) and the per-output-channel scales."""
    q, scales = quantize_weight(weight)
    return group_qs8_bcsr(q, block_rows), scales


def group_qs8_bcsr(q: torch.Tensor, block_rows: int) -> BCSR:
    """An int8 weight [out, in] (already quantized) as int8 BCSR Rx1 in groups of four blocks."""
    packed = pack_bcsr(q.float(), block_rows)
    R = block_rows
    counts = (packed.row_ptr[1:] - packed.row_ptr[:-1]).long()
    padded = (counts + 3) // 4 * 4
    row_ptr = torch.zeros_like(packed.row_ptr)
    row_ptr[1:] = padded.cumsum(0)
    rb = torch.repeat_interleave(torch.arange(counts.numel()), padded)  # row block of each new slot
    pos = torch.arange(rb.numel()) - row_ptr[rb].long()
    real = pos < counts[rb]
    src = packed.row_ptr[rb].long() + torch.minimum(pos, counts[rb] - 1)  # padding repeats the last block
    blocks = torch.where(real[:, None], packed.values.reshape(-1, R)[src], 0.0)  # [slot, r]
    values = blocks.reshape(-1, 4, R).transpose(1, 2).reshape(-1).to(torch.int8).contiguous()
    return BCSR(values, packed.col_idx[src].contiguous(), row_ptr, R, packed.out_features, packed.in_features)


def ungroup_qs8(values: torch.Tensor, block_rows: int) -> torch.Tensor:
    """The grouped int8 values back in per-block order (values[k*R + r] for block k)."""
    return values.reshape(-1, block_rows, 4).transpose(1, 2).reshape(-1)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row dynamic symmetric int8, the same float32 arithmetic as es_qs8_quantize_rows:
    (xq as float holding integers, scale [..., 1])."""
    amax = x.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    return torch.round(x * (1.0 / scale)).clamp(-127, 127), scale


def unpack_bcsr(values, col_idx, row_ptr, block_rows: int, in_features: int, out_features: int,
                block_cols: int = 1) -> torch.Tensor:
    """The dense [out, in] weight (torch ops only, so it also traces for the eager op)."""
    blocks = row_ptr.numel() - 1
    counts = (row_ptr[1:] - row_ptr[:-1]).long()
    rb = torch.repeat_interleave(torch.arange(blocks), counts)
    shape = (rb.numel(), block_rows, block_cols)
    rows = (rb[:, None, None] * block_rows + torch.arange(block_rows)[None, :, None]).expand(shape)
    cols = (col_idx.long()[:, None, None] + torch.arange(block_cols)[None, None, :]).expand(shape)
    dense = torch.zeros(blocks * block_rows, in_features, dtype=values.dtype)
    # accumulate: the int8 layout's padding blocks (zeros) may repeat a real block's position
    dense.index_put_((rows, cols), values.reshape(shape), accumulate=True)
    return dense[:out_features]
