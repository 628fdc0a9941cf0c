"""The details that decide whether LCR's signal is real (DESIGN §1, issue 9): per-image GradCAM, its
scale, the fitting strength, the authors' released-code preset, and each variant's wiring, written
out by hand here so that changing one line of the method fails a test."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torchvision import transforms as T

from lcr_core import losses
from lcr_core.augment import IMAGENET_MEAN, IMAGENET_STD, RandomGaussianBlur, train_transform
from lcr_core.config import VARIANTS
from lcr_core.model import GradCAMFittingBranch, MLPFittingBranch, build_model, build_projector
from lcr_core.train import TrainingHealth
from tests.test_method import batch_statistics, images, project_with, tiny_config


def per_image_loop_gradcam(model, im_q, k) -> torch.Tensor:
    """Eq. 3 one image at a time: image i alone through the projector (its BN normalising with the
    batch's statistics, held constant), the gradient of its own positive score q.k."""
    enc = model.encoder_q
    phi = enc.backbone(im_q).detach()
    stats = batch_statistics(enc.projector, phi.mean(dim=(2, 3)))
    maps = []
    for i in range(len(phi)):
        phi_i = phi[i:i + 1].clone().requires_grad_(True)
        q = F.normalize(project_with(enc.projector, phi_i.mean(dim=(2, 3)), stats), dim=1)
        (grad,) = torch.autograd.grad((q * k[i:i + 1]).sum(), phi_i)
        maps.append(torch.relu((grad * phi_i).sum(dim=1))[0])
    return torch.stack(maps)


def test_gradcam_is_per_image_as_a_per_sample_loop_computes_it():
    torch.manual_seed(0)
    model = build_model(tiny_config(variant="lcr", batch_size=8, queue_size=16))
    im_q, im_k = images(8, seed=1), images(8, seed=2)
    k = model._keys(im_k)
    torch.manual_seed(5)  # _keys shuffles; the same permutation again below
    batched = model.gradcam(im_q, im_k)
    torch.testing.assert_close(batched, per_image_loop_gradcam(model, im_q, k), rtol=1e-4, atol=1e-9)
    # ... and the batch-coupled GradCAM (through train-mode BN statistics) is measurably different
    out = model.encoder_q(im_q, "gap")
    coupled = losses.contrastive_gradcam(out.feature_map, (F.normalize(out.projection, dim=1) * k).sum(dim=1))
    assert (coupled - batched).abs().max() > 1e-3 * batched.abs().max()


def test_gradcam_is_a_detached_target():
    model = build_model(tiny_config())
    assert not model.gradcam(images(), images(seed=3)).requires_grad
    # the fitting loss trains A, never G: with only the KL term the projector (G's only path) gets nothing
    model(images(), images(seed=3))
    fresh = build_model(tiny_config(cl_weight=0.0, kl_weight=1.0))
    fresh(images(), images(seed=4))["loss"].backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in fresh.encoder_q.projector.parameters())


@pytest.mark.parametrize("mode", ["minmax", "max", "none"])
def test_gradcam_normalisation_per_image_by_hand(mode):
    g = torch.tensor([[[0.0, 1.0], [2.0, 4.0]], [[3.0, 3.0], [5.0, 7.0]]]) * 1e-3
    out = losses.normalize_gradcam(g, mode)
    for n in range(2):
        low, high = g[n].min(), g[n].max()
        expected = {"minmax": (g[n] - low) / (high - low), "max": g[n] / high, "none": g[n]}[mode]
        torch.testing.assert_close(out[n], expected, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="softmax"):
        losses.normalize_gradcam(g, "softmax")


def test_a_tiny_raw_gradcam_is_flat_under_the_softmax_and_minmax_restores_contrast():
    g = torch.tensor([[[0.0, 0.01], [0.02, 0.03]]])
    flat = losses.kl_from_uniform(losses.grid_log_softmax(g, 0.4))
    restored = losses.kl_from_uniform(losses.grid_log_softmax(losses.normalize_gradcam(g, "minmax"), 0.4))
    assert flat < 1e-3 < 0.1 < restored
    assert losses.kl_from_uniform(losses.grid_log_softmax(torch.zeros(1, 3, 3), 0.4)).abs() < 1e-7


def test_kl_sum_is_batch_size_times_mean_and_both_match_the_hand_formula():
    g, a = torch.rand(3, 2, 2), torch.randn(3, 2, 2)
    mean = losses.gradcam_fitting_loss(g, a, 0.4, "mean")
    assert losses.gradcam_fitting_loss(g, a, 0.4, "sum").item() == pytest.approx(3 * mean.item(), rel=1e-6)
    by_hand = 0.0
    for n in range(3):
        pg, pa = F.softmax(g[n].flatten() / 0.4, 0), F.softmax(a[n].flatten() / 0.4, 0)
        by_hand += float((pg * (pg.log() - pa.log())).sum())
    assert mean.item() == pytest.approx(by_hand / 3, rel=1e-5)


def test_released_code_distributions_by_hand():
    g, a = torch.rand(2, 3, 3), torch.randn(2, 3, 3)
    log_g, log_a = losses.released_code_distributions(g, a)
    scaled = (a - a.min()) / (a.max() - a.min() + 1e-7)  # over the whole batch
    for n in range(2):
        for row in range(3):
            torch.testing.assert_close(log_g[n, row].exp(), F.softmax(g[n, row], 0))
            torch.testing.assert_close(log_a[n, row].exp(), F.softmax(scaled[n, row], 0))


def test_released_code_preset_trains_and_differs_from_ours():
    torch.manual_seed(0)
    ours = build_model(tiny_config())
    released = build_model(tiny_config(fitting_preset="released-code", gradcam_source="loss", gfb_bn_relu=True,
                                       gradcam_normalize="none", kl_reduction="sum", kl_weight=0.01))
    released.load_state_dict(ours.state_dict(), strict=False)
    a, b = ours(images(), images(seed=1)), released(images(), images(seed=1))
    assert torch.isfinite(b["loss"]) and b["loss_kl"] > 0
    assert not torch.isclose(a["loss_kl"], b["loss_kl"])


def test_training_reports_how_the_fit_stands():
    out = build_model(tiny_config())(images(), images(seed=1))
    assert out["gradcam_kl_uniform"] > 0 and out["attention_kl_uniform"] >= 0
    assert out["kl_fit_ratio"].item() == pytest.approx((out["loss_kl"] / out["gradcam_kl_uniform"]).item(), rel=1e-5)


def test_gfb_is_a_max_over_k_projections_not_a_mean():
    branch = GradCAMFittingBranch(3, 2)
    with torch.no_grad():
        branch.projections.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 2.0, 0]]).view(2, 3, 1, 1))
    phi = torch.tensor([[5.0, 1.0, 9.0], [1.0, 4.0, 9.0]]).T.reshape(1, 3, 1, 2)  # two cells
    torch.testing.assert_close(branch(phi), torch.tensor([[[5.0, 8.0]]]))  # max(5, 2), max(1, 8)


def test_mlp_branch_is_two_layers_by_hand():
    branch = MLPFittingBranch(4, 3)
    phi = torch.randn(2, 4, 2, 2)
    w1, b1 = branch.projections.weight.view(3, 4), branch.projections.bias
    w2, b2 = branch.output.weight.view(1, 3), branch.output.bias
    cells = phi.permute(0, 2, 3, 1)
    expected = (torch.relu(cells @ w1.T + b1) @ w2.T + b2)[..., 0]
    torch.testing.assert_close(branch(phi), expected, rtol=1e-5, atol=1e-6)


def test_sam_ssl_has_one_projection_and_lcr_has_k():
    assert build_model(tiny_config(variant="sam-ssl")).encoder_q.gfb.projections.out_channels == 1
    assert build_model(tiny_config(variant="lcr", num_projections=5)).encoder_q.gfb.projections.out_channels == 5


def test_bilinear_pooling_by_hand_with_bn_relu_part_maps():
    model = build_model(tiny_config(variant="sam-ssl-bilinear"))
    assert isinstance(model.encoder_q.gfb.bn_relu[1], torch.nn.ReLU)  # as the authors' bilinear branch
    phi, parts = torch.randn(2, 3, 2, 2), torch.rand(2, 4, 2, 2)
    pooled = losses.bilinear_pool(phi, parts).view(2, 4, 3)
    for n in range(2):
        for k in range(4):
            raw = (phi[n] * parts[n, k]).sum(dim=(1, 2)) / 4
            torch.testing.assert_close(pooled[n, k], torch.sign(raw) * torch.sqrt(raw.abs() + 1e-8))


def test_forward_fills_the_queue_with_this_steps_keys():
    model = build_model(tiny_config(queue_size=8, batch_size=4, momentum=0.0))
    im_q, im_k = images(), images(seed=1)
    key_encoder = copy.deepcopy(model.encoder_q)  # momentum 0: the key encoder becomes the query encoder
    model(im_q, im_k)
    expected = F.normalize(key_encoder(im_k, "gap").projection, dim=1)
    torch.testing.assert_close(model.queue[:, :4].T, expected, rtol=1e-4, atol=1e-5)
    assert int(model.queue_ptr) == 4


def test_moco_loss_is_one_way_infonce_by_hand():
    model = build_model(tiny_config(queue_size=8, batch_size=4))
    im_q, im_k = images(), images(seed=1)
    query, key = copy.deepcopy(model.encoder_q), copy.deepcopy(model.encoder_k)
    queue = model.queue.clone()
    out = model(im_q, im_k)
    q = F.normalize(query(im_q, "gap").projection, dim=1)
    k = F.normalize(key(im_k, "gap").projection, dim=1)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue], dim=1) / model.cfg.temperature
    expected = F.cross_entropy(logits, torch.zeros(4, dtype=torch.long))
    assert out["loss_cl"].item() == pytest.approx(expected.item(), rel=1e-5)
    swapped = copy.deepcopy(model)
    assert swapped(im_k, im_q)["loss_cl"].item() != pytest.approx(expected.item(), rel=1e-3)


def test_byol_loss_is_symmetric_regression_by_hand():
    model = build_model(tiny_config(variant="byol"))
    im_a, im_b = images(), images(seed=1)
    online, target, predictor = (copy.deepcopy(m) for m in (model.encoder_q, model.encoder_k, model.predictor))
    out = model(im_a, im_b)

    def regression(x, y):
        p = predictor(online(x, "gap").projection)
        z = F.normalize(target(y, "gap").projection, dim=1)
        return (2 - 2 * F.cosine_similarity(p, z, dim=1)).mean()

    expected = regression(im_a, im_b) + regression(im_b, im_a)
    assert out["loss_cl"].item() == pytest.approx(expected.item(), rel=1e-4)


@pytest.mark.parametrize("variant, pooling", [
    ("moco", "gap"), ("lcr", "attention"), ("lcr-multitask", "gap"), ("lcr-dualpool", "attention"),
    ("lcr-mlp", "attention"), ("sam-ssl", "gap"), ("sam-ssl-bilinear", "bilinear"), ("moco-bilinear", "bilinear"),
    ("byol", "gap"), ("byol-lcr", "attention"),
])
def test_each_variant_pools_as_table_1_says_at_test_time(variant, pooling):
    assert variant in VARIANTS
    model = build_model(tiny_config(variant=variant)).eval()
    assert model.cfg.test_pooling == pooling
    batch = images()
    with torch.no_grad():
        phi = model.encoder_q.backbone(batch)  # from the backbone, never the projector
        if pooling == "gap":
            expected = phi.mean(dim=(2, 3))
        elif pooling == "attention":
            a = model.encoder_q.gfb(phi).flatten(1)
            low, high = a.min(1, keepdim=True).values, a.max(1, keepdim=True).values
            weights = (a - low) / (high - low + 1e-7)
            expected = (phi.flatten(2) * weights[:, None]).sum(2) / (weights.sum(1, keepdim=True) + 1e-7)
        else:
            expected = losses.bilinear_pool(phi, model.encoder_q.gfb.projection_maps(phi))
        torch.testing.assert_close(model.embed(batch), F.normalize(expected, dim=1), rtol=1e-4, atol=1e-6)
    assert model.embed(batch).shape[1] != model.cfg.embed_dim


def test_unknown_projector_and_gradcam_source_raise():
    with pytest.raises(ValueError, match="projector 'mlp'"):
        build_projector("mlp", 4, 8, 2)
    model = build_model(tiny_config())
    model.cfg.gradcam_source = "logits"
    with pytest.raises(ValueError, match="gradcam_source 'logits'"):
        model(images(), images(seed=1))


def test_gfb_learning_rate_scale_gives_the_branch_its_own_group():
    from lcr_core.train import build_optimizer

    cfg = tiny_config(gfb_lr_scale=10.0)
    optimizer = build_optimizer(build_model(cfg), cfg)
    rest, branch = optimizer.param_groups
    assert branch["lr"] == pytest.approx(10 * rest["lr"]) and len(branch["params"]) == 1


def test_augmentation_is_mocov2_aug_plus():
    steps = train_transform(224).transforms
    crop, jitter, gray, blur, flip, _, normalize = steps
    assert isinstance(crop, T.RandomResizedCrop) and crop.size == (224, 224) and crop.scale == (0.2, 1.0)
    assert jitter.p == 0.8 and isinstance(jitter.transforms[0], T.ColorJitter)
    cj = jitter.transforms[0]
    assert (cj.brightness, cj.contrast, cj.saturation, cj.hue) == ((0.6, 1.4), (0.6, 1.4), (0.6, 1.4), (-0.1, 0.1))
    assert isinstance(gray, T.RandomGrayscale) and gray.p == 0.2
    assert blur.p == 0.5 and isinstance(blur.transforms[0], RandomGaussianBlur)
    assert blur.transforms[0].sigma == (0.1, 2.0)
    assert isinstance(flip, T.RandomHorizontalFlip) and flip.p == 0.5
    assert (tuple(normalize.mean), tuple(normalize.std)) == (IMAGENET_MEAN, IMAGENET_STD)


def test_training_health_warns_once_for_each_sign():
    health = TrainingHealth(embed_dim=100)
    assert health.end_epoch({"loss_cl": 5.0, "gradcam_kl_uniform": 0.3}, 50.0) == {}
    warned = health.end_epoch({"loss_cl": 5.5, "gradcam_kl_uniform": 0.001}, 5.0)
    assert set(warned) == {"loss_rising", "flat_target", "collapse"} and "5.500" in warned["loss_rising"]
    assert health.end_epoch({"loss_cl": 6.0, "gradcam_kl_uniform": 0.001}, 5.0) == {}


def test_effective_rank_of_spread_and_collapsed_rows():
    assert losses.effective_rank(torch.eye(16)) == pytest.approx(16, rel=1e-4)
    collapsed = torch.ones(32, 16) + 1e-6 * torch.randn(32, 16)
    assert losses.effective_rank(collapsed) < 1.1
    assert math.isfinite(losses.effective_rank(torch.zeros(4, 4)))


def test_stop_gradient_keeps_the_fitting_loss_out_of_the_trunk():
    model = build_model(tiny_config(cl_weight=0.0, kl_weight=1.0, gfb_stop_gradient=True))
    model(images(), images(seed=5))["loss"].backward()
    assert model.encoder_q.gfb.projections.weight.grad.abs().sum() > 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.encoder_q.backbone.parameters())


def test_a_non_finite_loss_stops_training_before_the_update_naming_the_step():
    from lcr_core.train import NonFiniteLossError, build_optimizer, build_scheduler, train_step

    cfg = tiny_config(lr=1e30, epochs=2)
    model = build_model(cfg)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch=10)
    with pytest.raises(NonFiniteLossError, match=r"at step \d+ .*expected a finite loss") as err:
        for _ in range(20):
            before = [p.detach().clone() for p in model.encoder_q.parameters()]
            train_step(model, (images(), images(seed=1)), optimizer, scheduler)
    assert "\n" not in str(err.value)
    for param, saved in zip(model.encoder_q.parameters(), before):  # the failing step updated nothing
        torch.testing.assert_close(param.detach(), saved, equal_nan=True)
