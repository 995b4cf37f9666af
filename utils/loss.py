"""YOLOv3 training loss on the raw [yolo] outputs of a models.Darknet.

    loss, items = compute_loss(raw, targets, model, hyp=None, img_hw=None)

raw:     list per [yolo] layer of [B, na, H, W, 5 + nc] pre-activation outputs (model in train mode).
targets: [N, 6] rows (image index in batch, class, cx, cy, w, h), box normalised to the input image.
items:   detached [4] tensor (box, obj, cls, total).
`loss_components(...)` gives the box, obj and cls terms themselves (with grad; the loss is their sum).

Design (what is computed, and where it differs from darknet or ultralytics-v3):
- Anchor matching by wh-IoU (boxes sharing a corner) between the target's size and each anchor, in input
  pixels. A target is assigned to every anchor of every [yolo] layer whose wh-IoU exceeds hyp['iou_t'], and
  always to its best anchor over all layers (darknet's rule: best of the full anchor set, then only the layer
  whose mask holds it) so that no target is left unassigned. Cell = floor(centre * grid size).
- Box: 1 - GIoU between the decoded prediction and the target, in grid units (GIoU is scale invariant),
  averaged over the layer's assignments. Decoding as models.YOLOLayer: xy = sigmoid(t)*s - (s-1)/2 (s =
  the layer's scale_x_y), wh = exp(t) * anchor / stride; anchors are the YOLOLayer's `.anchors` buffer
  (pixels), stride = input size / feature-map size, so multi-scale input sizes need no change.
- `[yolo] new_coords=1` heads (scaled-YOLOv4): the head conv is logistic already, so its output p is used as
  the probability itself: xy = p*s - (s-1)/2, wh = (2p)^2 * anchor / stride, and objectness/class BCE on p
  (not on sigmoid(p)); everything else is as above.
- Objectness: BCE over all cells, averaged over the layer's cells. Positive cells have target
  (1 - gr) + gr * clamp(GIoU, 0) (hyp['gr'] = 1: ultralytics-v3's choice, so objectness also ranks boxes by
  localisation quality, which mAP@0.5:0.95 rewards; gr = 0 gives darknet's target 1). Negative cells whose
  decoded box overlaps any target of the same image with IoU > the layer's cfg `ignore_thresh` are not
  penalised (darknet's ignore rule; weight 0, still counted in the mean's denominator).
- Class: BCE against one-hot targets (optionally label-smoothed), summed over classes and averaged over the
  layer's assignments. Computed for every nc, 1 included: the detection score is objectness * class
  probability, so a 1-class model's class score must be trained too.
- Gains (hyp): giou 3.54, obj 64.3 (ultralytics-v3's COCO-tuned values for mean-reduced losses) and cls 2.0
  for the class BCE summed over classes (no class count in the formula). ultralytics-v3's class gain, 37.4
  averaged over the classes and rescaled by nc/nc_coco, equals 37.4/nc_coco = 0.4675 in this sum form; with it a
  5-class model learns its classes far more slowly (bench/train_bench.py demo, same run otherwise: mAP@0.5
  0.54 vs 0.91 after 24 epochs), so the default is 2.0; `train.py --hyp cls=0.4675` restores ultralytics'.
  Each term is summed over the [yolo] layers. The total is a per-batch mean, so the batch size does not change
  its scale; train.py divides by --accumulate for gradient accumulation.
"""
import torch
import torch.nn.functional as F

from utils.boxes import bbox_giou, box_iou, wh_iou, xywh2xyxy
from utils.torch_utils import de_parallel

DEFAULT_HYP = {
    'giou': 3.54,  # box loss gain
    'obj': 64.3,  # objectness loss gain
    'cls': 2.0,  # class loss gain (BCE summed over classes; ultralytics-v3's equivalent is 0.4675)
    'iou_t': 0.2,  # wh-IoU threshold for assigning a target to an extra anchor
    'gr': 1.0,  # positive objectness target: (1 - gr) + gr * clamp(GIoU, 0)
    'cls_pw': 1.0,  # class BCE positive weight
    'obj_pw': 1.0,  # objectness BCE positive weight
    'label_smooth': 0.0,  # class target smoothing eps: positives 1 - eps/2, negatives eps/2
}


def yolo_heads(model):
    """[(layer index, YOLOLayer, cfg section)] of a Darknet (DDP wrapper allowed)."""
    m = de_parallel(model)
    return [(i, m.module_list[i], m.module_defs[i]) for i in m.yolo_layers]


def build_targets(raw, targets, model, hyp=None, img_hw=None):
    """Assign targets to (layer, image, anchor, cell).

    Returns per [yolo] layer a dict: b, a, gj, gi (index tensors [n]), tbox [n, 4] (cx, cy offsets in the cell,
    w, h; grid units), anchors [n, 2] (grid units), tcls [n] (long), stride (x, y) in input pixels.
    """
    hyp = {**DEFAULT_HYP, **(hyp or {})}
    m = de_parallel(model)
    heads = yolo_heads(m)
    if img_hw is None:
        img_hw = m.img_size
    img_h, img_w = float(img_hw[0]), float(img_hw[1])
    dev = raw[0].device
    t = targets.to(dev, torch.float32)
    all_anchors = torch.cat([h.anchors.to(dev, torch.float32) for _, h, _ in heads])  # [A, 2] pixels
    twh = t[:, 4:6] * torch.tensor([img_w, img_h], device=dev)  # [N, 2] pixels
    iou = wh_iou(twh, all_anchors) if len(t) else torch.zeros((0, len(all_anchors)), device=dev)  # [N, A]
    best = iou.argmax(1) if len(t) else torch.zeros(0, dtype=torch.long, device=dev)
    out, offset = [], 0
    for (_, head, _), p in zip(heads, raw):
        na, ny, nx = p.shape[1], p.shape[2], p.shape[3]
        stride = (img_w / nx, img_h / ny)
        cols = torch.arange(offset, offset + na, device=dev)
        match = (iou[:, offset:offset + na] > hyp['iou_t']) | (best[:, None] == cols[None, :])  # [N, na]
        offset += na
        ti, ai = match.nonzero(as_tuple=True)
        tt = t[ti]
        gxy = tt[:, 2:4] * torch.tensor([nx, ny], device=dev, dtype=torch.float32)
        gwh = tt[:, 4:6] * torch.tensor([nx, ny], device=dev, dtype=torch.float32)
        gij = gxy.long()
        gi = gij[:, 0].clamp(0, nx - 1)
        gj = gij[:, 1].clamp(0, ny - 1)
        anchors = head.anchors.to(dev, torch.float32)[ai] / torch.tensor(stride, device=dev)
        out.append({'b': tt[:, 0].long(), 'a': ai, 'gj': gj, 'gi': gi,
                    'tbox': torch.cat((gxy - torch.stack((gi, gj), 1).float(), gwh), 1),
                    'anchors': anchors, 'tcls': tt[:, 1].long(), 'stride': stride})
    return out


def decode_xywh(p, head, anchors):
    """Box centre offsets and sizes [..., 4] in grid units from raw head outputs p [..., >= 4] (anchors [..., 2]
    in grid units, broadcastable), by the head's rule: default sigmoid/exp, new_coords=1 p*s and (2p)^2."""
    s = head.scale_x_y
    if head.new_coords:
        return torch.cat((p[..., :2] * s - (s - 1) / 2, (2 * p[..., 2:4]) ** 2 * anchors), -1)
    return torch.cat((torch.sigmoid(p[..., :2]) * s - (s - 1) / 2,
                      torch.exp(p[..., 2:4].clamp(max=20)).clamp(max=1e3) * anchors), -1)


def bce(x, target, head, pos_weight, weight=None):
    """Summed binary cross-entropy of head outputs x: logits for default heads, probabilities for new_coords=1
    heads (clamped to [1e-7, 1 - 1e-7] so log stays finite). pos_weight scales the positive term."""
    if not head.new_coords:
        return F.binary_cross_entropy_with_logits(x, target, weight=weight, pos_weight=pos_weight, reduction='sum')
    p = x.clamp(1e-7, 1 - 1e-7)
    loss = -(pos_weight * target * torch.log(p) + (1 - target) * torch.log1p(-p))
    return (loss * weight).sum() if weight is not None else loss.sum()


def ignore_mask(p, head, ignore_thresh, targets, stride):
    """[B, na, H, W] bool: cells whose decoded box has IoU > ignore_thresh with a target of its image.

    p: raw [B, na, H, W, 5+nc]; targets [N, 6] normalised; stride (x, y) input pixels per cell.
    """
    bsz, na, ny, nx = p.shape[:4]
    dev = p.device
    if not len(targets) or ignore_thresh >= 1:
        return torch.zeros((bsz, na, ny, nx), dtype=torch.bool, device=dev)
    with torch.no_grad():
        yv, xv = torch.meshgrid(torch.arange(ny, device=dev), torch.arange(nx, device=dev), indexing='ij')
        grid = torch.stack((xv, yv, torch.zeros_like(xv), torch.zeros_like(yv)), 2).view(1, 1, ny, nx, 4).float()
        anchors = (head.anchors.to(dev, torch.float32) / torch.tensor(stride, device=dev)).view(1, na, 1, 1, 2)
        pbox = xywh2xyxy(decode_xywh(p.float(), head, anchors) + grid).view(bsz, -1, 4)  # [B, P, 4] grid units
        # targets padded per image: [B, T, 4] (zero boxes have IoU 0 with everything)
        t = targets.to(dev, torch.float32)
        bi = t[:, 0].long()
        order = torch.argsort(bi, stable=True)
        t, bi = t[order], bi[order]
        counts = torch.bincount(bi, minlength=bsz)
        starts = torch.cumsum(counts, 0) - counts
        pos = torch.arange(len(t), device=dev) - starts[bi]
        tb = torch.zeros((bsz, int(counts.max()), 4), device=dev)
        gbox = t[:, 2:6] * torch.tensor([nx, ny, nx, ny], device=dev, dtype=torch.float32)
        tb[bi, pos] = xywh2xyxy(gbox)
        best = box_iou(pbox, tb).amax(2)  # [B, P]
    return (best > ignore_thresh).view(bsz, na, ny, nx)


def compute_loss(raw, targets, model, hyp=None, img_hw=None):
    """(loss: 0-dim tensor with grad, items: detached [4] = box, obj, cls, total). See the module docstring.

    img_hw: the input (height, width) in pixels that produced `raw` (default: model.img_size); needed to turn
    the pixel anchors into grid units.
    """
    lbox, lobj, lcls = loss_components(raw, targets, model, hyp, img_hw)
    loss = lbox + lobj + lcls
    return loss, torch.stack((lbox, lobj, lcls, loss)).detach()


def loss_components(raw, targets, model, hyp=None, img_hw=None):
    """(box, obj, cls): the three gained terms of `compute_loss`, 0-dim tensors with grad (their sum is the
    loss)."""
    hyp = {**DEFAULT_HYP, **(hyp or {})}
    heads = yolo_heads(model)
    if len(raw) != len(heads):
        raise ValueError(f"{len(raw)} raw outputs for a model with {len(heads)} [yolo] layers")
    dev = raw[0].device
    assigned = build_targets(raw, targets, model, hyp, img_hw)
    zero = torch.zeros((), device=dev)
    lbox, lobj, lcls = zero.clone(), zero.clone(), zero.clone()
    eps = hyp['label_smooth']
    cp, cn = 1.0 - 0.5 * eps, 0.5 * eps
    obj_pw = torch.tensor(hyp['obj_pw'], device=dev)
    cls_pw = torch.tensor(hyp['cls_pw'], device=dev)
    for (_, head, d), p, tg in zip(heads, raw, assigned):
        p = p.float()  # AMP: losses in float32
        b, a, gj, gi = tg['b'], tg['a'], tg['gj'], tg['gi']
        tobj = torch.zeros_like(p[..., 4])
        ignore_thresh = float(d.get('ignore_thresh', 0.5))  # darknet's default (parser.c parse_yolo)
        weight = (~ignore_mask(p, head, ignore_thresh, targets, tg['stride'])).float()
        nb = b.numel()
        if nb:
            ps = p[b, a, gj, gi]  # [nb, 5+nc]
            giou = bbox_giou(decode_xywh(ps, head, tg['anchors']), tg['tbox'])  # [nb]
            lbox = lbox + (1.0 - giou).mean()
            tobj[b, a, gj, gi] = (1.0 - hyp['gr']) + hyp['gr'] * giou.detach().clamp(0)
            weight[b, a, gj, gi] = 1.0  # a positive is never ignored
            tc = torch.full_like(ps[:, 5:], cn)
            tc[torch.arange(nb, device=dev), tg['tcls']] = cp
            lcls = lcls + bce(ps[:, 5:], tc, head, cls_pw) / nb
        lobj = lobj + bce(p[..., 4], tobj, head, obj_pw, weight) / tobj.numel()
    return lbox * hyp['giou'], lobj * hyp['obj'], lcls * hyp['cls']
