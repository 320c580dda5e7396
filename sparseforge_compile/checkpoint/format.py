"""The compact N:M storage: each N:M weight as its kept values (N/M of the elements, same dtype) plus
packed in-group positions (ceil(log2 M) bits per kept value, a bit stream, LSB first).

For 2:4 that is 0.5625x the dense bytes in bf16 and 0.53125x in fp32. A pruned weight's zeros come
back as +0.0: the sign of a pruned zero is not stored (it never changes a product).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import CheckpointError
from ..masks import NMPattern

VALUES_SUFFIX = ".nm_values"
INDICES_SUFFIX = ".nm_indices"


def index_bits(m: int) -> int:
    """Bits per in-group position: ceil(log2(M)) (0 for M == 1, where the position is implied)."""
    return (int(m) - 1).bit_length()


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integers < 2**bits (bits <= 8) into a uint8 bit stream, LSB first.

    Value i occupies stream bits [i*bits, (i+1)*bits); the stream is padded with zeros to whole bytes,
    so the result has ceil(len * bits / 8) bytes (4 values per byte for 2-bit positions).
    """
    if not 0 <= bits <= 8:
        raise ValueError(f"pack_bits packs 0..8 bits per value, not {bits}")
    flat = values.reshape(-1)
    count = flat.numel()
    if bits == 0 or count == 0:
        return torch.zeros(0, dtype=torch.uint8, device=flat.device)
    if int(flat.max()) >= (1 << bits) or int(flat.min()) < 0:
        raise ValueError(f"values must lie in [0, {1 << bits}) to fit in {bits} bits")
    if 8 % bits == 0:  # whole values per byte (1, 2, 4, 8 bits): stay in uint8
        per = 8 // bits
        lanes = torch.nn.functional.pad(flat.to(torch.uint8), (0, -count % per)).reshape(-1, per)
        out = lanes[:, 0].clone()
        for k in range(1, per):
            out |= lanes[:, k] << (k * bits)
        return out
    # Eight values of `bits` bits fill exactly `bits` bytes: build each 8-value word, emit its bytes.
    octets = torch.nn.functional.pad(flat.to(torch.int64), (0, -count % 8)).reshape(-1, 8)
    word = octets[:, 0].clone()
    for k in range(1, 8):
        word |= octets[:, k] << (k * bits)
    out = torch.stack([(word >> (8 * i)) & 0xFF for i in range(bits)], dim=1).reshape(-1)
    return out[: (count * bits + 7) // 8].to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` values, as uint8."""
    expected = (count * bits + 7) // 8
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != expected:
        raise ValueError(f"packed indices: expected {expected} uint8 bytes for {count} values of {bits} bits, "
                         f"got {tuple(packed.shape)} {packed.dtype}")
    if bits == 0 or count == 0:
        return torch.zeros(count, dtype=torch.uint8, device=packed.device)
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        lanes = [(packed >> (k * bits)) & mask for k in range(8 // bits)]
        return torch.stack(lanes, dim=1).reshape(-1)[:count]
    groups = torch.nn.functional.pad(packed.to(torch.int64), (0, -packed.numel() % bits)).reshape(-1, bits)
    word = groups[:, 0].clone()
    for i in range(1, bits):
        word |= groups[:, i] << (8 * i)
    out = torch.stack([(word >> (k * bits)) & mask for k in range(8)], dim=1).reshape(-1)
    return out[:count].to(torch.uint8)


@dataclass(frozen=True)
class CompressedNM:
    """An N:M weight as kept values ``[rows, cols/M*N]`` and packed in-group positions."""

    values: torch.Tensor
    indices: torch.Tensor  # uint8 bit stream, see pack_bits
    shape: tuple[int, int]  # of the grouped (rows, cols) matrix, groups along cols
    pattern: NMPattern

    @property
    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size() + self.indices.numel()


def compress_nm(weight: torch.Tensor, pattern: NMPattern, name: str = "weight") -> CompressedNM:
    """Values and positions of an exact N:M matrix (groups of M along the last dim).

    Each group keeps its nonzeros plus, if it has fewer than N, its lowest-index zeros, so every group
    stores exactly N values. Raises if any group holds more than N nonzeros.
    """
    if weight.dim() != 2:
        raise CheckpointError(f"{name}: compact N:M storage needs a 2-D weight, got shape {tuple(weight.shape)}")
    if pattern.m > 256:
        raise CheckpointError(f"{name}: compact storage takes M <= 256 (8-bit positions), not {pattern}")
    rows, cols = weight.shape
    pattern.check_divides(cols, name)
    groups = weight.detach().reshape(-1, pattern.m)
    nonzero = groups != 0
    counts = nonzero.sum(dim=-1)
    violations = int((counts > pattern.n).sum())
    if violations:
        raise CheckpointError(
            f"{name} {tuple(weight.shape)}: {violations} groups of {pattern.m} hold more than {pattern.n} nonzeros, "
            f"so it is not {pattern} sparse; harden the model first or leave this layer out of `layers`")
    # A hardened group has exactly N nonzeros: keep those. Groups with fewer (zeros among the kept
    # weights) also keep their lowest-index zeros; they are few, so a sort over them is cheap.
    keep = nonzero.clone()
    short = (counts < pattern.n).nonzero().squeeze(1)
    if short.numel():
        order = torch.sort(nonzero[short].to(torch.int8), dim=-1, descending=True, stable=True).indices
        keep[short] = torch.zeros_like(nonzero[short]).scatter_(1, order[:, : pattern.n], True)
    # Row-major order of the kept entries is ascending position within each group.
    positions = keep.nonzero()[:, 1].to(torch.uint8)
    values = groups[keep].reshape(rows, cols // pattern.m * pattern.n)
    indices = pack_bits(positions, index_bits(pattern.m))
    return CompressedNM(values=values, indices=indices, shape=(rows, cols), pattern=pattern)


def decompress_nm(packed: CompressedNM, name: str = "weight") -> torch.Tensor:
    """The dense ``shape`` matrix of a :class:`CompressedNM`, zeros (+0.0) where pruned."""
    rows, cols = packed.shape
    n, m = packed.pattern.n, packed.pattern.m
    if cols % m or tuple(packed.values.shape) != (rows, cols // m * n):
        raise CheckpointError(f"{name}: values of shape {tuple(packed.values.shape)} do not match a {rows}x{cols} "
                              f"{packed.pattern} weight (expected {(rows, cols // m * n)})")
    try:
        positions = unpack_bits(packed.indices, index_bits(m), packed.values.numel()).reshape(-1, n).long()
    except ValueError as exc:
        raise CheckpointError(f"{name}: {exc}") from exc
    if n > 1 and bool((positions[:, 1:] <= positions[:, :-1]).any()) or bool((positions >= m).any()):
        raise CheckpointError(f"{name}: packed positions are not strictly increasing in-group indices below "
                              f"M={m}; the file is corrupt")
    groups = torch.zeros(rows * cols // m, m, dtype=packed.values.dtype, device=packed.values.device)
    groups.scatter_(1, positions, packed.values.reshape(-1, n))
    return groups.reshape(rows, cols)
