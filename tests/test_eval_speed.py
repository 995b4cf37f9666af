"""Fast evaluation: rectangular batches (shapes hand-computed, results equal to the square letterbox for an oracle
detector, pycocotools agreement on a rect run's JSON), loader workers, --half, test.py's --square.

The oracle (RectOracle in tests/helpers.py) knows each image's detections in ORIGINAL pixels. Given a batch of any
shape (h, w) it recognises each image by letterboxing every known image to that shape itself (cv2, geometry written
out there, independent of utils.datasets) and returns the detections mapped into that letterbox. So a correct
evaluation maps them back to the same original boxes whatever the batching: rect and square runs must agree.
"""
import json
import os
import shutil

import cv2
import numpy as np
import pytest
import torch

import test as test_cli  # the test.py command line
from data.make_shapes import CLASSES, make_shapes
from models import Darknet, save_checkpoint
from tests.helpers import RectOracle, _oracle_dets, _original_xyxy, cocoeval, mini_tiny, randomize_
from utils.datasets import LoadImagesAndLabels, RectBatchSampler, rect_batches, scale_coords
from utils.errors import DarkslimError
from utils.evaluate import default_workers, evaluate
from utils.metrics import coco_gt_from_labels

NC = len(CLASSES)
S = 160  # evaluation long side; make_shapes images are 128 px long side, 0.65-0.85 short side or square


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------- batch shapes

def test_rect_batch_shapes_hand_computed():
    # (h, w) -> resized to long side 64: A 48x64, B 30x64, C 64x30, D 64x64, E 20x64 (ratios .75 .47 2.13 1 .31)
    sizes = [(48, 64), (30, 64), (128, 60), (50, 50), (20, 64)]
    plan = rect_batches(sizes, 64, batch_size=2)
    assert plan.batches == [[4, 1], [0, 3], [2]]  # sorted by h / w: E B | A D | C
    # E, B: height max(20, 30) -> 32; A, D: a square image in the batch -> 64 x 64; C: width 30 -> 32
    assert plan.shapes.tolist() == [[32, 64], [64, 64], [64, 32]]
    assert plan.shape_of.tolist() == [[64, 64], [32, 64], [64, 32], [64, 64], [32, 64]]
    # pad 0.5 stride (ultralytics' test.py): +16 px on both sides before rounding up, 64 -> 96 as well
    assert rect_batches(sizes, 64, 2, pad=0.5).shapes.tolist() == [[64, 96], [96, 96], [96, 64]]
    # 416, the real case: 480x640 -> 312x416 -> 320 rows; 427x640 -> 278x416 -> 288; 640x480 -> 416 x 320
    plan = rect_batches([(480, 640), (427, 640), (640, 480)], 416, batch_size=1)
    assert plan.shapes.tolist() == [[288, 416], [320, 416], [416, 320]] and plan.batches == [[1], [0], [2]]
    # ties in aspect ratio keep data set order; one batch for everything: the union of all shapes
    assert rect_batches([(30, 60), (10, 20), (60, 30)], 64, 3).batches == [[0, 1, 2]]
    with pytest.raises(DarkslimError, match='batch size'):
        rect_batches(sizes, 64, 0)


def _write(root, name, img, label_rows):
    p = root / 'images' / name
    p.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(p), img)
    lp = root / 'labels' / (os.path.splitext(name)[0] + '.txt')
    lp.parent.mkdir(parents=True, exist_ok=True)
    lp.write_text(''.join(' '.join(map(str, r)) + '\n' for r in label_rows))
    return str(p)


def test_rect_items_have_their_batch_shape_and_map_back(tmp_path):
    """Each item is letterboxed (centred, no upscaling beyond the long side) to its batch's shape; the labels
    follow, and scale_coords with the item's shapes maps them back to the original rectangle."""
    paths, boxes = [], []
    for k, (h, w) in enumerate([(48, 64), (30, 64), (128, 60), (50, 50), (20, 64)]):
        img = np.zeros((h, w, 3), np.uint8)
        x1, y1, x2, y2 = w // 4, h // 4, w // 2, 3 * h // 4
        img[y1:y2, x1:x2] = (0, 0, 255)
        paths.append(_write(tmp_path, f'{k}.png', img, [[0, (x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w,
                                                          (y2 - y1) / h]]))
        boxes.append([x1, y1, x2, y2])
    ds = LoadImagesAndLabels(paths, 64, batch_size=2, nc=1, rect=True)
    batches = list(RectBatchSampler(ds))
    assert batches == [[4, 1], [0, 3], [2]]
    loader = torch.utils.data.DataLoader(ds, batch_sampler=RectBatchSampler(ds),
                                         collate_fn=LoadImagesAndLabels.collate_fn)
    assert [tuple(b[0].shape[2:]) for b in loader] == [(32, 64), (64, 64), (64, 32)]
    img, labels, _, shapes = ds[1]  # 30 x 64 in a 32 x 64 batch: 1 row of padding on top, 1 below
    assert img.shape == (3, 32, 64) and shapes == ((30, 64), ((1.0, 1.0), (0, 1)))
    assert (img[:, 0] == 114 / 255).all() and (img[:, -1] == 114 / 255).all()
    img, labels, _, shapes = ds[2]  # 128 x 60 -> 64 x 30 in a 64 x 32 batch: 1 column each side
    assert img.shape == (3, 64, 32) and shapes == ((128, 60), ((0.5, 0.5), (1, 0)))
    for i in range(5):
        img, labels, _, shapes = ds[i]
        h, w = img.shape[1:]
        cx, cy, bw, bh = labels[0, 2:].double().numpy() * [w, h, w, h]
        back = scale_coords((h, w), np.array([[cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2]]), *shapes)
        np.testing.assert_allclose(back[0], boxes[i], atol=1e-4)
    with pytest.raises(DarkslimError, match='mosaic'):
        LoadImagesAndLabels(paths, 64, augment=True, mosaic=True, rect=True)


# ---------------------------------------------------------------------------------------- rect == square

CROPS = [(1.0, 1.0), (0.5, 1.0), (1.0, 0.55), (0.7, 1.0), (1.0, 0.8), (0.4, 1.0), (0.85, 1.0)]  # kept of (h, w)


def _cropped_copy(src, dst, stem, frac):
    """Top-left crop of make_shapes image `src` keeping fractions `frac` (h, w), written as dst/images/<stem>.png
    (lossless) with the labels of the objects wholly inside the crop, renormalised. Returns the image path."""
    img = cv2.imread(str(src))
    h, w = img.shape[:2]
    ch, cw = round(h * frac[0]), round(w * frac[1])
    lab_file = src.parent.parent.parent / 'labels' / 'val' / (src.stem + '.txt')
    lab = np.array([r.split() for r in lab_file.read_text().splitlines() if r.strip()], float).reshape(-1, 5)
    px = _original_xyxy(lab, h, w)
    inside = (px[:, 3] <= cw) & (px[:, 4] <= ch)
    rows = [[int(c), (x1 + x2) / 2 / cw, (y1 + y2) / 2 / ch, (x2 - x1) / cw, (y2 - y1) / ch]
            for c, x1, y1, x2, y2 in px[inside].tolist()]
    return _write(dst, f'{stem}.png', img[:ch, :cw], rows)


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    """(data path, image paths, labels [m, 5] normalised, (h0, w0) sizes, oracle): make_shapes images cropped
    to several aspect ratios, under numeric stems that are not their list indices; read back from the files."""
    base = tmp_path_factory.mktemp('rect')
    make_shapes(base / 'src', n_train=1, n_val=16, img_size=128, seed=5)
    root = base / 'data'
    srcs = sorted((base / 'src' / 'images' / 'val').iterdir())
    files = [_cropped_copy(f, root, f"{100 + 7 * k:012d}", CROPS[k % len(CROPS)]) for k, f in enumerate(srcs)]
    shutil.copy(base / 'src' / 'shapes.names', root / 'shapes.names')
    data = root / 'rect.data'
    data.write_text(f"classes = {NC}\nvalid = images\nnames = shapes.names\n")  # no train=: not needed
    labels, images = [], []
    for f in files:
        lab = root / 'labels' / (os.path.splitext(os.path.basename(f))[0] + '.txt')
        labels.append(np.array([r.split() for r in lab.read_text().splitlines() if r.strip()], float).reshape(-1, 5))
        images.append(cv2.imread(f))
    sizes = [im.shape[:2] for im in images]
    assert len({round(h / w, 2) for h, w in sizes}) >= 5 and sum(len(lab) for lab in labels) > 15
    return data, files, labels, sizes, RectOracle(images, _oracle_dets(labels, sizes, NC), NC, S)


def _run(oracle, data, tmp_path, name, **kw):
    oracle.shapes_seen = []
    res = evaluate(oracle, data, img_size=S, save_json=tmp_path / f'{name}.json', verbose=False, workers=0, **kw)
    return res, json.loads((tmp_path / f'{name}.json').read_text()), list(oracle.shapes_seen)


METRICS = ('precision', 'recall', 'f1', 'mAP50', 'mAP50_95', 'per_class', 'images', 'targets', 'conf_threshold')


def test_rect_equals_square_for_an_oracle_detector(shapes, tmp_path):
    data, files, labels, sizes, oracle = shapes
    square, square_json, seen = _run(oracle, data, tmp_path, 'square', batch_size=4, rect=False)
    assert set(seen) == {(S, S)} and 0.2 < square['mAP50'] < 0.95  # meaningful, not trivial
    for batch in (3, 4, 1):  # different groupings and batch orders, same answer
        rect, rect_json, seen = _run(oracle, data, tmp_path, f'rect{batch}', batch_size=batch)
        assert any(h != w for h, w in seen)  # rectangles were used ...
        assert sum(h * w for h, w in seen) * batch < len(files) * S * S  # ... with fewer pixels than squares
        assert {k: rect[k] for k in METRICS} == {k: square[k] for k in METRICS}
        # the same detections per image, in data-set order, with the image's own id and file name
        assert len(rect_json) == len(square_json)
        for a, b in zip(rect_json, square_json):
            assert (a['image_id'], a['file_name'], a['category_id'], a['score']) == \
                   (b['image_id'], b['file_name'], b['category_id'], b['score'])
            np.testing.assert_allclose(a['bbox'], b['bbox'], atol=2e-3)
    # JSON in data-set order although batches come in aspect-ratio order; numeric stems are the image ids
    assert [files.index(d['file_name']) for d in rect_json] == sorted(files.index(d['file_name']) for d in rect_json)
    assert all(d['image_id'] == int(os.path.basename(d['file_name'])[:-4]) for d in rect_json)


def test_pycocotools_agrees_with_a_rect_run_to_1e6(shapes, tmp_path):
    data, files, labels, sizes, oracle = shapes
    res, dets, seen = _run(oracle, data, tmp_path, 'rect', batch_size=4)
    assert any(h != w for h, w in seen)
    ids = [int(os.path.basename(f)[:-4]) for f in files]  # 100, 107, ...: the file stems
    map50, map5095, per_class = cocoeval(coco_gt_from_labels(files, labels, sizes, NC, image_ids=ids), dets)
    assert 0.2 < res['mAP50'] < 0.95 and 0.05 < res['mAP50_95'] < res['mAP50']
    assert res['mAP50'] == pytest.approx(map50, abs=1e-6)
    assert res['mAP50_95'] == pytest.approx(map5095, abs=1e-6)
    assert [pc['class'] for pc in res['per_class']] == sorted(per_class)
    for pc in res['per_class']:
        assert pc['ap50'] == pytest.approx(per_class[pc['class']][0], abs=1e-6)
        assert pc['ap50_95'] == pytest.approx(per_class[pc['class']][1], abs=1e-6)


def test_results_do_not_depend_on_the_list_order(shapes, tmp_path):
    """The valid list reversed: every image keeps its detections (found by file name); only data-set order,
    and with it the tie-breaking among equal scores, could differ, and the oracle's scores have no ties."""
    data, files, labels, sizes, oracle = shapes
    reversed_list = tmp_path / 'reversed.txt'
    reversed_list.write_text(''.join(f + '\n' for f in files[::-1]))
    rev_data = tmp_path / 'rev.data'
    rev_data.write_text(f"classes = {NC}\nvalid = {reversed_list}\n")
    fwd, fwd_json, _ = _run(oracle, data, tmp_path, 'fwd', batch_size=4)
    rev, rev_json, _ = _run(oracle, rev_data, tmp_path, 'rev', batch_size=4)
    assert (fwd['mAP50'], fwd['mAP50_95']) == (rev['mAP50'], rev['mAP50_95'])
    key = lambda d: (d['file_name'], -d['score'], d['category_id'])  # noqa: E731
    for a, b in zip(sorted(fwd_json, key=key), sorted(rev_json, key=key)):
        assert (a['file_name'], a['score'], a['image_id']) == (b['file_name'], b['score'], b['image_id'])


def test_worker_processes_give_the_same_results(shapes):
    data, _, _, _, oracle = shapes
    inline = evaluate(oracle, data, img_size=S, batch_size=4, verbose=False, workers=0)
    workers = evaluate(oracle, data, img_size=S, batch_size=4, verbose=False, workers=2)
    assert {k: inline[k] for k in METRICS} == {k: workers[k] for k in METRICS}


def test_default_workers_leave_a_core_for_the_model(monkeypatch):
    for cores, batch, want in ((1, 16, 0), (2, 16, 1), (8, 16, 4), (8, 2, 2), (None, 16, 0)):
        monkeypatch.setattr(os, 'cpu_count', lambda c=cores: c)
        assert default_workers(batch) == want


# ---------------------------------------------------------------------------------------- test.py options

@pytest.fixture(scope='module')
def tiny_pt(tmp_path_factory):
    d = tmp_path_factory.mktemp('tiny')
    cfg = d / 'tiny.cfg'
    cfg.write_text(mini_tiny(NC, 64, 64))
    model = randomize_(Darknet(str(cfg)), seed=2)
    return save_checkpoint(str(d / 'tiny.pt'), model), model


def test_cli_defaults_to_rect_and_square_flag_gives_the_square_letterbox(shapes, tiny_pt, tmp_path):
    data = shapes[0]
    pt, model = tiny_pt
    fused = Darknet(model.defs)  # test.py folds BatchNorm: compare with the same folded weights
    fused.load_state_dict(model.state_dict())
    fused.eval().fuse()
    dets = {}
    for mode, flag in (('rect', []), ('square', ['--square'])):
        cli = ['--weights', str(pt), '--data', str(data), '--batch-size', '4', '--workers', '0']
        cli_json, lib_json = tmp_path / f'cli-{mode}.json', tmp_path / f'lib-{mode}.json'
        by_cli = test_cli.main(test_cli.get_args_parser().parse_args(cli + flag + ['--save-json', str(cli_json)]))
        by_lib = evaluate(fused, data, batch_size=4, verbose=False, workers=0, rect=mode == 'rect',
                          save_json=lib_json)
        assert {k: by_cli[k] for k in METRICS} == {k: by_lib[k] for k in METRICS}
        dets[mode] = json.loads(cli_json.read_text())
        assert dets[mode] == json.loads(lib_json.read_text()) and len(dets[mode]) > 100  # random weights: many
    assert dets['rect'] != dets['square']  # the two letterboxes give the network different inputs


def test_half_is_refused_on_cpu(shapes, tiny_pt):
    data = shapes[0]
    pt, model = tiny_pt
    with pytest.raises(DarkslimError, match=r'^--half on device cpu; expected a CUDA device'):
        test_cli.main(test_cli.get_args_parser().parse_args(['--weights', str(pt), '--data', str(data), '--half']))
    with pytest.raises(DarkslimError, match='CUDA'):
        evaluate(model, data, half=True, verbose=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_half_on_cuda_matches_fp32(shapes, tiny_pt):
    data = shapes[0]
    model = tiny_pt[1].to('cuda')
    try:
        fp32 = evaluate(model, data, batch_size=4, verbose=False)
        fp16 = evaluate(model, data, batch_size=4, verbose=False, half=True)
    finally:
        model.to('cpu')
    assert next(model.parameters()).dtype == torch.float32  # the model itself is not converted
    assert fp16['mAP50'] == pytest.approx(fp32['mAP50'], abs=0.02) and fp32['mAP50'] > 0

