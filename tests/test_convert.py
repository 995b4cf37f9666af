"""Specification of data/convert.py (utils/annotations.py): Pascal VOC and COCO annotations -> the Darknet folder
the loaders read. Expected label rows are computed by hand in the comments; the round trips read the output back
through utils.datasets (parse_data_cfg, LoadImagesAndLabels) and map the boxes to the annotated pixels."""
import hashlib
import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from data.convert import get_args_parser, main
from tests.helpers import REPO, need_shared
from utils.datasets import LoadImagesAndLabels, load_names, parse_data_cfg, scale_coords
from utils.boxes import xywhn2xyxy
from utils.errors import cli_main


# ---------------------------------------------------------------------------------------------------------------
# building inputs

def png(path, w, h, seed=0):
    """A w x h random-noise PNG at `path` (written by OpenCV)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), img)


def voc_xml(filename, size, objects):
    """VOC annotation text. size: (width, height) or None; objects: (name, xmin, ymin, xmax, ymax[, difficult])."""
    s = f"<annotation>\n\t<folder>JPEGImages</folder>\n\t<filename>{filename}</filename>\n" \
        f"\t<path>/somebody/else/{filename}</path>\n"
    if size:
        s += f"\t<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>\n"
    for name, x1, y1, x2, y2, *difficult in objects:
        s += (f"\t<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
              f"<difficult>{difficult[0] if difficult else 0}</difficult>"
              f"<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>\n")
    return s + "</annotation>\n"


def voc_root(tmp_path):
    """A VOC root: a.png 100x50 (4 boxes), b.png 80x60 (2 boxes), c.png 64x32 (none); train = a, c; val = b;
    d.xml (its image absent) is in no split list."""
    root = tmp_path / 'VOC'
    for name, w, h in (('a', 100, 50), ('b', 80, 60), ('c', 64, 32)):
        png(root / 'JPEGImages' / f'{name}.png', w, h)
    ann = root / 'Annotations'
    ann.mkdir()
    (ann / 'a.xml').write_text(voc_xml('a.png', (100, 50), [
        ('cat', 11, 6, 61, 31),        # inside
        ('dog', 71, 21, 121, 61),      # past the right and bottom border
        ('cat', 31, 31, 31, 41),       # zero width
        ('dog', 2, 2, 10, 10, 1)]))    # difficult
    (ann / 'b.xml').write_text(voc_xml('b.png', (80, 60), [
        ('dog', 1, 1, 41, 31),
        ('cat', 90, 10, 100, 20)]))    # right of the 80 px image
    (ann / 'c.xml').write_text(voc_xml('c.png', (64, 32), []))
    (ann / 'd.xml').write_text(voc_xml('d.png', (10, 10), [('cow', 1, 1, 5, 5)]))  # in no list: not read
    main_dir = root / 'ImageSets' / 'Main'
    main_dir.mkdir(parents=True)
    (main_dir / 'train.txt').write_text("a\nc\n")
    (main_dir / 'val.txt').write_text("b\n")
    return root


# VOC corners are 1-based: x from xmin - 1 to xmax - 1 (darknet's voc_label.py), then clipped to the image.
# a.png 100x50: cat (11,6)-(61,31) -> x 10..60, y 5..30: cx 35/100, cy 17.5/50, w 50/100, h 25/50
#               dog (71,21)-(121,61) -> x 70..120 -> 70..100, y 20..60 -> 20..50: cx 85/100, cy 35/50, w .3, h .6
A_ROWS = "0 0.350000 0.350000 0.500000 0.500000\n1 0.850000 0.700000 0.300000 0.600000\n"
# b.png 80x60: dog (1,1)-(41,31) -> x 0..40, y 0..30: cx 20/80, cy 15/60, w 40/80, h 30/60; the cat is outside
B_ROWS = "1 0.250000 0.250000 0.500000 0.500000\n"
# the difficult dog (2,2)-(10,10) -> x 1..9, y 1..9: cx 5/100, cy 5/50, w 8/100, h 8/50
A_DIFFICULT_ROW = "1 0.050000 0.100000 0.080000 0.160000\n"


def convert(*argv):
    """data/convert.py in this process: the Summary."""
    return main(get_args_parser().parse_args([str(a) for a in argv]))


def cli(*argv):
    """data/convert.py as a user runs it: the finished process (a few seconds: it imports torch)."""
    return subprocess.run([sys.executable, 'data/convert.py'] + [str(a) for a in argv], cwd=REPO,
                          capture_output=True, text=True)


def cli_here(capsys, *argv):
    """data/convert.py's __main__ path (cli_main over main) in this process: returncode, stdout, stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli_main(main, get_args_parser().parse_args([str(a) for a in argv]))
    out, err = capsys.readouterr()
    return SimpleNamespace(returncode=e.value.code, stdout=out, stderr=err)


def assert_one_line_error(r, *fragments):
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.startswith('error: ') and r.stderr.count('\n') == 1, r.stderr
    for f in fragments:
        assert f in r.stderr, (f, r.stderr)


def nothing_written(out):
    """Neither the output folder nor a temp folder beside it exists."""
    return not out.exists() and not list(out.parent.glob(f'.{out.name}.*'))


def tree_digest(root):
    """{relative path: sha1 of the bytes} of every file under root."""
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob('*')) if p.is_file()}


def label(out, stem):
    return (out / 'labels' / f'{stem}.txt').read_text()


# ---------------------------------------------------------------------------------------------------------------
# VOC

def test_voc_root_writes_the_hand_computed_labels_lists_and_data(tmp_path, capsys):
    src = voc_root(tmp_path)
    before = tree_digest(src)
    out = tmp_path / 'out' / 'pets'
    convert('voc', src, '--out', out)
    assert tree_digest(src) == before  # the input is only read
    assert (label(out, 'a'), label(out, 'b'), label(out, 'c')) == (A_ROWS, B_ROWS, '')
    assert (out / 'train.txt').read_text() == "images/a.png\nimages/c.png\n"  # ImageSets/Main honoured
    assert (out / 'val.txt').read_text() == "images/b.png\n"
    assert not (out / 'test.txt').exists()
    for stem in 'abc':  # copies of the images
        assert (out / 'images' / f'{stem}.png').read_bytes() == (src / 'JPEGImages' / f'{stem}.png').read_bytes()
    data = parse_data_cfg(out / 'pets.data')  # name = the folder's basename
    assert data == {'classes': 2, 'train': str(out / 'train.txt'), 'valid': str(out / 'val.txt'),
                    'names': str(out / 'pets.names')}
    assert load_names(data['names']) == ['cat', 'dog']  # sorted by name
    printed = capsys.readouterr().out
    for line in ('dropped 1 boxes: zero size (a.xml object 3)', 'dropped 1 boxes: difficult (a.xml object 4)',
                 'dropped 1 boxes: outside the image (b.xml object 2)', 'clipped to the image: 1 boxes',
                 '1 .xml files in'):
        assert line in printed
    table = {row.split()[0]: row.split()[1:] for row in printed.splitlines()[1:4]}
    assert table == {'train': ['2', '1', '1', '1', '2'], 'val': ['1', '0', '0', '1', '1'],
                     'all': ['3', '1', '1', '2', '3']}  # images, background, cat, dog, boxes


def test_voc_round_trip_through_the_loader_gives_the_annotated_pixels(tmp_path):
    out = tmp_path / 'pets'
    convert('voc', voc_root(tmp_path), '--out', out)
    data = parse_data_cfg(out / 'pets.data')
    # the boxes of the XML in 0-based pixels (corner - 1), clipped to the image
    expected = {'a.png': ([0, 1], [[10, 5, 60, 30], [70, 20, 100, 50]]), 'c.png': ([], []),
                'b.png': ([1], [[0, 0, 40, 30]])}
    for split in ('train', 'valid'):
        ds = LoadImagesAndLabels(data[split], img_size=128, nc=data['classes'])
        for i in range(len(ds)):
            img, labels, path, shapes = ds[i]
            boxes = xywhn2xyxy(labels[:, 2:].numpy().astype(np.float64), 128, 128)  # letterboxed pixels
            back = scale_coords(img.shape[1:], boxes, *shapes)
            cls, xyxy = expected[os.path.basename(path)]
            assert labels[:, 1].tolist() == cls
            np.testing.assert_allclose(back.reshape(-1, 4), np.array(xyxy, np.float64).reshape(-1, 4), atol=2e-3)


def test_names_fix_the_class_order_and_keep_difficult_writes_difficult_boxes(tmp_path):
    src = voc_root(tmp_path)
    names = tmp_path / 'my.names'
    names.write_text("dog\ncat\n")
    out = tmp_path / 'o'
    convert('voc', src, '--out', out, '--names', names, '--keep-difficult', '--name', 'pets')
    swapped = ''.join(('1' if r[0] == '0' else '0') + r[1:] + '\n' for r in A_ROWS.splitlines())
    assert label(out, 'a') == swapped + '0' + A_DIFFICULT_ROW[1:]
    assert label(out, 'b') == '0' + B_ROWS[1:]
    assert (out / 'pets.names').read_text() == "dog\ncat\n"
    assert parse_data_cfg(out / 'pets.data')['classes'] == 2


def test_skip_unknown_drops_the_boxes_of_classes_not_in_names(tmp_path, capsys):
    names = tmp_path / 'cat.names'
    names.write_text("cat\n")
    out = tmp_path / 'cats'
    convert('voc', voc_root(tmp_path), '--out', out, '--names', names, '--skip-unknown')
    assert (label(out, 'a'), label(out, 'b')) == (A_ROWS.splitlines()[0] + '\n', '')
    printed = capsys.readouterr().out
    assert 'dropped 2 boxes: class not in names (a.xml object 2, b.xml object 1)' in printed
    assert 'dropped 1 boxes: difficult (a.xml object 4)' in printed  # difficult is decided first
    assert parse_data_cfg(out / 'cats.data')['classes'] == 1


def test_skip_missing_leaves_out_a_missing_image_and_counts_it(tmp_path, capsys):
    src = voc_root(tmp_path)
    (src / 'JPEGImages' / 'c.png').unlink()
    out = tmp_path / 'o'
    convert('voc', src, '--out', out, '--skip-missing')
    assert (out / 'train.txt').read_text() == "images/a.png\n"
    assert not (out / 'labels' / 'c.txt').exists() and not (out / 'images' / 'c.png').exists()
    assert f"skipped 1 images: image not found ({src / 'JPEGImages' / 'c.png'})" in capsys.readouterr().out


def _class_not_in_names(src, tmp_path):
    names = tmp_path / 'cat.names'
    names.write_text("cat\n")
    return ['--names', names], [str(names), "'dog'", '--skip-unknown']


def _malformed_xml(src, tmp_path):
    (src / 'Annotations' / 'b.xml').write_text("<annotation><filename>b.png</filename><object>")
    return [], [str(src / 'Annotations' / 'b.xml'), 'malformed XML']


def _missing_element(src, tmp_path):
    xml = src / 'Annotations' / 'b.xml'
    xml.write_text(xml.read_text().replace('<xmax>41</xmax>', ''))
    return [], [f"{xml}: object 1 <bndbox>/<xmax>: missing"]


def _missing_image(src, tmp_path):
    (src / 'JPEGImages' / 'b.png').unlink()
    return [], [str(src / 'Annotations' / 'b.xml'), str(src / 'JPEGImages' / 'b.png'), 'not found',
                '--skip-missing']


def _size_disagrees(src, tmp_path):
    xml = src / 'Annotations' / 'b.xml'
    xml.write_text(xml.read_text().replace('<width>80</width>', '<width>81</width>'))
    return [], [str(xml), 'declares 81x60', 'is 80x60']


def _fraction_with_split_lists(src, tmp_path):
    return ['--val-fraction', '0.3'], ['--val-fraction', 'ImageSets/Main', '--split']


@pytest.mark.parametrize('make_bad', [_class_not_in_names, _malformed_xml, _missing_element, _missing_image,
                                      _size_disagrees, _fraction_with_split_lists])
def test_bad_voc_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, make_bad):
    src = voc_root(tmp_path)
    extra, fragments = make_bad(src, tmp_path)
    out = tmp_path / 'out'
    # one case as a user runs the script, the others through the same cli_main in this process (faster)
    r = cli('voc', src, '--out', out, *extra) if make_bad is _missing_image else \
        cli_here(capsys, 'voc', src, '--out', out, *extra)
    assert_one_line_error(r, *fragments)
    assert nothing_written(out)


def test_xml_folder_random_split_is_exact_seeded_and_disjoint(tmp_path):
    xmls, images = tmp_path / 'xml', tmp_path / 'img'
    xmls.mkdir()
    for i in range(10):
        png(images / f'{i}.png', 40, 30, seed=i)
        (xmls / f'{i}.xml').write_text(voc_xml(f'{i}.png', (40, 30), [('x', 1, 1, 11, 11)]))

    def lists(out, *argv):
        convert('voc', xmls, '--images', images, '--out', out, *argv)
        return {k: (out / f'{k}.txt').read_text().split() if (out / f'{k}.txt').exists() else []
                for k in ('train', 'val', 'test')}

    a = lists(tmp_path / 'a', '--val-fraction', '0.2', '--test-fraction', '0.1', '--seed', '3')
    assert [len(a[k]) for k in ('train', 'val', 'test')] == [7, 2, 1]  # 10 * 0.2, 10 * 0.1, the rest
    assert sorted(sum(a.values(), [])) == sorted(f'images/{i}.png' for i in range(10))
    assert lists(tmp_path / 'b', '--val-fraction', '0.2', '--test-fraction', '0.1', '--seed', '3') == a
    assert [len(v) for v in lists(tmp_path / 'c').values()] == [8, 2, 0]  # default: val 0.2, no test
    everything = lists(tmp_path / 'd', '--split', 'test')
    assert everything['test'] == sorted(f'images/{i}.png' for i in range(10)) and not everything['train']
    data = parse_data_cfg(tmp_path / 'd' / 'd.data', need=('classes',))
    assert 'train' not in data and 'valid' not in data and data['test'] == str(tmp_path / 'd' / 'test.txt')


def test_output_folder_is_new_empty_or_a_previous_output_with_force(tmp_path, capsys):
    src = voc_root(tmp_path)
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'mine.txt').write_text('keep me')
    assert_one_line_error(cli('voc', src, '--out', out), str(out), 'not empty', '--force')
    assert_one_line_error(cli_here(capsys, 'voc', src, '--out', out, '--force'), 'not a convert output')
    assert tree_digest(out) == {'mine.txt': hashlib.sha1(b'keep me').hexdigest()}
    assert_one_line_error(cli_here(capsys, 'voc', src, '--out', src / 'darknet'), 'overlaps the input')
    assert not (src / 'darknet').exists()

    empty = tmp_path / 'empty'
    empty.mkdir()
    convert('voc', src, '--out', empty)
    convert('voc', src, '--out', empty, '--split', 'val', '--force')  # a previous output is replaced whole
    assert (empty / 'val.txt').read_text() == "images/a.png\nimages/b.png\nimages/c.png\n"
    assert not (empty / 'train.txt').exists() and not list(tmp_path.glob('.empty.*'))


# ---------------------------------------------------------------------------------------------------------------
# COCO

def coco_files(tmp_path):
    """instances.json + images/: p.png 100x50 (2 boxes), q.png 80x60 (3 annotations), r.png 64x32 (none)."""
    images = tmp_path / 'coco' / 'images'
    for name, w, h in (('p', 100, 50), ('q', 80, 60), ('r', 64, 32)):
        png(images / f'{name}.png', w, h)
    ann = {'images': [{'id': 1, 'file_name': 'p.png', 'width': 100, 'height': 50},
                      {'id': 2, 'file_name': 'q.png', 'width': 80, 'height': 60},
                      {'id': 5, 'file_name': 'r.png', 'width': 64, 'height': 32}],
           'categories': [{'id': 7, 'name': 'zebra'}, {'id': 2, 'name': 'ant'}],  # by id: ant 0, zebra 1
           'annotations': [{'id': 1, 'image_id': 1, 'category_id': 7, 'bbox': [10, 5, 40, 20], 'iscrowd': 0},
                           {'id': 2, 'image_id': 1, 'category_id': 2, 'bbox': [90, 40, 20, 20]},
                           {'id': 3, 'image_id': 2, 'category_id': 2, 'bbox': [8, 6, 0, 12]},
                           {'id': 4, 'image_id': 2, 'category_id': 7, 'bbox': [0, 0, 80, 60], 'iscrowd': 1},
                           {'id': 5, 'image_id': 2, 'category_id': 2, 'bbox': [20, 15, 40, 30]}]}
    path = tmp_path / 'coco' / 'instances.json'
    path.write_text(json.dumps(ann, indent=1))
    return path, images


# p.png 100x50: zebra [10,5,40,20] -> x 10..50, y 5..25: cx 30/100, cy 15/50, w 40/100, h 20/50
#               ant [90,40,20,20] -> x 90..110 -> 90..100, y 40..60 -> 40..50: cx 95/100, cy 45/50, w .1, h .2
P_ROWS = "1 0.300000 0.300000 0.400000 0.400000\n0 0.950000 0.900000 0.100000 0.200000\n"
# q.png 80x60: zero-width ant dropped, crowd zebra dropped; ant [20,15,40,30] -> cx 40/80, cy 30/60, w .5, h .5
Q_ROWS = "0 0.500000 0.500000 0.500000 0.500000\n"


def test_coco_labels_by_hand_and_round_trip(tmp_path, capsys):
    path, images = coco_files(tmp_path)
    out = tmp_path / 'out'
    convert('coco', path, '--images', images, '--out', out, '--split', 'val', '--name', 'zoo')
    assert (label(out, 'p'), label(out, 'q'), label(out, 'r')) == (P_ROWS, Q_ROWS, '')
    assert (out / 'zoo.names').read_text() == "ant\nzebra\n"
    assert (out / 'val.txt').read_text() == "images/p.png\nimages/q.png\nimages/r.png\n"
    printed = capsys.readouterr().out
    assert 'dropped 1 boxes: zero size (instances.json annotations[2])' in printed
    assert 'dropped 1 boxes: crowd (instances.json annotations[3])' in printed
    assert 'note: no val split' not in printed
    data = parse_data_cfg(out / 'zoo.data', need=('classes', 'valid'))
    ds = LoadImagesAndLabels(data['valid'], img_size=96, nc=data['classes'])
    got = {os.path.basename(p): (lab[:, 0].tolist(), xywhn2xyxy(lab[:, 1:].astype(np.float64), w, h))
           for p, lab, (h, w) in zip(ds.img_files, ds.labels, ds.shapes)}
    # COCO [x, y, w, h] -> corners (x, y)-(x + w, y + h), clipped
    for name, cls, xyxy in (('p.png', [1, 0], [[10, 5, 50, 25], [90, 40, 100, 50]]),
                            ('q.png', [0], [[20, 15, 60, 45]]), ('r.png', [], [])):
        assert got[name][0] == cls
        np.testing.assert_allclose(got[name][1].reshape(-1, 4), np.reshape(xyxy, (-1, 4)), atol=1e-3)


def test_coco_default_split_and_trainable_data(tmp_path):
    path, images = coco_files(tmp_path)
    out = tmp_path / 'zoo'
    convert('coco', path, '--images', images, '--out', out)
    data = parse_data_cfg(out / 'zoo.data')  # classes, train and valid present
    n = [len(LoadImagesAndLabels(data[k], img_size=64)) for k in ('train', 'valid')]
    assert n == [2, 1]  # 3 images: round(3 * 0.2) = 1 for val


def _bad_json(path, images):
    path.write_text(path.read_text()[:-40])
    return [str(path), 'malformed JSON']


def _no_bbox(path, images):
    ann = json.loads(path.read_text())
    del ann['annotations'][4]['bbox']
    path.write_text(json.dumps(ann))
    return [f"{path}: annotations[4]: no 'bbox'"]


def _coco_missing_image(path, images):
    (images / 'q.png').unlink()
    return [f"{path}: images[1]", str(images / 'q.png'), 'not found']


@pytest.mark.parametrize('make_bad', [_bad_json, _no_bbox, _coco_missing_image])
def test_bad_coco_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, make_bad):
    path, images = coco_files(tmp_path)
    fragments = make_bad(path, images)
    out = tmp_path / 'out'
    argv = ('coco', path, '--images', images, '--out', out)
    assert_one_line_error(cli(*argv) if make_bad is _bad_json else cli_here(capsys, *argv), *fragments)
    assert nothing_written(out)


# ---------------------------------------------------------------------------------------------------------------
# a real data set

def test_bccd_converts_with_its_split_lists(tmp_path, capsys):
    bccd = need_shared('datasets/bccd/BCCD')
    out = tmp_path / 'bccd'
    convert('voc', bccd, '--out', out)
    for split, n in (('train', 205), ('val', 87), ('test', 72)):
        listed = (bccd / 'ImageSets' / 'Main' / f'{split}.txt').read_text().split()
        assert len(listed) == n
        assert (out / f'{split}.txt').read_text().split() == [f'images/{s}.jpg' for s in sorted(listed)]
    assert load_names(out / 'bccd.names') == ['Platelets', 'RBC', 'WBC']
    # boxes counted from the XML text, independently of the converter
    coords = [tuple(map(int, m)) for xml in (bccd / 'Annotations').glob('*.xml') for m in re.findall(
        r'<xmin>(\d+)</xmin>\s*<ymin>(\d+)</ymin>\s*<xmax>(\d+)</xmax>\s*<ymax>(\d+)</ymax>', xml.read_text())]
    zero = [c for c in coords if c[0] == c[2] or c[1] == c[3]]
    assert (len(coords), len(zero)) == (4888, 2)
    rows = sum(len(p.read_text().splitlines()) for p in (out / 'labels').glob('*.txt'))
    assert rows == 4888 - 2
    assert 'dropped 2 boxes: zero size' in capsys.readouterr().out
    data = parse_data_cfg(out / 'bccd.data')
    assert len(LoadImagesAndLabels(data['test'], img_size=416, nc=data['classes'])) == 72
