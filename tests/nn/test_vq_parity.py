"""spae_fast.nn.VectorQuantize against vector-quantize-pytorch 1.32: same seed, same inputs -> same indices,
quantized outputs, losses, gradients and codebooks (EMA, dead codes, k-means), except near-ties (counted and
required to be rare). Both layers run in the same process from identical RNG states."""

from __future__ import annotations

import pytest
import torch

vqp = pytest.importorskip("vector_quantize_pytorch")

from _parity import near_tie_mismatches, twins

from spae_fast.nn import VectorQuantize

CONFIGS = {
    "frozen": {"dim": 32, "codebook_size": 512, "freeze_codebook": True},
    "ema": {"dim": 32, "codebook_size": 256, "decay": 0.8},
    "ema_dead_codes": {"dim": 32, "codebook_size": 256, "threshold_ema_dead_code": 2},
    "ema_kmeans": {"dim": 16, "codebook_size": 64, "kmeans_init": True, "kmeans_iters": 5},
    "cosine": {"dim": 32, "codebook_size": 256, "use_cosine_sim": True},
    "straight_through": {"dim": 32, "codebook_size": 256, "rotation_trick": False, "straight_through": True},
    "projection": {"dim": 48, "codebook_size": 128, "codebook_dim": 16, "commitment_weight": 0.25},
    "channel_first": {"dim": 24, "codebook_size": 128, "channel_last": False},
}

NEAR_TIES: dict[str, tuple[int, int]] = {}


def _step(ref, fast, x, seed, **forward_kwargs):
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(seed)
    out_r = ref(xr, **forward_kwargs)
    torch.manual_seed(seed)
    out_f = fast(xf, **forward_kwargs)
    weight = torch.randn_like(out_r[0])
    ((out_r[0] * weight).sum() + out_r[2].sum()).backward() if ref.training else None
    ((out_f[0] * weight).sum() + out_f[2].sum()).backward() if fast.training else None
    return out_r, out_f, xr.grad, xf.grad


@pytest.mark.parametrize("name", list(CONFIGS))
def test_training_and_eval_match(name):
    kwargs = CONFIGS[name]
    ref, fast = twins(vqp.VectorQuantize, VectorQuantize, **kwargs)
    assert torch.equal(ref.codebook, fast.codebook)  # same init, same RNG use
    mismatched = ties = 0
    shape = (3, kwargs["dim"], 90) if not kwargs.get("channel_last", True) else (3, 90, kwargs["dim"])
    for step in range(4):
        torch.manual_seed(100 + step)
        x = torch.randn(shape) * (1 + step)
        before = fast.codebook.detach().clone()
        queries = fast._codebook.transform_input(
            fast.project_in(x if fast.channel_last else x.transpose(1, 2))
        )
        (q_r, i_r, l_r), (q_f, i_f, l_f), g_r, g_f = _step(ref, fast, x, seed=7 + step)
        n, t = near_tie_mismatches(queries, before, i_f, i_r, "ip" if kwargs.get("use_cosine_sim") else "l2")
        assert n == t, f"{name} step {step}: {n - t} index mismatches are not near-ties"
        mismatched, ties = mismatched + n, ties + t
        if n == 0:
            torch.testing.assert_close(q_f, q_r, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(l_f, l_r, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(g_f, g_r, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(fast.codebook, ref.codebook, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(
                fast._codebook.cluster_size, ref._codebook.cluster_size, rtol=1e-5, atol=1e-6
            )
        else:  # a near-tie sent one vector to another code: continue from the reference's state
            fast.load_state_dict(ref.state_dict())
    if not kwargs.get("freeze_codebook"):
        assert not torch.equal(fast.codebook, before) or kwargs.get("kmeans_init")  # the codebook did learn
    ref.eval(), fast.eval()
    x = torch.randn(shape)
    (q_r, i_r, l_r), (q_f, i_f, l_f) = ref(x), fast(x)
    n, t = near_tie_mismatches(fast._codebook.transform_input(fast.project_in(x if fast.channel_last else x.transpose(1, 2))),
                               fast.codebook, i_f, i_r, "ip" if kwargs.get("use_cosine_sim") else "l2")  # fmt: skip
    assert n == t and float(l_f.detach()) == float(l_r.detach()) == 0.0
    same = i_f == i_r
    torch.testing.assert_close(fast.get_output_from_indices(i_f), q_f)
    if n == 0:
        torch.testing.assert_close(q_f, q_r, rtol=1e-5, atol=1e-6)
    NEAR_TIES[name] = (mismatched + n, int(same.numel()) * 5)
    print(f"near-ties {name}: {mismatched + n} of {int(same.numel()) * 5} indices")
    assert mismatched + n <= 2  # near-ties are rare at these sizes


def test_mask_and_lens_match():
    ref, fast = twins(
        vqp.VectorQuantize, VectorQuantize, dim=16, codebook_size=128, threshold_ema_dead_code=1
    )
    x = torch.randn(4, 30, 16)
    lens = torch.tensor([30, 12, 1, 25])
    mask = torch.arange(30) < lens[:, None]
    for kw in ({"mask": mask}, {"lens": lens}):
        (q_r, i_r, l_r), (q_f, i_f, l_f), g_r, g_f = _step(ref, fast, x, seed=3, **kw)
        assert torch.equal(i_f, i_r) and bool((i_f[~mask] == -1).all())
        torch.testing.assert_close(q_f, q_r, rtol=1e-4, atol=1e-5)
        assert bool((q_f[~mask] == 0).all())
        torch.testing.assert_close(l_f, l_r)
        torch.testing.assert_close(g_f, g_r, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fast.codebook, ref.codebook, rtol=1e-4, atol=1e-6)


def test_image_fmap_and_single_token_match():
    ref, fast = twins(vqp.VectorQuantize, VectorQuantize, dim=8, codebook_size=64, accept_image_fmap=True)
    x = torch.randn(2, 8, 5, 7)
    (q_r, i_r, _l_r), (q_f, i_f, _l_f), g_r, g_f = _step(ref, fast, x, seed=1)
    assert i_f.shape == (2, 5, 7) and q_f.shape == x.shape and torch.equal(i_f, i_r)
    torch.testing.assert_close(q_f, q_r, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g_f, g_r, rtol=1e-4, atol=1e-5)
    assert fast.get_codes_from_indices(i_f).shape == ref.get_codes_from_indices(i_r).shape == (2, 8, 5, 7)
    ref, fast = twins(vqp.VectorQuantize, VectorQuantize, dim=8, codebook_size=64)
    x = torch.randn(6, 8)
    (q_r, i_r, _), (q_f, i_f, _), _, _ = _step(ref, fast, x, seed=1)
    assert i_f.shape == (6,) and torch.equal(i_f, i_r)
    torch.testing.assert_close(q_f, q_r, rtol=1e-4, atol=1e-5)


def test_state_dicts_load_both_ways_and_codebook_setter():
    ref, fast = twins(vqp.VectorQuantize, VectorQuantize, dim=16, codebook_size=64)
    table = torch.randn(64, 16)
    ref.codebook = table
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 40, 16)
    ref.eval(), fast.eval()
    assert torch.equal(fast(x)[1], ref(x)[1])
    fast.codebook = -table  # the setter: the packed search table is rebuilt on the next forward
    assert torch.equal(fast(x)[1], torch.cdist(x, -table).argmin(-1))
    ref.load_state_dict(fast.state_dict())
    assert torch.equal(ref(x)[1], fast(x)[1])
    with pytest.raises(ValueError, match="codebook must have shape"):
        fast.codebook = torch.randn(63, 16)


def test_loss_breakdown_and_frozen_forward_override():
    ref, fast = twins(vqp.VectorQuantize, VectorQuantize, dim=16, codebook_size=64, commitment_weight=0.5)
    x = torch.randn(2, 40, 16)
    before = fast.codebook.clone()
    torch.manual_seed(0)
    *_, _loss_r, parts_r = ref(x, return_loss_breakdown=True, freeze_codebook=True)
    torch.manual_seed(0)
    *_, loss_f, parts_f = fast(x, return_loss_breakdown=True, freeze_codebook=True)
    assert parts_f._fields == parts_r._fields
    torch.testing.assert_close(parts_f.commitment, parts_r.commitment)
    torch.testing.assert_close(loss_f, 0.5 * parts_f.commitment)
    assert torch.equal(fast.codebook, before)  # frozen for this call
