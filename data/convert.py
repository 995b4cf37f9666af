"""Convert Pascal VOC or COCO detection annotations into the Darknet folder that train.py and test.py read.

    python data/convert.py voc  VOC_ROOT --out DIR                   # Annotations/, JPEGImages/, ImageSets/Main
    python data/convert.py voc  XML_DIR --images IMG_DIR --out DIR --val-fraction 0.2 --test-fraction 0.1
    python data/convert.py coco instances.json --images IMG_DIR --out DIR [--split val]

The work is done by utils/annotations.py (see its docstring for the layout and the pixel conventions).
"""
import argparse
import os
import sys

if __package__ in (None, ''):  # run as `python data/convert.py`: the repository root (utils/) goes first
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils import annotations  # noqa: E402
from utils.errors import DarkslimError, cli_main  # noqa: E402

# a library error about a parameter is shown with the flag a user typed
FLAGS = {'images': '--images', 'names': '--names', 'split': '--split', 'val_fraction': '--val-fraction',
         'test_fraction': '--test-fraction', 'seed': '--seed', 'skip_unknown': '--skip-unknown',
         'skip_missing': '--skip-missing', 'force': '--force', 'name': '--name'}

DESCRIPTION = """\
Convert detection annotations (Pascal VOC XML or COCO JSON) into a Darknet/YOLO folder DIR:

  DIR/images/<file>           a copy of each image, under the file name the annotation gives
                              (VOC <filename>, COCO file_name); the input is only read, never written
  DIR/labels/<stem>.txt       one row 'class cx cy w h' per box, normalized to the image (6 decimals);
                              empty for an image without boxes
  DIR/train.txt, val.txt, test.txt   image paths relative to DIR (only the splits that have images)
  DIR/NAME.names              class names, line k = class k;  NAME = --name, default DIR's basename
  DIR/NAME.data               classes=, train=, valid= (the val split), test=, names= (relative to DIR):
                              pass it to train.py / test.py as --data
  DIR/convert.json            sources, options and counts (marks DIR as a convert output for --force)

Classes: VOC classes sorted by name, COCO categories ordered by id (class k = the k-th smallest id), or the
order of --names FILE. Splits: VOC ImageSets/Main/{train,val,test}.txt when present (trainval.txt stands for
train without train.txt; other .xml files are not converted); else a seeded random split by --val-fraction
(default 0.2) and --test-fraction (default 0); --split puts every image in one split (for a COCO file that is
already one split: convert each file into its own DIR and point one .data at both lists).

Boxes: VOC <bndbox> corners are 1-based pixel indices (as darknet's voc_label.py reads them: x from xmin-1 to
xmax-1); COCO bbox [x, y, w, h] is 0-based. Boxes are clipped to the image. Not written, and counted in the
summary: boxes of zero size (as annotated, or nothing left inside the image), VOC difficult=1 boxes (as
darknet's voc_label.py; --keep-difficult keeps them) and COCO iscrowd=1 boxes. The image size comes from the
image file; a VOC <size> or COCO width/height that disagrees with it is an error (0 or absent: not checked).
VOC <path> is ignored. Any error stops before DIR is touched: DIR is built beside itself and renamed into place.
"""


def _common_args(p):
    p.add_argument('--out', required=True, metavar='DIR', help='output folder: new, empty, or (with --force) a '
                                                               'previous convert output, which is replaced')
    p.add_argument('--name', help="file name of DIR/NAME.data and NAME.names (default: DIR's basename)")
    p.add_argument('--names', metavar='FILE', help='a .names file (one class per line) giving the classes and '
                                                   'their order; a box of another class is an error')
    p.add_argument('--skip-unknown', action='store_true',
                   help='with --names: drop (and count) boxes of classes not in FILE instead of stopping')
    p.add_argument('--skip-missing', action='store_true',
                   help='leave out (and count) images that are missing or unreadable instead of stopping')
    p.add_argument('--split', choices=annotations.SPLITS, help='put every image in this split')
    p.add_argument('--val-fraction', type=float, metavar='F',
                   help=f'without split lists: share of images for val (default {annotations.DEFAULT_VAL_FRACTION})')
    p.add_argument('--test-fraction', type=float, metavar='F',
                   help='without split lists: share of images for test (default 0)')
    p.add_argument('--seed', type=int, default=0, help='seed of the random split (default 0)')
    p.add_argument('--force', action='store_true', help='replace DIR if it is a previous convert output')


def get_args_parser():
    p = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='format', required=True, metavar='{voc,coco}')
    voc = sub.add_parser('voc', help='Pascal VOC XML', description=DESCRIPTION,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    voc.add_argument('src', metavar='SRC', help='a VOC root (Annotations/, JPEGImages/, optional ImageSets/Main/) '
                                                'or a folder of .xml files (then --images is needed)')
    voc.add_argument('--images', metavar='DIR', help='folder of the images named by <filename> (default for a VOC '
                                                     'root: SRC/JPEGImages)')
    voc.add_argument('--keep-difficult', action='store_true',
                     help='write boxes marked <difficult>1 (dropped by default, as darknet\'s voc_label.py does)')
    _common_args(voc)
    coco = sub.add_parser('coco', help='COCO JSON', description=DESCRIPTION,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    coco.add_argument('annotations', metavar='ANNOTATIONS.json', help='COCO detection annotations (one file)')
    coco.add_argument('--images', metavar='DIR', required=True, help='folder the images\' file_name is relative to')
    _common_args(coco)
    return p


def options_of(args):
    """ConvertOptions from the parsed command line."""
    return annotations.ConvertOptions(
        name=args.name, names=args.names, split=args.split, val_fraction=args.val_fraction,
        test_fraction=args.test_fraction, seed=args.seed, keep_difficult=getattr(args, 'keep_difficult', False),
        skip_unknown=args.skip_unknown, skip_missing=args.skip_missing, force=args.force)


def main(args):
    try:
        if args.format == 'voc':
            ann = annotations.read_voc(args.src, args.images)
        else:
            ann = annotations.read_coco(args.annotations, args.images)
        summary = annotations.convert(ann, args.out, options_of(args))
    except DarkslimError as e:
        raise DarkslimError(e.shown(FLAGS), param=e.param) from None
    print('\n'.join(summary.lines()))
    print(f"wrote {summary.out}: {summary.name}.data, {summary.name}.names, "
          f"{', '.join(k + '.txt' for k in summary.images if summary.images[k])}, images/, labels/, "
          f"{annotations.MARKER}")
    return summary


if __name__ == '__main__':
    cli_main(main, get_args_parser().parse_args())
