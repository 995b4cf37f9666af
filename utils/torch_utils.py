"""Device selection, seeding, model EMA and DDP unwrapping."""
import copy
import math
import os
import random
import re

import numpy as np
import torch
import torch.nn as nn

from utils.errors import DarkslimError


def select_device(device='cpu'):
    """'cpu' | 'cuda' | 'cuda:N' (also 'N' = 'cuda:N') -> torch.device, or DarkslimError when the device is
    not usable here (unknown name, CUDA absent, index out of range)."""
    name = str(device if device is not None else 'cpu').strip().lower()
    if re.fullmatch(r'\d+', name):
        name = f"cuda:{name}"
    m = re.fullmatch(r'cuda(?::(\d+))?', name)
    if name == 'cpu':
        return torch.device('cpu')
    if not m:
        raise DarkslimError(f"device {device!r}: expected cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise DarkslimError(f"device {device!r}: CUDA is not available on this machine "
                            f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}); expected the CPU (cpu)")
    index = int(m.group(1)) if m.group(1) is not None else 0
    n = torch.cuda.device_count()
    if index >= n:
        raise DarkslimError(f"device {device!r}: this machine has {n} CUDA device(s); expected cuda:0..cuda:{n - 1}")
    return torch.device('cuda', index)


def init_seeds(seed=0, deterministic=False):
    """Seed Python, NumPy and torch (all devices). deterministic=True also asks cuDNN for determinism."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def de_parallel(model):
    """The plain model inside a DistributedDataParallel / DataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


def dist_info():
    """(rank, local_rank, world_size) from torchrun's environment; (0, 0, 1) when not launched by torchrun."""
    world = int(os.environ.get('WORLD_SIZE', 1))
    return int(os.environ.get('RANK', 0)), int(os.environ.get('LOCAL_RANK', 0)), world


class ModelEMA:
    """Exponential moving average of a model's parameters and buffers (Polyak averaging).

    ema = d * ema + (1 - d) * model after each optimizer step, with d = decay * (1 - exp(-updates / tau)):
    the ramp makes early averages follow the model closely (the first weights are random). Integer buffers
    (BatchNorm's num_batches_tracked) are copied. `self.ema` is an eval-mode deep copy without gradients.
    """

    def __init__(self, model, decay=0.9999, tau=2000.0, updates=0):
        self.ema = copy.deepcopy(de_parallel(model)).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.decay, self.tau, self.updates = decay, tau, updates

    def current_decay(self):
        return self.decay * (1 - math.exp(-self.updates / self.tau))

    @torch.no_grad()
    def update(self, model):
        self.updates += 1
        d = self.current_decay()
        msd = de_parallel(model).state_dict()
        for k, v in self.ema.state_dict().items():
            if v.dtype.is_floating_point:
                v.mul_(d).add_(msd[k].detach(), alpha=1 - d)
            else:
                v.copy_(msd[k])

    def state(self):
        """Plain data for a checkpoint (weights_only-loadable)."""
        return {'updates': self.updates, 'decay': self.decay, 'tau': self.tau}
