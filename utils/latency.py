"""Forward-pass latency of detectors, timed the same way everywhere (prune reports, benchmarks, the demo).

Each model is fused (BatchNorm folded into its conv) and run on a zero batch; several models are timed
alternately, one pass each in turn, so that drift of the machine (other load, frequency changes) hits all of
them alike. On CUDA the forward is captured once as a CUDA graph and replayed, which removes Python and
kernel-launch overhead from the figure.
"""
import copy
import statistics
import time

import torch


def _timed_forward(model, x):
    """(a no-argument callable running `model` on the static input `x`, how it runs).

    CPU: the eval forward.  CUDA: the forward captured once as a CUDA graph and replayed.  The model must be
    fused: with no BatchNorm (nor dropout) left, train mode runs the same kernels as eval up to the raw head
    outputs, and skips the heads' box decoding, whose host-to-device stride tensor cannot be captured (the
    decoding costs the same before and after a prune)."""
    if x.device.type != 'cuda':
        return (lambda: model(x)), 'cpu eager'
    model.train()
    side = torch.cuda.Stream(x.device)
    side.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(side):                     # warm-up off the default stream (cuDNN plans, allocations)
        for _ in range(3):
            model(x)
    torch.cuda.current_stream(x.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model(x)
    return graph.replay, 'cuda graph (raw head outputs)'


def _sync(dev):
    if dev.type == 'cuda':
        torch.cuda.synchronize(dev)


def latencies(nets, hw, runs=5, batch=1, device='cpu', warmup=1):
    """([median seconds per model], how): `runs` forward passes of a zero batch [batch, C, *hw] through a fused
    copy of each model on `device`, the models timed alternately after `warmup` untimed passes each (the first
    call pays one-off costs: allocations, kernel selection)."""
    dev = torch.device(device)
    fused = [copy.deepcopy(m).eval().fuse().to(dev) for m in nets]
    times = [[] for _ in fused]
    how = 'cpu eager'
    with torch.no_grad():
        forwards = []
        for m in fused:
            fn, how = _timed_forward(m, torch.zeros(batch, m.in_channels, *hw, device=dev))
            for _ in range(max(warmup, 1)):
                fn()
            forwards.append(fn)
        for _ in range(runs):
            for k, fn in enumerate(forwards):
                _sync(dev)
                t = time.perf_counter()
                fn()
                _sync(dev)
                times[k].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times], how


def cpu_latency(model, hw, runs=5):
    """Median seconds of `runs` batch-1 forward passes of a fused CPU copy of `model` (one warm-up pass);
    None when runs < 1."""
    return latencies([model], hw, runs)[0][0] if runs >= 1 else None
