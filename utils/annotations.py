"""Detection annotations in Pascal VOC XML or COCO JSON, converted to the Darknet layout darkslim's loaders read.

read_voc / read_coco parse the annotations into Samples (one per image, boxes in 0-based pixels as annotated);
convert() assigns splits, orders the classes, checks every image, clips the boxes and writes the folder DIR:

    DIR/images/<file>               a copy of each image, under its annotated file name (the input is only read)
    DIR/labels/<file stem>.txt      one row `class cx cy w h` per box, normalized to the image, 6 decimals;
                                    empty for an image without boxes (a background image)
    DIR/train.txt, val.txt, test.txt   image paths relative to DIR, one per line; only the splits that have images
    DIR/<name>.names                the class names, one per line: line k is class k
    DIR/<name>.data                 classes=, train=, valid= (the val split), test=, names=, relative to DIR
    DIR/convert.json                what was converted (sources, options, counts); marks DIR as a convert output

Pixel conventions (both as darknet's scripts and ultralytics' converters read them):
- VOC `<bndbox>` corners are 1-based pixel indices (VOC devkit, labelImg write 1..width): the box spans
  (xmin - 1, ymin - 1) to (xmax - 1, ymax - 1) in 0-based pixels, width xmax - xmin (darknet's voc_label.py).
- COCO `bbox` [x, y, w, h] is 0-based: the box spans (x, y) to (x + w, y + h).
Boxes are clipped to the image; a box of zero size (as annotated, or nothing left after clipping) is dropped and
counted, as are VOC `difficult` boxes (darknet's voc_label.py drops them) and COCO `iscrowd` boxes.
"""
import json
import math
import os
import random
import shutil
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field

from utils.datasets import header_size, img2label_path, imread, load_names
from utils.errors import DarkslimError

SPLITS = ('train', 'val', 'test')
DATA_KEYS = {'train': 'train', 'val': 'valid', 'test': 'test'}  # split -> its .data key
MARKER = 'convert.json'
DEFAULT_VAL_FRACTION = 0.2
DECIMALS = 6  # label rows are written with 6 decimals, as data/make_shapes.py writes them

# why a box is not written (the summary counts each)
DIFFICULT = 'difficult'
CROWD = 'crowd'
UNKNOWN_CLASS = 'class not in names'
ZERO_SIZE = 'zero size'
OUTSIDE = 'outside the image'
TOO_SMALL = 'under 1e-6 of the image'
# why an image is not written (with skip_missing)
NOT_FOUND = 'image not found'
UNREADABLE = 'image unreadable'


@dataclass
class Box:
    """One annotated box: class name, corners (x1, y1, x2, y2) in 0-based pixels as annotated (not clipped),
    `where` it is in its annotation file (for messages)."""
    name: str
    xyxy: tuple
    where: str
    difficult: bool = False
    crowd: bool = False


@dataclass
class Sample:
    """One image and its boxes. `source`: the annotation file (and entry) for messages; `image`: the source image
    path; `rel`: its path under DIR/images/; `size`: (width, height) the annotation declares, None if it does
    not; `split`: the split the annotations put it in (VOC ImageSets lists), else None."""
    source: str
    image: str
    rel: str
    size: tuple
    boxes: list
    split: str = None


@dataclass
class Annotations:
    """What read_voc / read_coco found: the samples, the class names in the format's order (VOC: sorted by name;
    COCO: by category id), the input folders/files (never written to) and a description for convert.json."""
    samples: list
    classes: list
    inputs: list
    source: dict
    notes: list = field(default_factory=list)


@dataclass
class ConvertOptions:
    """How convert() turns Annotations into a Darknet folder (see the module docstring).

    name: file name of DIR/<name>.data and .names (default: DIR's basename). names: a .names file that fixes the
    class order (and the classes). split: put every image in this split. val_fraction / test_fraction / seed:
    random split when the annotations name no splits (default 0.2 / 0). keep_difficult: write VOC difficult
    boxes. skip_unknown: drop boxes of classes missing from `names` instead of stopping. skip_missing: leave out
    images that are missing or unreadable instead of stopping. force: replace a previous convert output."""
    name: str = None
    names: str = None
    split: str = None
    val_fraction: float = None
    test_fraction: float = None
    seed: int = 0
    keep_difficult: bool = False
    skip_unknown: bool = False
    skip_missing: bool = False
    force: bool = False


# ----------------------------------------------------------------------------------------------------------------
# small checks shared by both formats

def _finite(value, what):
    """`value` as a finite float, or DarkslimError('what: found ...; expected a number')."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if isinstance(value, bool) or not math.isfinite(v):
        raise DarkslimError(f"{what}: found {value!r}; expected a number")
    return v


def _image_rel(name, what):
    """Annotated image file name as a clean relative path (forward slashes); absolute or '..' names refused."""
    rel = os.path.normpath(str(name).replace('\\', '/')).replace(os.sep, '/')
    if not name or os.path.isabs(rel) or rel == '.' or rel.startswith('../') or rel == '..':
        raise DarkslimError(f"{what}: found {name!r}; expected an image file name relative to the images folder")
    return rel


def _declared_size(w, h):
    """(w, h) as ints, or None when the annotation leaves the size out (missing or 0, as some tools write)."""
    if w is None or h is None or (w == 0 and h == 0):
        return None
    return int(round(w)), int(round(h))


# ----------------------------------------------------------------------------------------------------------------
# Pascal VOC

def _xml_text(parent, tag, what):
    """Stripped text of child <tag> of `parent`; DarkslimError '{what}<tag>: ...' when it is missing or empty."""
    node = parent.find(tag)
    if node is None or node.text is None or not node.text.strip():
        raise DarkslimError(f"{what}<{tag}>: missing or empty; expected a value")
    return node.text.strip()


def _voc_object(obj, k, path):
    """Box of the k-th (1-based) <object> of VOC file `path`."""
    what = f"{path}: object {k}"
    name = _xml_text(obj, 'name', what + ' ')
    bndbox = obj.find('bndbox')
    if bndbox is None:
        raise DarkslimError(f"{what} <bndbox>: missing; expected <xmin> <ymin> <xmax> <ymax>")
    x1, y1, x2, y2 = (_finite(_xml_text(bndbox, t, f"{what} <bndbox>/"), f"{what} <bndbox>/<{t}>")
                      for t in ('xmin', 'ymin', 'xmax', 'ymax'))
    difficult = obj.find('difficult')
    difficult = difficult is not None and bool(_finite((difficult.text or '0').strip(), f"{what} <difficult>"))
    # 1-based pixel indices -> 0-based corners (darknet's voc_label.py: centre - 1, width xmax - xmin)
    return Box(name, (x1 - 1, y1 - 1, x2 - 1, y2 - 1), f"object {k}", difficult=difficult)


def _voc_size(root, path):
    """(width, height) from <size>, or None when <size> is absent or 0 x 0."""
    size = root.find('size')
    if size is None:
        return None
    what = f"{path}: <size>/"
    return _declared_size(*(_finite(_xml_text(size, t, what), f"{what}<{t}>") for t in ('width', 'height')))


def read_voc_xml(path, images):
    """Sample of one VOC XML file; its image is `<filename>` under folder `images` (`<path>` is ignored)."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise DarkslimError(f"{path}: malformed XML ({e}); expected a Pascal VOC annotation") from None
    if root.tag != 'annotation':
        raise DarkslimError(f"{path}: root element <{root.tag}>; expected <annotation>")
    rel = _image_rel(_xml_text(root, 'filename', f"{path}: "), f"{path}: <filename>")
    boxes = [_voc_object(obj, k, path) for k, obj in enumerate(root.findall('object'), 1)]
    return Sample(path, os.path.join(images, rel), rel, _voc_size(root, path), boxes)


def _split_lists(main):
    """{stem: split} from VOC ImageSets/Main/{train,val,test}.txt (trainval.txt stands for train when there is no
    train.txt), with the list files read; None when there is none of them."""
    names = {'train': 'train.txt', 'val': 'val.txt', 'test': 'test.txt'}
    if not os.path.isfile(os.path.join(main, 'train.txt')) and os.path.isfile(os.path.join(main, 'trainval.txt')):
        names['train'] = 'trainval.txt'
    split_of, seen = {}, {}
    for split, fname in names.items():
        path = os.path.join(main, fname)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding='utf-8') as f:
                lines = f.read().splitlines()
        except UnicodeDecodeError as e:
            raise DarkslimError(f"{path}: cannot read ({e}); expected one image name per line") from None
        for n, line in enumerate(lines, 1):
            if not line.split():
                continue
            stem = line.split()[0]  # class lists (ImageSets/Main/cat_train.txt) add a flag after the name
            if stem in seen:
                raise DarkslimError(f"{path}:{n}: image {stem!r} already listed at {seen[stem]}; expected "
                                    f"each image in one split list, once")
            split_of[stem], seen[stem] = split, f"{fname}:{n}"
    return split_of or None


def read_voc(src, images=None):
    """Annotations of a VOC root `src` (Annotations/, JPEGImages/, optional ImageSets/Main/{train,val,test}.txt)
    or of a folder of .xml files with `images` the folder of their images. With split lists, only the listed
    images are read, each in its split; classes are sorted by name."""
    src = os.path.abspath(os.fspath(src))
    if not os.path.isdir(src):
        raise DarkslimError(f"{src}: not found; expected a VOC root (Annotations/, JPEGImages/) or a folder of "
                            f"VOC .xml files")
    if os.path.isdir(os.path.join(src, 'Annotations')):
        ann_dir, split_of = os.path.join(src, 'Annotations'), _split_lists(os.path.join(src, 'ImageSets', 'Main'))
        images = os.path.abspath(images) if images else os.path.join(src, 'JPEGImages')
    elif images:
        ann_dir, split_of, images = src, None, os.path.abspath(images)
    else:
        raise DarkslimError(f"{src}: no Annotations/ folder; expected a VOC root, or a folder of .xml files with "
                            f"{{images}} naming the folder of their images", param='images')
    xmls = sorted(f[:-4] for f in os.listdir(ann_dir) if f.endswith('.xml'))
    stems = xmls if split_of is None else list(split_of)
    for stem in stems:
        if split_of is not None and not os.path.isfile(os.path.join(ann_dir, stem + '.xml')):
            raise DarkslimError(f"{src}/ImageSets/Main: image {stem!r} is listed but {ann_dir}/{stem}.xml is not "
                                f"found; expected an annotation for each listed image")
    if not stems:
        raise DarkslimError(f"{ann_dir}: no .xml files; expected Pascal VOC annotations")
    samples = []
    for stem in stems:
        s = read_voc_xml(os.path.join(ann_dir, stem + '.xml'), images)
        s.split = None if split_of is None else split_of[stem]
        samples.append(s)
    notes = []
    if split_of is not None and len(set(xmls) - set(split_of)):
        notes.append(f"{len(set(xmls) - set(split_of))} .xml files in {ann_dir} are in no split list of "
                     f"{src}/ImageSets/Main and were not converted")
    classes = sorted({b.name for s in samples for b in s.boxes})
    source = {'format': 'voc', 'annotations': ann_dir, 'images': images,
              'split_lists': None if split_of is None else os.path.join(src, 'ImageSets', 'Main')}
    return Annotations(samples, classes, [src, images], source, notes)


# ----------------------------------------------------------------------------------------------------------------
# COCO

def _json_field(entry, key, what, kind, expected):
    """entry[key] checked to be of `kind`; DarkslimError naming the entry and key otherwise."""
    if not isinstance(entry, dict):
        raise DarkslimError(f"{what}: found {type(entry).__name__}; expected an object")
    if key not in entry:
        raise DarkslimError(f"{what}: no {key!r}; expected {expected}")
    v = entry[key]
    if not isinstance(v, kind) or isinstance(v, bool):
        raise DarkslimError(f"{what}: {key!r} is {v!r}; expected {expected}")
    return v


def _coco_categories(data, path):
    """{category id: name} and the names ordered by id."""
    cats = {}
    for k, c in enumerate(_json_field(data, 'categories', path, list, 'a list of categories'), 0):
        what = f"{path}: categories[{k}]"
        cid = _json_field(c, 'id', what, int, 'an integer id')
        name = _json_field(c, 'name', what, str, 'a class name').strip()
        if cid in cats or name in cats.values() or not name:
            raise DarkslimError(f"{what}: id {cid} {name!r} repeats an earlier id or name (or is empty); expected "
                                f"unique ids and names")
        cats[cid] = name
    return cats, [cats[i] for i in sorted(cats)]


def _coco_images(data, path, images):
    """{image id: Sample} from the 'images' list."""
    out = {}
    for k, im in enumerate(_json_field(data, 'images', path, list, 'a list of images')):
        what = f"{path}: images[{k}]"
        iid = _json_field(im, 'id', what, int, 'an integer id')
        if iid in out:
            raise DarkslimError(f"{what}: id {iid} repeats an earlier image id; expected unique ids")
        rel = _image_rel(_json_field(im, 'file_name', what, str, 'an image file name'), f"{what} 'file_name'")
        w, h = (None if im.get(key) is None else _finite(im[key], f"{what} {key!r}") for key in ('width', 'height'))
        out[iid] = Sample(what, os.path.join(images, rel), rel, _declared_size(w, h), [])
    return out


def _coco_box(a, what, cats):
    """Box of one 'annotations' entry (iscrowd recorded, kept for counting)."""
    cid = _json_field(a, 'category_id', what, int, 'an integer category id')
    if cid not in cats:
        raise DarkslimError(f"{what}: category_id {cid} is not in 'categories'; expected one of "
                            f"{sorted(cats)[:10]}")
    bbox = _json_field(a, 'bbox', what, list, '[x, y, width, height] in pixels')
    if len(bbox) != 4:
        raise DarkslimError(f"{what}: 'bbox' is {bbox!r}; expected [x, y, width, height] in pixels")
    x, y, w, h = (_finite(v, f"{what} 'bbox'") for v in bbox)
    crowd = bool(_finite(a.get('iscrowd', 0), f"{what} 'iscrowd'"))
    return Box(cats[cid], (x, y, x + w, y + h), what.split(': ', 1)[-1], crowd=crowd)


def read_coco(path, images):
    """Annotations of COCO detection file `path` (images, annotations, categories); image `file_name`s are
    under folder `images`. Classes are the categories ordered by id (class k = the k-th smallest id)."""
    path, images = os.path.abspath(os.fspath(path)), os.path.abspath(os.fspath(images))
    try:
        with open(path, encoding='utf-8') as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DarkslimError(f"{path}: not found; expected a COCO annotation file (.json)") from None
    except json.JSONDecodeError as e:
        raise DarkslimError(f"{path}:{e.lineno}: malformed JSON ({e.msg}); expected a COCO annotation file") from None
    except UnicodeDecodeError as e:
        raise DarkslimError(f"{path}: cannot read ({e}); expected a UTF-8 COCO annotation file") from None
    if not isinstance(data, dict):
        raise DarkslimError(f"{path}: found a JSON {type(data).__name__}; expected a COCO object with 'images', "
                            f"'annotations', 'categories'")
    cats, classes = _coco_categories(data, path)
    by_id = _coco_images(data, path, images)
    for k, a in enumerate(_json_field(data, 'annotations', path, list, 'a list of annotations')):
        what = f"{path}: annotations[{k}]"
        iid = _json_field(a, 'image_id', what, int, 'an integer image id')
        if iid not in by_id:
            raise DarkslimError(f"{what}: image_id {iid} is not in 'images'; expected the id of a listed image")
        by_id[iid].boxes.append(_coco_box(a, what, cats))
    source = {'format': 'coco', 'annotations': path, 'images': images}
    return Annotations(list(by_id.values()), classes, [path, images], source)


# ----------------------------------------------------------------------------------------------------------------
# splits and classes

def _fraction(v, param):
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
        raise DarkslimError(f"{{{param}}} {v!r}: expected a fraction in [0, 1)", param=param)
    return float(v)


def assign_splits(samples, split=None, val_fraction=None, test_fraction=None, seed=0):
    """{split: samples sorted by rel}. `split`: every sample there. Else the samples' own splits (split lists).
    Else a random split: the samples sorted by rel, shuffled by random.Random(seed); the first
    round(n * test_fraction) go to test, the next round(n * val_fraction) (default 0.2) to val, the rest to train."""
    vf, tf = _fraction(val_fraction, 'val_fraction'), _fraction(test_fraction, 'test_fraction')
    given = vf is not None or tf is not None
    samples = sorted(samples, key=lambda s: s.rel)
    if split is not None:
        if split not in SPLITS:
            raise DarkslimError(f"{{split}} {split!r}: expected one of {', '.join(SPLITS)}", param='split')
        if given:
            raise DarkslimError("{split} with {val_fraction}/{test_fraction}; expected one of them", param='split')
        return {split: samples}
    if any(s.split for s in samples):
        if given:
            raise DarkslimError("{val_fraction}/{test_fraction} given, but the annotations name the splits (VOC "
                                "ImageSets/Main lists); expected neither, or {split} to put every image in one",
                                param='val_fraction')
        return {k: [s for s in samples if s.split == k] for k in SPLITS if any(s.split == k for s in samples)}
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise DarkslimError(f"{{seed}} {seed!r}: expected an integer >= 0", param='seed')
    vf, tf, n = DEFAULT_VAL_FRACTION if vf is None else vf, tf or 0.0, len(samples)
    n_test, n_val = math.floor(n * tf + 0.5), math.floor(n * vf + 0.5)
    if n - n_test - n_val < 1:
        raise DarkslimError(f"{{val_fraction}} {vf} + {{test_fraction}} {tf} of {n} images leave no training "
                            f"image; expected smaller fractions", param='val_fraction')
    order = list(range(n))
    random.Random(seed).shuffle(order)
    cut = {'test': order[:n_test], 'val': order[n_test:n_test + n_val], 'train': order[n_test + n_val:]}
    return {k: [samples[i] for i in sorted(cut[k])] for k in SPLITS if cut[k]}


def class_order(ann, names=None, skip_unknown=False):
    """Class names in class-id order: those of .names file `names`, else the annotations' own order. Without
    skip_unknown, a box of a class not in `names` is an error naming the file and the class."""
    if names is None:
        return list(ann.classes)
    classes = load_names(names)
    dup = [c for c, n in Counter(classes).items() if n > 1]
    if dup:
        raise DarkslimError(f"{names}: class {dup[0]!r} is named twice; expected each class once", param='names')
    if not skip_unknown:
        known = set(classes)
        for s in ann.samples:
            for b in s.boxes:
                if b.name not in known:
                    raise DarkslimError(f"{names}: no class {b.name!r} (annotated in {s.source}, {b.where}); "
                                        f"expected every annotated class, or {{skip_unknown}} to drop its boxes",
                                        param='names')
    return classes


# ----------------------------------------------------------------------------------------------------------------
# labels: images checked, boxes clipped and normalized

@dataclass
class Item:
    """One image to write: source `image`, its path `rel` under DIR/images/, its split and label file text."""
    image: str
    rel: str
    split: str
    label: str


@dataclass
class Summary:
    """What convert() wrote: per split the images, background images (no box) and boxes per class id; dropped
    boxes and skipped images by reason ({reason: ['file entry', ...]}); boxes clipped to their image; notes."""
    out: str
    name: str
    classes: list
    images: dict = field(default_factory=dict)
    background: dict = field(default_factory=dict)
    boxes: dict = field(default_factory=dict)
    dropped: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)
    clipped: int = 0
    notes: list = field(default_factory=list)

    def lines(self):
        """The summary as printed: a table (splits x classes), then dropped boxes, skipped images, notes."""
        head = ['split', 'images', 'background'] + list(self.classes) + ['boxes']
        rows = [[k, self.images[k], self.background[k]] + [self.boxes[k][c] for c in range(len(self.classes))]
                + [sum(self.boxes[k].values())] for k in self.images]
        rows.append(['all'] + [sum(r[j] for r in rows) for j in range(1, len(head))])
        widths = [max(len(str(r[j])) for r in [head] + rows) for j in range(len(head))]
        out = ['  '.join(str(v).rjust(w) if j else str(v).ljust(w) for j, (v, w) in enumerate(zip(r, widths)))
               for r in [head] + rows]
        for what, table in (('dropped', self.dropped), ('skipped', self.skipped)):
            for reason, where in table.items():
                more = f", ... ({len(where) - 3} more)" if len(where) > 3 else ''
                unit = 'boxes' if what == 'dropped' else 'images'
                out.append(f"{what} {len(where)} {unit}: {reason} ({', '.join(where[:3])}{more})")
        out.append(f"clipped to the image: {self.clipped} boxes")
        return out + [f"note: {n}" for n in self.notes]


def _box_row(box, cls, w, h):
    """(label row 'cls cx cy w h' or None, drop reason or None, clipped) of a box in an image of w x h pixels."""
    x1, y1, x2, y2 = box.xyxy
    if x2 <= x1 or y2 <= y1:
        return None, ZERO_SIZE, False
    c = (min(max(x1, 0), w), min(max(y1, 0), h), min(max(x2, 0), w), min(max(y2, 0), h))
    if c[2] <= c[0] or c[3] <= c[1]:
        return None, OUTSIDE, True
    text = [f"{v:.{DECIMALS}f}" for v in ((c[0] + c[2]) / 2 / w, (c[1] + c[3]) / 2 / h,
                                          (c[2] - c[0]) / w, (c[3] - c[1]) / h)]
    if float(text[2]) <= 0 or float(text[3]) <= 0:  # the loader refuses w or h = 0
        return None, TOO_SMALL, False
    return f"{cls} {' '.join(text)}", None, c != tuple(box.xyxy)


def _image_size(sample):
    """((width, height) of the stored image, None), or (None, why it cannot be used). Read as the loader reads
    it: the PNG/JPEG header, else the decoded image (EXIF orientation ignored)."""
    if not os.path.isfile(sample.image):
        return None, NOT_FOUND
    hw = header_size(sample.image)
    if hw is None:
        try:
            hw = imread(sample.image).shape[:2]
        except DarkslimError:
            return None, UNREADABLE
    return (int(hw[1]), int(hw[0])), None


def _checked_size(sample, options, summary):
    """The image's (width, height), or None when skip_missing leaves it out; DarkslimError otherwise."""
    size, problem = _image_size(sample)
    if problem is not None:
        if options.skip_missing:
            summary.skipped.setdefault(problem, []).append(sample.image)
            return None
        raise DarkslimError(f"{sample.source}: {problem}: {sample.image}; expected the annotated image there "
                            f"(or {{skip_missing}} to leave such images out)", param='skip_missing')
    if sample.size is not None and sample.size != size:
        raise DarkslimError(f"{sample.source}: declares {sample.size[0]}x{sample.size[1]} pixels but "
                            f"{sample.image} is {size[0]}x{size[1]}; expected the size of the image the boxes "
                            f"were drawn on")
    return size


def _drop_reason(box, class_id, options):
    """Why `box` is not written before its geometry is looked at, or None."""
    if box.crowd:
        return CROWD
    if box.difficult and not options.keep_difficult:
        return DIFFICULT
    if box.name not in class_id:
        return UNKNOWN_CLASS
    return None


def _label_text(sample, split, size, class_id, options, summary):
    """Label file text of one sample; its boxes counted in `summary` (written, dropped, clipped)."""
    rows = []
    for box in sample.boxes:
        reason = _drop_reason(box, class_id, options)
        if reason is None:
            row, reason, clipped = _box_row(box, class_id[box.name], *size)
        if reason is not None:
            file = sample.source.split(': ')[0]
            summary.dropped.setdefault(reason, []).append(f"{os.path.basename(file)} {box.where}")
            continue
        rows.append(row + '\n')
        summary.boxes[split][class_id[box.name]] += 1
        summary.clipped += clipped
    summary.background[split] += not rows
    return ''.join(rows)


def plan_items(splits, classes, options, summary):
    """Items (images with their label text) of {split: samples}; every image checked (found, readable, of the
    declared size) before anything is written."""
    class_id = {c: i for i, c in enumerate(classes)}
    items = []
    for split, samples in splits.items():
        summary.boxes[split], summary.background[split], summary.images[split] = Counter(), 0, 0
        for s in samples:
            size = _checked_size(s, options, summary)
            if size is None:
                continue
            items.append(Item(s.image, s.rel, split, _label_text(s, split, size, class_id, options, summary)))
            summary.images[split] += 1
    return items


def _check_unique(samples):
    """Refuse two samples with the same output image, or two images sharing one label file (a.jpg, a.png)."""
    image_of, label_of = {}, {}
    for s in samples:
        if s.rel in image_of:
            raise DarkslimError(f"{s.source}: image {s.rel!r} is also annotated in {image_of[s.rel]}; expected "
                                f"one annotation per image")
        image_of[s.rel] = s.source
        label = img2label_path('/images/' + s.rel)
        if label in label_of:
            raise DarkslimError(f"{s.source}: image {s.rel!r} and {label_of[label]!r} would share the label file "
                                f"{label[1:]!r}; expected image names that differ before the extension")
        label_of[label] = s.rel


# ----------------------------------------------------------------------------------------------------------------
# the output folder

def _inside(path, folder):
    return os.path.commonpath([path, folder]) == folder


def check_output(out, inputs, force=False):
    """Refuse an output folder that is or holds an input, lies inside one, or is a non-empty folder other than a
    previous convert output (which `force` replaces)."""
    real = os.path.realpath(out)
    for p in inputs:
        rp = os.path.realpath(p)
        if _inside(real, rp) or _inside(rp, real):
            raise DarkslimError(f"{out}: overlaps the input {p}; expected an output folder outside the input "
                                f"(the input is only read)")
    if not os.path.exists(out):
        return
    if not os.path.isdir(out):
        raise DarkslimError(f"{out}: exists and is not a folder; expected a new or empty folder")
    if os.listdir(out) and not force:
        raise DarkslimError(f"{out}: folder not empty; expected a new or empty folder (or {{force}} to replace a "
                            f"previous convert output)", param='force')
    if os.listdir(out) and not os.path.isfile(os.path.join(out, MARKER)):
        raise DarkslimError(f"{out}: folder not empty and not a convert output (no {MARKER}); expected a new or "
                            f"empty folder", param='force')


def dataset_name(name, out):
    """File name of the .data/.names files: `name`, else the output folder's basename."""
    name = name if name is not None else os.path.basename(os.path.normpath(out))
    if not name or name.startswith('.') or not all(ch.isalnum() or ch in '._-' for ch in name):
        raise DarkslimError(f"{{name}} {name!r}: expected a file name of letters, digits, '.', '_', '-' (not "
                            f"starting with '.') for the .data and .names files", param='name')
    return name


def _data_text(name, n_classes, splits, source):
    """The .data file: class count, the list of each split present, the names file; paths relative to it."""
    lines = [f"# written by data/convert.py from {source}; paths are relative to this file's folder"]
    lines += [f"classes = {n_classes}"]
    lines += [f"{DATA_KEYS[k]} = {k}.txt" for k in SPLITS if k in splits]
    return '\n'.join(lines + [f"names = {name}.names", ''])


def _write_tree(root, items, classes, name, record):
    """Every output file under folder `root` (the temp folder that becomes DIR)."""
    for it in items:
        dst = os.path.join(root, 'images', it.rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copyfile(it.image, dst)
        label = img2label_path(dst)
        os.makedirs(os.path.dirname(label), exist_ok=True)
        with open(label, 'w', encoding='utf-8') as f:
            f.write(it.label)
    splits = [k for k in SPLITS if any(it.split == k for it in items)]
    for k in splits:
        with open(os.path.join(root, f"{k}.txt"), 'w', encoding='utf-8') as f:
            f.writelines(f"images/{it.rel}\n" for it in items if it.split == k)
    with open(os.path.join(root, f"{name}.names"), 'w', encoding='utf-8') as f:
        f.writelines(c + '\n' for c in classes)
    source = record['source']['annotations']
    with open(os.path.join(root, f"{name}.data"), 'w', encoding='utf-8') as f:
        f.write(_data_text(name, len(classes), splits, source))
    with open(os.path.join(root, MARKER), 'w', encoding='utf-8') as f:
        json.dump(record, f, indent=1)


def _swap_into_place(tmp, out):
    """Rename folder `tmp` onto `out`; an old `out` is moved aside first (and back if the rename fails)."""
    old = None
    if os.path.isdir(out) and os.listdir(out):
        old = tempfile.mkdtemp(dir=os.path.dirname(out), prefix=f".{os.path.basename(out)}.old-")
        os.replace(out, os.path.join(old, 'x'))
    elif os.path.isdir(out):
        os.rmdir(out)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(os.path.join(old, 'x'), out)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def write_dataset(items, classes, out, name, record):
    """Write the Darknet folder `out` atomically: built in a temp folder beside it, then renamed into place."""
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out)}.tmp-")
    try:
        _write_tree(tmp, items, classes, name, record)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the output gets the usual permissions
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def convert(ann, out, options=None):
    """Write Annotations `ann` as a Darknet folder `out` (see the module docstring); return the Summary.
    Everything is checked before anything is written, and `out` appears complete or not at all."""
    o = options or ConvertOptions()
    out = os.path.abspath(os.fspath(out))
    name = dataset_name(o.name, out)
    check_output(out, ann.inputs, o.force)
    classes = class_order(ann, o.names, o.skip_unknown)
    splits = assign_splits(ann.samples, o.split, o.val_fraction, o.test_fraction, o.seed)
    _check_unique(ann.samples)
    summary = Summary(out, name, classes, notes=list(ann.notes))
    items = plan_items(splits, classes, o, summary)
    if not items:
        raise DarkslimError(f"{ann.source['annotations']}: no image left to write (all skipped); expected at "
                            f"least one readable image")
    if not summary.images.get('val'):
        summary.notes.append(f"no val split: {name}.data has no valid= line (training and test.py need one)")
    record = {'source': ann.source, 'options': {k: v for k, v in vars(o).items() if k != 'force'},
              'classes': classes, 'images': summary.images,
              'boxes': {k: {classes[c]: n for c, n in sorted(v.items())} for k, v in summary.boxes.items()},
              'dropped': {k: len(v) for k, v in summary.dropped.items()},
              'skipped': {k: len(v) for k, v in summary.skipped.items()}, 'clipped': summary.clipped}
    write_dataset(items, classes, out, name, record)
    return summary
