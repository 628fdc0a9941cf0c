"""The method against the paper's equations, written out independently here."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from lcr_core import distributed, losses
from lcr_core.config import VARIANTS, LCRConfig
from lcr_core.model import build_model


def tiny_config(**overrides) -> LCRConfig:
    values = dict(backbone="tiny", image_size=32, eval_resize=32, batch_size=4, queue_size=8, embed_dim=16,
                  projector_hidden=32, num_projections=4, gfb_mlp_hidden=8)
    values.update(overrides)
    return LCRConfig(**values).validate()


def images(n: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def batch_statistics(projector, pooled):
    """Mean and (biased) variance of the input of every BatchNorm in `projector`, for this batch."""
    stats, x = [], pooled
    for layer in projector:
        if isinstance(layer, torch.nn.BatchNorm1d):
            stats.append((x.mean(dim=0).detach(), x.var(dim=0, unbiased=False).detach()))
        x = layer(x)
    return stats


def project_with(projector, x, stats):
    """The projector in train mode, but every BN normalising with the given constant statistics."""
    stats = iter(stats)
    for layer in projector:
        if isinstance(layer, torch.nn.BatchNorm1d):
            mean, var = next(stats)
            x = F.batch_norm(x, mean, var, layer.weight, layer.bias, False, 0.0, layer.eps)
        else:
            x = layer(x)
    return x


def brute_force_gradcam(model, im_q, k, source: str) -> torch.Tensor:
    """Eq. 3 per image by central finite differences, in float64, one phi entry at a time; the
    projector's batch statistics are those of the unperturbed batch, held constant (DESIGN §1)."""
    enc = model.encoder_q
    phi = enc.backbone(im_q).detach()
    stats = batch_statistics(enc.projector, phi.mean(dim=(2, 3)))

    def total_score(feature_map):
        q = F.normalize(project_with(enc.projector, feature_map.mean(dim=(2, 3)), stats), dim=1)
        positive = (q * k).sum(dim=1)  # algorithm A1: q.k, without 1/t
        logits = torch.cat([positive[:, None], q @ model.queue], dim=1) / model.cfg.temperature
        log_p = logits[:, 0] - torch.logsumexp(logits, dim=1)
        return {"positive_logit": positive, "log_prob": log_p, "loss": -log_p}[source].sum()

    grad = torch.zeros_like(phi)
    eps = 1e-6
    with torch.no_grad():
        for index in range(phi.numel()):
            up, down = phi.clone(), phi.clone()
            up.view(-1)[index] += eps
            down.view(-1)[index] -= eps
            grad.view(-1)[index] = (total_score(up) - total_score(down)) / (2 * eps)
    return torch.relu((grad * phi).sum(dim=1))


@pytest.mark.parametrize("source", ["positive_logit", "log_prob", "loss"])
def test_gradcam_equals_finite_differences(source):
    torch.manual_seed(0)
    model = build_model(tiny_config(variant="moco", gradcam_source=source, embed_dim=8, projector_hidden=16)).double()
    model.encoder_q.backbone.features = model.encoder_q.backbone.features[:4]  # 64 channels: fewer FD evals
    model.encoder_k.backbone.features = model.encoder_k.backbone.features[:4]
    model.encoder_q.backbone.out_channels = 64
    model.encoder_q.projector[0] = torch.nn.Linear(64, 16, bias=False).double()
    model.encoder_k.projector[0] = torch.nn.Linear(64, 16, bias=False).double()
    im_q, im_k = images(size=16, seed=1).double(), images(size=16, seed=2).double()
    k = model._keys(im_k)
    g_model = model.gradcam(im_q, im_k)
    g_brute = brute_force_gradcam(model, im_q, k, source)
    assert g_model.shape == (4, 4, 4)
    assert g_brute.abs().max() > 0
    torch.testing.assert_close(g_model, g_brute, rtol=1e-5, atol=1e-7)


def test_gradcam_never_runs_backward_through_backbone():
    model = build_model(tiny_config())
    calls = []

    def watch_gradient(module, inputs, output):
        output.register_hook(lambda grad: calls.append(grad))

    model.encoder_q.backbone.features[0][0].register_forward_hook(watch_gradient)
    model.gradcam(images(), images(seed=3))
    assert calls == []
    assert all(p.grad is None for p in model.parameters())
    model(images(), images(seed=3))["loss"].backward()  # the hook does fire for a real backward
    assert len(calls) == 1


def test_fitting_loss_is_eq_5_6_by_hand():
    g = torch.rand(2, 3, 3) * 4
    a = torch.randn(2, 3, 3)
    tau = 0.4
    expected = 0.0
    for n in range(2):
        zg = sum(math.exp(v / tau) for v in g[n].flatten().tolist())
        za = sum(math.exp(v / tau) for v in a[n].flatten().tolist())
        for gv, av in zip(g[n].flatten().tolist(), a[n].flatten().tolist()):
            pg, pa = math.exp(gv / tau) / zg, math.exp(av / tau) / za
            expected += pg * math.log(pg / pa)
    expected /= 2  # batch mean
    assert losses.gradcam_fitting_loss(g, a, tau).item() == pytest.approx(expected, rel=1e-5)


def test_fitting_loss_gradient_reaches_branch_and_backbone():
    model = build_model(tiny_config(cl_weight=0.0, kl_weight=1.0))
    out = model(images(), images(seed=5))
    out["loss"].backward()
    assert out["loss_kl"] > 0
    assert model.encoder_q.gfb.projections.weight.grad.abs().sum() > 0
    assert model.encoder_q.backbone.features[0][0].weight.grad.abs().sum() > 0
    assert model.encoder_q.projector[0].weight.grad is None or model.encoder_q.projector[0].weight.grad.abs().sum() == 0


@pytest.mark.parametrize("pooling", ["attention", "gap"])
def test_embedding_does_not_depend_on_batch(pooling):
    model = build_model(tiny_config())
    model(images(8, seed=7)[:4], images(8, seed=8)[:4])  # move BN running stats off their init
    model.eval()
    batch = images(6, seed=9)
    with torch.no_grad():
        together = model.embed(batch, pooling)
        for i in range(6):
            alone = model.embed(batch[i:i + 1], pooling)
            torch.testing.assert_close(alone[0], together[i], rtol=1e-4, atol=1e-5)
    assert torch.allclose(together.norm(dim=1), torch.ones(6))


def test_attention_normalisation_and_weighted_pool_by_hand():
    a = torch.tensor([[[1.0, 3.0], [2.0, 5.0]]])
    a_norm = losses.normalize_attention(a)
    torch.testing.assert_close(a_norm, torch.tensor([[[0.0, 0.5], [0.25, 1.0]]]), atol=1e-6, rtol=0)
    phi = torch.arange(8.0).view(1, 2, 2, 2)
    expected = torch.stack([(phi[0, c] * a_norm[0]).sum() / a_norm.sum() for c in range(2)])
    torch.testing.assert_close(losses.weighted_average_pool(phi, a_norm)[0], expected, rtol=1e-5, atol=1e-6)


def test_queue_is_fifo_and_pointer_wraps():
    model = build_model(tiny_config(queue_size=8, batch_size=4))
    keys = [F.normalize(torch.randn(4, 16), dim=1) for _ in range(3)]
    for key in keys:
        model._dequeue_and_enqueue(key)
    assert int(model.queue_ptr) == 4
    torch.testing.assert_close(model.queue[:, :4], keys[2].T)
    torch.testing.assert_close(model.queue[:, 4:], keys[1].T)


def test_momentum_update_formula_and_keys_get_no_gradient():
    model = build_model(tiny_config(momentum=0.9))
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(torch.randn_like(p))
    before_q = [p.detach().clone() for p in model.encoder_q.parameters()]
    before_k = [p.detach().clone() for p in model.encoder_k.parameters()]
    model._momentum_update_key_encoder()
    for q, k_old, k_new in zip(before_q, before_k, model.encoder_k.parameters()):
        torch.testing.assert_close(k_new, 0.9 * k_old + 0.1 * q)
    model(images(), images(seed=1))["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in model.encoder_k.parameters())


def _shuffle_worker(rank: int, world: int, port: int, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(rank)  # different local seeds: the permutation must still be rank 0's
    local = torch.arange(4.0).view(4, 1) + 10 * rank
    shuffled, inverse = distributed.batch_shuffle(local)
    restored = distributed.batch_unshuffle(shuffled * 2, inverse)
    results[rank] = (local.tolist(), shuffled.tolist(), restored.tolist())
    dist.destroy_process_group()


def test_shuffle_bn_across_two_gloo_processes_restores_order():
    from tests.services import free_port

    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_shuffle_worker, args=(2, free_port(), results), nprocs=2, join=True)
    shuffled_all = sorted(v for rank in range(2) for row in results[rank][1] for v in row)
    assert shuffled_all == [0, 1, 2, 3, 10, 11, 12, 13]  # a permutation of the global batch
    assert results[0][1] + results[1][1] != results[0][0] + results[1][0]  # and not the identity
    for rank in range(2):
        assert results[rank][2] == [[2 * v for v in row] for row in results[rank][0]]


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_trains_a_step(variant):
    model = build_model(tiny_config(variant=variant))
    out = model(images(), images(seed=1))
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert (out["loss_kl"] > 0) == model.cfg.fits_gradcam
    # One step leaves the BN running statistics near their init, where the bilinear variants' BN+ReLU
    # part maps can be all zero in eval mode: make them those of the images embedded below.
    for layer in model.encoder_q.modules():
        if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm):
            layer.momentum = None
            layer.reset_running_stats()
    model.encoder_q(images(), model.cfg.train_pooling)
    model.eval()
    with torch.no_grad():
        embedding = model.embed(images())
    assert torch.allclose(embedding.norm(dim=1), torch.ones(4), atol=1e-5)


@pytest.mark.parametrize("variant, branch_learns_from_cl", [("lcr-dualpool", True), ("lcr", False)])
def test_only_dualpool_pools_with_attention_in_training(variant, branch_learns_from_cl):
    model = build_model(tiny_config(variant=variant, kl_weight=0.0))
    model(images(), images(seed=1))["loss"].backward()
    grad = model.encoder_q.gfb.projections.weight.grad
    assert (grad is not None and grad.abs().sum() > 0) == branch_learns_from_cl
