"""Darknet `.weights` I/O: read and write, every float accounted for.

File layout (darknet src/parser.c, `load_weights_upto` / `save_weights_upto`):
  header: int32 major, int32 minor, int32 revision, then `seen` (images seen in training) as
          uint64 when (major*10 + minor) >= 2 and major < 1000 and minor < 1000, else int32.
          (parser.c: `if ((major*10 + minor) >= 2 && major < 1000 && minor < 1000) fread(net->seen, sizeof(uint64_t)..)`
          `else { int iseen = 0; fread(&iseen, sizeof(int), 1, fp); }`)
  body:   for each [convolutional] layer in cfg order, float32:
            with batch_normalize: beta (biases), gamma (scales), running_mean, running_var, then weights
            without:              bias, then weights
          weights in PyTorch's [out, in/groups, kh, kw] row-major order (darknet's own order).
Other layer types hold no parameters.

`cutoff=None` means all layers; `cutoff=k` means layers 0..k-1 (darknet's `load_weights_upto(net, f, 0, k)`,
the darknet53.conv.74 convention): it is asked for explicitly, never inferred from a file name.
"""
import os

import numpy as np
import torch

from utils.errors import DarkslimError
from utils.io import atomic_path

DEFAULT_HEADER = (0, 2, 0, 0)  # major, minor, revision, seen: what darknet itself writes today


def seen_is_int64(major, minor):
    """darknet parser.c: `seen` is uint64 when (major*10 + minor) >= 2 and major < 1000 and minor < 1000."""
    return (major * 10 + minor) >= 2 and major < 1000 and minor < 1000


def conv_tensors(module_defs, module_list, cutoff=None):
    """[(layer index, [tensors in file order])] for every conv layer below `cutoff`."""
    stop = len(module_defs) if cutoff is None else cutoff
    out = []
    for i, (d, m) in enumerate(zip(module_defs[:stop], module_list[:stop])):
        if d['type'] != 'convolutional':
            continue
        conv = m[0]
        if d.get('batch_normalize', 0):
            bn = m[1]
            out.append((i, [bn.bias, bn.weight, bn.running_mean, bn.running_var, conv.weight]))
        else:
            out.append((i, [conv.bias, conv.weight]))
    return out


def read_header(f):
    """Read the header from an open binary file -> (major, minor, revision, seen)."""
    ver = np.fromfile(f, dtype=np.int32, count=3)
    if ver.size < 3:
        raise DarkslimError(f"{f.name}: {ver.size * 4} bytes; expected a 12-byte darknet header at least")
    major, minor, revision = (int(v) for v in ver)
    seen = np.fromfile(f, dtype=np.int64 if seen_is_int64(major, minor) else np.int32, count=1)
    if seen.size < 1:
        raise DarkslimError(f"{f.name}: header ends early; expected the 'seen' counter")
    return major, minor, revision, int(seen[0])


def load_darknet_weights(model, path, cutoff=None):
    """Load a darknet `.weights` file into `model` (a models.Darknet). Returns the header tuple.

    The float count must match what the cfg needs: exactly, with `cutoff=None`; at least the first `cutoff`
    layers' worth otherwise. A mismatch raises one DarkslimError naming the file, the counts and the first
    layer that does not fit (darknet and OpenCV load such files silently and compute garbage).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DarkslimError(f"{path}: no such weights file")
    with open(path, 'rb') as f:
        header = read_header(f)
        body = np.fromfile(f, dtype=np.float32)
    groups = conv_tensors(model.module_defs, model.module_list, cutoff)
    need = sum(t.numel() for _, ts in groups for t in ts)
    if body.size < need or (cutoff is None and body.size > need):
        pos = 0
        first = 'none (every layer fits; the file is longer than the cfg)'
        for i, ts in groups:
            n = sum(t.numel() for t in ts)
            if pos + n > body.size:
                first = (f"layer {i} ({model.module_defs[i]['type']}, filters={model.module_defs[i]['filters']})"
                         f" needs {n} floats, {body.size - pos} left")
                break
            pos += n
        scope = 'the cfg' if cutoff is None else f'layers 0..{cutoff - 1} of the cfg'
        raise DarkslimError(f"{path}: holds {body.size} floats after the header; {scope} needs {need}; "
                            f"first layer that does not fit: {first}")
    src = torch.from_numpy(body)
    pos = 0
    with torch.no_grad():
        for _, ts in groups:
            for t in ts:
                n = t.numel()
                t.copy_(src[pos:pos + n].view_as(t))
                pos += n
    model.header = header
    return header


def save_weights(model, path, cutoff=None):
    """Write `model` as darknet `.weights` (atomically), layers 0..cutoff-1 (all when None).

    The header is the one read by `load_darknet_weights` (so load -> save is byte-identical), else
    DEFAULT_HEADER with `seen` taken from `model.seen` when set.
    """
    major, minor, revision, seen = getattr(model, 'header', None) or DEFAULT_HEADER
    seen = int(getattr(model, 'seen', seen) or seen)
    wide = seen_is_int64(major, minor)
    parts = [t.detach().to('cpu', torch.float32).reshape(-1)
             for _, ts in conv_tensors(model.module_defs, model.module_list, cutoff) for t in ts]
    body = torch.cat(parts).numpy() if parts else np.zeros(0, np.float32)
    with atomic_path(path) as tmp:
        with open(tmp, 'wb') as f:
            np.array([major, minor, revision], dtype=np.int32).tofile(f)
            np.array([seen], dtype=np.int64 if wide else np.int32).tofile(f)
            body.tofile(f)
    return path


def weights_file_size(model, cutoff=None):
    """Bytes `save_weights(model, path, cutoff)` writes (header + float32 body), without writing."""
    major, minor = (getattr(model, 'header', None) or DEFAULT_HEADER)[:2]
    n = sum(t.numel() for _, ts in conv_tensors(model.module_defs, model.module_list, cutoff) for t in ts)
    return 12 + (8 if seen_is_int64(major, minor) else 4) + 4 * n
