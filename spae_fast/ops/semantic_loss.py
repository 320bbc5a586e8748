"""SPAE's semantic-guidance loss (SPAE-METHOD.md §4): op ``spae_fast::semantic_loss`` and its public functions
`semantic_loss` and `semantic_loss_from_sets`. Spec: `spae_fast._ref.semantic_loss_reference` (the loss as
the method states it) and `semantic_loss_parts_reference` (what the op returns).

Per position p, the cross-entropy of the logits s_k(p) = -||z_p - e_k||^2 / tau over the whole vocabulary
with soft targets uniform on a candidate set C(p): logsumexp_k s_k(p) - mean_{c in C(p)} s_c(p). The
||z_p||^2 / tau terms cancel, so this is a linear cross-entropy computed in one streaming pass with an
online logsumexp: no positions x vocabulary logits, forward or backward (the op returns d loss(p) / d z_p
with the loss, and the backward scales it).

Kernels per device: "cpu" runs the native kernel (backend "cpu"; AVX512-BF16 at precision "bf16"), the
Triton interpreter (backend "triton" under TRITON_INTERPRET=1) or the reference; "cuda" runs
`gpu_semantic_loss` (backend "triton") or the reference; any other device runs the reference.
"""

from __future__ import annotations

import torch

from .. import _native, _ref, _validate
from ..codebook import Codebook
from . import boundary, common, gpu_semantic_loss
from .backends import BACKENDS, resolve_backend, semantic_triton_usable
from .common import EMPTY

SEMANTIC_REDUCTIONS = ("mean", "sum", "none")
# "default": fp32 operands and accumulation (exact fp32 products); "bf16": the loss of bf16(z) against bf16(E)
# (rounded to nearest even), products exact, fp32 accumulation - twice the multiply-adds per instruction on
# CPUs with AVX512-BF16 (VDPBF16PS), tensor cores in the Triton kernel. See `semantic_loss`.
SEMANTIC_PRECISIONS = ("default", "bf16")


@torch.library.custom_op("spae_fast::semantic_loss", mutates_args=())
def _semantic_loss_op(
    z: torch.Tensor,
    weight: torch.Tensor,
    panels: torch.Tensor,
    bias: torch.Tensor,
    norm_bound: torch.Tensor,
    candidate_index: torch.Tensor,
    candidate_offsets: torch.Tensor,
    set_of_position: torch.Tensor,
    tau: float,
    compute_grad: bool,
    backend: str,
    check_finite: bool,
    bf16_rows: torch.Tensor,
    precision: str = "default",
) -> tuple[torch.Tensor, torch.Tensor]:
    """z [N, D] -> (loss [N] fp32, grad [N, D] fp32 or [0, D]); see `semantic_loss`. At precision "bf16" the
    CPU operands come from `common.pack_semantic_bf16` (`bf16_rows` empty: no AVX512-BF16 kernel)."""
    _check_operands(z, weight, panels, bias, norm_bound, candidate_index, candidate_offsets, set_of_position, tau,
                    compute_grad, backend, check_finite, bf16_rows, precision)  # fmt: skip
    problem = (z, weight, candidate_index, candidate_offsets, set_of_position, tau, compute_grad, check_finite)
    return _reference(backend, *problem, precision)


@_semantic_loss_op.register_fake
def _(z, weight, panels, bias, norm_bound, candidate_index, candidate_offsets, set_of_position, tau, compute_grad,
      backend, check_finite, bf16_rows, precision="default"):  # fmt: skip
    _check_operands(z, weight, panels, bias, norm_bound, candidate_index, candidate_offsets, set_of_position, tau,
                    compute_grad, backend, check_finite, bf16_rows, precision)  # fmt: skip
    num, dim = z.shape
    return z.new_empty(num, dtype=torch.float32), z.new_empty(num if compute_grad else 0, dim, dtype=torch.float32)


def _check_operands(z, weight, panels, bias, norm_bound, candidate_index, candidate_offsets, set_of_position, tau,
                    compute_grad, backend, check_finite, bf16_rows, precision):  # fmt: skip
    """The boundary of ``spae_fast::semantic_loss`` (see `boundary`): every kernel runs it first. The values of
    the index arrays (rows in [0, V), a CSR, sets in [-1, S)) are checked by the kernels."""
    op = "semantic_loss"
    num_rows, dim = boundary.table(op, weight)
    num = boundary.rows_like(op, z, "z", dim, weight.device)
    boundary.index_array(op, candidate_index, "candidate_index", None, weight.device, "")
    boundary.index_array(op, candidate_offsets, "candidate_offsets", None, weight.device, "")
    if candidate_offsets.numel() < 1:
        raise ValueError("spae_fast::semantic_loss: candidate_offsets must hold S + 1 >= 1 entries (a CSR), got 0")
    boundary.index_array(op, set_of_position, "set_of_position", num, weight.device, "one set per row of z")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 < float(tau) < float("inf"):
        raise ValueError(f"spae_fast::semantic_loss: tau must be a finite float > 0, got {tau!r}")
    boundary.flag(op, compute_grad, "compute_grad")
    boundary.choice(op, backend, "backend", BACKENDS[1:])
    boundary.flag(op, check_finite, "check_finite")
    boundary.choice(op, precision, "precision", SEMANTIC_PRECISIONS)
    if backend != "cpu":
        return
    if precision == "bf16" and bf16_rows.numel():  # the AVX512-BF16 packing (common.pack_semantic_bf16)
        groups, why = -(-num_rows // boundary.BF16_GROUP_ROWS), f"the bf16 packing of a [{num_rows}, {dim}] table"
        boundary.shaped(op, panels, "panels", (groups, -(-dim // 2), boundary.BF16_GROUP_ROWS), torch.int32, why)
        boundary.shaped(op, bf16_rows, "bf16_rows", (groups, 32, -(-dim // 64) * 64), torch.int32, why)
        boundary.shaped(op, bias, "bias", (groups * boundary.BF16_GROUP_ROWS,), torch.float32, why)
    else:
        if bf16_rows.numel():
            raise ValueError("spae_fast::semantic_loss: bf16_rows must be empty unless precision is 'bf16'")
        boundary.cpu_panels(op, panels, bias, norm_bound, num_rows, dim, weight.dtype, "l2")
    if norm_bound.numel() != 1:
        raise ValueError("spae_fast::semantic_loss: norm_bound must be a one-element tensor")


def _reference(backend, z, weight, index, offsets, sets, tau, compute_grad, check_finite, precision):
    """Backend "torch" (any device): the reference, behind the native kernel's input checks."""
    if backend != "torch":
        raise RuntimeError(f"backend {backend!r} has no semantic_loss kernel for tensors on {z.device}")
    if precision == "bf16":  # the definition: the same loss of the rounded operands
        z, weight = z.bfloat16().float(), weight.bfloat16().float()
    common.semantic_check_finite(z, weight, check_finite)
    return _ref.semantic_loss_parts_reference(z, weight, index, offsets, sets, tau, compute_grad)


@_semantic_loss_op.register_kernel(("cpu", "cuda"))
def _semantic_loss_kernel(z, weight, panels, bias, norm_bound, index, offsets, sets, tau, compute_grad, backend,
                          check_finite, bf16_rows, precision="default"):  # fmt: skip
    """Backend "cpu" (CPU tensors): the native kernel; "triton": the Triton kernel (CUDA tensors, or CPU tensors
    under TRITON_INTERPRET=1); "torch": the reference."""
    _check_operands(z, weight, panels, bias, norm_bound, index, offsets, sets, tau, compute_grad, backend,
                    check_finite, bf16_rows, precision)  # fmt: skip
    problem = (z, weight, index, offsets, sets, tau, compute_grad, check_finite, precision)
    if backend == "cpu" and z.device.type == "cpu":
        return _native_semantic_loss(
            z, weight, panels, bias, norm_bound, index, offsets, sets, tau, compute_grad, check_finite,
            bf16_rows, precision == "bf16",
        )  # fmt: skip
    if backend == "triton":
        return gpu_semantic_loss.semantic_loss(*problem)
    return _reference(backend, *problem)


def _native_semantic_loss(z, weight, panels, bias, norm_bound, candidate_index, candidate_offsets,
                          set_of_position, tau, compute_grad, check_finite, bf16_rows, bf16):  # fmt: skip
    """The native CPU semantic loss (``_C.semantic_loss``), fp32 or, with `bf16`, on the AVX512-BF16 kernel
    when `bf16_rows` is there (else the rounded operands through the fp32 kernel)."""
    num, dim = z.shape
    native = _native.cpu_module()
    bf16_kernel = bf16 and bf16_rows.numel() > 0
    if bf16 and not bf16_kernel:  # no AVX512-BF16: the rounded operands through the fp32 kernel
        z = z.bfloat16().float()
    loss = torch.empty(num, dtype=torch.float32)
    grad = torch.empty(num if compute_grad else 0, dim, dtype=torch.float32)
    code, detail = native.semantic_loss(
        z=_native.buffer(z), num_rows=num, dim=dim, z_row_stride=z.stride(0), z_col_stride=z.stride(1),
        z_dtype=_native.DTYPE_TAGS[str(z.dtype).removeprefix("torch.")],
        weight=_native.buffer(weight), vocab=weight.shape[0], weight_row_stride=weight.stride(0),
        weight_col_stride=weight.stride(1), weight_dtype=_native.DTYPE_TAGS[str(weight.dtype).removeprefix("torch.")],
        panels=_native.NO_BUFFER if bf16_kernel else _native.buffer(panels),
        panels_dtype=_native.DTYPE_TAGS[str(panels.dtype).removeprefix("torch.")] if not bf16_kernel else 0,
        bias=_native.NO_BUFFER if bf16_kernel else _native.buffer(bias),
        max_norm=float(norm_bound), candidate_index=_native.buffer(candidate_index),
        num_candidates=candidate_index.numel(), candidate_offsets=_native.buffer(candidate_offsets),
        num_sets=candidate_offsets.numel() - 1, set_of_position=_native.buffer(set_of_position), tau=float(tau),
        compute_grad=compute_grad, check_finite=check_finite, num_threads=torch.get_num_threads(),
        out_loss=_native.buffer(loss), out_grad=_native.buffer(grad) if compute_grad else _native.NO_BUFFER,
        bf16_panels=_native.buffer(panels) if bf16_kernel else _native.NO_BUFFER,
        bf16_rows=_native.buffer(bf16_rows) if bf16_kernel else _native.NO_BUFFER,
        bf16_bias=_native.buffer(bias) if bf16_kernel else _native.NO_BUFFER,
    )  # fmt: skip
    common.raise_semantic_status(code, detail)
    return loss, grad


def _setup_semantic_context(ctx, inputs, output):
    ctx.z_dtype = inputs[0].dtype
    ctx.compute_grad = inputs[9]
    ctx.mark_non_differentiable(output[1])  # the gradient direction: an auxiliary output
    ctx.set_materialize_grads(False)  # else autograd hands the backward an [N, D] zero gradient for it
    ctx.save_for_backward(output[1])


def _semantic_backward(ctx, grad_loss, grad_direction):
    (direction,) = ctx.saved_tensors  # [N, D] fp32: d loss(p) / d z_p
    if not ctx.compute_grad:
        raise RuntimeError(
            "spae_fast::semantic_loss ran with compute_grad=False, so it has no gradient; call it with "
            "compute_grad=True (spae_fast.semantic_loss does so whenever z requires grad)"
        )
    grad_z = None if grad_loss is None else (grad_loss[:, None] * direction).to(ctx.z_dtype)
    return (grad_z,) + (None,) * 13


_semantic_loss_op.register_autograd(_semantic_backward, setup_context=_setup_semantic_context)


def _integer_tensor(value: object, name: str, device: torch.device) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int64, got {type(value).__name__}")
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (int64), got {value.dtype}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but z and the codebook are on {device}")
    return value.to(torch.int64).contiguous()


def _semantic_candidates(candidate_index, candidate_offsets, set_of_position, positions_shape, num_rows, device):
    """Validated (candidate_index [M], candidate_offsets [S + 1], set_of_position [N]) int64 contiguous."""
    index = _integer_tensor(candidate_index, "candidate_index", device)
    offsets = _integer_tensor(candidate_offsets, "candidate_offsets", device)
    if index.dim() != 1:
        raise ValueError(f"candidate_index must be 1-D [M] (all sets concatenated), got shape {tuple(index.shape)}")
    if offsets.dim() != 1 or offsets.numel() < 1:
        raise ValueError(f"candidate_offsets must be 1-D [S + 1] with S >= 0, got shape {tuple(offsets.shape)}")
    num_sets, num = offsets.numel() - 1, 1
    for size in positions_shape:
        num *= size
    if set_of_position is None:
        if num_sets != num:
            raise ValueError(
                f"without set_of_position every position has its own set, so candidate_offsets needs N + 1 = "
                f"{num + 1} entries; got {num_sets + 1}. Pass set_of_position to share sets between positions"
            )
        sets = torch.arange(num, device=device)
    else:
        sets = _integer_tensor(set_of_position, "set_of_position", device)
        if tuple(sets.shape) not in (tuple(positions_shape), (num,)):
            raise ValueError(
                f"set_of_position must have shape {tuple(positions_shape)} (z without its last dimension) or "
                f"[{num}], got {tuple(sets.shape)}"
            )
        sets = sets.reshape(num)
    if not torch.compiler.is_compiling():  # value checks (the native kernel checks them again)
        if int(offsets[0]) != 0 or int(offsets[-1]) != index.numel():
            raise ValueError(
                f"candidate_offsets must start at 0 and end at M = len(candidate_index) = {index.numel()}, got "
                f"{int(offsets[0])} .. {int(offsets[-1])}"
            )
        if num_sets and bool((offsets[1:] < offsets[:-1]).any()):
            raise ValueError("candidate_offsets must be non-decreasing")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= num_rows):
            raise ValueError(
                f"candidate_index holds codebook rows out of range [0, V) = [0, {num_rows}): "
                f"min {int(index.min())}, max {int(index.max())}"
            )
        if num and (int(sets.min()) < -1 or int(sets.max()) >= num_sets):
            raise ValueError(
                f"set_of_position values must be in [-1, S) = [-1, {num_sets}) (-1: no set), got "
                f"{int(sets.min())} .. {int(sets.max())}"
            )
    return index, offsets, sets


def _semantic_backend(backend: str, device: torch.device) -> str:
    """The backend of the semantic loss: "auto" is "cpu" (native) on the CPU and "triton" on CUDA tensors."""
    if backend == "cuda":
        raise RuntimeError("backend 'cuda' has no semantic_loss kernel; use backend='triton' (or 'auto') on CUDA tensors")
    if backend == "auto" and device.type == "cuda":
        return "triton" if semantic_triton_usable(device)[0] else "torch"
    if backend == "triton":
        usable, why = semantic_triton_usable(device)
        if not usable:
            raise RuntimeError(f"backend 'triton' cannot run semantic_loss here: {why}")
        return backend
    return resolve_backend(backend, device)


def _fixed_order_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum of a 1-D tensor in fp64 in an order that does not depend on the thread count."""
    width = 1024
    padded = torch.nn.functional.pad(values.double(), (0, (-values.numel()) % width))
    return padded.reshape(-1, width).sum(1).sum()


def _check_options(tau: object, reduction: object, precision: object) -> None:
    """The checks of the loss's tau, reduction and precision (also those of the vocabulary-parallel loss)."""
    if isinstance(tau, bool) or not isinstance(tau, (int, float)):
        raise TypeError(f"tau must be a number, got {type(tau).__name__}")
    if not 0.0 < float(tau) < float("inf"):  # also rejects NaN
        raise ValueError(f"tau must be finite and > 0, got {tau}")
    if reduction not in SEMANTIC_REDUCTIONS:
        raise ValueError(f"reduction must be one of {SEMANTIC_REDUCTIONS}, got {reduction!r}")
    if precision not in SEMANTIC_PRECISIONS:
        raise ValueError(f"precision must be one of {SEMANTIC_PRECISIONS}, got {precision!r}")


def _reduce(loss: torch.Tensor, positions_shape: tuple, reduction: str, offsets: torch.Tensor,
            sets: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Per-position losses [N] -> the loss of `reduction` (see `semantic_loss`), summed in a fixed order."""
    if reduction == "none":
        return loss.reshape(positions_shape)
    total = _fixed_order_sum(loss)
    if reduction == "sum":
        return total.float()
    sizes = offsets[1:] - offsets[:-1]
    if sizes.numel() == 0:
        return total.float()  # no sets: every position is excluded, the loss is 0
    count = ((sets >= 0) & (sizes[sets.clamp_min(0)] > 0)).sum()
    return (total / count.clamp_min(1)).float()


def semantic_loss(
    z: torch.Tensor,
    codebook: torch.Tensor | Codebook,
    candidate_index: torch.Tensor,
    candidate_offsets: torch.Tensor,
    set_of_position: torch.Tensor | None = None,
    *,
    tau: float = 1.0,
    reduction: str = "mean",
    backend: str = "auto",
    check_finite: bool = True,
    precision: str = "default",
) -> torch.Tensor:
    """SPAE's semantic-guidance loss, fused: no (positions x vocabulary) logits, forward or backward.

    With the logits s_k(p) = -||z_p - e_k||^2 / tau over the whole codebook and the candidate set C(p) of
    position p, the loss of p is

        mean_{c in C(p)} -log softmax_k(s(p))[c]  =  logsumexp_k s_k(p) - mean_{c in C(p)} s_c(p)

    i.e. the cross-entropy with soft targets uniform on C(p). ||z_p||^2 / tau cancels, so it is a linear
    cross-entropy (weight 2E / tau, bias -||e||^2 / tau), and mean_c s_c needs only the set's mean embedding.
    One streaming pass over the vocabulary computes the logsumexp online and, when ``z`` requires grad, the
    softmax-weighted embedding sum, so the backward is d loss(p) / d z_p = (2 / tau) (sum_k softmax_k e_k
    - mean_{c in C(p)} e_c), a scaling of a saved [N, D] tensor (no second pass over the vocabulary). The
    codebook is frozen: no gradient flows to it; first derivatives only (no double backward). The per-position
    values of the native ("cpu", for a given micro-kernel) and Triton kernels are bitwise identical for any
    thread count, grid and batch split; the reductions sum in a fixed order. Extra memory of the native
    kernel beside the returned [N, D] gradient: O(N) plus a packed block of z (<= 512 KiB) per thread; sets
    of more than 64 candidates add their fp64 sums (S_large x D), a transposed candidate list (V + M) and
    per thread the fp32 partials of those one 64-row vocabulary group touches; nothing of size N x V.

    Args:
        z: ``[..., D]`` positions (for SPAE the layer targets z_l(p) of the sampled positions), fp32 / bf16 /
            fp16, any strides; accumulation is fp32.
        codebook: ``[V, D]`` tensor or an l2 `Codebook` (packed once: use it for repeated calls; a plain
            tensor is packed on every call on the CPU).
        candidate_index: ``[M]`` integer codebook rows of all candidate sets, concatenated.
        candidate_offsets: ``[S + 1]`` integer: set s is ``candidate_index[offsets[s] : offsets[s + 1]]``
            (CSR). Duplicates count as often as they appear; a set may be empty.
        set_of_position: ``[...]`` (z's leading shape) or ``[N]`` integer set of each position, -1 for none.
            Default: position p uses set p (then S must equal N). Positions share sets per image and layer in
            SPAE: see `spae_fast.semantic.candidates_from_relevance` and `pyramid_set_of_position`, or
            `semantic_loss_from_sets` for a list of sets.
        tau: temperature, finite and > 0.
        reduction: ``"mean"`` over the positions that have a non-empty set (positions without one are
            excluded; 0 when none has), ``"sum"``, or ``"none"``: the loss of every position, shape
            ``z.shape[:-1]``, 0 at excluded positions.
        backend: ``"auto"``, ``"cpu"`` (native), ``"torch"`` (reference), ``"triton"`` (CUDA tensors, or CPU
            tensors with TRITON_INTERPRET=1).
        check_finite: raise ``ValueError`` on NaN / Inf in ``z``.
        precision: ``"default"``: fp32 products and accumulation (16-bit inputs are exact in fp32).
            ``"bf16"``: the loss of bf16(z) against bf16(E), both rounded to nearest even: every product is
            exact, accumulation stays fp32, and the softmax weights that form the gradient's weighted embedding
            sum are rounded to bf16 too; the gradient is applied to ``z`` as if the rounding were the identity
            (straight-through). On CPUs with AVX512-BF16 (``cpu_has_bf16_semantic_kernel()``) this runs at
            twice the multiply-adds per instruction of fp32 (about 2x faster; a `Codebook` caches the bf16
            packing, V * D * 4 bytes, on first use); elsewhere the rounded operands go through the fp32
            kernel (same loss, no speed-up). On CUDA the Triton kernel feeds bf16 operands to the tensor
            cores. The error against the fp32 loss is that of rounding z and E to 8 significant bits: about
            2^-9 |z| |e| / tau per logit (see docs/DECISIONS.md for measured values). Training code that can
            afford it (the semantic term is a guidance loss) should use it; the trainer does by default.

    Returns:
        fp32 loss: a scalar (``"mean"`` / ``"sum"``) or per position (``"none"``).
    """
    if isinstance(codebook, Codebook):
        if codebook.metric != "l2":
            raise ValueError(
                f"semantic_loss needs an l2 Codebook (its logits are squared L2 distances), got metric="
                f"{codebook.metric!r}"
            )
        dim, device, num_rows = codebook.dim, codebook.device, codebook.num_rows
    else:
        weight = _validate.codebook_weight(codebook, "codebook")
        dim, device, num_rows = weight.shape[1], weight.device, weight.shape[0]
    z = _validate.queries(z, dim, device, "z")
    _validate.flag(check_finite, "check_finite")
    _check_options(tau, reduction, precision)
    positions_shape = tuple(z.shape[:-1])
    index, offsets, sets = _semantic_candidates(
        candidate_index, candidate_offsets, set_of_position, positions_shape, num_rows, device
    )
    backend = _semantic_backend(backend, z.device)
    if precision == "bf16" and backend == "cpu":
        weight, panels, bias, norm_bound, bf16_rows = common.semantic_bf16_operands(codebook)
    else:
        weight, panels, bias, norm_bound, _ = common.codebook_operands(codebook, "l2", backend)
        bf16_rows = EMPTY
    flat = z.reshape(-1, dim)
    compute_grad = torch.is_grad_enabled() and z.requires_grad
    loss, _ = torch.ops.spae_fast.semantic_loss(
        flat, weight, panels, bias, norm_bound, index, offsets, sets, float(tau), compute_grad, backend, check_finite,
        bf16_rows, precision,
    )  # fmt: skip
    return _reduce(loss, positions_shape, reduction, offsets, sets)


def semantic_loss_from_sets(
    z: torch.Tensor,
    codebook: torch.Tensor | Codebook,
    candidate_sets: list[torch.Tensor],
    set_of_position: torch.Tensor,
    **kwargs,
) -> torch.Tensor:
    """`semantic_loss` with the candidate sets as a list of S integer tensors (codebook rows) and the set of
    every position (``[...]`` or ``[N]``, values in [-1, S)); keyword arguments as `semantic_loss`."""
    from ..semantic import pack_candidate_sets

    index, offsets = pack_candidate_sets(candidate_sets)
    device = z.device if isinstance(z, torch.Tensor) else index.device
    return semantic_loss(z, codebook, index.to(device), offsets.to(device), set_of_position, **kwargs)
