"""Detection post-processing (NMS) and COCO-style metrics.

Conventions (shared with pycocotools so that our numbers equal COCOeval's):
- Boxes are continuous xyxy pixels; IoU has no +1 pixel terms.
- A prediction matches a ground truth (GT) box of the same class when IoU >= threshold; predictions are taken in
  descending score order (stable for ties), each GT is matched at most once per IoU threshold, and a prediction
  takes the highest-IoU still-unmatched GT (the last one in label order on exact ties, as COCOeval does).
- AP is COCO's 101-point interpolated AP: precision made monotone (envelope from the right), read at recall
  thresholds linspace(0, 1, 101) with searchsorted(side='left'), 0 beyond the highest recall reached.
- Classes without any GT are left out of every mean (COCOeval gives them precision -1); classes with GT but no
  predictions count with AP 0.
- No per-image detection cap is applied here: every prediction passed in is evaluated. COCOeval keeps at most
  params.maxDets[-1] (default 100) detections per image *and class*; results are identical unless an image has
  more detections of one class than that (our NMS keeps `max_det` = 300 per image in total).
- P, R, F1 are reported at one operating point for all classes: the confidence threshold (one of the prediction
  scores) that maximises the mean over classes of F1 at IoU iouv[0] (0.5), like current ultralytics but exact (no
  curve interpolation or smoothing). Ties go to the highest threshold.
"""
import json
import os

import numpy as np
import torch
from terminaltables import AsciiTable

from utils.boxes import box_iou, xywh2xyxy
from utils.errors import DarkslimError
from utils.io import write_text_atomic

COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)  # same construction as pycocotools Params.iouThrs
COCO_RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)  # same as pycocotools Params.recThrs


# ---------------------------------------------------------------------------------------------------------- NMS

def nms(boxes, scores, iou_thres, labels=None, max_keep=None, block=512):
    """Greedy non-maximum suppression, vectorised (no Python loop over boxes).

    boxes [K, 4] xyxy, scores [K], labels [K] (optional; boxes only suppress boxes of the same label).
    A box is dropped when its IoU with a kept, higher-scoring box is > iou_thres. Returns the kept indices [k]
    (int64) in descending score order; with max_keep, only the first max_keep of them (and work stops early).

    Boxes are processed in score-ordered blocks of `block`: a block is first cleared against all boxes kept so
    far, then its survivors are resolved by iterating keep[j] = not any(keep[i] and i suppresses j, i < j) to
    its fixed point. The greedy result is the unique fixed point (keep[j] depends only on earlier boxes), reached
    after at most `block` iterations, a handful on real detections. Memory is O(block * kept).
    """
    n = boxes.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = torch.argsort(scores, descending=True, stable=True)
    boxes = boxes[order]
    labels = labels[order] if labels is not None else None
    kept_chunks = []  # indices into `order`
    kept_boxes = boxes[:0]
    kept_labels = labels[:0] if labels is not None else None
    n_kept = 0
    for start in range(0, n, block):
        cand = torch.arange(start, min(start + block, n), device=boxes.device)  # indices into sorted boxes
        if n_kept:
            over = box_iou(kept_boxes, boxes[cand]) > iou_thres  # [kept, B]
            if labels is not None:
                over &= kept_labels[:, None] == labels[cand][None, :]
            cand = cand[~over.any(0)]  # not suppressed by earlier blocks
        b = boxes[cand]
        sup = torch.triu(box_iou(b, b) > iou_thres, diagonal=1)  # [B, B]: i suppresses j (i < j)
        if labels is not None:
            sup &= labels[cand][:, None] == labels[cand][None, :]
        keep = torch.ones(len(cand), dtype=torch.bool, device=boxes.device)
        while True:
            new = ~(sup & keep[:, None]).any(0)
            if torch.equal(new, keep):
                break
            keep = new
        cand = cand[keep]
        kept_chunks.append(cand)
        kept_boxes = torch.cat([kept_boxes, boxes[cand]])
        if labels is not None:
            kept_labels = torch.cat([kept_labels, labels[cand]])
        n_kept += cand.numel()
        if max_keep is not None and n_kept >= max_keep:
            break
    kept = torch.cat(kept_chunks)
    if max_keep is not None:
        kept = kept[:max_keep]
    return order[kept]


def non_max_suppression(prediction, conf_thres=0.001, iou_thres=0.6, max_det=300, multi_label=True, classes=None,
                        max_nms=30000):
    """Class-aware NMS on raw detector output.

    prediction: [B, N, 5 + nc] tensor; per row centre x, centre y, w, h (input pixels), objectness and nc class
      probabilities, all already sigmoid-ed. Not modified.
    A (box, class) candidate scores obj * cls_prob and is kept when score > conf_thres; with multi_label every
    class above the threshold gives a candidate, otherwise only the best class. `classes`: keep only these ids.
    At most max_nms candidates (highest scores) enter NMS; NMS suppresses within a class only (IoU > iou_thres).
    Returns a list of B tensors [n <= max_det, 6]: x1, y1, x2, y2, conf, cls, sorted by conf descending, on the
    device and dtype of `prediction`.
    """
    if prediction.dim() != 3 or prediction.shape[-1] < 6:
        raise ValueError(f"prediction shape {tuple(prediction.shape)}; expected [B, N, 5 + nc] with nc >= 1")
    output = []
    for x in prediction:  # one image: [N, 5 + nc]
        x = x[x[:, 4] > conf_thres]  # score <= obj, so this only drops rows that cannot pass
        scores = x[:, 5:] * x[:, 4:5]  # [n, nc], a new tensor
        boxes = xywh2xyxy(x[:, :4])
        if multi_label:
            i, j = (scores > conf_thres).nonzero(as_tuple=True)
            conf = scores[i, j]
        else:
            conf, j = scores.max(1)
            i = torch.nonzero(conf > conf_thres).squeeze(1)
            conf, j = conf[i], j[i]
        if classes is not None:
            m = torch.isin(j, torch.as_tensor(list(classes), dtype=j.dtype, device=j.device))
            i, j, conf = i[m], j[m], conf[m]
        if conf.numel() > max_nms:
            top = torch.topk(conf, max_nms).indices
            i, j, conf = i[top], j[top], conf[top]
        keep = nms(boxes[i], conf, iou_thres, labels=j, max_keep=max_det)
        output.append(torch.cat([boxes[i[keep]], conf[keep, None], j[keep, None].to(x.dtype)], 1))
    return output


# ------------------------------------------------------------------------------------------------- matching

def _to_numpy(x, dtype=np.float64):
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def match_predictions(pred, labels, iouv=COCO_IOU_THRESHOLDS):
    """Mark true positives as COCOeval does for one image.

    pred [n, 6] x1, y1, x2, y2, conf, cls; labels [m, 5] cls, x1, y1, x2, y2 (same pixel frame); iouv [T].
    Returns a numpy bool array tp [n, T] in the row order of `pred`.
    """
    pred = _to_numpy(pred).reshape(-1, 6)
    labels = _to_numpy(labels).reshape(-1, 5)
    thr = np.minimum(_to_numpy(iouv).reshape(-1), 1 - 1e-10)  # pycocotools caps thresholds the same way
    n, m, t = len(pred), len(labels), len(thr)
    tp = np.zeros((n, t), dtype=bool)
    if n == 0 or m == 0:
        return tp
    iou = box_iou(pred[:, :4], labels[:, 1:5])  # [n, m] float64
    iou[pred[:, 5][:, None] != labels[:, 0][None, :]] = -1.0  # other classes never match
    order = np.argsort(-pred[:, 4], kind='stable')
    order = order[iou[order].max(1) >= thr.min()]  # predictions that can match anything, still score-ordered
    matched = np.zeros((t, m), dtype=bool)  # GT already taken, per threshold
    rows = np.arange(t)
    for d in order:  # sequential by definition of greedy matching; vectorised over thresholds and GT
        ok = (iou[d][None, :] >= thr[:, None]) & ~matched  # [T, m]
        has = ok.any(1)
        if not has.any():
            continue
        masked = np.where(ok, iou[d][None, :], -np.inf)
        g = m - 1 - np.argmax(masked[:, ::-1], axis=1)  # best IoU, last GT on ties (COCOeval)
        tp[d] = has
        matched[rows[has], g[has]] = True
    return tp


# --------------------------------------------------------------------------------------------------------- AP

def coco_ap(tp, n_gt, recall_thresholds=COCO_RECALL_THRESHOLDS):
    """COCO 101-point AP of one class. tp [n, T] bool sorted by descending score; n_gt > 0. Returns [T]."""
    tp = np.asarray(tp, dtype=bool)
    n, t = tp.shape
    if n == 0:
        return np.zeros(t)
    tpc = np.cumsum(tp, 0, dtype=np.float64)
    fpc = np.cumsum(~tp, 0, dtype=np.float64)
    rc = tpc / n_gt
    pr = tpc / (tpc + fpc + np.spacing(1))
    pr = np.maximum.accumulate(pr[::-1], axis=0)[::-1]  # precision envelope
    ap = np.zeros(t)
    for k in range(t):
        inds = np.searchsorted(rc[:, k], recall_thresholds, side='left')
        q = np.where(inds < n, pr[np.minimum(inds, n - 1), k], 0.0)
        ap[k] = q.mean()
    return ap


def ap_per_class(tp, conf, pred_cls, target_cls):
    """Per-class metrics over a data set.

    tp [n, T] bool (from match_predictions), conf [n], pred_cls [n], target_cls [m] (class of every GT box).
    Returns a dict:
      classes [K] int (classes having GT, ascending), n_targets [K] int,
      p, r, f1 [K] at the operating point (see module doc), conf_threshold (float; None without predictions),
      ap [K, T] COCO 101-point AP per IoU threshold.
    """
    conf = _to_numpy(conf).reshape(-1)
    tp = _to_numpy(tp, bool)
    tp = tp[:, None] if tp.ndim == 1 else tp
    pred_cls = _to_numpy(pred_cls).reshape(-1).astype(np.int64)
    target_cls = _to_numpy(target_cls).reshape(-1).astype(np.int64)
    classes, n_targets = np.unique(target_cls, return_counts=True)
    k_, t_ = len(classes), tp.shape[1]
    order = np.argsort(-conf, kind='stable')
    tp, conf, pred_cls = tp[order], conf[order], pred_cls[order]
    n = len(conf)

    ap = np.zeros((k_, t_))
    f1_delta = np.zeros(n)  # change of the sum over classes of F1 when threshold passes prediction i
    cls_index = np.full(n, -1)
    cum_tp = np.zeros(n)  # per-class running TP count at IoU iouv[0], aligned with predictions
    cum_n = np.zeros(n)  # per-class running prediction count
    for k, (c, nt) in enumerate(zip(classes, n_targets)):
        pos = np.nonzero(pred_cls == c)[0]
        if len(pos) == 0:
            continue
        ap[k] = coco_ap(tp[pos], nt)
        tpc = np.cumsum(tp[pos, 0], dtype=np.float64)
        cnt = np.arange(1, len(pos) + 1, dtype=np.float64)
        p, r = tpc / cnt, tpc / nt
        f1 = np.divide(2 * p * r, p + r, out=np.zeros_like(p), where=(p + r) > 0)
        f1_delta[pos] = np.diff(f1, prepend=0.0)
        cls_index[pos], cum_tp[pos], cum_n[pos] = k, tpc, cnt

    p = np.zeros(k_)
    r = np.zeros(k_)
    conf_threshold = None
    if n and k_:
        mean_f1 = np.cumsum(f1_delta) / k_  # mean F1 with the threshold at conf[i] (all predictions >= it)
        last_of_tie = np.append(conf[1:] != conf[:-1], True)  # a threshold includes every equal score
        cand = np.nonzero(last_of_tie)[0]
        best = cand[np.argmax(mean_f1[cand])]  # first maximum = highest threshold
        conf_threshold = float(conf[best])
        for k in range(k_):  # last prediction of class k at or above the threshold
            pos = np.nonzero(cls_index[:best + 1] == k)[0]
            if len(pos):
                p[k] = cum_tp[pos[-1]] / cum_n[pos[-1]]
                r[k] = cum_tp[pos[-1]] / n_targets[k]
    f1 = np.divide(2 * p * r, p + r, out=np.zeros_like(p), where=(p + r) > 0)
    return {'classes': classes, 'n_targets': n_targets, 'p': p, 'r': r, 'f1': f1,
            'conf_threshold': conf_threshold, 'ap': ap}


class DetectionStats:
    """Accumulates per-image matches, then computes data-set metrics.

    stats = DetectionStats(); for each image: stats.update(pred, labels); results = stats.compute(names)
    pred [n, 6] x1, y1, x2, y2, conf, cls and labels [m, 5] cls, x1, y1, x2, y2 in one pixel frame (torch or
    numpy). Images must be fed in data-set order for ties in score to break as in COCOeval.
    """

    def __init__(self, iouv=COCO_IOU_THRESHOLDS):
        self.iouv = _to_numpy(iouv).reshape(-1)
        self._tp, self._conf, self._cls, self._tcls = [], [], [], []
        self._image_counts = {}  # class -> number of images holding at least one GT box of it
        self.images = 0

    def update(self, pred, labels):
        pred = _to_numpy(pred).reshape(-1, 6)
        labels = _to_numpy(labels).reshape(-1, 5)
        self._tp.append(match_predictions(pred, labels, self.iouv))
        self._conf.append(pred[:, 4])
        self._cls.append(pred[:, 5])
        tcls = labels[:, 0].astype(np.int64)
        self._tcls.append(tcls)
        for c in np.unique(tcls).tolist():
            self._image_counts[c] = self._image_counts.get(c, 0) + 1
        self.images += 1

    def compute(self, names=None):
        """Returns a JSON-ready dict:
        images, targets (int); precision, recall, f1, mAP50, mAP50_95 (float, means over classes with GT; 0.0
        when there is no GT); conf_threshold (operating point, None without predictions); iou_thresholds (list);
        per_class: list, one dict per class with GT in ascending class order, with keys
        class, name, images, targets, P, R, F1, AP50 (AP at iou_thresholds[0]), AP50_95 (mean over thresholds).
        names: list/dict class -> name (default: str(class)).
        """
        t = len(self.iouv)
        tp = np.concatenate(self._tp) if self._tp else np.zeros((0, t), bool)
        conf = np.concatenate(self._conf) if self._conf else np.zeros(0)
        cls = np.concatenate(self._cls) if self._cls else np.zeros(0)
        tcls = np.concatenate(self._tcls) if self._tcls else np.zeros(0, np.int64)
        res = ap_per_class(tp, conf, cls, tcls)
        per_class = []
        for k, c in enumerate(res['classes'].tolist()):
            per_class.append({
                'class': int(c), 'name': class_name(names, c), 'images': self._image_counts.get(c, 0),
                'targets': int(res['n_targets'][k]), 'P': float(res['p'][k]), 'R': float(res['r'][k]),
                'F1': float(res['f1'][k]), 'AP50': float(res['ap'][k, 0]), 'AP50_95': float(res['ap'][k].mean())})
        has = len(per_class) > 0
        return {
            'images': self.images, 'targets': int(len(tcls)),
            'precision': float(res['p'].mean()) if has else 0.0,
            'recall': float(res['r'].mean()) if has else 0.0,
            'f1': float(res['f1'].mean()) if has else 0.0,
            'mAP50': float(res['ap'][:, 0].mean()) if has else 0.0,
            'mAP50_95': float(res['ap'].mean()) if has else 0.0,
            'conf_threshold': res['conf_threshold'],
            'iou_thresholds': [float(v) for v in self.iouv],
            'per_class': per_class,
        }


def class_name(names, c):
    """names[c] (names: list or dict), or str(c) when there are no names or no name for c."""
    if names is None:
        return str(c)
    try:
        return str(names[c])
    except (IndexError, KeyError):
        return str(c)


def format_table(results, names=None):
    """Text table (terminaltables) of DetectionStats.compute() results: one row per class, then 'all'."""
    header = ['Class', 'Images', 'Targets', 'P', 'R', 'F1', 'mAP@0.5', 'mAP@0.5:0.95']
    rows = [header]
    for pc in results['per_class']:
        name = class_name(names, pc['class']) if names is not None else pc['name']
        rows.append([name, pc['images'], pc['targets']] +
                    [f"{pc[k]:.3f}" for k in ('P', 'R', 'F1', 'AP50', 'AP50_95')])
    rows.append(['all', results['images'], results['targets']] +
                [f"{results[k]:.3f}" for k in ('precision', 'recall', 'f1', 'mAP50', 'mAP50_95')])
    table = AsciiTable(rows)
    for col in range(1, len(header)):
        table.justify_columns[col] = 'right'
    return table.table


# ---------------------------------------------------------------------------------------------- COCO JSON

# The 80 COCO detection classes in the class-id order of Darknet/ultralytics label files, and the category ids
# of the official COCO annotations for them (COCO numbers 91 categories, 11 of which have no boxes).
COCO_NAMES = (
    'person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus', 'train', 'truck', 'boat', 'traffic light',
    'fire hydrant', 'stop sign', 'parking meter', 'bench', 'bird', 'cat', 'dog', 'horse', 'sheep', 'cow',
    'elephant', 'bear', 'zebra', 'giraffe', 'backpack', 'umbrella', 'handbag', 'tie', 'suitcase', 'frisbee',
    'skis', 'snowboard', 'sports ball', 'kite', 'baseball bat', 'baseball glove', 'skateboard', 'surfboard',
    'tennis racket', 'bottle', 'wine glass', 'cup', 'fork', 'knife', 'spoon', 'bowl', 'banana', 'apple',
    'sandwich', 'orange', 'broccoli', 'carrot', 'hot dog', 'pizza', 'donut', 'cake', 'chair', 'couch',
    'potted plant', 'bed', 'dining table', 'toilet', 'tv', 'laptop', 'mouse', 'remote', 'keyboard', 'cell phone',
    'microwave', 'oven', 'toaster', 'sink', 'refrigerator', 'book', 'clock', 'vase', 'scissors', 'teddy bear',
    'hair drier', 'toothbrush')
# darknet's data/coco.names spells six of them differently
DARKNET_COCO_SPELLINGS = {3: 'motorbike', 4: 'aeroplane', 57: 'sofa', 58: 'pottedplant', 60: 'diningtable',
                          62: 'tvmonitor'}
COCO80_TO_91 = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31,
                32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57,
                58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87,
                88, 89, 90)


def is_coco_names(names):
    """True when `names` are COCO's 80 classes in COCO order (official or darknet spelling, any case)."""
    if names is None or len(names) != len(COCO_NAMES):
        return False
    for k, (name, coco) in enumerate(zip(names, COCO_NAMES)):
        if str(name).strip().lower() not in (coco, DARKNET_COCO_SPELLINGS.get(k)):
            return False
    return True


def coco_category_ids(names, nc):
    """category_id of each class 0..nc-1 in COCO JSON: COCO's official ids (COCO80_TO_91) when `names` are the
    80 COCO classes, so that the JSON scores against the official annotations; else the class index itself."""
    return list(COCO80_TO_91) if nc == len(COCO80_TO_91) and is_coco_names(names) else list(range(nc))


def coco_image_ids(img_files):
    """image_id of each image in COCO JSON: the file stem as a number when every stem is a number and no two are
    equal (COCO's 000000000139.jpg -> 139, the id of the official annotations); else the 0-based index in the
    list."""
    stems = [os.path.splitext(os.path.basename(os.fspath(f)))[0] for f in img_files]
    if stems and all(s.isdigit() for s in stems):
        ids = [int(s) for s in stems]
        if len(set(ids)) == len(ids):
            return ids
    return list(range(len(stems)))


def coco_json_detections(dets, image_id, file_name, class_map=None):
    """COCO result entries for one image.

    dets [n, 6] x1, y1, x2, y2, conf, cls in ORIGINAL image pixels (map letterboxed boxes back first with
    utils.datasets.scale_coords). image_id: the image's id (see coco_image_ids). class_map: optional
    sequence/dict class -> category_id (default: the class index itself; see coco_category_ids). bbox is
    [x, y, w, h] rounded to 3 decimals; score unrounded (rounding it, to 5 decimals as ultralytics does, ties
    low scores and changes the order pycocotools ranks detections in: its mAP then differs from ours, 4e-6 on
    coco128 val). Returns a list of dicts
    {"image_id", "file_name", "category_id", "bbox", "score"}.
    """
    dets = _to_numpy(dets).reshape(-1, 6)
    out = []
    for x1, y1, x2, y2, score, c in dets.tolist():
        c = int(c)
        out.append({'image_id': int(image_id), 'file_name': str(file_name),
                    'category_id': int(class_map[c]) if class_map is not None else c,
                    'bbox': [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)],
                    'score': score})
    return out


def write_coco_json(path, dets):
    """Write a list of coco_json_detections entries to `path` atomically."""
    write_text_atomic(path, json.dumps(dets))


def coco_gt_from_labels(img_files, label_arrays, sizes, nc, names=None, image_ids=None, category_ids=None):
    """COCO-format ground truth dict (for pycocotools) from YOLO labels.

    img_files [I] paths; label_arrays [I] arrays [m, 5] class, x_centre, y_centre, w, h normalised to 0..1;
    sizes [I] (height, width) of the original images in pixels, as LoadImagesAndLabels.shapes; nc classes.
    Typical call: coco_gt_from_labels(ds.img_files, ds.labels, ds.shapes, nc).
    images get id image_ids[i] (default 0-based index), annotations ids 1.. (pycocotools treats id 0 as
    'unmatched'), bbox [x, y, w, h] in pixels, area = w * h, iscrowd 0; category of class c: category_ids[c]
    (default c). Pass coco_image_ids(img_files) and coco_category_ids(names, nc) to match a JSON that
    utils.evaluate wrote.
    """
    if not (len(img_files) == len(label_arrays) == len(sizes)):
        raise ValueError(f"{len(img_files)} images, {len(label_arrays)} label arrays, {len(sizes)} sizes; "
                         f"expected equal lengths")
    image_ids = list(range(len(img_files))) if image_ids is None else list(image_ids)
    category_ids = list(range(nc)) if category_ids is None else list(category_ids)
    if len(image_ids) != len(img_files) or len(category_ids) != nc:
        raise ValueError(f"{len(image_ids)} image ids for {len(img_files)} images, {len(category_ids)} category ids "
                         f"for {nc} classes; expected one each")
    images, annotations = [], []
    for i, (f, lab, (h, w)) in enumerate(zip(img_files, label_arrays, sizes)):
        images.append({'id': int(image_ids[i]), 'file_name': str(f), 'width': int(w), 'height': int(h)})
        lab = _to_numpy(lab).reshape(-1, 5)
        for c, xc, yc, bw, bh in lab.tolist():
            if c != int(c) or not 0 <= c < nc:
                raise DarkslimError(f"{f}: label class {c}; expected an integer in 0..{nc - 1}")
            pw, ph = bw * w, bh * h
            annotations.append({'id': len(annotations) + 1, 'image_id': int(image_ids[i]),
                                'category_id': int(category_ids[int(c)]),
                                'bbox': [(xc - bw / 2) * w, (yc - bh / 2) * h, pw, ph],
                                'area': pw * ph, 'iscrowd': 0})
    categories = [{'id': int(category_ids[c]), 'name': class_name(names, c)} for c in range(nc)]
    return {'images': images, 'annotations': annotations, 'categories': categories}
