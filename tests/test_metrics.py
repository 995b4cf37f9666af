"""Boxes, NMS and COCO-style metrics, checked against hand-computed values, pycocotools' COCOeval and a slow
reference greedy NMS."""
import json

import numpy as np
import pytest
import torch

from tests.helpers import cocoeval
from utils.boxes import bbox_giou, box_iou, wh_iou, xywh2xyxy, xywhn2xyxy, xyxy2xywh, xyxy2xywhn
from utils.errors import DarkslimError
from utils.metrics import (DetectionStats, ap_per_class, coco_gt_from_labels, coco_json_detections, format_table,
                           match_predictions, nms, non_max_suppression, write_coco_json)

IMG_W, IMG_H = 200, 160  # image size of the hand-made cases


# ----------------------------------------------------------------------------------------------------- helpers

def _to_yolo(labels_px, w, h):
    """[m, 5] cls, x1, y1, x2, y2 pixels -> [m, 5] cls, xc, yc, w, h normalised."""
    labels_px = np.asarray(labels_px, dtype=np.float64).reshape(-1, 5)
    out = np.zeros_like(labels_px)
    out[:, 0] = labels_px[:, 0]
    out[:, 1:] = xyxy2xywh(labels_px[:, 1:]) / [w, h, w, h]
    return out


def _ours(labels, preds, names=None):
    """labels / preds: per image, [m, 5] cls x1 y1 x2 y2 / [n, 6] x1 y1 x2 y2 conf cls (pixels)."""
    stats = DetectionStats()
    for lab, pred in zip(labels, preds):
        stats.update(np.asarray(pred, dtype=np.float64).reshape(-1, 6), np.asarray(lab, dtype=np.float64).reshape(-1, 5))
    return stats.compute(names)


def _cocoeval(labels, preds, nc, sizes=None):
    """Oracle: pycocotools on the same data. Returns mAP50, mAP50_95 and {class: (AP50, AP50_95)}."""
    sizes = sizes or [(IMG_H, IMG_W)] * len(labels)  # (h, w)
    files = [f"img{i}.jpg" for i in range(len(labels))]
    gt = coco_gt_from_labels(files, [_to_yolo(lab, w, h) for lab, (h, w) in zip(labels, sizes)], sizes, nc)
    dets = []
    for i, pred in enumerate(preds):
        dets += coco_json_detections(np.asarray(pred, dtype=np.float64).reshape(-1, 6), i, files[i])
    return cocoeval(gt, dets)


def _assert_matches_cocoeval(res, labels, preds, nc, sizes=None, tol=1e-6):
    map50, map5095, per_class = _cocoeval(labels, preds, nc, sizes)
    assert res['mAP50'] == pytest.approx(map50, abs=tol)
    assert res['mAP50_95'] == pytest.approx(map5095, abs=tol)
    assert [pc['class'] for pc in res['per_class']] == sorted(per_class)
    for pc in res['per_class']:
        assert pc['AP50'] == pytest.approx(per_class[pc['class']][0], abs=tol)
        assert pc['AP50_95'] == pytest.approx(per_class[pc['class']][1], abs=tol)


def _raw(boxes_xyxy, obj, cls_probs, dtype=torch.float32):
    """One image of raw detector output [N, 5 + nc] from xyxy boxes, objectness and class probabilities."""
    boxes = torch.as_tensor(boxes_xyxy, dtype=dtype).reshape(-1, 4)
    return torch.cat([xyxy2xywh(boxes), torch.as_tensor(obj, dtype=dtype).reshape(-1, 1),
                      torch.as_tensor(cls_probs, dtype=dtype).reshape(len(boxes), -1)], 1)


def _iou_scalar(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _reference_nms(boxes, scores, labels, iou_thres):
    """Textbook greedy NMS, one box at a time: indices kept, by descending score."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    keep = []
    for i in order:
        if all(labels[k] != labels[i] or _iou_scalar(boxes[k], boxes[i]) <= iou_thres for k in keep):
            keep.append(i)
    return keep


def _reference_non_max_suppression(x, conf_thres, iou_thres, max_det):
    """Reference for one image [N, 5 + nc] with multi_label: rows (x1, y1, x2, y2, conf, cls) as lists."""
    x = x.double().tolist()
    cand = []
    for row in x:
        xc, yc, w, h, obj = row[:5]
        for c, p in enumerate(row[5:]):
            if obj > conf_thres and obj * p > conf_thres:
                cand.append(([xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2], obj * p, c))
    keep = _reference_nms([c[0] for c in cand], [c[1] for c in cand], [c[2] for c in cand], iou_thres)[:max_det]
    return [cand[i][0] + [cand[i][1], cand[i][2]] for i in keep]


# -------------------------------------------------------------------------------------------------------- boxes

def test_xywh_xyxy_conversions_round_trip_torch_and_numpy():
    xywh = np.array([[10.0, 20.0, 4.0, 6.0], [0.5, 0.5, 1.0, 1.0]])
    xyxy = np.array([[8.0, 17.0, 12.0, 23.0], [0.0, 0.0, 1.0, 1.0]])
    np.testing.assert_allclose(xywh2xyxy(xywh), xyxy)
    np.testing.assert_allclose(xyxy2xywh(xyxy), xywh)
    t = torch.tensor(xywh)
    assert torch.equal(xyxy2xywh(xywh2xyxy(t)), t)
    assert torch.equal(xywh2xyxy(t), torch.tensor(xyxy))
    np.testing.assert_allclose(xywhn2xyxy(np.array([[0.5, 0.5, 0.5, 0.25]]), 200, 100, padw=3, padh=4),
                               [[53.0, 41.5, 153.0, 66.5]])
    # pixel xyxy in a 200 x 100 image -> normalised centre, size; and back (float32 kept, as the data loader uses)
    px = np.array([[50.0, 40.0, 150.0, 65.0], [0.0, 0.0, 200.0, 100.0]], np.float32)
    n = xyxy2xywhn(px, 200, 100)
    assert n.dtype == np.float32
    np.testing.assert_allclose(n, [[0.5, 0.525, 0.5, 0.25], [0.5, 0.5, 1.0, 1.0]], atol=1e-7)
    np.testing.assert_allclose(xywhn2xyxy(n, 200, 100), px, atol=1e-4)
    assert torch.allclose(xyxy2xywhn(torch.from_numpy(px), 200, 100), torch.from_numpy(n))
    assert px[0].tolist() == [50.0, 40.0, 150.0, 65.0]  # input not modified
    assert xywh.tolist() == [[10.0, 20.0, 4.0, 6.0], [0.5, 0.5, 1.0, 1.0]]  # input not modified


def test_box_iou_hand_computed():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    b = torch.tensor([[5.0, 5.0, 15.0, 15.0],  # overlap 5x5 = 25; union 100 + 100 - 25 = 175
                      [0.0, 0.0, 10.0, 10.0],  # identical
                      [0.0, 0.0, 5.0, 5.0],  # contained: 25 / 100
                      [10.0, 0.0, 20.0, 10.0],  # touching edge: no area in common
                      [30.0, 30.0, 40.0, 40.0]])  # disjoint
    expected = [[25 / 175, 1.0, 0.25, 0.0, 0.0]]
    torch.testing.assert_close(box_iou(a, b), torch.tensor(expected))
    np.testing.assert_allclose(box_iou(a.numpy(), b.numpy()), expected)
    assert box_iou(b, a).shape == (5, 1)
    empty = torch.tensor([[1.0, 1.0, 1.0, 1.0]])  # two zero-area boxes: IoU 0, not NaN
    assert box_iou(empty, empty).item() == 0.0


def test_giou_identical_disjoint_and_gradient():
    a = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    far = torch.tensor([[2.0, 0.0, 3.0, 1.0]])  # IoU 0, enclosing box 3, union 2 -> 0 - (3 - 2) / 3
    assert bbox_giou(a, a, x1y1x2y2=True).item() == pytest.approx(1.0, abs=1e-6)
    assert bbox_giou(a, far, x1y1x2y2=True).item() == pytest.approx(-1 / 3, abs=1e-6)
    # centre-size form gives the same answer as corner form
    assert bbox_giou(xyxy2xywh(a), xyxy2xywh(far)).item() == pytest.approx(-1 / 3, abs=1e-6)
    half = torch.tensor([[0.0, 0.0, 1.0, 0.5]])  # inside a: IoU 0.5, enclosing == union -> GIoU = IoU
    assert bbox_giou(a, half, x1y1x2y2=True).item() == pytest.approx(0.5, abs=1e-6)
    # differentiable: analytic gradient equals finite differences on partly overlapping boxes (centre-size form)
    p = torch.tensor([[5.0, 5.0, 4.0, 3.0], [1.0, 2.0, 2.0, 2.0]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[6.0, 5.5, 3.0, 4.0], [4.0, 2.0, 2.0, 1.0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: bbox_giou(x, t), (p,))


def test_wh_iou_hand_computed():
    wh1 = torch.tensor([[2.0, 2.0]])
    wh2 = torch.tensor([[4.0, 1.0], [2.0, 2.0], [1.0, 1.0]])  # inter 2, union 6 | identical | 1/4
    torch.testing.assert_close(wh_iou(wh1, wh2), torch.tensor([[1 / 3, 1.0, 0.25]]))


# ---------------------------------------------------------------------------------------------------------- NMS

def test_nms_suppresses_within_class_and_keeps_across_classes():
    boxes = [[0, 0, 10, 10],  # class 0, score 0.9
             [1, 0, 11, 10],  # class 0, IoU with first 90/110 = 0.82 -> suppressed
             [1, 0, 11, 10],  # same box, class 1 -> kept (different class)
             [50, 50, 60, 60]]  # class 0, no overlap -> kept
    cls = [[1, 0], [1, 0], [0, 1], [1, 0]]
    obj = [0.9, 0.8, 0.7, 0.6]
    pred = _raw(boxes, obj, cls)[None]
    before = pred.clone()
    out = non_max_suppression(pred, conf_thres=0.1, iou_thres=0.5)
    assert len(out) == 1
    torch.testing.assert_close(out[0], torch.tensor([[0, 0, 10, 10, 0.9, 0],
                                                     [1, 0, 11, 10, 0.7, 1],
                                                     [50, 50, 60, 60, 0.6, 0]], dtype=torch.float32))
    assert torch.equal(pred, before)  # input not modified
    # with a threshold above the IoU (0.82) nothing is suppressed
    assert len(non_max_suppression(pred, conf_thres=0.1, iou_thres=0.85)[0]) == 4


def test_nms_score_is_objectness_times_class_probability():
    # obj 0.5 and class probability 0.5 each pass 0.3, but their product 0.25 does not
    pred = _raw([[0, 0, 10, 10], [20, 20, 30, 30]], [0.5, 0.9], [[0.5], [0.5]])[None]
    out = non_max_suppression(pred, conf_thres=0.3)[0]
    torch.testing.assert_close(out, torch.tensor([[20.0, 20.0, 30.0, 30.0, 0.45, 0.0]]))
    assert non_max_suppression(pred, conf_thres=0.5)[0].shape == (0, 6)


def test_nms_multi_label_and_class_filter():
    # one box, two classes above threshold: two detections with multi_label, only the best without
    pred = _raw([[0, 0, 10, 10]], [1.0], [[0.2, 0.7, 0.6]])[None]
    multi = non_max_suppression(pred, conf_thres=0.3, multi_label=True)[0]
    torch.testing.assert_close(multi[:, 4:], torch.tensor([[0.7, 1.0], [0.6, 2.0]]))
    single = non_max_suppression(pred, conf_thres=0.3, multi_label=False)[0]
    torch.testing.assert_close(single[:, 4:], torch.tensor([[0.7, 1.0]]))
    only2 = non_max_suppression(pred, conf_thres=0.3, classes=[2])[0]
    torch.testing.assert_close(only2[:, 4:], torch.tensor([[0.6, 2.0]]))


def test_nms_max_det_keeps_highest_scores_per_image():
    n = 20
    boxes = [[20 * i, 0, 20 * i + 10, 10] for i in range(n)]  # disjoint
    obj = torch.linspace(0.2, 0.95, n)
    img0 = _raw(boxes, obj, torch.ones(n, 1))
    img1 = _raw(boxes[:3], obj[:3], torch.ones(3, 1))
    out = non_max_suppression(torch.stack([img0, torch.cat([img1, torch.zeros(n - 3, 6)])]), conf_thres=0.1,
                              max_det=5)
    assert [len(o) for o in out] == [5, 3]
    torch.testing.assert_close(out[0][:, 4], obj.flip(0)[:5])
    assert (out[1][:, 4].diff() <= 0).all()


def test_nms_empty_and_single_class():
    pred = torch.zeros(2, 7, 6)  # nc = 1, nothing above threshold
    out = non_max_suppression(pred)
    assert [o.shape for o in out] == [(0, 6), (0, 6)]
    pred = _raw([[0, 0, 10, 10], [0, 0, 10, 9]], [0.9, 0.8], [[1.0], [1.0]])[None]  # IoU 0.9
    assert non_max_suppression(pred, iou_thres=0.6)[0].shape == (1, 6)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_nms_equals_slow_reference_on_random_boxes(seed):
    g = torch.Generator().manual_seed(seed)
    n, nc = 300, 3
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * 100  # crowded: many overlaps and chains
    wh = 5 + torch.rand(n, 2, generator=g, dtype=torch.float64) * 30
    obj = torch.rand(n, 1, generator=g, dtype=torch.float64)
    cls = torch.rand(n, nc, generator=g, dtype=torch.float64)
    x = torch.cat([xy, wh, obj, cls], 1)
    out = non_max_suppression(x[None], conf_thres=0.05, iou_thres=0.45, max_det=1000)[0]
    ref = _reference_non_max_suppression(x, 0.05, 0.45, 1000)
    assert 20 < len(ref) < n * nc  # the case exercises suppression
    torch.testing.assert_close(out, torch.tensor(ref, dtype=torch.float64))
    capped = non_max_suppression(x[None], conf_thres=0.05, iou_thres=0.45, max_det=25)[0]
    torch.testing.assert_close(capped, torch.tensor(ref[:25], dtype=torch.float64))


def test_nms_blocks_give_the_greedy_result():
    g = torch.Generator().manual_seed(3)
    n = 200
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * 60
    boxes = torch.cat([xy, xy + 8 + torch.rand(n, 2, generator=g, dtype=torch.float64) * 20], 1)
    scores = torch.rand(n, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 2, (n,), generator=g)
    ref = _reference_nms(boxes.tolist(), scores.tolist(), labels.tolist(), 0.3)
    for block in (7, 64, 512):  # a box may be suppressed by a box in an earlier block or its own block
        assert nms(boxes, scores, 0.3, labels=labels, block=block).tolist() == ref
    assert nms(boxes, scores, 0.3, labels=labels, max_keep=4, block=7).tolist() == ref[:4]
    ref_agnostic = _reference_nms(boxes.tolist(), scores.tolist(), [0] * n, 0.3)
    assert nms(boxes, scores, 0.3, block=16).tolist() == ref_agnostic


# ---------------------------------------------------------------------------------------------------- matching

def test_match_predictions_greedy_by_score():
    labels = np.array([[0, 0, 0, 10, 10],
                       [0, 20, 0, 30, 10],
                       [1, 40, 0, 50, 10]], dtype=np.float64)
    iouv = np.array([0.5, 0.75])
    pred = np.array([[0, 0, 10, 10, 0.5, 0],  # exact on GT 0, but scored below the duplicate
                     [0, 0, 10, 8, 0.9, 0],  # IoU 0.8 with GT 0: takes it at both thresholds
                     [20, 0, 30, 6, 0.8, 0],  # IoU 0.6 with GT 1: match at 0.5 only
                     [40, 0, 50, 10, 0.7, 0],  # exact on a class-1 GT but class 0: no match
                     [40, 0, 50, 10, 0.6, 1]])  # exact, right class
    tp = match_predictions(pred, labels, iouv)
    assert tp.tolist() == [[False, False], [True, True], [True, False], [False, False], [True, True]]
    assert match_predictions(pred[:0], labels, iouv).shape == (0, 2)
    assert not match_predictions(pred, labels[:0], iouv).any()


def test_match_predictions_takes_best_unmatched_gt():
    # first prediction overlaps GT a (IoU 90/115) and GT b (IoU 95/110): it takes b, so the second one, which
    # only overlaps a (IoU 80/130 with a, 60/150 with b), is a true positive too
    labels = np.array([[0, 0, 0, 10, 10], [0, 0, 2, 10, 12]], dtype=np.float64)
    pred = np.array([[0, 1, 10, 11.5, 0.9, 0], [0, -3, 10, 8, 0.8, 0]], dtype=np.float64)
    np.testing.assert_allclose(box_iou(pred[:, :4], labels[:, 1:]), [[90 / 115, 95 / 110], [80 / 130, 60 / 150]])
    assert match_predictions(pred, labels, np.array([0.5]))[:, 0].tolist() == [True, True]
    # at 0.7 the second prediction's 0.62 is too low
    assert match_predictions(pred, labels, np.array([0.7]))[:, 0].tolist() == [True, False]


# ------------------------------------------------------------------------------------------- AP vs hand and COCO

def test_perfect_detections_give_map_1():
    labels = [[[0, 10, 10, 50, 60], [1, 100, 20, 150, 90]], [[1, 5, 5, 40, 40]]]
    preds = [[[10, 10, 50, 60, 0.9, 0], [100, 20, 150, 90, 0.8, 1]], [[5, 5, 40, 40, 0.7, 1]]]
    res = _ours(labels, preds, names=['cat', 'dog'])
    assert (res['mAP50'], res['mAP50_95'], res['precision'], res['recall']) == pytest.approx((1.0, 1.0, 1.0, 1.0))
    assert [(pc['name'], pc['images'], pc['targets']) for pc in res['per_class']] == [('cat', 1, 1), ('dog', 2, 2)]
    assert (res['images'], res['targets']) == (2, 3)
    _assert_matches_cocoeval(res, labels, preds, nc=2)


def test_shifted_box_counts_only_at_low_iou_thresholds():
    # prediction covers 72% of the GT (IoU 0.72): a match at 0.50..0.70 (5 thresholds), not at 0.75..0.95 (5)
    labels = [[[0, 0, 0, 100, 100]]]
    preds = [[[0, 0, 100, 72, 0.9, 0]]]
    res = _ours(labels, preds)
    assert res['mAP50'] == pytest.approx(1.0)
    assert res['mAP50_95'] == pytest.approx(5 / 10)
    _assert_matches_cocoeval(res, labels, preds, nc=1)


def test_duplicate_detection_is_a_false_positive():
    # 3 images with one GT each. Sorted detections: TP .9, duplicate FP .8, TP .7, TP .6
    # recall [1/3, 1/3, 2/3, 1], precision [1, 1/2, 2/3, 3/4] -> envelope [1, 3/4, 3/4, 3/4]
    # 101 recall points: 0.00..0.33 (34 points) read 1, 0.34..1.00 (67 points) read 3/4
    box = [20, 20, 80, 90]
    labels = [[[0] + box]] * 3
    preds = [[box + [0.9, 0], box + [0.8, 0]], [box + [0.7, 0]], [box + [0.6, 0]]]
    res = _ours(labels, preds)
    expected_ap = (34 * 1.0 + 67 * 0.75) / 101
    assert res['mAP50'] == pytest.approx(expected_ap)
    assert res['mAP50_95'] == pytest.approx(expected_ap)  # exact boxes: same at every IoU threshold
    # operating point: mean F1 by threshold .9: 1/2, .8: 2/5, .7: 2/3, .6: 6/7 -> conf .6, P 3/4, R 1
    assert res['conf_threshold'] == pytest.approx(0.6)
    assert (res['precision'], res['recall']) == pytest.approx((0.75, 1.0))
    assert res['f1'] == pytest.approx(6 / 7)
    _assert_matches_cocoeval(res, labels, preds, nc=1)


def test_missing_detections_lower_recall():
    # 3 GT, 2 found: recall [1/3, 2/3], precision 1 -> recall points 0.00..0.66 (67) read 1, the rest 0
    labels = [[[0, 10, 10, 50, 50], [0, 60, 10, 100, 50], [0, 110, 10, 150, 50]]]
    preds = [[[10, 10, 50, 50, 0.9, 0], [60, 10, 100, 50, 0.8, 0]]]
    res = _ours(labels, preds)
    assert res['mAP50'] == pytest.approx(67 / 101)
    assert res['mAP50_95'] == pytest.approx(67 / 101)
    assert (res['precision'], res['recall']) == pytest.approx((1.0, 2 / 3))
    _assert_matches_cocoeval(res, labels, preds, nc=1)


def test_wrong_class_detection():
    # class 0 GT A is only detected as class 1 (FP of class 1, score .9); class 1 GT B is found (score .8)
    # class 0: no detection -> AP 0; class 1: recall [0, 1], precision [0, 1/2] -> envelope 1/2 -> AP 1/2
    # class 2 has detections but no GT: left out of the mean, as in COCOeval
    a, b = [10, 10, 60, 60], [100, 10, 150, 60]
    labels = [[[0] + a, [1] + b]]
    preds = [[a + [0.9, 1], b + [0.8, 1], [0, 100, 50, 150, 0.95, 2]]]
    res = _ours(labels, preds)
    assert [(pc['class'], pc['AP50']) for pc in res['per_class']] == [(0, 0.0), (1, pytest.approx(0.5))]
    assert res['mAP50'] == pytest.approx(0.25)
    _assert_matches_cocoeval(res, labels, preds, nc=3)


def test_no_detections_and_no_labels():
    res = _ours([[[0, 1, 1, 5, 5]], []], [[], []])
    assert (res['mAP50'], res['recall'], res['conf_threshold']) == (0.0, 0.0, None)
    res = _ours([[]], [[[1, 1, 5, 5, 0.9, 0]]])
    assert (res['mAP50'], res['per_class'], res['targets']) == (0.0, [], 0)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_random_dataset_matches_cocoeval(seed):
    rng = np.random.default_rng(seed)
    nc, n_img = 4, 40
    labels, preds, sizes = [], [], []
    for _ in range(n_img):
        w, h = int(rng.integers(200, 640)), int(rng.integers(200, 480))
        m = int(rng.integers(0, 7))
        xy = rng.uniform(0, 0.7, (m, 2)) * [w, h]
        wh = rng.uniform(0.05, 0.3, (m, 2)) * [w, h]
        lab = np.concatenate([rng.integers(0, nc, (m, 1)), xy, xy + wh], 1)
        pred = []
        for c, x1, y1, x2, y2 in lab:
            for _ in range(int(rng.choice([0, 1, 1, 1, 2]))):  # missed, found, or found twice
                jitter = rng.normal(0, 0.08, 4) * [x2 - x1, y2 - y1, x2 - x1, y2 - y1]
                pc = c if rng.random() < 0.85 else rng.integers(0, nc)
                pred.append([x1, y1, x2, y2] + jitter)
                pred[-1] = list(pred[-1]) + [rng.random(), pc]
        for _ in range(int(rng.integers(0, 4))):  # background false positives
            x1, y1 = rng.uniform(0, 0.8) * w, rng.uniform(0, 0.8) * h
            pred.append([x1, y1, x1 + 0.1 * w, y1 + 0.15 * h, rng.random(), rng.integers(0, nc)])
        labels.append(lab)
        preds.append(np.array(pred, dtype=np.float64).reshape(-1, 6))
        sizes.append((h, w))
    res = _ours(labels, preds)
    assert 0.2 < res['mAP50_95'] < res['mAP50'] < 1.0  # a non-trivial case
    _assert_matches_cocoeval(res, labels, preds, nc, sizes, tol=1e-3)  # tol covers the 3-decimal JSON boxes


def test_ap_per_class_operating_point_by_hand():
    # class 0: 2 GT, detections (conf, tp) = (.9, T), (.5, F), (.4, T), (.2, F), (.1, F)
    # class 1: 1 GT, detections (.8, F), (.3, T)
    tp = np.array([[True], [False], [True], [False], [False], [False], [True]])
    conf = np.array([0.9, 0.5, 0.4, 0.2, 0.1, 0.8, 0.3])
    pred_cls = np.array([0, 0, 0, 0, 0, 1, 1])
    out = ap_per_class(tp, conf, pred_cls, target_cls=np.array([0, 0, 1]))
    # F1 (class 0, class 1) with all detections >= threshold: .9 (2/3, 0) .8 (2/3, 0) .5 (1/2, 0) .4 (4/5, 0)
    # .3 (4/5, 2/3) .2 (2/3, 2/3) .1 (4/7, 2/3): the mean is highest at .3
    assert out['conf_threshold'] == pytest.approx(0.3)
    assert out['p'].tolist() == pytest.approx([2 / 3, 1 / 2])
    assert out['r'].tolist() == pytest.approx([1.0, 1.0])
    assert out['f1'].tolist() == pytest.approx([4 / 5, 2 / 3])
    assert out['classes'].tolist() == [0, 1] and out['n_targets'].tolist() == [2, 1]
    # class 0 AP: recall [.5, .5, 1, 1, 1], precision [1, 1/2, 2/3, 1/2, 2/5] -> envelope [1, 2/3, 2/3, 1/2, 2/5]
    # recall points 0.00..0.50 (51) read 1, 0.51..1.00 (50) read 2/3
    assert out['ap'][0, 0] == pytest.approx((51 + 50 * 2 / 3) / 101)


def test_operating_point_ties():
    # equal scores enter together: 1 GT, (.9, T) and (.9, F) -> P 1/2 at threshold .9, never P 1
    out = ap_per_class(np.array([[True], [False]]), np.array([0.9, 0.9]), np.array([0, 0]), np.array([0]))
    assert (out['p'][0], out['r'][0]) == pytest.approx((0.5, 1.0))
    # equal mean F1 (2/3) at .9 (P 1, R 1/2) and .6 (P 1/2, R 1): the higher threshold wins
    out = ap_per_class(np.array([[True], [False], [False], [True]]), np.array([0.9, 0.8, 0.7, 0.6]),
                       np.zeros(4), np.array([0, 0]))
    assert out['conf_threshold'] == pytest.approx(0.9)
    assert (out['p'][0], out['r'][0]) == pytest.approx((1.0, 0.5))


# ------------------------------------------------------------------------------------------ output formatting

def test_format_table_lists_classes_and_all():
    labels = [[[0, 10, 10, 50, 60], [1, 100, 20, 150, 90]]]
    preds = [[[10, 10, 50, 60, 0.9, 0]]]
    text = format_table(_ours(labels, preds), names=['person', 'bicycle'])
    lines = [ln for ln in text.splitlines() if ln.startswith('|')]
    assert [ln.split('|')[1].strip() for ln in lines] == ['Class', 'person', 'bicycle', 'all']
    assert lines[-1].split('|')[-2].strip() == '0.500'  # mAP@0.5:0.95 of 'all': classes 1.0 and 0.0


def test_coco_json_written_atomically_with_original_pixels(tmp_path):
    dets = torch.tensor([[10.0, 20.0, 40.0, 60.0, 0.87654321, 2.0]])
    entries = coco_json_detections(dets, 3, 'images/a.jpg')
    path = tmp_path / 'out' / 'dets.json'
    write_coco_json(path, entries)
    assert json.loads(path.read_text()) == [{'image_id': 3, 'file_name': 'images/a.jpg', 'category_id': 2,
                                             'bbox': [10.0, 20.0, 30.0, 40.0],
                                             'score': float(np.float32(0.87654321))}]  # the score as computed
    assert [p.name for p in path.parent.iterdir()] == ['dets.json']  # no temp file left behind
    assert coco_json_detections(dets, 0, 'a.jpg', class_map=[1, 2, 3])[0]['category_id'] == 3


def test_coco_gt_from_yolo_labels():
    gt = coco_gt_from_labels(['a.jpg', 'b.jpg'], [np.array([[1, 0.5, 0.5, 0.5, 0.25]]), np.zeros((0, 5))],
                             [(100, 200), (48, 64)], nc=2)  # (h, w)
    assert gt['images'] == [{'id': 0, 'file_name': 'a.jpg', 'width': 200, 'height': 100},
                            {'id': 1, 'file_name': 'b.jpg', 'width': 64, 'height': 48}]
    assert gt['annotations'] == [{'id': 1, 'image_id': 0, 'category_id': 1, 'bbox': [50.0, 37.5, 100.0, 25.0],
                                  'area': 2500.0, 'iscrowd': 0}]
    assert [c['id'] for c in gt['categories']] == [0, 1]
    with pytest.raises(DarkslimError, match='a.jpg'):
        coco_gt_from_labels(['a.jpg'], [np.array([[2, 0.5, 0.5, 0.1, 0.1]])], [(10, 10)], nc=2)


def test_box_iou_batched_equals_per_image():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(3, 7, 2, generator=g) * 50
    a = torch.cat((xy, xy + torch.rand(3, 7, 2, generator=g) * 30), -1)
    xy = torch.rand(3, 4, 2, generator=g) * 50
    b = torch.cat((xy, xy + torch.rand(3, 4, 2, generator=g) * 30), -1)
    batched = box_iou(a, b)
    assert batched.shape == (3, 7, 4)
    for k in range(3):
        assert torch.equal(batched[k], box_iou(a[k], b[k]))
