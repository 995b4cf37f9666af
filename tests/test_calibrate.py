"""Calibrated surgery (calibrate.py), specified against independent references: an exactly reconstructible
pruned channel, the beta fold where it is exact, BatchNorm statistics computed layer by layer in float64,
numpy's least squares, image files written here, and a plain Darknet rebuilt from the compact cfg."""
import copy

import cv2
import numpy as np
import pytest
import torch

from calibrate import (RefitOptions, affected_layers, calibrated_compact, calibration_files, calibration_images,
                       mean_activations, recalibrate_bn, ridge_solve)
from models import BN_EPS, BN_MOMENTUM, Darknet
from prune_utils import compact_model, get_layer_set, loose_model, make_plan
from tests.helpers import ANCHORS6, conv, max_diff, mini_tiny, mini_yolov3, randomize_, raw_outputs, sparsify_, yolo
from utils.errors import DarkslimError
from utils.parse_config import parse_cfg_text
from tests.helpers import one_thread  # noqa: F401 (autouse: one intra-op thread in this file)

H, W = 64, 96




def build(text, seed=0):
    return randomize_(Darknet(parse_cfg_text(text, '<test cfg>')), seed).eval()


def rand_images(n, seed, h=H, w=W):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def leaky(x):
    return torch.where(x > 0, x, 0.1 * x)


# --- refit ------------------------------------------------------------------------------------------------------

def affine_cfg(with_3x3=True, nc=1):
    """Layer 0 (linear BN conv A) feeds a 1x1 consumer (1) and, through a route, a 3x3 consumer (5)."""
    s = "[net]\nwidth=32\nheight=32\nchannels=3\n\n"
    s += conv(4, 3, act='linear')                                  # 0 A
    s += conv(6, 1)                                                # 1 1x1 consumer
    s += conv(3 * (nc + 5), 1, bn=0, act='linear') + yolo([0, 1, 2], ANCHORS6, nc)     # 2 3
    if with_3x3:
        s += "[route]\nlayers=0\n"                               # 4
        s += conv(6, 3)                                            # 5 3x3 consumer
        s += conv(3 * (nc + 5), 1, bn=0, act='linear') + yolo([3, 4, 5], ANCHORS6, nc)     # 6 7
    return s


def affine_model(with_3x3=True, offset=0.0, r=3, k1=0, k2=2, a=0.7, b=-1.3):
    """A's channel r = a * channel k1 + b * channel k2 + offset at every position (its weights and beta are
    that combination; zero padding of a 3x3 consumer agrees only when offset = 0).  Every BN's scale
    gamma / sqrt(var + eps) is 1, A's running mean 0 (the consumers' random), r's |gamma| (0.5) the smallest
    of all (every other >= 1)."""
    model = build(affine_cfg(with_3x3))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(1.0, 2.0, generator=g)
        a_conv, a_bn = model.module_list[0][0], model.module_list[0][1]
        a_bn.running_mean.zero_()
        a_conv.weight[r] = a * a_conv.weight[k1] + b * a_conv.weight[k2]
        a_bn.bias[r] = a * a_bn.bias[k1] + b * a_bn.bias[k2] + offset
        a_bn.running_var[r] = 0.25 - BN_EPS
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_((m.running_var + BN_EPS).sqrt())
    return model


@pytest.mark.parametrize('with_3x3, offset, shrink_to',
                         [(True, 0.0, 'fold'), (False, 0.8, 'fold'), (True, 0.0, 'zero')],
                         ids=['1x1+3x3', '1x1-offset', '1x1+3x3-shrink-to-zero'])
def test_refit_recovers_an_exactly_reconstructible_pruned_channel(with_3x3, offset, shrink_to):
    model = affine_model(with_3x3, offset)
    plan = make_plan(model, get_layer_set(model.module_defs, 'tiny'), 'tiny', threshold=0.75)
    assert {i: int((~k).sum()) for i, k in plan.keep.items() if (~k).any()} == {0: 1}      # only A's r goes
    calib, new = rand_images(16, 1, 32, 32), rand_images(4, 2, 32, 32)
    refit, report = calibrated_compact(model, plan, calib, steps=('refit',), refit=RefitOptions(shrink_to=shrink_to),
                                       verbose=False)
    assert [(r.layer, r.kernel) for r in report.refit] == [(1, '1x1'), (5, '3x3')][:1 + with_3x3]
    assert max_diff(raw_outputs(refit, new), raw_outputs(model, new)) < 1e-4
    fold, _ = calibrated_compact(model, plan, calib, steps=(), verbose=False)
    assert max_diff(raw_outputs(fold, new), raw_outputs(model, new)) > 1e-2     # control: the fold alone is off
    assert all(r.err_after < 1e-8 < r.err_before for r in report.refit)


def test_ridge_solve_is_least_squares_with_an_unpenalized_offset():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g, dtype=torch.float64) * torch.tensor([1., 3., .1, 2., 1.], dtype=torch.float64)
    a = torch.cat([x, torch.ones(200, 1, dtype=torch.float64)], 1)
    y = torch.randn(200, 3, generator=g, dtype=torch.float64) + 5
    w = ridge_solve(a.T @ a, a.T @ y, 1e-12)
    ref = np.linalg.lstsq(a.numpy(), y.numpy(), rcond=None)[0]
    np.testing.assert_allclose(w.numpy(), ref, atol=1e-8)
    heavy = ridge_solve(a.T @ a, a.T @ y, 1e9)                   # weights shrink to 0, the offset to mean(Y)
    np.testing.assert_allclose(heavy[:-1].numpy(), 0, atol=1e-6)
    np.testing.assert_allclose(heavy[-1].numpy(), y.mean(0).numpy(), atol=1e-6)
    prior = torch.randn(6, 3, generator=g, dtype=torch.float64)
    held = ridge_solve(a.T @ a, a.T @ y, 1e9, prior)             # weights stay at the prior, the offset absorbs
    np.testing.assert_allclose(held[:-1].numpy(), prior[:-1].numpy(), atol=1e-6)
    np.testing.assert_allclose(held[-1].numpy(), (y - x @ prior[:-1]).mean(0).numpy(), atol=1e-6)
    light = ridge_solve(a.T @ a, a.T @ y, 1e-12, prior)          # no shrinkage: least squares again
    np.testing.assert_allclose(light.numpy(), ref, atol=1e-8)


def consumers_by_shape(original, compact):
    """Convs whose compact version reads fewer channels than the original (derived from the two models)."""
    return [i for i, d in enumerate(original.module_defs) if d['type'] == 'convolutional'
            and compact.module_list[i][0].in_channels < original.module_list[i][0].in_channels]


def test_calibrated_yolov3_with_shortcuts_and_concat_is_a_plain_darknet_and_refit_lowers_errors():
    model = build(mini_yolov3())
    layer_set = get_layer_set(model.module_defs, 'shortcut')
    assert layer_set.groups                                        # a shortcut group is thinned
    plan = make_plan(model, layer_set, 'shortcut', percent=0.3)
    before = copy.deepcopy(model.state_dict())
    calib = rand_images(10, 3)
    compact, report = calibrated_compact(model, plan, calib, verbose=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())     # input left alone
    assert report.steps == ('mean', 'refit', 'bn') and report.images == 10
    assert [r.layer for r in report.refit] == consumers_by_shape(model, compact)
    assert 24 in [r.layer for r in report.refit]                   # reads the [route] concat 23 = 22 + 11
    assert all(r.err_after < r.err_before for r in report.refit)
    plain = Darknet(compact.defs).eval()
    plain.load_state_dict(compact.state_dict())                    # strict: every shape agrees with the cfg
    new = rand_images(2, 4)
    assert max_diff(raw_outputs(plain, new), raw_outputs(compact, new)) == 0


def test_refit_brings_the_compact_model_closer_to_the_original_on_new_images():
    model = build(mini_tiny())
    plan = make_plan(model, get_layer_set(model.module_defs, 'tiny'), 'tiny', percent=0.3)
    calib, new = rand_images(12, 5), rand_images(4, 6)
    ref = raw_outputs(model, new)
    err = {}
    for steps in [('mean',), ('mean', 'refit')]:
        compact, _ = calibrated_compact(model, plan, calib, steps=steps, verbose=False)
        err[steps] = sum(((u - v) ** 2).mean().item() for u, v in zip(raw_outputs(compact, new), ref))
    assert err[('mean', 'refit')] < 0.5 * err[('mean',)]


# --- mean fold --------------------------------------------------------------------------------------------------

def test_mean_fold_equals_beta_fold_when_removed_channels_are_dead():
    model = build(mini_tiny())
    layer_set = get_layer_set(model.module_defs, 'tiny')
    zeroed = sparsify_(model, layer_set, share=0.4, beta='random')   # gamma 0: output act(beta), a constant
    plan = make_plan(model, layer_set, 'tiny', threshold=0.25)
    calib = rand_images(4, 7)
    means = mean_activations(model, sorted(plan.keep), calib)
    for i, idx in zeroed.items():
        beta = model.module_list[i][1].bias.detach()[idx]
        np.testing.assert_allclose(means[i][idx].numpy(), leaky(beta).numpy(), atol=1e-6)
    mean_fold, _ = calibrated_compact(model, plan, calib, steps=('mean',), verbose=False)
    beta_fold = compact_model(model, plan)
    new = rand_images(2, 8)
    assert max_diff(raw_outputs(mean_fold, new), raw_outputs(beta_fold, new)) < 1e-5


def test_mean_activations_hand_computed_on_a_one_conv_model():
    text = ("[net]\nwidth=32\nheight=32\nchannels=3\n\n" + conv(4, 1, act='linear')
            + conv(3 * 6, 1, bn=0, act='linear') + yolo([0, 1, 2], ANCHORS6[:3], 1))
    model = build(text)
    x = rand_images(3, 9, 32, 32)
    c, bn = model.module_list[0][0], model.module_list[0][1]
    scale = (bn.weight / (bn.running_var + BN_EPS).sqrt()).detach()
    # a linear 1x1 conv + BN: the mean output is the affine map of the mean input pixel
    mean_in = x.double().mean((0, 2, 3))
    expect = (c.weight.detach()[:, :, 0, 0].double() @ mean_in - bn.running_mean.double()) * scale.double() \
        + bn.bias.detach().double()
    got = mean_activations(model, [0], x, batch=2)[0]
    np.testing.assert_allclose(got.numpy(), expect.numpy(), atol=1e-5)
    with pytest.raises(DarkslimError, match=r"layer 2: a \[yolo\] layer; expected a \[convolutional\]"):
        mean_activations(model, [2], x)


# --- BatchNorm recalibration ------------------------------------------------------------------------------------

def exact_bn_statistics(model, images):
    """Each BN's input mean and biased variance over `images`, in float64, set layer by layer (eval mode, every
    earlier BN already set): the statistics the model's eval forward sees. Returns [(mean, var)] in order."""
    m64 = copy.deepcopy(model).double().eval()
    bns = [m for m in m64.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    out = []
    for bn in bns:
        seen = []
        h = bn.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0]))
        with torch.no_grad():
            m64(images.double())
        h.remove()
        x = seen[0]
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        out.append((mean, var))
    return out


def test_recalibrate_bn_finds_the_exact_statistics_and_keeps_correct_ones():
    model = build(mini_yolov3())
    images = rand_images(6, 10)
    exact = exact_bn_statistics(model, images)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert max((bn.running_mean.double() - m).abs().max().item() for bn, (m, _) in zip(bns, exact)) > 0.05
    tracked = [bn.num_batches_tracked.item() for bn in bns]
    recalibrate_bn(model, images, batch=len(images))               # from wrong statistics
    for bn, (m, v) in zip(bns, exact):
        assert (bn.running_mean.double() - m).abs().max().item() < 1e-3
        assert (bn.running_var.double() - v).abs().max().item() < 1e-3
    settled = [(bn.running_mean.clone(), bn.running_var.clone()) for bn in bns]
    recalibrate_bn(model, images, batch=len(images))               # from correct statistics: unchanged
    for bn, (m, v) in zip(bns, settled):
        assert (bn.running_mean - m).abs().max().item() < 1e-3 and (bn.running_var - v).abs().max().item() < 1e-3
    assert not any(m.training for m in model.modules())            # modes restored
    assert [bn.num_batches_tracked.item() for bn in bns] == tracked and all(bn.momentum == BN_MOMENTUM for bn in bns)


def test_recalibrate_bn_in_batches_combines_moments_of_one_layer_exactly():
    """The first BN's input does not depend on any BN: batches of 2 give its exact statistics too."""
    model = build(mini_tiny())
    images = rand_images(5, 11)
    (m, v), *_ = exact_bn_statistics(model, images)
    recalibrate_bn(model, images, batch=2)
    bn = model.module_list[0][1]
    np.testing.assert_allclose(bn.running_mean.numpy(), m.numpy(), atol=1e-5)
    np.testing.assert_allclose(bn.running_var.numpy(), v.numpy(), rtol=1e-5, atol=1e-6)


def test_recalibrate_bn_of_chosen_layers_leaves_the_others():
    model = build(mini_yolov3())
    images = rand_images(4, 12)
    last = max(i for i, d in enumerate(model.module_defs) if d['type'] == 'convolutional' and d['batch_normalize'])
    bn = model.module_list[last][1]
    seen = []
    h = bn.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0].double()))
    with torch.no_grad():
        model(images)                               # eval: every other BN uses its own statistics
    h.remove()
    others = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(f"module_list.{last}.")}
    recalibrate_bn(model, images, batch=3, layers=[last])
    np.testing.assert_allclose(bn.running_mean.numpy(), seen[0].mean((0, 2, 3)).numpy(), atol=1e-5)
    np.testing.assert_allclose(bn.running_var.numpy(), seen[0].var((0, 2, 3), unbiased=False).numpy(), rtol=1e-4)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in others.items())


def conv_outputs(model, x):
    """{conv layer: raw conv output (before BN)}."""
    out = {}
    hooks = [model.module_list[i][0].register_forward_hook(lambda m, inp, o, i=i: out.__setitem__(i, o))
             for i, d in enumerate(model.module_defs) if d['type'] == 'convolutional']
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return out


@pytest.mark.parametrize('text, mode', [(mini_yolov3(), 'shortcut'), (mini_yolov3(), 'normal'), (mini_tiny(), 'tiny')])
def test_affected_layers_are_the_convs_whose_input_the_prune_changes(text, mode):
    model = build(text)
    plan = make_plan(model, get_layer_set(model.module_defs, mode), mode, percent=0.2)
    x = rand_images(1, 13)
    ref, loose = conv_outputs(model, x), conv_outputs(loose_model(model, plan), x)
    changed = [i for i in ref if not torch.allclose(ref[i], loose[i], atol=1e-6)]
    assert affected_layers(model, plan) == changed
    assert len(changed) < len(ref)                   # some convs (the first) are untouched


# --- calibration images -----------------------------------------------------------------------------------------

def image_set(tmp_path):
    """Three train images (PNG, lossless: 32x32, 32x32 and 16x32 h x w) and a .data whose valid list names
    missing files. Returns (.data path, [RGB float arrays as written], [paths])."""
    rng = np.random.default_rng(0)
    folder = tmp_path / 'images' / 'train'
    folder.mkdir(parents=True)
    arrays, paths = [], []
    for name, (h, w) in zip(('a', 'b', 'c'), ((32, 32), (32, 32), (16, 32))):
        bgr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        p = folder / f"{name}.png"
        cv2.imwrite(str(p), bgr)
        arrays.append(bgr[:, :, ::-1].astype(np.float32) / 255)
        paths.append(str(p))
    (tmp_path / 'train.txt').write_text(''.join(f"images/train/{n}.png\n" for n in 'abc'))
    (tmp_path / 'valid.txt').write_text("images/val/missing1.png\nimages/val/missing2.png\n")
    data = tmp_path / 'set.data'
    data.write_text("classes=2\ntrain=train.txt\nvalid=valid.txt\n")
    return data, arrays, paths


def test_calibration_images_are_the_train_split_in_order(tmp_path):
    data, arrays, paths = image_set(tmp_path)
    before = data.read_text()
    imgs = calibration_images(data, 10, 32, verbose=False)        # more than the split: all of it
    assert imgs.shape == (3, 3, 32, 32)
    for got, want in zip(imgs[:2], arrays[:2]):                    # square at 32: exactly the pixels
        np.testing.assert_allclose(got.permute(1, 2, 0).numpy(), want, atol=1e-6)
    # 16x32: letterboxed, 8 rows of pad colour 114 above and below
    np.testing.assert_allclose(imgs[2, :, 8:24].permute(1, 2, 0).numpy(), arrays[2], atol=1e-6)
    np.testing.assert_allclose(imgs[2, :, :8].numpy(), 114 / 255, atol=1e-6)
    np.testing.assert_allclose(imgs[2, :, 24:].numpy(), 114 / 255, atol=1e-6)
    assert data.read_text() == before


def test_calibration_files_subset_is_seeded_and_in_file_order(tmp_path):
    data, _, paths = image_set(tmp_path)
    assert calibration_files(data) == paths
    two = calibration_files(data, 2, seed=3)
    assert len(two) == 2 and set(two) <= set(paths) and two == sorted(two, key=paths.index)
    assert calibration_files(data, 2, seed=3) == two
    assert {tuple(calibration_files(data, 2, seed=s)) for s in range(8)} != {tuple(two)}   # the seed matters
    with pytest.raises(DarkslimError, match="calibration images 0; expected a positive count"):
        calibration_files(data, 0)


def test_unknown_step_or_bn_layers_is_refused():
    model = build(mini_tiny())
    plan = make_plan(model, get_layer_set(model.module_defs, 'tiny'), 'tiny', percent=0.2)
    with pytest.raises(DarkslimError, match=r"unknown \['refti'\]; expected any of \['mean', 'refit', 'bn'\]"):
        calibrated_compact(model, plan, rand_images(2, 0), steps=('mean', 'refti'))
    with pytest.raises(DarkslimError, match=r"bn_layers 'some'; expected 'affected' or 'all'"):
        calibrated_compact(model, plan, rand_images(2, 0), bn_layers='some')
    with pytest.raises(DarkslimError, match=r"refit shrink_to 'one'; expected 'fold' or 'zero'"):
        calibrated_compact(model, plan, rand_images(2, 0), refit=RefitOptions(shrink_to='one'))


def test_no_steps_is_the_beta_fold():
    model = build(mini_tiny())
    plan = make_plan(model, get_layer_set(model.module_defs, 'tiny'), 'tiny', percent=0.2)
    compact, report = calibrated_compact(model, plan, rand_images(2, 0), steps=(), verbose=False)
    new = rand_images(2, 1)
    assert max_diff(raw_outputs(compact, new), raw_outputs(compact_model(model, plan), new)) == 0
    assert report.refit == [] and report.steps == ()


def test_refit_options_bound_the_rows():
    model = build(mini_tiny())
    plan = make_plan(model, get_layer_set(model.module_defs, 'tiny'), 'tiny', percent=0.3)
    opts = RefitOptions(rows_per_feature=1, min_rows=50, max_rows=100, gram_macs=0)
    _, report = calibrated_compact(model, plan, rand_images(5, 2), steps=('refit',), refit=opts, verbose=False)
    assert report.refit and all(50 <= r.rows <= 100 for r in report.refit)
