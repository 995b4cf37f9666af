"""Loss, sparsity (-sr) and train.py: what the training loop must guarantee.

Tiny cfgs (tests/helpers.py) at 64-128 px and a few make_shapes images keep every run to seconds.
"""
import csv
import json
import math
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

import train as train_module
import training
from data.make_shapes import make_shapes
from importance import get_importance
from models import Darknet, load_model
from prune_utils import get_layer_set
from tests.helpers import REPO, free_port, interrupted_after_first_last_pt, mini_tiny, mini_yolov3, write
from utils.errors import DarkslimError
from utils.loss import DEFAULT_HYP, build_targets, compute_loss
from utils.parse_config import infer_shapes, parse_cfg_text
from utils.sparsity import BNSparsity, gamma_histogram_png, sparsity_stats
from utils.torch_utils import ModelEMA, select_device

SHAPES_NC = 5  # make_shapes classes


def model_from_text(text):
    defs = parse_cfg_text(text)
    infer_shapes(defs)
    return Darknet(defs)


def run_train(*argv):
    return train_module.train(train_module.get_args_parser().parse_args([str(a) for a in argv]))


def gammas(path, layers):
    """{layer: BN gamma} stored in checkpoint `path`."""
    state = torch.load(path, map_location='cpu', weights_only=True)['model']
    return {i: state[f"module_list.{i}.BatchNorm2d.weight"] for i in layers}


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    """8 train / 4 val make_shapes images at 64 px (5 classes)."""
    return make_shapes(tmp_path_factory.mktemp('shapes') / 'shapes', n_train=8, n_val=4, img_size=64, seed=0)


@pytest.fixture(scope='module')
def tiny5(tmp_path_factory):
    return write(tmp_path_factory.mktemp('cfg'), 'tiny5.cfg', mini_tiny(nc=SHAPES_NC, width=64, height=64))


# ------------------------------------------------------------------------------------------------------ loss

def _wh_iou_py(a, b):
    inter = min(a[0], b[0]) * min(a[1], b[1])
    return inter / (a[0] * a[1] + b[0] * b[1] - inter)


def test_targets_go_to_every_anchor_over_iou_t_and_always_to_the_best():
    model = model_from_text(mini_tiny(nc=2, width=128, height=128)).train()
    raw = model(torch.zeros(1, 3, 128, 128))
    # a 70x52 px box (equal to one anchor) and a 2x2 px box (IoU < iou_t with every anchor)
    targets = torch.tensor([[0, 1, 0.5, 0.5, 70 / 128, 52 / 128], [0, 0, 0.3, 0.7, 2 / 128, 2 / 128]])
    got = build_targets(raw, targets, model)
    heads = [model.module_list[i] for i in model.yolo_layers]
    all_anchors = [tuple(a) for h in heads for a in h.anchors.tolist()]
    for k, (_, c, cx, cy, w, h) in enumerate(targets.tolist()):
        ious = [_wh_iou_py((w * 128, h * 128), a) for a in all_anchors]
        best = max(range(len(ious)), key=ious.__getitem__)
        expected, offset = set(), 0
        for li, (head, p) in enumerate(zip(heads, raw)):
            ny, nx = p.shape[2:4]
            for a in range(head.na):
                if ious[offset + a] > DEFAULT_HYP['iou_t'] or offset + a == best:
                    expected.add((li, a, int(cy * ny), int(cx * nx), int(c)))
            offset += head.na
        found = {(li, a, gj, gi, c) for li, g in enumerate(got)
                 for a, gj, gi, c, tb in zip(g['a'].tolist(), g['gj'].tolist(), g['gi'].tolist(), g['tcls'].tolist(),
                                             g['tbox'].tolist())
                 if abs(tb[2] - w * raw[li].shape[3]) < 1e-5 and abs(tb[3] - h * raw[li].shape[2]) < 1e-5}
        assert found == expected
    assert sum(len(g['b']) for g in got) > 2  # the big box matched several anchors, the tiny one exactly one


def test_box_loss_is_zero_when_the_yolo_decoding_hits_the_target_with_scale_x_y():
    """Raw outputs built by inverting models.YOLOLayer's decoding (scale_x_y = 1.2) so that the decoded box
    equals the target: the GIoU loss must vanish; decoding without scale_x_y would miss."""
    s = 1.2
    model = model_from_text(mini_tiny(nc=2, width=128, height=128).replace('[yolo]\n', f'[yolo]\nscale_x_y={s}\n'))
    model.train()
    raw = [torch.zeros_like(p) for p in model(torch.zeros(1, 3, 128, 128))]
    targets = torch.tensor([[0, 1, 0.43, 0.61, 40 / 128, 30 / 128]])
    for p, g, i in zip(raw, build_targets(raw, targets, model), model.yolo_layers):
        head = model.module_list[i]
        ny, nx = p.shape[2:4]
        for a, gj, gi in zip(g['a'].tolist(), g['gj'].tolist(), g['gi'].tolist()):
            off = (0.43 * nx - gi, 0.61 * ny - gj)
            p[0, a, gj, gi, :2] = torch.logit(torch.tensor([(o + (s - 1) / 2) / s for o in off]))
            p[0, a, gj, gi, 2:4] = torch.log(torch.tensor([40., 30.]) / head.anchors[a])
            # the model's own decoding of this cell: the target box in pixels
            conv_out = p.permute(0, 1, 4, 2, 3).reshape(1, -1, ny, nx)
            _, dec = head.eval()(conv_out, (128, 128))
            row = dec.view(head.na, ny, nx, -1)[a, gj, gi, :4]
            assert torch.allclose(row, torch.tensor([0.43 * 128, 0.61 * 128, 40, 30]), atol=1e-3)
    _, items = compute_loss(raw, targets, model, img_hw=(128, 128))
    assert items[0].item() < 1e-4
    unscaled = model_from_text(mini_tiny(nc=2, width=128, height=128)).train()
    _, items_wrong = compute_loss(raw, targets, unscaled, img_hw=(128, 128))
    assert items_wrong[0].item() > 1e-2


def test_predictions_overlapping_a_target_above_ignore_thresh_are_not_negatives():
    model = model_from_text(mini_tiny(nc=2, width=128, height=128)).train()
    raw = [torch.zeros_like(p) for p in model(torch.zeros(1, 3, 128, 128))]
    # target 30x25 px centred at grid (16.5, 16.5) of the stride-4 head (anchors 7x9, 15x21, 30x25)
    targets = torch.tensor([[0, 0, 66 / 128, 66 / 128, 30 / 128, 25 / 128]])
    head_i = model.yolo_layers[1]
    k = model.yolo_layers.index(head_i)
    anchor = model.module_list[head_i].anchors[0]  # 7x9: wh-IoU 0.08 < iou_t, so not a positive
    assert _wh_iou_py((30, 25), anchor.tolist()) < DEFAULT_HYP['iou_t']
    raw[k][0, 0, 16, 16, 2:4] = torch.log(torch.tensor([30., 25.]) / anchor)  # decodes onto the target (IoU 1)
    raw = [p.requires_grad_() for p in raw]
    loss, _ = compute_loss(raw, targets, model, img_hw=(128, 128))
    loss.backward()
    assert raw[k].grad[0, 0, 16, 16, 4].item() == 0.0  # IoU 1 > ignore_thresh 0.7: ignored
    assert raw[k].grad[0, 0, 2, 2, 4].item() > 0  # a background cell is pushed towards objectness 0


def test_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    model = model_from_text(mini_tiny(nc=3, width=64, height=64)).train()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([[0, 1, 0.5, 0.5, 0.3, 0.4], [1, 0, 0.25, 0.3, 0.15, 0.1], [1, 2, 0.7, 0.7, 0.5, 0.5]])
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    hist = []
    for _ in range(20):
        loss, items = compute_loss(model(x), targets, model, img_hw=(64, 64))
        opt.zero_grad()
        loss.backward()
        opt.step()
        hist.append(items)
    first, last = hist[0], torch.stack(hist[-3:]).mean(0)
    assert last[3] < 0.5 * first[3]
    assert last[0] < first[0] and last[2] < first[2]  # box and class terms learn too, not only objectness


def _draw_image(size=64):
    """An image with two filled rectangles and their targets (rows: 0, cls, cx, cy, w, h normalised)."""
    img = np.full((size, size, 3), 90, np.uint8)
    boxes = [(0, 8, 10, 30, 34), (1, 36, 30, 60, 56)]  # cls, x1, y1, x2, y2
    colors = [(20, 220, 240), (240, 60, 30)]
    rows = []
    for (c, x1, y1, x2, y2), col in zip(boxes, colors):
        cv2.rectangle(img, (x1, y1), (x2 - 1, y2 - 1), col, -1)
        rows.append([0, c, (x1 + x2) / 2 / size, (y1 + y2) / 2 / size, (x2 - x1) / size, (y2 - y1) / size])
    x = torch.from_numpy(img).permute(2, 0, 1).float().div(255)[None]
    return x, torch.tensor(rows)


def _best_cells(raw, targets, model):
    """Per target: (objectness, true-class score) at its assigned (anchor, cell) of highest objectness."""
    out = []
    for k in range(len(targets)):
        cells = [(p[b, a, gj, gi], c) for p, g in zip(raw, build_targets(raw, targets[k:k + 1], model))
                 for b, a, gj, gi, c in zip(g['b'], g['a'], g['gj'], g['gi'], g['tcls'])]
        row, c = max(cells, key=lambda rc: rc[0][4].item())
        out.append((torch.sigmoid(row[4]).item(), torch.sigmoid(row[5 + c]).item()))
    return out


@pytest.mark.parametrize('nc', [1, 2])
def test_one_image_overfit_reaches_high_objectness_and_class_score(nc):
    """nc=1 included: the class score is trained too (darknet's score is objectness * class probability).
    Scores are read in train mode (batch statistics): 100 steps are too few for BN running stats to settle."""
    torch.manual_seed(0)
    model = model_from_text(mini_tiny(nc=nc, width=64, height=64)).train()
    training.init_head_biases(model, set(range(len(model.module_defs))))  # objectness prior as train.py
    with torch.no_grad():  # class logits start at 0 (score 0.5): a high class score must be learned
        for i in model.yolo_layers:
            head = model.module_list[i]
            model.module_list[model.inputs[i][0]][0].bias.view(head.na, head.no)[:, 5:] = 0
    x, targets = _draw_image()
    if nc == 1:
        targets[:, 1] = 0
    with torch.no_grad():
        start = _best_cells(model(x), targets, model)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(100):
        loss, items = compute_loss(model(x), targets, model, img_hw=(64, 64))
        first = items if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first[2] > 0.1  # a class loss exists for nc == 1 as well
    with torch.no_grad():
        end = _best_cells(model(x), targets, model)
    for (obj0, cls0), (obj1, cls1) in zip(start, end):
        assert obj0 < 0.3 and obj1 > 0.5
        assert cls0 < 0.7 and cls1 > 0.9


# -------------------------------------------------------------------------------------------------- sparsity

def test_sparsity_step_adds_s_sign_gamma_to_exactly_the_prunable_layers(capsys):
    model = model_from_text(mini_yolov3(nc=2, width=64, height=64)).train()
    layer_set = get_layer_set(model.module_defs, 0)
    assert layer_set.prunable and layer_set.excluded  # this cfg has both kinds
    loss, _ = compute_loss(model(torch.rand(1, 3, 64, 64)), torch.tensor([[0, 1, 0.5, 0.5, 0.3, 0.3]]), model)
    loss.backward()
    bns = {i: model.module_list[i][1] for i in list(layer_set.prunable) + list(layer_set.excluded)}
    before = {i: bn.weight.grad.clone() for i, bn in bns.items()}
    with torch.no_grad():
        bns[layer_set.prunable[0]].weight[0] = -0.5  # a negative gamma gets -s
    sr = BNSparsity(model, layer_set, s=0.01)
    sr.step()
    for i, bn in bns.items():
        if i in layer_set.prunable:
            assert torch.equal(bn.weight.grad, before[i] + 0.01 * torch.sign(bn.weight))
        else:
            assert torch.equal(bn.weight.grad, before[i])
    out = capsys.readouterr().out
    assert f"{len(layer_set.prunable)} BN layers regularized" in out
    assert f"{len(layer_set.excluded)} BN layers excluded" in out
    for i, why in layer_set.excluded.items():
        assert f"{i}: {why}" in out


def _set_gammas(model, layers, values):
    """Write `values` (flat) into the BN gammas of `layers`, in layer order."""
    k = 0
    with torch.no_grad():
        for i in sorted(layers):
            w = model.module_list[i][1].weight
            w.copy_(values[k:k + w.numel()])
            k += w.numel()


def test_sparsity_stats_and_histogram(tmp_path):
    model = model_from_text(mini_tiny(nc=2, width=64, height=64))
    layer_set = get_layer_set(model.module_defs, 2)
    n = sum(model.module_list[i][1].num_features for i in layer_set.prunable)
    values = torch.linspace(0, 1, n)  # evenly spread |gamma|: share < 0.01 and percentiles known in closed form
    _set_gammas(model, layer_set.prunable, -values)  # negative: the stats use |gamma|
    st = sparsity_stats(model, layer_set)
    assert st['channels'] == n
    assert st['small_share'] == pytest.approx(sum(1 for j in range(n) if j / (n - 1) < 0.01) / n)
    assert st['p50'] == pytest.approx(0.5, abs=1e-6) and st['p90'] == pytest.approx(0.9, abs=1e-6)
    counts, _ = gamma_histogram_png(model, layer_set, tmp_path / 'h.png', title='t')
    assert counts.sum() == n
    img = cv2.imread(str(tmp_path / 'h.png'))
    assert img is not None and (img < 128).any()


def test_local_decay_keeps_the_full_rate_on_the_smallest_share_only():
    model = model_from_text(mini_tiny(nc=2, width=64, height=64))
    layer_set = get_layer_set(model.module_defs, 2)
    n = sum(model.module_list[i][1].num_features for i in layer_set.prunable)
    values = torch.randperm(n).float().add(1) * torch.where(torch.rand(n) < 0.5, -1.0, 1.0) / n
    _set_gammas(model, layer_set.prunable, values)  # distinct |gamma| 1/n .. 1, mixed signs, shuffled over layers
    sr = BNSparsity(model, layer_set, s=0.1, verbose=False)
    assert sr.local_decay(0.3) == round(0.3 * n)
    for p in model.parameters():
        p.grad = None
    sr.step()
    k = 0
    for i in sorted(layer_set.prunable):
        bn = model.module_list[i][1]
        v = values[k:k + bn.num_features]
        k += bn.num_features
        # rank of |gamma| among all n (1-based) is |gamma| * n: the 30 % smallest get s, the rest s / 100
        rate = torch.where(v.abs() * n <= round(0.3 * n) + 0.5, 0.1, 0.001)
        assert torch.allclose(bn.weight.grad, rate * torch.sign(v))
    assert sr.penalty() == pytest.approx(float((torch.where(values.abs() * n <= round(0.3 * n) + 0.5, 0.1, 0.001)
                                                * values.abs()).sum()), rel=1e-5)
    with pytest.raises(DarkslimError, match='expected 0 < share <= 1'):
        sr.local_decay(0)


def test_local_decay_ranks_channels_by_the_scores_it_is_given():
    """Default: |gamma|, as the prune's 'gamma' importance (same rates); scores ranking the other way round
    press the largest |gamma| instead."""
    model = model_from_text(mini_tiny(nc=2, width=64, height=64))
    layer_set = get_layer_set(model.module_defs, 2)
    n = sum(model.module_list[i][1].num_features for i in layer_set.prunable)
    _set_gammas(model, layer_set.prunable, torch.randperm(n).float().add(1) / n)  # distinct |gamma| 1/n .. 1
    srs = [BNSparsity(model, layer_set, s=0.1, verbose=False) for _ in range(3)]
    srs[0].local_decay(0.3)
    srs[1].local_decay(0.3, importance=get_importance('gamma').scores)
    assert all(torch.equal(srs[0].rates[i], srs[1].rates[i]) for i in layer_set.prunable)

    def largest_first(m, layers):
        return {i: -m.module_list[i][1].weight.detach().abs().numpy() for i in layers}
    k = round(0.3 * n)
    assert srs[2].local_decay(0.3, importance=largest_first) == k
    for i in layer_set.prunable:
        rank = model.module_list[i][1].weight.detach() * n          # 1..n, n the largest
        assert torch.equal(srs[2].rates[i], torch.where(rank > n - k + 0.5, 0.1, 0.001))


def _sr_pair(tmp_path, shapes, cfg, extra):
    """The same seeded run without and with -sr (prune mode 0); returns (layer_set, plain.pt, sr.pt)."""
    common = ['--cfg', cfg, '--data', shapes, '--img-size', 64, '--workers', 0, '--notest', '--seed', 3,
              '--warmup-epochs', 0, *extra]
    run_train(*common, '--out-dir', tmp_path / 'plain')
    run_train(*common, '--out-dir', tmp_path / 'sr', '-sr', '--s', 0.05, '--prune', 0)
    defs = parse_cfg_text(open(cfg).read())
    return get_layer_set(defs[1:], 0), tmp_path / 'plain' / 'last.pt', tmp_path / 'sr' / 'last.pt'


def test_sr_penalty_touches_only_the_prunable_layers_in_a_training_step(tmp_path, shapes):
    cfg = write(tmp_path, 'y.cfg', mini_yolov3(nc=SHAPES_NC, width=64, height=64))
    # one optimizer step: any difference between the runs is the penalty's own
    ls, plain, sr = _sr_pair(tmp_path, shapes, cfg, ['--epochs', 1, '--batch-size', 8])
    g0, g1 = gammas(plain, ls.excluded), gammas(sr, ls.excluded)
    assert all(torch.equal(g0[i], g1[i]) for i in ls.excluded)
    p0, p1 = gammas(plain, ls.prunable), gammas(sr, ls.prunable)
    assert all((p1[i].abs() < p0[i].abs()).all() for i in ls.prunable)


def test_sr_shrinks_regularized_gammas_faster(tmp_path, shapes, capsys):
    cfg = write(tmp_path, 'y.cfg', mini_yolov3(nc=SHAPES_NC, width=64, height=64))
    ls, plain, sr = _sr_pair(tmp_path, shapes, cfg, ['--epochs', 2, '--batch-size', 4])
    def mean_abs(path, layers):
        return torch.cat(list(gammas(path, layers).values())).abs().mean().item()

    # 4 steps, lr 0.01 cosine-decayed, s 0.05, Nesterov momentum: the penalty alone moves |gamma| by ~0.0035
    shrink = mean_abs(plain, ls.prunable) - mean_abs(sr, ls.prunable)
    drift = abs(mean_abs(plain, ls.excluded) - mean_abs(sr, ls.excluded))  # only through the changed forward
    assert shrink > 0.002 and drift < shrink / 4
    out = capsys.readouterr().out
    assert out.count('BN layers regularized') == 1  # the covered layers are printed once per run
    assert 'epoch 1 sparsity:' in out
    hist = cv2.imread(str(tmp_path / 'sr' / 'gamma_hist_epoch1.png'))
    assert hist is not None and hist.shape[2] == 3
    last_row = _csv_rows(tmp_path / 'sr' / 'results.csv')[-1]  # the logged stats are those of last.pt:
    g = torch.cat(list(gammas(sr, ls.prunable).values())).abs().double().numpy()   # read from its tensors here
    assert float(last_row['gamma_p50']) == pytest.approx(np.median(g), rel=1e-5)
    assert float(last_row['gamma_small_share']) == pytest.approx((g < 0.01).mean(), abs=1e-6)
    assert math.isnan(float(_csv_rows(tmp_path / 'plain' / 'results.csv')[-1]['gamma_p50']))


def test_sr_local_decay_spares_the_largest_gammas_from_the_start_epoch_on(tmp_path, shapes, capsys):
    cfg = write(tmp_path, 'y.cfg', mini_yolov3(nc=SHAPES_NC, width=64, height=64))
    common = ['--cfg', cfg, '--data', shapes, '--img-size', 64, '--workers', 0, '--notest', '--seed', 3,
              '--warmup-epochs', 0, '--epochs', 2, '--batch-size', 4, '-sr', '--s', 0.05, '--prune', 0]
    run_train(*common, '--out-dir', tmp_path / 'sr')
    run_train(*common, '--out-dir', tmp_path / 'local', '--sr-local', 0.5, '--sr-local-start', 0.5)
    out = capsys.readouterr().out
    assert 'epoch 0 local s decay' not in out and 'epoch 1 local s decay' in out  # starts at int(0.5 * 2)
    ls = get_layer_set(parse_cfg_text(open(cfg).read())[1:], 0)
    g_sr = torch.cat(list(gammas(tmp_path / 'sr' / 'last.pt', ls.prunable).values())).abs()
    g_local = torch.cat(list(gammas(tmp_path / 'local' / 'last.pt', ls.prunable).values())).abs()
    big = g_sr >= g_sr.median()  # the half the decay spared in epoch 1 (ranks barely move in 2 steps)
    # epoch 1's two steps (lr ~0.005, s 0.05, momentum carrying epoch 0's push) move the spared half ~5e-4 less:
    # it ends larger; the pressed half, pushed alike in both runs, ends about equal
    spared = (g_local[big] - g_sr[big]).mean()
    assert spared > 4e-4
    assert (g_local[~big] - g_sr[~big]).abs().mean() < spared / 4
    with pytest.raises(DarkslimError, match='--sr-local 1.5; expected a share of channels in'):
        run_train(*common, '--out-dir', tmp_path / 'bad', '--sr-local', 1.5)
    with pytest.raises(DarkslimError, match='--sr-local 0.5 without -sr; expected -sr'):
        run_train(*[a for a in common if a != '-sr'], '--out-dir', tmp_path / 'bad', '--sr-local', 0.5)


def _bn_input_moments(model, images):
    """{conv layer: (mean, biased var)} of every BN's input over `images` in one eval-mode forward, float64."""
    seen = {}
    hooks = [m[1].register_forward_pre_hook(lambda mod, x, i=i: seen.__setitem__(i, x[0].double()))
             for i, m in enumerate(model.module_list)
             if isinstance(m, torch.nn.Sequential) and len(m) > 1 and isinstance(m[1], torch.nn.BatchNorm2d)]
    with torch.no_grad():
        model.eval()(images)
    for h in hooks:
        h.remove()
    return {i: (x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)) for i, x in seen.items()}


def test_sr_runs_save_bn_statistics_re_estimated_on_the_train_images(tmp_path, shapes, tiny5, capsys):
    from utils.datasets import LoadImagesAndLabels, list_images, parse_data_cfg
    common = ['--cfg', tiny5, '--data', shapes, '--img-size', 64, '--workers', 0, '--notest', '--seed', 3,
              '--epochs', 1, '--batch-size', 8, '--warmup-epochs', 0]
    run_train(*common, '--out-dir', tmp_path / 'sr', '-sr', '--s', 0.05, '--prune', 2)   # default: 64 images
    assert 'BatchNorm statistics re-estimated at every epoch end on 8 train images' in capsys.readouterr().out
    run_train(*common, '--out-dir', tmp_path / 'plain')                                   # default: none
    files = list_images(parse_data_cfg(shapes)['train'])
    data = LoadImagesAndLabels(files, 64, augment=False, nc=SHAPES_NC)
    images = torch.stack([data[j][0] for j in range(len(data))])          # all 8: one batch, exact moments
    for name, refreshed in (('sr', True), ('plain', False)):
        model = load_model(None, tmp_path / name / 'last.pt')
        moments = _bn_input_moments(model, images)
        worst = max(max((bn.running_mean.double() - moments[i][0]).abs().max().item(),
                        ((bn.running_var.double() - moments[i][1]).abs() / moments[i][1].clamp(min=1e-6)).max().item())
                    for i, bn in ((i, model.module_list[i][1]) for i in moments))
        assert (worst < 1e-4) if refreshed else (worst > 1e-2), (name, worst)


def test_model_ema_is_the_decayed_average():
    model = model_from_text(mini_tiny(nc=2, width=64, height=64))
    ema = ModelEMA(model, decay=0.9, tau=1.0)
    before = {k: v.clone() for k, v in ema.ema.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    d = 0.9 * (1 - math.exp(-1))
    after, msd = ema.ema.state_dict(), model.state_dict()
    for k, v in after.items():
        if v.dtype.is_floating_point:
            assert torch.allclose(v, d * before[k] + (1 - d) * msd[k], atol=1e-6)


def test_select_device():
    assert select_device('cpu') == torch.device('cpu')
    with pytest.raises(DarkslimError, match='expected cpu, cuda or cuda:N'):
        select_device('tpu')
    if not torch.cuda.is_available():
        with pytest.raises(DarkslimError, match='CUDA is not available'):
            select_device('cuda:0')


# ----------------------------------------------------------------------------------------------------- train.py

def _csv_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_resume_continues_exactly_where_an_interrupted_run_stopped(tmp_path, shapes, tiny5, monkeypatch):
    common = ['--cfg', tiny5, '--data', shapes, '--img-size', 64, '--batch-size', 4, '--workers', 0, '--seed', 1]
    full = run_train(*common, '--epochs', 2, '--out-dir', tmp_path / 'full')

    with interrupted_after_first_last_pt(monkeypatch):
        run_train(*common, '--epochs', 2, '--out-dir', tmp_path / 'cut')
    ckpt = torch.load(tmp_path / 'cut' / 'last.pt', weights_only=True)
    assert ckpt['epoch'] == 0 and ckpt['optimizer']['state']  # momentum buffers saved

    resumed = run_train('--resume', '--epochs', 2, '--out-dir', tmp_path / 'cut', '--workers', 0)
    assert resumed['start_epoch'] == 1
    a = torch.load(tmp_path / 'full' / 'last.pt', weights_only=True)
    b = torch.load(tmp_path / 'cut' / 'last.pt', weights_only=True)
    assert b['epoch'] == 1
    for k in a['model']:  # same weights as the uninterrupted run: optimizer state and LR schedule restored
        assert torch.allclose(a['model'][k], b['model'][k], atol=1e-5), k
    for sa, sb in zip(a['optimizer']['state'].values(), b['optimizer']['state'].values()):
        assert torch.allclose(sa['momentum_buffer'], sb['momentum_buffer'], atol=1e-5)
    assert b['best_fitness'] == pytest.approx(a['best_fitness'])
    assert [r['epoch'] for r in _csv_rows(tmp_path / 'cut' / 'results.csv')] == ['0', '1']
    assert resumed['metrics']['mAP50'] == pytest.approx(full['metrics']['mAP50'], abs=1e-6)


@pytest.fixture(scope='module')
def trained(tmp_path_factory, shapes, tiny5):
    out = tmp_path_factory.mktemp('run')
    summary = run_train('--cfg', tiny5, '--data', shapes, '--img-size', 64, '--batch-size', 4, '--workers', 0,
                        '--epochs', 2, '--ema', '--out-dir', out)
    return out, summary


def test_eval_interval_evaluates_every_nth_and_the_last_epoch(tmp_path, shapes, tiny5):
    summary = run_train('--cfg', tiny5, '--data', shapes, '--img-size', 64, '--batch-size', 4, '--workers', 0,
                        '--epochs', 3, '--eval-interval', 2, '--out-dir', tmp_path)
    rows = _csv_rows(tmp_path / 'results.csv')
    evaluated = [r['epoch'] for r in rows if r['mAP50'] != 'nan']
    assert evaluated == ['1', '2']  # (epoch + 1) % 2 == 0, and the final epoch
    assert torch.load(tmp_path / 'best.pt', weights_only=True)['epoch'] in (1, 2)
    assert summary['best_epoch'] in (1, 2)


def test_artifacts_load_with_weights_only_and_in_darknet_readers(trained, tiny5):
    out, summary = trained
    rows = _csv_rows(out / 'results.csv')
    assert [r['epoch'] for r in rows] == ['0', '1']
    fit = [0.1 * float(r['mAP50']) + 0.9 * float(r['mAP50_95']) for r in rows]
    assert float(rows[-1]['fitness']) == pytest.approx(fit[-1], abs=1e-5)
    best = torch.load(out / 'best.pt', weights_only=True)
    assert best['fitness'] == pytest.approx(max(fit), abs=1e-5)  # best by fitness, not by loss
    last = torch.load(out / 'last.pt', weights_only=True)
    assert set(last['ema']['train_model']) == set(last['model'])  # --ema: raw weights kept for --resume
    assert summary['paths']['best_pt'] == str(out / 'best.pt')

    from_pt = load_model(None, out / 'last.pt')
    from_weights = load_model(tiny5, out / 'last.weights')
    for k, v in from_pt.state_dict().items():
        if v.is_floating_point():  # (num_batches_tracked is not part of a .weights file)
            assert torch.equal(v, from_weights.state_dict()[k]), k

    # OpenCV's Darknet importer reads last.weights with the cfg; centres and objectness agree with ours
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        inf, raw = from_pt(x)
    net = cv2.dnn.readNetFromDarknet(str(tiny5), str(out / 'last.weights'))
    net.setInput(x.numpy())
    names = net.getUnconnectedOutLayersNames()
    outs = net.forward(names)
    outs = [outs[k] for k in sorted(range(len(names)), key=lambda k: int(names[k].split('_')[-1]))]
    start = 0
    for r, o in zip(raw, outs):
        _, na, ny, nx, no = r.shape
        ours = inf[0, start:start + na * ny * nx].view(na, ny, nx, no)
        start += na * ny * nx
        theirs = torch.from_numpy(o).view(ny, nx, na, no).permute(2, 0, 1, 3)
        assert torch.allclose(ours[..., :2] / 64, theirs[..., :2], atol=2e-3)
        assert torch.allclose(ours[..., 4], theirs[..., 4], atol=2e-3)


def test_class_count_mismatch_exits_2_with_one_line(tmp_path, shapes):
    cfg = write(tmp_path, 'three.cfg', mini_tiny(nc=3, width=64, height=64))
    r = subprocess.run([sys.executable, 'train.py', '--cfg', str(cfg), '--data', str(shapes), '--epochs', '1',
                        '--out-dir', str(tmp_path / 'o')], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and 'classes = 5' in lines[0] and '3 classes' in lines[0] and 'make-cfg' in lines[0]
    assert not (tmp_path / 'o' / 'last.pt').exists()


def test_non_finite_loss_stops_with_the_epoch_and_batch(tmp_path, shapes, tiny5):
    with pytest.raises(DarkslimError, match=r'epoch 0, batch 0: non-finite loss'):
        run_train('--cfg', tiny5, '--data', shapes, '--img-size', 64, '--workers', 0, '--epochs', 1,
                  '--out-dir', tmp_path, '--hyp', 'giou=nan')


DDP_DRIVER = '''"""Train with the training library, alone or as one rank under torchrun; save each rank's weights.

    python ddp_driver.py SPEC.json OUT_DIR     (SPEC: the TrainConfig of a BN-free model, and train.py options)

Under torchrun: the BN-free model through training.build + train_one_epoch (the library's DistributedSampler)
-> OUT/nobn-rank{R}.pt, then -sr on a BN model through train.py's options (training.fit, in the same process
group) -> OUT/sr-rank{R}.pt. Alone: the BN-free model with the images a 2-process run would see in each step
(one DistributedSampler order: ranks take alternate images of it, so one process taking them in order in
batches of 2 x 2 sees the same batches) -> OUT/single-rank0.pt, and the same with the second and third image
pairs swapped between steps (other batches, the control) -> OUT/mixed-rank0.pt.
"""
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, Sampler

import train
import training
from utils.torch_utils import dist_info, init_seeds

spec = json.loads(open(sys.argv[1]).read())
out = sys.argv[2]
rank, _, world = dist_info()


class OneOrder(Sampler):
    """The order DistributedSampler(shuffle, seed) deals from at each epoch, optionally rearranged."""
    def __init__(self, dataset, seed, rearrange=None):
        self.inner = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=seed)
        self.rearrange = rearrange or (lambda order: order)

    def set_epoch(self, epoch):
        self.inner.set_epoch(epoch)

    def __iter__(self):
        return iter(self.rearrange(list(self.inner)))

    def __len__(self):
        return len(self.inner)


def train_nobn(name, rearrange=None):
    cfg = training.TrainConfig(**spec['nobn'])
    init_seeds(cfg.seed + rank)
    run = training.build(cfg, torch.device('cpu'), rank, world)
    if world == 1:
        ds = run.loader.dataset
        run.sampler = OneOrder(ds, cfg.seed, rearrange)
        run.loader = DataLoader(ds, batch_size=cfg.batch_size, sampler=run.sampler, num_workers=0,
                                collate_fn=ds.collate_fn)
    for epoch in range(cfg.epochs):
        training.train_one_epoch(run, epoch)
    torch.save(run.model.state_dict(), os.path.join(out, f"{name}-rank{rank}.pt"))


if world > 1:
    dist.init_process_group('gloo')
    train_nobn('nobn')
    runs = []
    real_build = training.build

    def build_and_keep(*args, **kwargs):  # the Run that fit trains, to save this rank's weights after it
        runs.append(real_build(*args, **kwargs))
        return runs[-1]

    training.build = build_and_keep
    train.train(train.get_args_parser().parse_args(spec['sr_argv']))
    torch.save(runs[0].model.state_dict(), os.path.join(out, f"sr-rank{rank}.pt"))
else:
    train_nobn('single')
    train_nobn('mixed', lambda order: order[:2] + order[4:6] + order[2:4] + order[6:])
'''

# no random augmentation (flip, affine and HSV gains 0), and the objectness loss alone: it is a mean over every
# cell of every image, so the mean of two 2-image means is the 4-image mean (the box and class terms are means
# over a batch's positives, whose counts differ between the halves of a batch)
DETERMINISTIC_HYP = ['hsv_h=0', 'hsv_s=0', 'hsv_v=0', 'degrees=0', 'translate=0', 'scale=0', 'shear=0', 'fliplr=0',
                     'giou=0', 'cls=0']


def _max_param_diff(a, b, names):
    return max((a[k] - b[k]).abs().max().item() for k in names)


def test_two_process_ddp_ranks_agree_and_equal_one_process_over_the_whole_batch(tmp_path, shapes, tiny5):
    port = free_port()
    if port is None:
        pytest.skip('cannot bind a local port for torch.distributed')
    nobn_cfg = write(tmp_path, 'nobn.cfg', mini_tiny(nc=SHAPES_NC, width=64, height=64).replace(
        'batch_normalize=1', 'batch_normalize=0'))
    assert 'batch_normalize=1' not in nobn_cfg.read_text()
    out = tmp_path / 'out'
    out.mkdir()
    spec = {'nobn': dict(cfg=str(nobn_cfg), data=str(shapes), img_size=64, batch_size=4, epochs=1, workers=0,
                         notest=True, seed=5, lr0=0.02, warmup_epochs=0, hyp=DETERMINISTIC_HYP,
                         out_dir=str(tmp_path / 'nobn-run')),
            # --sr-rate: torchrun's own parser would take `--s` for an ambiguous prefix of its options
            'sr_argv': ['--cfg', str(tiny5), '--data', str(shapes), '--img-size', '64', '--batch-size', '4',
                        '--epochs', '1', '--workers', '0', '-sr', '--sr-rate', '0.01', '--prune', '2',
                        '--out-dir', str(tmp_path / 'sr')]}
    write(tmp_path, 'spec.json', json.dumps(spec))
    driver = write(tmp_path, 'ddp_driver.py', DDP_DRIVER)
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(REPO)}
    args = [str(driver), str(tmp_path / 'spec.json'), str(out)]
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--nnodes', '1',
                        '--master_addr', '127.0.0.1', '--master_port', str(port), *args],
                       cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    alone = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert alone.returncode == 0, alone.stderr[-3000:]

    # -sr through train.py's options: rank 0 alone prints and writes; both ranks end with the same parameters
    assert r.stdout.count('BN layers regularized') == 1
    assert len(_csv_rows(tmp_path / 'sr' / 'results.csv')) == 1
    ckpt = torch.load(tmp_path / 'sr' / 'last.pt', weights_only=True)
    assert ckpt['epoch'] == 0 and ckpt['args']['sr'] is True
    sr = [torch.load(out / f'sr-rank{k}.pt', weights_only=True) for k in (0, 1)]
    names = [n for n, _ in Darknet(str(tiny5)).named_parameters()]
    assert all(torch.equal(sr[0][k], sr[1][k]) for k in names)
    assert all(torch.equal(ckpt['model'][k], sr[0][k]) for k in names)             # what rank 0 wrote
    means = [k for k in sr[0] if k.endswith('running_mean')]                       # per-process statistics:
    assert max((sr[0][k] - sr[1][k]).abs().max().item() for k in means) > 1e-4     # the ranks saw other images

    # a model without BN: 2 processes x batch 2 (gradients averaged) == 1 process x batch 4 over the same images
    ddp = [torch.load(out / f'nobn-rank{k}.pt', weights_only=True) for k in (0, 1)]
    single = torch.load(out / 'single-rank0.pt', weights_only=True)
    mixed = torch.load(out / 'mixed-rank0.pt', weights_only=True)
    names = [n for n, _ in Darknet(str(nobn_cfg)).named_parameters()]
    assert _max_param_diff(ddp[0], ddp[1], names) == 0
    assert _max_param_diff(ddp[0], single, names) < 1e-5
    assert _max_param_diff(mixed, single, names) > 1e-4         # other batches give other weights: the check bites


def test_resume_does_not_need_the_weights_file_the_run_started_from(tmp_path, shapes, tiny5):
    start = tmp_path / 'start.pt'
    common = ['--data', shapes, '--img-size', 64, '--batch-size', 4, '--workers', 0, '--notest']
    run_train('--cfg', tiny5, *common, '--epochs', 1, '--out-dir', tmp_path / 'base')
    os.replace(tmp_path / 'base' / 'last.pt', start)
    run_train('--cfg', tiny5, *common, '--weights', start, '--epochs', 1, '--out-dir', tmp_path / 'run')
    start.unlink()                                    # the start weights are moved away after the first run
    resumed = run_train('--resume', tmp_path / 'run' / 'last.pt', '--epochs', 2, '--workers', 0)
    assert resumed['start_epoch'] == 1
    assert torch.load(tmp_path / 'run' / 'last.pt', weights_only=True)['epoch'] == 1


def test_resume_keeps_options_given_explicitly_even_at_their_default():
    # the interrupted run used --device cuda; `--resume --device cpu` must stay on cpu (cpu is the default)
    args = train_module.get_args_parser().parse_args(['--resume', '--device', 'cpu', '--epochs', '3'])
    train_module._restore_args(args, {'device': 'cuda', 'epochs': 9, 'lr0': 0.123, 'batch_size': 4})
    assert (args.device, args.epochs) == ('cpu', 3)        # given on the command line: kept
    assert (args.lr0, args.batch_size) == (0.123, 4)       # not given: the interrupted run's


def test_weights_inside_the_out_dir_are_refused_not_overwritten(tmp_path, shapes, tiny5):
    out = tmp_path / 'run'
    run_train('--cfg', tiny5, '--data', shapes, '--img-size', 64, '--batch-size', 4, '--workers', 0,
              '--epochs', 1, '--out-dir', out)
    before = (out / 'best.pt').read_bytes()
    with pytest.raises(DarkslimError, match='overwrites'):
        run_train('--cfg', tiny5, '--data', shapes, '--img-size', 64, '--batch-size', 4, '--workers', 0,
                  '--epochs', 1, '--out-dir', out, '--weights', out / 'best.pt')
    assert (out / 'best.pt').read_bytes() == before


def test_results_png_plots_every_epoch_and_tensorboard_is_optional(tmp_path, shapes, tiny5, capsys):
    """After training, results.png is drawn from results.csv; --tensorboard writes event files when the
    tensorboard package is installed and says in one line that it is skipped when it is not."""
    import importlib.util
    run_train('--cfg', tiny5, '--data', shapes, '--img-size', 64, '--batch-size', 4, '--workers', 0,
              '--epochs', 2, '--tensorboard', '--out-dir', tmp_path)
    img = cv2.imread(str(tmp_path / 'results.png'))
    assert img is not None and img.shape[1] > img.shape[0] > 100      # four panels side by side
    out = capsys.readouterr().out
    if importlib.util.find_spec('tensorboard') is None:
        assert out.count('tensorboard logging skipped: the tensorboard package is not installed') == 1
        assert not (tmp_path / 'tensorboard').exists()
    else:
        assert any(p.name.startswith('events.out.tfevents') for p in (tmp_path / 'tensorboard').iterdir())


def test_cfg_training_keys_the_trainer_ignores_are_named_once_with_what_governs_them(tmp_path, shapes, capsys):
    text = mini_tiny(nc=SHAPES_NC, width=64, height=64).replace(
        '[net]\n', '[net]\nlearning_rate=0.001\nburn_in=1000\nsteps=400,450\nhue=.1\n', 1)
    text = text.replace('[yolo]\n', '[yolo]\niou_normalizer=0.07\n')     # every [yolo]: named once all the same
    cfg = write(tmp_path, 'keys.cfg', text)
    run_train('--cfg', cfg, '--data', shapes, '--img-size', 64, '--batch-size', 4, '--workers', 0, '--epochs', 1,
              '--notest', '--out-dir', tmp_path / 'run')
    out = capsys.readouterr().out
    assert out.count("cfg training keys not used by this trainer") == 1
    for key, instead in (('learning_rate', '--lr0'), ('burn_in', '--warmup-epochs'), ('steps', 'cosine'),
                         ('hue', '--hyp hsv_h='), ('iou_normalizer', '--hyp giou=')):
        lines = [line for line in out.splitlines() if f"] {key} -> " in line]
        assert len(lines) == 1 and instead in lines[0] and f"{cfg}:" in lines[0], key
