"""Data rules that every command follows: --skip-bad-labels covers every split a run reads, a .data file needs only
the keys the command uses, and --save-json ids score against official COCO annotations."""
import json
import os

import cv2
import numpy as np
import pytest

import detect as detect_mod
import test as test_cli  # the test.py command line
import train as train_module
from data.make_shapes import CLASSES, make_shapes
from models import Darknet, save_checkpoint
from tests.helpers import RectOracle, _oracle_dets, cocoeval, mini_tiny, need_shared, randomize_, write
from utils.datasets import parse_data_cfg
from utils.errors import DarkslimError
from utils.evaluate import evaluate
from utils.metrics import (COCO80_TO_91, COCO_NAMES, coco_category_ids, coco_gt_from_labels, coco_image_ids,
                           is_coco_names)

NC = len(CLASSES)
BAD_ROW = "9 0.5 0.5 0.2 0.2\n"  # class 9 of 5


@pytest.fixture()
def bad_valid(tmp_path):
    """make_shapes data (64 px) whose first val label file ends with a bad row (class 9 of 5), and the path and
    line number of that row."""
    data = make_shapes(tmp_path / 'shapes', n_train=2, n_val=3, img_size=64, seed=2)
    lab = sorted((tmp_path / 'shapes' / 'labels' / 'val').glob('*.txt'))[0]
    text = lab.read_text()
    lab.write_text(text + BAD_ROW)
    return data, lab, len(text.splitlines()) + 1


@pytest.fixture(scope='module')
def tiny_pt(tmp_path_factory):
    d = tmp_path_factory.mktemp('tiny')
    cfg = write(d, 'tiny.cfg', mini_tiny(NC, 64, 64))
    return cfg, save_checkpoint(str(d / 'tiny.pt'), randomize_(Darknet(str(cfg)), seed=3))


# ------------------------------------------------------------------------------------- --skip-bad-labels

def test_train_skip_bad_labels_also_covers_the_validation_split(bad_valid, tiny_pt, tmp_path, capsys):
    data, lab, line = bad_valid
    argv = ['--cfg', tiny_pt[0], '--data', data, '--img-size', 64, '--workers', 0, '--epochs', 1, '--batch-size', 2]
    args = lambda *extra: train_module.get_args_parser().parse_args([str(a) for a in argv + list(extra)])  # noqa
    with pytest.raises(DarkslimError, match=rf"^{lab}:{line}: found class 9"):
        train_module.train(args('--out-dir', tmp_path / 'a'))
    train_module.train(args('--out-dir', tmp_path / 'b', '--skip-bad-labels'))  # trains and evaluates
    out = capsys.readouterr().out
    valid = parse_data_cfg(data)['valid']
    assert f"skip_bad_labels: {valid}: dropped 1 bad label rows in 1 of 3 label files" in out
    assert (tmp_path / 'b' / 'best.pt').is_file()  # the validation set was evaluated


def test_test_py_skip_bad_labels(bad_valid, tiny_pt, capsys):
    data, lab, line = bad_valid
    cli = ['--weights', str(tiny_pt[1]), '--data', str(data), '--workers', '0']
    with pytest.raises(DarkslimError, match=rf"^{lab}:{line}: found class 9"):
        test_cli.main(test_cli.get_args_parser().parse_args(cli))
    res = test_cli.main(test_cli.get_args_parser().parse_args(cli + ['--skip-bad-labels']))
    assert res['images'] == 3 and 'dropped 1 bad label rows' in capsys.readouterr().out
    # the dropped row is not a target: the count equals the good rows of the three files
    rows = sum(len([r for r in f.read_text().splitlines() if r.strip()]) for f in lab.parent.glob('*.txt'))
    assert res['targets'] == rows - 1


# ------------------------------------------------------------------------------------- .data keys per command

def test_each_command_needs_only_the_data_keys_it_reads(tmp_path, tiny_pt):
    data = make_shapes(tmp_path / 'shapes', n_train=1, n_val=2, img_size=64, seed=1)
    root = os.path.dirname(data)
    eval_only = write(tmp_path, 'eval.data', f"classes = {NC}\nvalid = {root}/val.txt\n")
    res = test_cli.main(test_cli.get_args_parser().parse_args(['--weights', str(tiny_pt[1]), '--data',
                                                               str(eval_only), '--workers', '0']))
    assert res['images'] == 2
    no_valid = write(tmp_path, 'novalid.data', f"classes = {NC}\ntrain = {root}/train.txt\n")
    with pytest.raises(DarkslimError, match=r"novalid\.data:3: end of file without a 'valid' line; expected keys "
                                            r"classes, valid \(names optional\)"):
        evaluate(Darknet(str(tiny_pt[0])), no_valid, verbose=False)
    # training reads train= and valid=: parse_data_cfg's default still requires both
    with pytest.raises(DarkslimError, match="'train'"):
        parse_data_cfg(eval_only)
    assert parse_data_cfg(eval_only, need=('classes', 'valid'))['classes'] == NC
    # detect.py --data reads only names= (checked against classes=)
    names_only = write(tmp_path, 'names.data', f"classes = {NC}\nnames = {root}/shapes.names\n")
    out = detect_mod.detect(str(tiny_pt[0]), f"{root}/images/val", tmp_path / 'det', data=names_only,
                            verbose=False)
    assert len(out) == 2
    with pytest.raises(DarkslimError, match=r"without a 'names' line; expected keys classes, names$"):
        detect_mod.detect(str(tiny_pt[0]), f"{root}/images/val", tmp_path / 'det2', data=eval_only, verbose=False)


# ------------------------------------------------------------------------------------------ COCO JSON ids

# the standard 80 -> 91 table, from its ranges: 1..11, 13..25, 27, 28, 31..44, 46..65, 67, 70, 72..82, 84..90
COCO_IDS = [*range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70, *range(72, 83),
            *range(84, 91)]
DARKNET_SPELLING = {'motorcycle': 'motorbike', 'airplane': 'aeroplane', 'couch': 'sofa',
                    'potted plant': 'pottedplant', 'dining table': 'diningtable', 'tv': 'tvmonitor'}


def test_coco_tables():
    assert len(COCO_IDS) == 80 and list(COCO80_TO_91) == COCO_IDS
    names = need_shared('datasets/coco128/coco.names').read_text().split('\n')
    assert list(COCO_NAMES) == [n.strip() for n in names if n.strip()]


def test_category_ids_are_coco_ids_only_for_the_coco_names():
    darknet = [DARKNET_SPELLING.get(n, n) for n in COCO_NAMES]
    assert darknet != list(COCO_NAMES)
    for names in (COCO_NAMES, darknet, [n.upper() for n in COCO_NAMES]):
        assert is_coco_names(names) and coco_category_ids(names, 80) == COCO_IDS
    swapped = list(COCO_NAMES)
    swapped[0], swapped[1] = swapped[1], swapped[0]  # COCO's names in another order: other classes
    for names, nc in ((swapped, 80), (COCO_NAMES[:79], 79), (None, 80), (list(COCO_NAMES) + ['extra'], 81)):
        assert not is_coco_names(names) and coco_category_ids(names, nc) == list(range(nc))


def test_image_ids_are_numeric_stems_when_all_are_distinct_numbers():
    assert coco_image_ids(['/d/000000000139.jpg', 'x/000000000285.png', '7.jpg']) == [139, 285, 7]
    assert coco_image_ids(['/d/000000000139.jpg', '/d/a.jpg']) == [0, 1]  # one stem is not a number
    assert coco_image_ids(['/a/12.jpg', '/b/12.jpg', '/c/3.jpg']) == [0, 1, 2]  # two images would share id 12
    assert coco_image_ids(['/d/1_2.jpg', '/d/-3.jpg']) == [0, 1]


def test_save_json_scores_against_coco_ids(tmp_path):
    """Images named like COCO's (000000000139.png), classes remapped to spread over COCO's table, names as in
    darknet's coco.names: the JSON has image_id = the number in the file name and category_id = COCO's id, and
    pycocotools on ground truth written in those ids (ids taken from the file names and the table above) agrees
    with our numbers class by class."""
    src = tmp_path / 'src'
    make_shapes(src, n_train=1, n_val=8, img_size=96, seed=4)
    coco_cls = [0, 11, 24, 57, 79]  # shapes class -> a COCO class (ids 1, 13, 27, 63, 90)
    ids = [139, 285, 632, 724, 776, 785, 802, 872]
    root = tmp_path / 'coco'
    (root / 'images').mkdir(parents=True)
    (root / 'labels').mkdir()
    files, labels, sizes, images = [], [], [], []
    for i, f in zip(ids, sorted((src / 'images' / 'val').iterdir())):
        dst = root / 'images' / f"{i:012d}.png"
        img = cv2.imread(str(f))
        assert cv2.imwrite(str(dst), img)
        rows = (src / 'labels' / 'val' / (f.stem + '.txt')).read_text().split()
        lab = np.array(rows, float).reshape(-1, 5)
        lab[:, 0] = [coco_cls[int(c)] for c in lab[:, 0]]
        (root / 'labels' / f"{i:012d}.txt").write_text(''.join(' '.join(map(str, r)) + '\n' for r in lab.tolist()))
        files.append(str(dst)), labels.append(lab), sizes.append(img.shape[:2]), images.append(img)
    (root / 'coco.names').write_text(''.join(DARKNET_SPELLING.get(n, n) + '\n' for n in COCO_NAMES))
    data = write(root, 'coco.data', "classes = 80\nvalid = images\nnames = coco.names\n")
    oracle = RectOracle(images, _oracle_dets(labels, sizes, 80), 80, 96)
    res = evaluate(oracle, data, batch_size=3, save_json=root / 'dets.json', verbose=False, workers=0)
    dets = json.loads((root / 'dets.json').read_text())
    assert {d['image_id'] for d in dets} <= set(ids) and len({d['image_id'] for d in dets}) > 4
    assert all(d['image_id'] == int(os.path.basename(d['file_name'])[:-4]) for d in dets)
    assert {d['category_id'] for d in dets} <= set(COCO_IDS) and {1, 13, 27, 63, 90} <= {d['category_id'] for d in dets}
    gt = coco_gt_from_labels(files, labels, sizes, 80, image_ids=ids, category_ids=COCO_IDS)
    assert {a['category_id'] for a in gt['annotations']} == {1, 13, 27, 63, 90}
    map50, map5095, per_class = cocoeval(gt, dets)
    assert 0.2 < res['mAP50'] < 0.95
    assert (res['mAP50'], res['mAP50_95']) == (pytest.approx(map50, abs=1e-6), pytest.approx(map5095, abs=1e-6))
    assert sorted(per_class) == [COCO_IDS[pc['class']] for pc in res['per_class']]
    for pc in res['per_class']:
        assert pc['ap50_95'] == pytest.approx(per_class[COCO_IDS[pc['class']]][1], abs=1e-6)
