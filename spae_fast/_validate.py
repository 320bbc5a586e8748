"""Argument checks shared by every op: each failure names the argument and what was expected."""

from __future__ import annotations

import torch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
METRICS = ("l2", "ip", "cosine")
# The limits every backend shares; why each: `spae_fast.ops.boundary`.
MAX_DIM = 65536
MAX_ROWS = 2**31 - 2**16
MAX_QUERIES = 2**31 - 2**16


def floating_tensor(value: object, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} must be float32, bfloat16 or float16, got {value.dtype}"
            + (" (convert with .float())" if value.dtype == torch.float64 else "")
        )
    return value


def codebook_weight(weight: object, name: str = "codebook") -> torch.Tensor:
    weight = floating_tensor(weight, name)
    if weight.dim() != 2:
        raise ValueError(f"{name} must be 2-D [V, D], got shape {tuple(weight.shape)}")
    if weight.shape[0] < 1:
        raise ValueError(f"{name} is empty: it needs at least one row, got shape {tuple(weight.shape)}")
    if weight.shape[1] < 1:
        raise ValueError(f"{name} rows must have at least one dimension, got shape {tuple(weight.shape)}")
    if weight.shape[1] > MAX_DIM:
        raise ValueError(f"{name} rows have D = {weight.shape[1]}; spae_fast supports D <= {MAX_DIM}")
    if weight.shape[0] > MAX_ROWS:
        raise ValueError(f"{name} has {weight.shape[0]} rows; spae_fast supports at most {MAX_ROWS}")
    return weight


def metric(value: object) -> str:
    if value not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {value!r}")
    return value  # type: ignore[return-value]


def queries(x: object, dim: int, device: torch.device, name: str = "x") -> torch.Tensor:
    x = floating_tensor(x, name)
    if x.dim() < 1:
        raise ValueError(f"{name} must have shape [..., D] with D = {dim}, got a 0-d tensor")
    if x.shape[-1] != dim:
        raise ValueError(f"{name} has last dimension {x.shape[-1]}, but the codebook rows have D = {dim}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but the codebook is on {device}; move both to one device")
    if x.numel() // dim > MAX_QUERIES:
        raise ValueError(f"{name} holds {x.numel() // dim} vectors; at most {MAX_QUERIES} per call")
    return x


def flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def k_value(k: object, num_rows: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= num_rows:
        raise ValueError(f"k must be in [1, V] = [1, {num_rows}], got {k}")
    return k


def latent(z: object, dim: int, device: torch.device, grid: int | None = None, name: str = "z") -> torch.Tensor:
    """A latent grid ``[B, D, g, g]`` whose channel dimension matches the codebook's D."""
    z = floating_tensor(z, name)
    if z.dim() != 4:
        raise ValueError(f"{name} must be 4-D [B, D, h, w] (a latent grid), got shape {tuple(z.shape)}")
    if z.shape[1] != dim:
        raise ValueError(
            f"{name} has {z.shape[1]} channels (shape {tuple(z.shape)}), but the codebook rows have D = {dim}; "
            "the encoder's last layer must output the codebook's embedding dimension"
        )
    if z.shape[2] != z.shape[3]:
        raise ValueError(f"{name} must be a square grid [B, D, g, g], got h = {z.shape[2]}, w = {z.shape[3]}")
    if grid is not None and z.shape[2] != grid:
        raise ValueError(f"{name} has a {z.shape[2]} x {z.shape[3]} grid, but the pyramid's grid is {grid}")
    if z.device != device:
        raise ValueError(f"{name} is on {z.device} but the codebook is on {device}; move both to one device")
    return z
