"""The official COCO-trained yolov3-tiny on real COCO images (../shared; skipped cleanly without it).

- test.py's mAP on coco128 val is the model's known mAP (0.30 at 416, measured with the darknet-era test.py too)
  and equals pycocotools' COCOeval on the JSON test.py saved: both come from the same detections.
- A 10 % tiny prune of the real model writes a cfg + weights that OpenCV's Darknet importer reads to the outputs
  of our forward on a real letterboxed image, and whose weights bytes survive a read + write unchanged."""
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from models import load_model
from tests.helpers import REPO, cocoeval, need_shared, opencv_max_diff
from utils.darknet_weights import save_weights
from utils.datasets import image_tensor, imread, letterbox
from utils.metrics import coco_category_ids, coco_gt_from_labels, coco_image_ids
from utils.parse_config import parse_cfg

SIZE = 416
OPENCV_TOL = 2e-3


@pytest.fixture(scope='module')
def real():
    """(cfg, weights, coco128 folder) of the official model and data."""
    folder = need_shared('models/yolov3-tiny-coco')
    coco = need_shared('datasets/coco128')
    return folder / 'yolov3-tiny.cfg', folder / 'yolov3-tiny.weights', coco


def run(script, *args):
    r = subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=REPO, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def val_ground_truth(coco, names):
    """COCO ground truth of coco128 val from its YOLO label files, in the ids test.py's JSON uses."""
    files = sorted(str(p) for p in (coco / 'images' / 'val2017').glob('*.jpg'))
    labels, sizes = [], []
    for f in files:
        lab = coco / 'labels' / 'val2017' / (os.path.basename(f)[:-4] + '.txt')
        labels.append(np.loadtxt(lab, ndmin=2).reshape(-1, 5) if lab.is_file() else np.zeros((0, 5)))
        sizes.append(cv2.imread(f).shape[:2])
    return coco_gt_from_labels(files, labels, sizes, 80, image_ids=coco_image_ids(files),
                               category_ids=coco_category_ids(names, 80))


def test_test_py_gives_the_known_map_and_equals_pycocotools(real, tmp_path):
    cfg, weights, coco = real
    data = tmp_path / 'coco128.data'
    data.write_text(f"classes = 80\nvalid = {coco / 'images' / 'val2017'}\nnames = {coco / 'coco.names'}\n")
    report, dets = tmp_path / 'report.json', tmp_path / 'dets.json'
    run('test.py', '--cfg', cfg, '--weights', weights, '--data', data, '--img-size', SIZE, '--report', report,
        '--save-json', dets)
    ours = json.loads(report.read_text())
    names = [n.strip() for n in (coco / 'coco.names').read_text().splitlines() if n.strip()]
    map50, map5095, _ = cocoeval(val_ground_truth(coco, names), dets)
    assert 0.29 <= ours['mAP50'] <= 0.31
    assert ours['mAP50'] == pytest.approx(map50, abs=1e-6)
    assert ours['mAP50_95'] == pytest.approx(map5095, abs=1e-6)


def test_pruned_real_model_loads_in_opencv_and_its_weights_re_read_equal(real, tmp_path):
    cfg, weights, coco = real
    out = tmp_path / 'tiny-0.1'
    run('tiny_prune.py', '--cfg', cfg, '--weights', weights, '--percent', 0.1, '--latency-runs', 0, '--out', out)
    pcfg, pweights = tmp_path / 'tiny-0.1.cfg', tmp_path / 'tiny-0.1.weights'
    pruned = load_model(pcfg, pweights)
    original = load_model(cfg, weights)
    assert sum(p.numel() for p in pruned.parameters()) < 0.95 * sum(p.numel() for p in original.parameters())
    image = sorted((coco / 'images' / 'val2017').glob('*.jpg'))[0]
    net = parse_cfg(pcfg)[0]
    x = image_tensor(letterbox(imread(str(image)), (net['height'], net['width']))[0])[None]
    assert opencv_max_diff(pruned, pcfg, pweights, x, OPENCV_TOL) < OPENCV_TOL
    with torch.no_grad():
        # not a blank output: an uncalibrated 10 % prune keeps a third of the mAP, its best objectness here ~0.2
        assert float(pruned(x)[0][..., 4].max()) > 0.1
    assert save_weights(pruned, tmp_path / 'again.weights').read_bytes() == pweights.read_bytes()
