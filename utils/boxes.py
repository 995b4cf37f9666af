"""Box conversions and overlaps.

Conventions: `xywh` is centre x, centre y, width, height; `xyxy` is top-left x, y, bottom-right x, y.
Coordinates are continuous (no +1 pixel in widths or areas), as pycocotools and OpenCV's Rect2d.
Conversions accept torch tensors or numpy arrays of shape [..., 4] and return a new object of the same kind;
inputs are never modified.
"""
import numpy as np
import torch


def _float_copy(x):
    """A floating-point copy of `x` (integer input becomes float32 for torch, float64 for numpy)."""
    if isinstance(x, torch.Tensor):
        return x.clone() if x.is_floating_point() else x.float()
    x = np.asarray(x)
    return np.array(x, dtype=np.float64 if x.dtype.kind in 'iub' else x.dtype)


def xywh2xyxy(x):
    """[..., 4] centre x, y, w, h -> x1, y1, x2, y2."""
    y = _float_copy(x)
    y[..., 0] = x[..., 0] - x[..., 2] / 2
    y[..., 1] = x[..., 1] - x[..., 3] / 2
    y[..., 2] = x[..., 0] + x[..., 2] / 2
    y[..., 3] = x[..., 1] + x[..., 3] / 2
    return y


def xyxy2xywh(x):
    """[..., 4] x1, y1, x2, y2 -> centre x, y, w, h."""
    y = _float_copy(x)
    y[..., 0] = (x[..., 0] + x[..., 2]) / 2
    y[..., 1] = (x[..., 1] + x[..., 3]) / 2
    y[..., 2] = x[..., 2] - x[..., 0]
    y[..., 3] = x[..., 3] - x[..., 1]
    return y


def xywhn2xyxy(x, w, h, padw=0.0, padh=0.0):
    """[..., 4] normalised (0..1) YOLO centre x, y, w, h -> pixel x1, y1, x2, y2 in an image of w x h pixels,
    shifted by (padw, padh) (letterbox padding)."""
    y = _float_copy(x)
    y[..., 0] = w * (x[..., 0] - x[..., 2] / 2) + padw
    y[..., 1] = h * (x[..., 1] - x[..., 3] / 2) + padh
    y[..., 2] = w * (x[..., 0] + x[..., 2] / 2) + padw
    y[..., 3] = h * (x[..., 1] + x[..., 3] / 2) + padh
    return y


def xyxy2xywhn(x, w, h):
    """[..., 4] pixel x1, y1, x2, y2 in an image of w x h pixels -> normalised (0..1) centre x, y, w, h."""
    y = xyxy2xywh(x)
    y[..., 0::2] /= w  # centre x, width
    y[..., 1::2] /= h  # centre y, height
    return y


def box_area(boxes):
    """[..., 4] xyxy -> [...] area (w * h, negative sizes count as 0)."""
    if isinstance(boxes, torch.Tensor):
        return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)
    return (boxes[..., 2] - boxes[..., 0]).clip(min=0) * (boxes[..., 3] - boxes[..., 1]).clip(min=0)


def box_iou(box1, box2):
    """Pairwise IoU of xyxy boxes: box1 [N, 4], box2 [M, 4] -> [N, M] (torch or numpy, same kind as box1).
    Torch also takes leading batch dims: [B, N, 4], [B, M, 4] -> [B, N, M].

    Boxes with zero union (two empty boxes) have IoU 0.
    """
    if isinstance(box1, torch.Tensor):
        box2 = torch.as_tensor(box2, dtype=box1.dtype, device=box1.device)
        lt = torch.maximum(box1[..., :, None, :2], box2[..., None, :, :2])  # [..., N, M, 2]
        rb = torch.minimum(box1[..., :, None, 2:], box2[..., None, :, 2:])
        inter = (rb - lt).clamp(min=0).prod(-1)
        union = box_area(box1)[..., :, None] + box_area(box2)[..., None, :] - inter
        return torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), torch.zeros_like(inter))
    box1 = np.asarray(box1, dtype=np.float64)
    box2 = np.asarray(box2, dtype=np.float64)
    lt = np.maximum(box1[:, None, :2], box2[None, :, :2])
    rb = np.minimum(box1[:, None, 2:], box2[None, :, 2:])
    inter = (rb - lt).clip(min=0).prod(2)
    union = box_area(box1)[:, None] + box_area(box2)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def bbox_giou(box1, box2, x1y1x2y2=False, eps=1e-9):
    """Elementwise generalised IoU (Rezatofighi et al. 2019) of torch boxes [..., 4] (broadcast) -> [...].

    Differentiable; in [-1, 1]: 1 for identical boxes, negative for disjoint boxes far apart relative to their
    enclosing box. Boxes are centre x, y, w, h unless x1y1x2y2.
    """
    if not x1y1x2y2:
        box1, box2 = xywh2xyxy(box1), xywh2xyxy(box2)
    b1x1, b1y1, b1x2, b1y2 = box1.unbind(-1)
    b2x1, b2y1, b2x2, b2y2 = box2.unbind(-1)
    inter = (torch.minimum(b1x2, b2x2) - torch.maximum(b1x1, b2x1)).clamp(min=0) * \
            (torch.minimum(b1y2, b2y2) - torch.maximum(b1y1, b2y1)).clamp(min=0)
    w1, h1 = b1x2 - b1x1, b1y2 - b1y1
    w2, h2 = b2x2 - b2x1, b2y2 - b2y1
    union = w1 * h1 + w2 * h2 - inter + eps
    iou = inter / union
    cw = torch.maximum(b1x2, b2x2) - torch.minimum(b1x1, b2x1)  # enclosing box
    ch = torch.maximum(b1y2, b2y2) - torch.minimum(b1y1, b2y1)
    c_area = cw * ch + eps
    return iou - (c_area - union) / c_area


def wh_iou(wh1, wh2):
    """IoU of boxes sharing one corner, from widths/heights: wh1 [N, 2], wh2 [M, 2] -> [N, M] (torch).

    Used to match targets to anchors.
    """
    wh1 = wh1[:, None]  # [N, 1, 2]
    wh2 = wh2[None]  # [1, M, 2]
    inter = torch.minimum(wh1, wh2).prod(2)
    return inter / (wh1.prod(2) + wh2.prod(2) - inter)
