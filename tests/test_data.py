"""Specification of the data layer: Darknet .data/list/label files, letterbox geometry, augmentation, make_shapes."""
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from data.make_shapes import CLASSES, make_shapes
from utils.datasets import (LoadImagesAndLabels, check_classes, check_img_size, img2label_path, letterbox,
                            list_images, load_labels, load_names, parse_data_cfg, scale_coords)
from utils.errors import DarkslimError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COCO128 = os.path.join(REPO, '..', 'shared', 'datasets', 'coco128')
NO_COLOUR_JITTER = {'hsv_h': 0.0, 'hsv_s': 0.0, 'hsv_v': 0.0}


def write_sample(root, name, img, label_text=None, split='train'):
    """root/images/<split>/<name> (+ root/labels/<split>/<stem>.txt when label_text is not None)."""
    p = root / 'images' / split / name
    p.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(p), img)
    if label_text is not None:
        lp = root / 'labels' / split / (os.path.splitext(name)[0] + '.txt')
        lp.parent.mkdir(parents=True, exist_ok=True)
        lp.write_text(label_text)
    return str(p)


def rect_image(h, w, x1, y1, x2, y2, bgr=(0, 0, 255)):
    """Black h x w BGR image with a filled rectangle covering pixel columns x1..x2-1, rows y1..y2-1, and its label
    row (class 0) normalized to the image."""
    img = np.zeros((h, w, 3), np.uint8)
    img[y1:y2, x1:x2] = bgr
    label = f"0 {(x1 + x2) / 2 / w} {(y1 + y2) / 2 / h} {(x2 - x1) / w} {(y2 - y1) / h}\n"
    return img, label


def label_boxes_px(labels, size):
    """labels [n, 6] (i, cls, cx, cy, w, h) normalized -> xyxy pixels [n, 4] in a size x size image."""
    lab = labels.numpy().astype(np.float64)
    cx, cy, w, h = (lab[:, k] * size for k in (2, 3, 4, 5))
    return np.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), 1)


def mask_bbox(mask):
    """xyxy pixel-edge bounding box of a boolean mask (x2, y2 exclusive)."""
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)


# ---------------------------------------------------------------------------------------------------------------
# .data / .names / list files

def test_data_cfg_paths_resolve_against_its_own_folder_not_cwd(tmp_path, monkeypatch):
    cfg_dir = tmp_path / 'cfgs'
    cfg_dir.mkdir()
    (cfg_dir / 'my.data').write_text(
        "# a comment\n\nclasses= 3\n  train =  lists/train.txt  \nvalid=/abs/val.txt\nnames = my.names\n"
        "eval = coco\n")
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    d = parse_data_cfg(str(cfg_dir / 'my.data'))
    assert d == {'classes': 3, 'train': str(cfg_dir / 'lists' / 'train.txt'), 'valid': '/abs/val.txt',
                 'names': str(cfg_dir / 'my.names'), 'eval': 'coco'}
    # the .data path itself given relative to the cwd
    monkeypatch.chdir(tmp_path)
    assert parse_data_cfg('cfgs/my.data')['train'] == str(cfg_dir / 'lists' / 'train.txt')


@pytest.mark.parametrize('text, line, fragment', [
    ("classes=2\ntrain=t.txt\n", 3, "'valid'"),  # missing key: reported at end of file
    ("train=t.txt\nvalid=v.txt\n", 3, "'classes'"),
    ("classes=2\ntrain t.txt\nvalid=v.txt\n", 2, "'key = value'"),
    ("classes=two\ntrain=t.txt\nvalid=v.txt\n", 1, "positive integer"),
    ("classes=2\ntrain=t.txt\nvalid=v.txt\ntrain=u.txt\n", 4, "each key once"),
])
def test_data_cfg_errors_name_file_and_line(tmp_path, text, line, fragment):
    p = tmp_path / 'bad.data'
    p.write_text(text)
    with pytest.raises(DarkslimError) as e:
        parse_data_cfg(str(p))
    assert str(e.value).startswith(f"{p}:{line}:")
    assert fragment in str(e.value)


def test_data_cfg_keeps_key_lines_and_check_classes_cites_them(tmp_path):
    (tmp_path / 'three.names').write_text("a\nb\nc\n")
    p = tmp_path / 'x.data'
    p.write_text("# header\ntrain = t.txt\n\nvalid = v.txt\nclasses = 3\nnames = three.names\n")
    d = parse_data_cfg(p)
    assert d.lines == {'train': 2, 'valid': 4, 'classes': 5, 'names': 6} and d.path == str(p)
    assert check_classes(d, 3, str(p)) == ['a', 'b', 'c']
    with pytest.raises(DarkslimError, match=rf"^{p}:5: classes = 3, but the model \(m.cfg\) has 4 classes"):
        check_classes(d, 4, str(p), 'the model (m.cfg)')
    (tmp_path / 'three.names').write_text("a\nb\n")
    with pytest.raises(DarkslimError, match=r"three\.names: found 2 class names; expected classes = 3"):
        check_classes(d, 3, str(p))
    assert check_classes({'classes': 2}, 2, 'plain.data') is None  # a plain dict: no names file, no lines


def test_names_file_one_name_per_line(tmp_path):
    p = tmp_path / 'x.names'
    p.write_text("person\n traffic light \n\n")
    assert load_names(str(p)) == ['person', 'traffic light']
    with pytest.raises(DarkslimError, match='not found'):
        load_names(str(tmp_path / 'missing.names'))


def test_list_file_paths_are_relative_to_the_list_folder(tmp_path, monkeypatch):
    a = write_sample(tmp_path / 'ds', 'a.jpg', np.zeros((8, 8, 3), np.uint8))
    b = write_sample(tmp_path / 'ds', 'b.png', np.zeros((8, 8, 3), np.uint8))
    lst = tmp_path / 'ds' / 'train.txt'
    lst.write_text(f"images/train/a.jpg\n\n{b}\n")  # relative, blank line, absolute
    monkeypatch.chdir(tmp_path)
    assert list_images('ds/train.txt') == [a, b]
    lst.write_text("images/train/a.jpg\nimages/train/nope.jpg\n")
    with pytest.raises(DarkslimError) as e:
        list_images(str(lst))
    assert str(e.value).startswith(f"{lst}:2:") and 'nope.jpg' in str(e.value)


def test_folder_lists_images_sorted_any_case_extension(tmp_path):
    folder = tmp_path / 'imgs'
    folder.mkdir()
    for name in ('c.JPG', 'a.png', 'b.JpEg', 'd.webp', 'notes.txt', 'e.gif'):
        (folder / name).write_bytes(b'x')
    assert list_images(str(folder)) == [str(folder / n) for n in ('a.png', 'b.JpEg', 'c.JPG', 'd.webp')]


def test_empty_or_missing_dataset_is_an_error(tmp_path):
    (tmp_path / 'empty').mkdir()
    with pytest.raises(DarkslimError, match='empty dataset'):
        list_images(str(tmp_path / 'empty'))
    (tmp_path / 'blank.txt').write_text("\n\n")
    with pytest.raises(DarkslimError, match='empty dataset'):
        LoadImagesAndLabels(str(tmp_path / 'blank.txt'), img_size=32)
    with pytest.raises(DarkslimError, match='not found'):
        list_images(str(tmp_path / 'nowhere'))


@pytest.mark.parametrize('img, label', [
    ('/d/images/train/x.jpg', '/d/labels/train/x.txt'),
    ('/images/a/images/b/x.final.PNG', '/images/a/labels/b/x.final.txt'),  # only the last /images/
    ('rel/images/x.bmp', 'rel/labels/x.txt'),
    ('/d/pics/x.jpg', '/d/pics/x.txt'),  # no /images/: label beside the image
])
def test_label_path_rule(img, label):
    assert img2label_path(img) == label


# ---------------------------------------------------------------------------------------------------------------
# labels

GOOD_ROW = "1 0.5 0.5 0.2 0.4"


@pytest.mark.parametrize('bad_row, fragment', [
    ("3 0.5 0.5 0.2 0.2", "class id in [0, 3)"),  # class = nc
    ("-1 0.5 0.5 0.2 0.2", "class id in [0, 3)"),
    ("1.5 0.5 0.5 0.2 0.2", "integer class id"),
    ("0 1.2 0.5 0.2 0.2", "in [0, 1]"),  # cx > 1
    ("0 0.5 -0.1 0.2 0.2", "in [0, 1]"),  # cy < 0
    ("0 0.5 0.5 1.5 0.2", "in [0, 1]"),  # w > 1
    ("0 0.5 0.5 0 0.2", "> 0"),  # w = 0
    ("0 0.5 0.5 0.2 -0.3", "> 0"),  # h < 0
    ("0 0.5 0.5 0.2", "5 numbers"),
    ("0 0.5 0.5 0.2 0.2 0.9", "5 numbers"),
    ("0 0.5 x 0.2 0.2", "5 numbers"),
])
def test_bad_label_row_names_file_line_and_expectation(tmp_path, bad_row, fragment):
    p = tmp_path / 'x.txt'
    p.write_text(f"{GOOD_ROW}\n\n{bad_row}\n{GOOD_ROW}\n")  # the bad row is on line 3
    with pytest.raises(DarkslimError) as e:
        load_labels(str(p), nc=3)
    msg = str(e.value)
    assert msg.startswith(f"{p}:3:") and 'expected' in msg and fragment in msg
    rows, dropped = load_labels(str(p), nc=3, skip_bad=True)
    assert dropped == 1
    np.testing.assert_array_equal(rows, np.array([[1, 0.5, 0.5, 0.2, 0.4]] * 2, np.float32))


def test_missing_label_file_is_a_background_image(tmp_path):
    rows, dropped = load_labels(str(tmp_path / 'none.txt'), nc=3)
    assert rows.shape == (0, 5) and rows.dtype == np.float32 and dropped == 0
    write_sample(tmp_path, 'bg.jpg', np.zeros((32, 48, 3), np.uint8))  # no label file
    ds = LoadImagesAndLabels(str(tmp_path / 'images' / 'train'), img_size=64, nc=3)
    img, labels, path, shapes = ds[0]
    assert ds.labels[0].shape == (0, 5) and labels.shape == (0, 6) and img.shape == (3, 64, 64)


def test_dataset_validates_labels_up_front_and_skip_bad_counts(tmp_path, capsys):
    write_sample(tmp_path, 'a.png', np.zeros((16, 16, 3), np.uint8), f"{GOOD_ROW}\n7 0.5 0.5 0.1 0.1\n")
    write_sample(tmp_path, 'b.png', np.zeros((16, 16, 3), np.uint8), "0 0.5 0.5 0.1\n0 2 0.5 0.1 0.1\n")
    folder = str(tmp_path / 'images' / 'train')
    with pytest.raises(DarkslimError) as e:
        LoadImagesAndLabels(folder, img_size=32, nc=3)
    assert str(e.value).startswith(f"{tmp_path / 'labels' / 'train' / 'a.txt'}:2:")
    ds = LoadImagesAndLabels(folder, img_size=32, nc=3, skip_bad_labels=True)
    assert ds.n_dropped == 3 and [len(x) for x in ds.labels] == [1, 0]
    assert 'dropped 3 bad label rows' in capsys.readouterr().out


def test_unreadable_image_error_names_it(tmp_path):
    bad = tmp_path / 'images' / 'train' / 'broken.jpg'
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b'this is not a jpeg')
    with pytest.raises(DarkslimError, match='broken.jpg: cannot read image'):
        LoadImagesAndLabels(str(bad.parent), img_size=32)
    # a file whose PNG header is intact but whose data is not: found when the image is loaded
    good = write_sample(tmp_path, 'ok.png', np.full((20, 30, 3), 50, np.uint8))
    ds = LoadImagesAndLabels([good], img_size=32)
    assert ds.shapes.tolist() == [[20, 30]]
    with open(good, 'r+b') as f:
        f.seek(40)
        f.write(b'\0' * 16)
        f.truncate(60)
    with pytest.raises(DarkslimError, match='ok.png: cannot read image'):
        ds[0]


def test_image_list_argument_and_original_shapes(tmp_path):
    paths = [write_sample(tmp_path, 'a.jpg', np.zeros((30, 50, 3), np.uint8)),
             write_sample(tmp_path, 'b.png', np.zeros((70, 20, 3), np.uint8)),
             write_sample(tmp_path, 'c.bmp', np.zeros((9, 11, 3), np.uint8))]  # no header parser: decoded
    ds = LoadImagesAndLabels(paths, img_size=32)
    assert ds.img_files == paths
    assert ds.label_files == [str(tmp_path / 'labels' / 'train' / n) for n in ('a.txt', 'b.txt', 'c.txt')]
    assert ds.shapes.tolist() == [[30, 50], [70, 20], [9, 11]]  # (h, w)


def test_img_size_must_be_a_positive_multiple_of_32(tmp_path):
    assert check_img_size(416) == 416
    for bad in (0, -32, 100, 416.0, True, '416'):
        with pytest.raises(DarkslimError, match='multiple of 32'):
            check_img_size(bad)
    ds = LoadImagesAndLabels([write_sample(tmp_path, 'a.png', np.zeros((40, 40, 3), np.uint8))], img_size=64)
    with pytest.raises(DarkslimError):
        ds.img_size = 100


# ---------------------------------------------------------------------------------------------------------------
# letterbox geometry

def test_letterbox_200x100_to_128_hand_computed():
    img = np.full((100, 200, 3), (10, 20, 30), np.uint8)  # h=100, w=200
    out, ratio, pad = letterbox(img, 128, color=(114, 114, 114))
    # r = min(128/100, 128/200) = 0.64 -> 128 x 64 content, 64 rows of padding split 32 top / 32 bottom
    assert out.shape == (128, 128, 3) and ratio == (0.64, 0.64) and pad == (0, 32)
    assert (out[:32] == 114).all() and (out[96:] == 114).all() and (out[32:96] == (10, 20, 30)).all()
    # auto: pad only to a multiple of 32 -> 64 x 128, no padding
    out, ratio, pad = letterbox(img, 128, auto=True)
    assert out.shape == (64, 128, 3) and pad == (0, 0)
    # odd padding: 101 rows -> round(64.64) = 65 rows, 63 padding rows = 31 top + 32 bottom
    out, ratio, pad = letterbox(np.zeros((101, 200, 3), np.uint8), (128, 128), color=255)
    assert out.shape == (128, 128, 3) and ratio == (65 / 101, 0.64) and pad == (0, 31)
    assert (out[:31] == 255).all() and (out[31:96] == 0).all() and (out[96:] == 255).all()
    # scaleup=False keeps a small image at its size, centred: (128-50)//2 = 39, (128-40)//2 = 44
    out, ratio, pad = letterbox(np.zeros((40, 50, 3), np.uint8), 128, scaleup=False)
    assert out.shape == (128, 128, 3) and ratio == (1.0, 1.0) and pad == (39, 44)


@pytest.mark.parametrize('h0, w0, size', [(100, 200, 128), (101, 200, 128), (333, 97, 96), (40, 50, 64)])
def test_scale_coords_inverts_letterbox(h0, w0, size):
    _, (rh, rw), (dw, dh) = letterbox(np.zeros((h0, w0, 3), np.uint8), size)
    boxes0 = np.array([[0, 0, w0, h0], [0.1 * w0, 0.2 * h0, 0.5 * w0, 0.9 * h0]])
    boxes1 = boxes0 * [rw, rh, rw, rh] + [dw, dh, dw, dh]  # forward map of letterbox
    before = boxes1.copy()
    for ratio_pad in (((rh, rw), (dw, dh)), None):
        back = scale_coords((size, size), boxes1, (h0, w0), ratio_pad)
        np.testing.assert_allclose(back, boxes0, atol=1e-6)
    np.testing.assert_array_equal(boxes1, before)  # input not modified
    # torch in, torch out; boxes outside the image are clipped to it, unless clip=False
    outside = torch.tensor([[-5.0, -5.0, size + 5.0, size + 5.0]], dtype=torch.float64)
    back = scale_coords((size, size), outside, (h0, w0))
    assert isinstance(back, torch.Tensor) and back.tolist() == [[0, 0, w0, h0]]
    back = scale_coords((size, size), outside, (h0, w0), ((rh, rw), (dw, dh)), clip=False)
    np.testing.assert_allclose(back, [[(-5 - dw) / rw, (-5 - dh) / rh, (size + 5 - dw) / rw, (size + 5 - dh) / rh]])


def test_item_geometry_and_shapes_map_back_to_original_pixels(tmp_path):
    img, label = rect_image(100, 200, 20, 30, 60, 70)
    p = write_sample(tmp_path, 'r.png', img, label)
    ds = LoadImagesAndLabels([p], img_size=128, nc=1)
    out, labels, path, shapes = ds[0]
    assert out.dtype == torch.float32 and out.shape == (3, 128, 128) and path == p
    assert shapes == ((100, 200), ((0.64, 0.64), (0, 32)))
    # x: 20*0.64 .. 60*0.64, y: 30*0.64+32 .. 70*0.64+32
    box = label_boxes_px(labels, 128)
    np.testing.assert_allclose(box, [[12.8, 51.2, 38.4, 76.8]], atol=1e-4)
    assert labels[0, :2].tolist() == [0, 0]
    red = (out[0] > 0.5) & (out[1] < 0.2) & (out[2] < 0.2)  # RGB
    np.testing.assert_allclose(mask_bbox(red.numpy()), box[0], atol=1.0)
    assert out[:, :32].eq(114 / 255).all()  # padding colour, top band
    np.testing.assert_allclose(scale_coords(out.shape[1:], box, *shapes), [[20, 30, 60, 70]], atol=1e-4)


def test_cache_gives_the_same_items_and_img_size_can_change(tmp_path):
    img, label = rect_image(90, 120, 10, 10, 50, 40)
    p = write_sample(tmp_path, 'r.jpg', img, label)
    plain = LoadImagesAndLabels([p], img_size=96, nc=1)
    cached = LoadImagesAndLabels([p], img_size=96, nc=1, cache=True)
    for a, b in zip(plain[0], cached[0]):
        assert (a == b).all() if isinstance(a, torch.Tensor) else a == b
    for ds in (plain, cached):  # multi-scale: the trainer sets img_size between epochs
        ds.img_size = 64
        out, labels, _, shapes = ds[0]
        assert out.shape == (3, 64, 64) and shapes[1][1] == (0, 8)  # 120x90 -> 64x48, 16 rows of padding
        np.testing.assert_allclose(label_boxes_px(labels, 64), [[10 * 64 / 120, 8 + 10 * 48 / 90,
                                                                 50 * 64 / 120, 8 + 40 * 48 / 90]], atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# augmentation

def coloured(img):
    """Boolean [H, W]: saturated pixels (black background and grey padding are not)."""
    return (img.max(0).values - img.min(0).values).numpy() > 0.1


def test_augmentation_keeps_the_box_on_the_object(tmp_path):
    img, label = rect_image(96, 128, 70, 20, 110, 50)  # off centre so that a flip moves it
    p = write_sample(tmp_path, 'r.png', img, label)
    hyp = {'translate': 0.2, 'scale': 0.4, 'fliplr': 0.5}  # default colour jitter
    ds = LoadImagesAndLabels([p], img_size=128, augment=True, hyp=hyp, nc=1)
    plain = LoadImagesAndLabels([p], img_size=128, nc=1)[0][0]
    centres = []
    for seed in range(12):
        torch.manual_seed(seed)
        out, labels, _, _ = ds[0]
        assert out.shape == (3, 128, 128)
        mask = coloured(out)
        if len(labels) == 0:  # dropped: less than 20% of the object is left in view
            assert mask.sum() < 0.2 * (40 * 30) * 1.4 ** 2
            continue
        assert len(labels) == 1
        box = label_boxes_px(labels, 128)[0]
        np.testing.assert_allclose(mask_bbox(mask), box, atol=1.5)
        centres.append((box[0] + box[2]) / 2)
        assert not (out == plain).all()  # something was augmented
    assert min(centres) < 64 < max(centres)  # flipped in some draws, not in others


def test_flip_alone_mirrors_image_and_boxes(tmp_path):
    img, label = rect_image(128, 128, 70, 20, 110, 50, bgr=(255, 0, 0))
    p = write_sample(tmp_path, 'r.png', img, label)
    hyp = {**NO_COLOUR_JITTER, 'translate': 0.0, 'scale': 0.0, 'fliplr': 1.0}
    out, labels, _, _ = LoadImagesAndLabels([p], img_size=128, augment=True, hyp=hyp, nc=1)[0]
    ref, ref_labels, _, _ = LoadImagesAndLabels([p], img_size=128, nc=1)[0]
    assert (out == ref.flip(2)).all()
    np.testing.assert_allclose(labels[:, 2], 1 - ref_labels[:, 2], atol=1e-6)
    np.testing.assert_array_equal(labels[:, [0, 1, 3, 4, 5]], ref_labels[:, [0, 1, 3, 4, 5]])


def test_mosaic_boxes_cover_their_objects(tmp_path):
    colours = [(0, 0, 255), (0, 255, 0), (255, 0, 0), (0, 255, 255)]  # BGR, one per class
    paths = []
    for k, bgr in enumerate(colours):
        img, label = rect_image(64, 64, 8 + 6 * k, 12, 40 + 4 * k, 50 - 5 * k, bgr)
        paths.append(write_sample(tmp_path, f'{k}.png', img, f"{k}" + label[1:]))
    hyp = {**NO_COLOUR_JITTER, 'fliplr': 0.5}
    ds = LoadImagesAndLabels(paths, img_size=64, augment=True, mosaic=True, hyp=hyp, nc=4)
    n_boxes = 0
    for seed in range(10):
        torch.manual_seed(seed)
        out, labels, _, shapes = ds[seed % 4]
        assert out.shape == (3, 64, 64) and shapes is None
        rgb = out.permute(1, 2, 0).numpy()
        boxes = label_boxes_px(labels, 64)
        for k, bgr in enumerate(colours):
            mask = (np.abs(rgb - np.array(bgr[::-1]) / 255) < 0.1).all(2)
            covered = np.zeros_like(mask)
            for (x1, y1, x2, y2), cls in zip(boxes, labels[:, 1].tolist()):
                if cls == k:
                    # inside the box (less a 1.5 px rim of interpolated edge) is the object's colour
                    inner = mask[int(np.ceil(y1 + 1.5)):int(y2 - 1.5), int(np.ceil(x1 + 1.5)):int(x2 - 1.5)]
                    assert inner.size and inner.mean() > 0.95
                    covered[max(int(y1 - 1.5), 0):int(np.ceil(y2 + 1.5)),
                            max(int(x1 - 1.5), 0):int(np.ceil(x2 + 1.5))] = True
                    n_boxes += 1
            # object pixels outside every box: only remnants of boxes dropped as < 20% visible
            n, _, stats, _ = cv2.connectedComponentsWithStats((mask & ~covered).astype(np.uint8))
            full_area = (40 * 40) * (64 / 64) ** 2 * 1.25 ** 2  # largest object at the largest scale
            assert all(stats[i, cv2.CC_STAT_AREA] < 0.2 * full_area for i in range(1, n))
    assert n_boxes >= 10  # the test saw boxes, not only drops


def test_collate_fn_puts_batch_index_in_column_0(tmp_path):
    rows = {'a.png': "0 0.5 0.5 0.2 0.2\n1 0.3 0.3 0.1 0.1\n", 'b.png': None, 'c.png': "2 0.6 0.6 0.4 0.4\n"}
    paths = [write_sample(tmp_path, n, np.zeros((32, 32, 3), np.uint8), t) for n, t in rows.items()]
    ds = LoadImagesAndLabels(paths, img_size=32, nc=3)
    items = [ds[i] for i in range(3)]
    imgs, targets, batch_paths, shapes = LoadImagesAndLabels.collate_fn(items)
    assert imgs.shape == (3, 3, 32, 32) and batch_paths == tuple(paths) and len(shapes) == 3
    assert targets[:, 0].tolist() == [0, 0, 2]
    assert targets[:, 1].tolist() == [0, 1, 2]
    assert torch.equal(targets[:, 2:], torch.cat([it[1][:, 2:] for it in items]))
    assert (items[0][1][:, 0] == 0).all() and (items[2][1][:, 0] == 0).all()  # items not modified


# ---------------------------------------------------------------------------------------------------------------
# make_shapes

def tree_bytes(root):
    out = {}
    for folder, _, files in os.walk(root):
        for f in files:
            p = os.path.join(folder, f)
            with open(p, 'rb') as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


def test_make_shapes_is_deterministic_and_loads(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = make_shapes('a', n_train=40, n_val=6, img_size=64, seed=3, verbose=True)
    printed = capsys.readouterr().out
    make_shapes(str(tmp_path / 'b'), n_train=40, n_val=6, img_size=64, seed=3)
    make_shapes(str(tmp_path / 'c'), n_train=40, n_val=6, img_size=64, seed=4)
    a, b, c = (tree_bytes(tmp_path / x) for x in 'abc')
    assert a == b
    assert set(a) == set(c) and a != c
    assert sum(k.startswith('images/train/') for k in a) == 40 and sum(k.startswith('images/val/') for k in a) == 6
    assert not [f for f in os.listdir(tmp_path) if f.startswith('.')]  # no temp folders left

    monkeypatch.chdir(tmp_path / 'c')  # the .data resolves against its own folder
    cfg = parse_data_cfg(data)
    assert cfg['classes'] == len(CLASSES) and load_names(cfg['names']) == list(CLASSES)
    ds = LoadImagesAndLabels(cfg['train'], img_size=64, nc=cfg['classes'])
    assert len(ds) == 40 and all(f.startswith(str(tmp_path / 'a')) for f in ds.img_files)
    # class counts from the files agree with the generator's own tally
    counts = np.bincount(np.concatenate([x[:, 0] for x in ds.labels]).astype(int), minlength=len(CLASSES))
    n_bg = sum(len(x) == 0 for x in ds.labels)
    per = ', '.join(f"{c} {k}" for c, k in zip(CLASSES, counts))
    assert f"train: 40 images ({n_bg} background), {counts.sum()} objects: {per}" in printed
    assert (counts > 0).all()
    for (h, w), lab in zip(ds.shapes, ds.labels):  # object long side >= ~8% of the image's short side
        assert (np.maximum(lab[:, 3] * w, lab[:, 4] * h) >= 0.08 * min(h, w)).all()
    img, labels, _, _ = ds[0]
    assert img.shape == (3, 64, 64) and labels.shape[1] == 6


def test_make_shapes_cli_replaces_only_its_own_output(tmp_path):
    cmd = [sys.executable, '-m', 'data.make_shapes', '--n-train', '3', '--n-val', '2', '--img-size', '48', '--seed',
           '1', '--out']
    env = {**os.environ, 'PYTHONPATH': REPO}  # run in another folder, the repository on the module path
    r = subprocess.run(cmd + ['out'], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    make_shapes(str(tmp_path / 'lib'), n_train=3, n_val=2, img_size=48, seed=1)
    assert tree_bytes(tmp_path / 'out') == tree_bytes(tmp_path / 'lib')
    r = subprocess.run(cmd + ['out'], cwd=tmp_path, capture_output=True, text=True, env=env)  # over its own output
    assert r.returncode == 0 and tree_bytes(tmp_path / 'out') == tree_bytes(tmp_path / 'lib')
    (tmp_path / 'mine').mkdir()
    (tmp_path / 'mine' / 'precious.txt').write_text('keep')
    r = subprocess.run(cmd + ['mine'], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert r.returncode == 2 and r.stderr.count('\n') == 1 and 'not a make_shapes output' in r.stderr
    assert os.listdir(tmp_path / 'mine') == ['precious.txt']


# ---------------------------------------------------------------------------------------------------------------
# real data

@pytest.mark.skipif(not os.path.isdir(COCO128), reason='shared/datasets/coco128 not present')
def test_coco128_loads_with_documented_counts():
    ds = LoadImagesAndLabels(os.path.join(COCO128, 'images', 'val2017'), img_size=320, nc=80)
    assert len(ds) == 128
    assert sum(len(x) for x in ds.labels) == 898  # README: 898 objects in val2017
    for i in range(0, 128, 16):  # sizes from JPEG headers agree with decoding
        assert tuple(ds.shapes[i]) == cv2.imread(ds.img_files[i]).shape[:2]
    img, labels, _, ((h0, w0), _) = ds[0]
    assert img.shape == (3, 320, 320) and (h0, w0) == tuple(ds.shapes[0]) and len(labels) == len(ds.labels[0])
    # train2017 has images without a label file: background images, accepted
    ds = LoadImagesAndLabels(os.path.join(COCO128, 'images', 'train2017'), img_size=320, nc=80)
    missing = [i for i, f in enumerate(ds.label_files) if not os.path.exists(f)]
    assert missing and all(len(ds.labels[i]) == 0 for i in missing)
    rows = sum(len(np.loadtxt(f, ndmin=2)) for f in ds.label_files if os.path.exists(f))
    assert sum(len(x) for x in ds.labels) == rows
