"""test.py (evaluation) and detect.py: agreement with pycocotools' COCOeval on the saved JSON, output formats,
user errors, and detect.py's boxes mapped back to the original images.

The oracle detector below has the eval-mode output contract of models.Darknet (decoded [B, N, 5 + nc]: cx, cy,
w, h in input pixels, objectness, class probabilities) and "detects" perturbed ground truth: it recognises which
letterboxed image it is given (or its left-right mirror) and returns boxes derived from the label files with a
letterbox computed here, independently of utils.datasets. Everything after the forward pass (NMS, mapping back to
original pixels, matching, AP, JSON) is the real test.py / detect.py code.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

import detect as detect_mod
import test as test_cli  # the test.py command line (a module named test_cli here: pytest collects no module)
from data.make_shapes import CLASSES, make_shapes
from models import Darknet, save_checkpoint
from tests.helpers import REPO, _noisy_detections, _original_xyxy, cocoeval, mini_tiny, randomize_
from utils.datasets import LoadImagesAndLabels
from utils.errors import DarkslimError
from utils.evaluate import evaluate
from utils.metrics import coco_gt_from_labels

NC = len(CLASSES)
N_VAL = 10
SRC_SIZE = 128  # make_shapes image long side; some images are non-square (letterbox pads them)
S = 160  # evaluation input size: images are scaled up, then padded


# ----------------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """Tiny inputs: on a shared 2-core machine a second intra-op thread only adds synchronisation cost (NMS of a
    few hundred boxes took seconds instead of milliseconds under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    """(data path, image paths in `valid` order, labels [m, 5] cls cx cy w h normalised, (h0, w0) sizes),
    read here from the files make_shapes wrote, not through utils.datasets."""
    root = tmp_path_factory.mktemp('eval') / 'shapes'
    data = make_shapes(root, n_train=1, n_val=N_VAL, img_size=SRC_SIZE, seed=3)
    files = [str(root / line.strip()) for line in (root / 'val.txt').read_text().splitlines() if line.strip()]
    labels, sizes = [], []
    for f in files:
        lab = root / 'labels' / 'val' / (os.path.splitext(os.path.basename(f))[0] + '.txt')
        labels.append(np.array([r.split() for r in lab.read_text().splitlines() if r.strip()], float).reshape(-1, 5))
        sizes.append(cv2.imread(f).shape[:2])
    assert sum(len(lab) for lab in labels) > 10 and any(h != w for h, w in sizes)  # non-square images present
    return data, files, labels, sizes


def _letterboxed_xyxy(lab, h0, w0, s):
    """Normalised labels [m, 5] -> [m, 5] cls, x1, y1, x2, y2 in the s x s letterboxed input: scale by
    s / max(h0, w0) (rounded image size), pad centred (floor on the left/top)."""
    r = s / max(h0, w0)
    nh, nw = max(1, round(h0 * r)), max(1, round(w0 * r))
    dw, dh = (s - nw) // 2, (s - nh) // 2
    cx, cy, w, h = lab[:, 1] * nw + dw, lab[:, 2] * nh + dh, lab[:, 3] * nw, lab[:, 4] * nh
    return np.stack([lab[:, 0], cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)


class OracleDetector(torch.nn.Module):
    """Eval-mode output contract of models.Darknet; returns preset rows for each recognised input image.

    bank [K, 3, s, s]: the letterboxed images it can recognise; rows[k]: [n_k, 5 + nc] its output for image k.
    A left-right mirrored image gets the mirrored rows (cx -> width - cx), as a real detector would.
    """

    def __init__(self, bank, rows, nc, tol=0.0, img_size=None):
        super().__init__()
        self.bank, self.rows, self.nc, self.tol = bank, rows, nc, tol
        if img_size is not None:  # (h, w) as models.Darknet.img_size
            self.img_size = img_size
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        out = []
        for img in x:
            d = (self.bank - img[None]).abs().flatten(1).amax(1)
            df = (self.bank.flip(3) - img[None]).abs().flatten(1).amax(1)
            flipped = bool(df.min() < d.min())
            d = df if flipped else d
            k = int(d.argmin())
            assert float(d[k]) <= self.tol, f"oracle does not know this image (max abs diff {float(d[k])})"
            r = torch.from_numpy(self.rows[k]).clone()
            if flipped:
                r[:, 0] = x.shape[3] - r[:, 0]
            out.append(r)
        n = max(len(r) for r in out)
        batch = torch.zeros(len(out), n, 5 + self.nc)  # zero rows: objectness 0, below any threshold
        for b, r in enumerate(out):
            batch[b, :len(r)] = r
        return batch, []


def _bank(files, s):
    """Letterboxed inputs as test()'s loader makes them (used only to recognise images)."""
    ds = LoadImagesAndLabels(files, s, augment=False)
    return torch.stack([ds[i][0] for i in range(len(ds))])


@pytest.fixture(scope='module')
def oracle(shapes):
    _, files, labels, sizes = shapes
    rows = [_noisy_detections(_letterboxed_xyxy(lab, h, w, S), S, NC, seed=i)
            for i, (lab, (h, w)) in enumerate(zip(labels, sizes))]
    return OracleDetector(_bank(files, S), rows, NC, img_size=(S - 32, S))  # test() default: max(h, w) = S


@pytest.fixture(scope='module')
def tiny_pt(tmp_path_factory):
    """A random-weight yolov3-tiny-like model for the shapes classes with a 64 x 32 (w x h) cfg input, saved as a
    .pt storing its cfg."""
    d = tmp_path_factory.mktemp('tiny')
    cfg = d / 'tiny.cfg'
    cfg.write_text(mini_tiny(NC, 64, 32))
    model = randomize_(Darknet(str(cfg)), seed=1)
    return cfg, save_checkpoint(str(d / 'tiny.pt'), model), model


def _run(script, *args):
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}  # tiny inputs: threads only add synchronisation cost
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=env)


# -------------------------------------------------------------------------------------------------- test.py

def test_metrics_agree_with_cocoeval_on_saved_json(shapes, oracle, tmp_path):
    data, files, labels, sizes = shapes
    json_path = tmp_path / 'dets.json'
    res = evaluate(oracle, data, img_size=S, batch_size=4, save_json=json_path, verbose=False, rect=False)
    map50, map5095, per_class = cocoeval(coco_gt_from_labels(files, labels, sizes, NC), json_path)
    assert 0.2 < res['mAP50'] < 0.95 and 0.05 < res['mAP50_95'] < res['mAP50']  # meaningful, not trivial
    assert res['mAP50'] == pytest.approx(map50, abs=0.01)
    assert res['mAP50_95'] == pytest.approx(map5095, abs=0.01)
    assert [pc['class'] for pc in res['per_class']] == sorted(per_class)
    for pc in res['per_class']:
        assert pc['ap50'] == pytest.approx(per_class[pc['class']][0], abs=0.01)
        assert pc['ap50_95'] == pytest.approx(per_class[pc['class']][1], abs=0.01)
    assert res['images'] == N_VAL and oracle.calls >= 3  # 10 images in batches of 4


def test_save_json_is_coco_results_in_original_pixels(shapes, oracle, tmp_path):
    data, files, labels, sizes = shapes
    json_path = tmp_path / 'dets.json'
    evaluate(oracle, data, img_size=S, batch_size=3, save_json=json_path, verbose=False, rect=False)
    dets = json.loads(json_path.read_text())
    assert dets and all(set(d) == {'image_id', 'file_name', 'category_id', 'bbox', 'score'} for d in dets)
    assert {d['image_id'] for d in dets} <= set(range(N_VAL))
    for d in dets:
        assert d['file_name'] == files[d['image_id']]  # image_id = numeric stem (make_shapes: 000000..) = index
        assert isinstance(d['category_id'], int) and 0 <= d['category_id'] < NC and 0 < d['score'] <= 1
        h0, w0 = sizes[d['image_id']]
        x, y, w, h = d['bbox']
        assert x >= 0 and y >= 0 and x + w <= w0 + 1e-3 and y + h <= h0 + 1e-3
    # each detection is one of the oracle's boxes (either of its classes) mapped back by inverting the letterbox
    for i, (lab, (h0, w0)) in enumerate(zip(labels, sizes)):
        rows = oracle.rows[i]
        r = S / max(h0, w0)
        nh, nw = max(1, round(h0 * r)), max(1, round(w0 * r))
        dw, dh = (S - nw) // 2, (S - nh) // 2
        x1 = np.clip((rows[:, 0] - rows[:, 2] / 2 - dw) * w0 / nw, 0, w0)
        y1 = np.clip((rows[:, 1] - rows[:, 3] / 2 - dh) * h0 / nh, 0, h0)
        x2 = np.clip((rows[:, 0] + rows[:, 2] / 2 - dw) * w0 / nw, 0, w0)
        y2 = np.clip((rows[:, 1] + rows[:, 3] / 2 - dh) * h0 / nh, 0, h0)
        want = np.stack([x1, y1, x2 - x1, y2 - y1], 1)
        mine = [d for d in dets if d['image_id'] == i]
        assert mine or not len(rows)
        for d in mine:
            k = np.abs(want - d['bbox']).max(1).argmin()
            np.testing.assert_allclose(d['bbox'], want[k], atol=0.01)
            assert d['score'] == pytest.approx(rows[k, 4] * rows[k, 5 + d['category_id']], abs=1e-5)


def test_flip_augment_merges_mirrored_pass(shapes, oracle, tmp_path):
    """A mirror-equivariant detector sees the same boxes twice; mapped back, NMS removes the copies, so the
    result equals the plain run (boxes left at mirrored places would add false positives)."""
    data = shapes[0]
    plain = evaluate(oracle, data, img_size=S, batch_size=5, save_json=tmp_path / 'a.json', verbose=False,
                     rect=False)
    tta = evaluate(oracle, data, img_size=S, batch_size=5, save_json=tmp_path / 'b.json', verbose=False,
                   augment=True, rect=False)
    a, b = json.loads((tmp_path / 'a.json').read_text()), json.loads((tmp_path / 'b.json').read_text())
    assert len(a) == len(b)
    for da, db in zip(a, b):
        assert (da['image_id'], da['category_id'], da['score']) == (db['image_id'], db['category_id'], db['score'])
        np.testing.assert_allclose(da['bbox'], db['bbox'], atol=2e-3)
    assert tta['mAP50_95'] == pytest.approx(plain['mAP50_95'], abs=1e-6)


def test_cfg_route_equals_model_route_and_restores_mode(shapes, tiny_pt):
    data = shapes[0]
    cfg, pt, model = tiny_pt
    model.train()
    kw = dict(batch_size=5, conf_thres=0.001, verbose=False)
    by_model = evaluate(model, data, img_size=64, **kw)
    assert model.training  # put back in train mode
    cli = ['--data', str(data), '--weights', str(pt), '--batch-size', '5', '--conf-thres', '0.001']
    by_cfg = test_cli.main(test_cli.get_args_parser().parse_args(cli + ['--cfg', str(cfg), '--img-size', '64']))
    by_pt_cfg = test_cli.main(test_cli.get_args_parser().parse_args(cli))  # cfg from the .pt; size max(64, 32)
    # random weights, but over 10 images some boxes hit a ground truth: the compared numbers are not all zero
    assert by_model['mAP50'] > 0 and any(pc['ap50'] > 0 for pc in by_model['per_class'])
    for key in ('precision', 'recall', 'f1', 'mAP50', 'mAP50_95', 'per_class', 'images'):
        assert by_model[key] == by_cfg[key] == by_pt_cfg[key]


def test_img_size_defaults_to_the_models_input_size(shapes, oracle, tmp_path):
    """The oracle recognises only S x S inputs (it fails on any other); its img_size (h, w) is (S - 32, S)."""
    data = shapes[0]
    by_default = evaluate(oracle, data, batch_size=5, verbose=False, rect=False)
    assert by_default == {**evaluate(oracle, data, img_size=S, batch_size=5, verbose=False, rect=False),
                          **{k: by_default[k] for k in ('seconds', 'inference_seconds', 'nms_seconds')}}
    assert by_default['mAP50'] > 0.2
    bare = OracleDetector(oracle.bank, oracle.rows, NC)  # no img_size attribute: the size must be given
    with pytest.raises(DarkslimError, match='input size'):
        evaluate(bare, data, verbose=False, rect=False)


def test_ground_truth_hanging_over_the_edge_is_not_clipped(tmp_path):
    """A label box may extend past the image (only its centre must lie inside). test() compares it unclipped, as
    pycocotools sees it (coco_gt_from_labels), while detections are clipped like the saved JSON.
    Image 96 x 64, box x from -9.6 to 19.2; the detection of exactly that box is clipped to x from 0 to 19.2:
    IoU = 19.2 / 28.8 = 2/3, a hit at IoU thresholds 0.50..0.65 (4 of 10), so mAP50 = 1, mAP50_95 = 0.4."""
    img = np.zeros((64, 96, 3), np.uint8)
    img[16:48, :20] = (0, 200, 255)
    (tmp_path / 'images').mkdir()
    (tmp_path / 'labels').mkdir()
    path = str(tmp_path / 'images' / 'a.png')
    assert cv2.imwrite(path, img)
    lab = np.array([[1, 0.05, 0.5, 0.3, 0.5]])
    (tmp_path / 'labels' / 'a.txt').write_text(' '.join(map(str, lab[0].tolist())) + '\n')
    data = tmp_path / 'edge.data'
    data.write_text(f"classes = 2\ntrain = {path}\nvalid = {path}\n")
    s = 96
    _, x1, y1, x2, y2 = _letterboxed_xyxy(lab, 64, 96, s)[0]
    row = np.array([[(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1, 0.9, 0.0, 1.0]], np.float32)
    json_path = tmp_path / 'dets.json'
    res = evaluate(OracleDetector(_bank([path], s), [row], 2), data, img_size=s, save_json=json_path,
                   verbose=False, rect=False)
    map50, map5095, _ = cocoeval(coco_gt_from_labels([path], [lab], [(64, 96)], 2), json_path)
    assert res['mAP50'] == pytest.approx(1.0) and res['mAP50_95'] == pytest.approx(0.4)
    assert (map50, map5095) == (pytest.approx(1.0), pytest.approx(0.4))


def test_classes_mismatch_names_both_counts(shapes, tmp_path):
    cfg = tmp_path / 'three.cfg'
    cfg.write_text(mini_tiny(3, 64, 64))
    with pytest.raises(DarkslimError, match=r"shapes\.data:\d+: classes = 5.*3 classes"):
        evaluate(Darknet(str(cfg)), shapes[0], img_size=64, verbose=False)


def test_cli_writes_report_and_json(shapes, tiny_pt, tmp_path):
    data, files, _, _ = shapes
    report, dets = tmp_path / 'out' / 'report.json', tmp_path / 'out' / 'dets.json'
    r = _run('test.py', '--weights', tiny_pt[1], '--data', data, '--img-size', 64, '--batch-size', 4,
             '--conf-thres', 0.05, '--report', report, '--save-json', dets)
    assert r.returncode == 0, r.stderr
    rep = json.loads(report.read_text())
    assert {'precision', 'recall', 'f1', 'mAP50', 'mAP50_95', 'per_class', 'images', 'seconds'} <= set(rep)
    assert rep['images'] == len(files) and rep['seconds'] > 0
    assert rep['per_class'] and all(set(pc) == {'class', 'name', 'images', 'targets', 'precision', 'recall', 'f1',
                                                'ap50', 'ap50_95'} for pc in rep['per_class'])
    assert rep['per_class'][0]['name'] == CLASSES[rep['per_class'][0]['class']]
    assert isinstance(json.loads(dets.read_text()), list)
    assert 'images/s' in r.stdout and rep['per_class'][0]['name'] in r.stdout  # per-class table, speed
    assert not [p for p in os.listdir(report.parent) if p.endswith('.tmp')]  # atomic writes left no temp file


def test_cli_bad_data_file_is_one_line_exit_2(tiny_pt, tmp_path):
    bad = tmp_path / 'bad.data'
    bad.write_text("classes = 5\ntrain = train.txt\n")  # no valid=
    r = _run('test.py', '--weights', tiny_pt[1], '--data', bad)
    assert r.returncode == 2
    assert 'Traceback' not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert str(bad) in r.stderr and 'valid' in r.stderr


def test_split_test_evaluates_the_test_list_as_if_it_were_valid(shapes, tiny_pt, tmp_path):
    data, files, _, _ = shapes
    root = os.path.dirname(data)
    (tmp_path / 'held.txt').write_text('\n'.join(files[:5]) + '\n')
    (tmp_path / 'three.data').write_text(f"classes = {NC}\ntrain = {files[-1]}\nvalid = {files[-1]}\n"
                                         f"test = held.txt\nnames = {root}/shapes.names\n")
    (tmp_path / 'as-valid.data').write_text(f"classes = {NC}\nvalid = held.txt\nnames = {root}/shapes.names\n")
    reports = []
    for data_file, split in (('three.data', 'test'), ('as-valid.data', 'valid')):
        report = tmp_path / f"{split}.json"
        r = _run('test.py', '--weights', tiny_pt[1], '--data', tmp_path / data_file, '--split', split,
                 '--img-size', 64, '--conf-thres', 0.05, '--report', report)
        assert r.returncode == 0, r.stderr
        reports.append(json.loads(report.read_text()))
    assert reports[0]['images'] == 5
    assert {k: reports[0][k] for k in ('mAP50', 'mAP50_95', 'targets')} == \
        {k: reports[1][k] for k in ('mAP50', 'mAP50_95', 'targets')}


# ------------------------------------------------------------------------------------------------ detect.py

def test_detect_maps_boxes_back_to_original_pixels(shapes, tmp_path):
    """A perfect detector (GT boxes in the letterboxed frame): detect() returns the GT boxes in the original
    images' pixels, counted per class, and saves one annotated image per input."""
    _, files, labels, sizes = shapes
    s = 96  # a different size than test(): the images are scaled down here
    src = tmp_path / 'src'
    src.mkdir()
    for f in files[:4]:
        shutil.copy(f, src)
    rows = []
    for lab, (h, w) in zip(labels, sizes):
        lb = _letterboxed_xyxy(lab, h, w, s)
        r = np.zeros((len(lb), 5 + NC), np.float32)
        r[:, 0], r[:, 1] = (lb[:, 1] + lb[:, 3]) / 2, (lb[:, 2] + lb[:, 4]) / 2
        r[:, 2], r[:, 3], r[:, 4] = lb[:, 3] - lb[:, 1], lb[:, 4] - lb[:, 2], 0.9
        r[np.arange(len(lb)), 5 + lb[:, 0].astype(int)] = 1.0
        rows.append(r)
    model = OracleDetector(_bank(files, s), rows, NC, tol=1e-6, img_size=(s, s - 32))  # default size max(h, w)
    names = list(CLASSES)
    out = tmp_path / 'out'
    res = detect_mod.detect(model, src, out, names=names, verbose=False)
    assert sorted(os.listdir(out)) == sorted(os.listdir(src))
    for r in res:
        i = files.index(os.path.join(os.path.dirname(files[0]), os.path.basename(r['path'])))
        gt = _original_xyxy(labels[i], *sizes[i])
        assert len(r['detections']) == len(gt)
        got = r['detections'][np.lexsort(r['detections'][:, :4].T[::-1])]
        want = gt[np.lexsort(gt[:, 1:5].T[::-1])]
        np.testing.assert_allclose(got[:, :4], want[:, 1:5], atol=0.01)
        np.testing.assert_array_equal(got[:, 5], want[:, 0])
        assert r['counts'] == {names[c]: int((gt[:, 0] == c).sum()) for c in np.unique(gt[:, 0]).astype(int)}
        drawn = cv2.imread(r['out'])
        assert drawn.shape == cv2.imread(r['path']).shape
        assert (np.abs(drawn.astype(int) - cv2.imread(r['path']).astype(int)).max() > 100) == bool(len(gt))
    with pytest.raises(DarkslimError, match='overwrite the input'):
        detect_mod.detect(model, src, src, img_size=s, verbose=False)


def test_detect_cli_one_image_per_input(shapes, tiny_pt, tmp_path):
    data, files, _, _ = shapes
    src = tmp_path / 'src'
    src.mkdir()
    for f in files[:3]:
        shutil.copy(f, src)
    digest = {p: hashlib.sha256((src / p).read_bytes()).hexdigest() for p in os.listdir(src)}
    out = tmp_path / 'out'
    r = _run('detect.py', '--weights', tiny_pt[1], '--source', src, '--out', out, '--data', data,
             '--img-size', 64, '--conf-thres', 0.05)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == sorted(digest)
    for p in digest:
        assert cv2.imread(str(out / p)).shape == cv2.imread(str(src / p)).shape
        assert hashlib.sha256((src / p).read_bytes()).hexdigest() == digest[p]  # input untouched
        line = next(ln for ln in r.stdout.splitlines() if ln.startswith(str(src / p)))
        assert line.endswith(' ms)')
        assert any(name in line for name in CLASSES)
    single = _run('detect.py', '--weights', tiny_pt[1], '--source', src / sorted(digest)[0], '--out',
                  tmp_path / 'one')  # --img-size from the cfg stored in the .pt
    assert single.returncode == 0, single.stderr
    assert os.listdir(tmp_path / 'one') == [sorted(digest)[0]]


def test_detect_list_file_with_repeated_file_names_keeps_every_output(shapes, tmp_path):
    """Two different images both named x.jpg (in two folders of a list file) and a third named x_1.jpg: each gets
    its own output file, in list order x.jpg, x_1.jpg, then x_1_1.jpg, none overwritten."""
    _, files, labels, sizes = shapes
    srcs = [tmp_path / 'a' / 'x.jpg', tmp_path / 'b' / 'x.jpg', tmp_path / 'c' / 'x_1.jpg']
    for f, dst in zip(files, srcs):
        dst.parent.mkdir()
        shutil.copy(f, dst)
    (tmp_path / 'list.txt').write_text(''.join(f"{p}\n" for p in srcs))
    s = 96
    rows = []
    for lab, (h, w) in zip(labels, sizes):  # one detection per image: its first GT box (or none)
        lb = _letterboxed_xyxy(lab[:1], h, w, s)
        r = np.zeros((len(lb), 5 + NC), np.float32)
        r[:, :4] = np.stack([(lb[:, 1] + lb[:, 3]) / 2, (lb[:, 2] + lb[:, 4]) / 2, lb[:, 3] - lb[:, 1],
                             lb[:, 4] - lb[:, 2]], 1)
        r[:, 4], r[np.arange(len(lb)), 5 + lb[:, 0].astype(int)] = 0.9, 1.0
        rows.append(r)
    model = OracleDetector(_bank(files, s), rows, NC)
    res = detect_mod.detect(model, tmp_path / 'list.txt', tmp_path / 'out', img_size=s, verbose=False)
    assert [os.path.basename(r['out']) for r in res] == ['x.jpg', 'x_1.jpg', 'x_1_1.jpg']
    assert sorted(os.listdir(tmp_path / 'out')) == ['x.jpg', 'x_1.jpg', 'x_1_1.jpg']
    for i, (r, src) in enumerate(zip(res, srcs)):
        assert r['path'] == str(src) and len(r['detections']) == min(len(labels[i]), 1)
        out, inp = cv2.imread(r['out']).astype(int), cv2.imread(str(src)).astype(int)
        assert out.shape == inp.shape
        assert np.median(np.abs(out - inp)) < 5  # its own image (JPEG re-encoded), not another input's
