"""Shared helpers for bench/ scripts: machine description, git commit, date, result files, tables.

    from bench.common import machine_info, print_table, write_result
    print_table([['step', 's'], ['load', 1.2]], title='yolov3')
    load = load_average()          # before measuring: other jobs on the box slow every number
    write_result('io', {...}, load)  # -> bench/results/io.json with machine, date, git commit, load added (atomic)
"""
import datetime
import json
import os
import platform
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, 'bench', 'results')


def _cpu_model():
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


OUTPUTS = ('bench/results', 'docs/*.png')      # what benches write: not a change to the code they measure


def git_commit(repo=REPO):
    """HEAD commit of `repo` (with '+dirty' when files outside the benches' own outputs, OUTPUTS, changed), or
    'unknown'."""
    try:
        head = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=repo, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(['git', 'status', '--porcelain', '--', '.'] + [f':(top,exclude){p}' for p in OUTPUTS],
                               cwd=repo, capture_output=True, text=True, check=True).stdout.strip()
        return head + ('+dirty' if dirty else '')
    except (OSError, subprocess.CalledProcessError):
        return 'unknown'


def machine_info():
    """Plain-data description of this machine: CPU, cores, torch threads, versions, GPU (if any)."""
    import torch
    info = {'cpu': _cpu_model(), 'cores': os.cpu_count(), 'torch_threads': torch.get_num_threads(),
            'python': platform.python_version(), 'torch': torch.__version__, 'platform': platform.platform()}
    try:
        import cv2
        info['opencv'] = cv2.__version__
    except ImportError:
        pass
    info['gpu'] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    try:
        with open('/proc/meminfo') as f:
            info['mem_gb'] = round(int(f.readline().split()[1]) / 1e6, 1)
    except (OSError, ValueError, IndexError):
        pass
    return info


def load_average():
    """[1, 5, 15]-minute load averages, rounded to 0.01."""
    return [round(v, 2) for v in os.getloadavg()]


def write_result(name, payload, load_start, folder=RESULTS):
    """Write <folder>/<name>.json (default bench/results) atomically: `payload` plus machine, date (UTC ISO), git
    commit and the load average at `load_start` (taken before measuring) and now. Returns the path."""
    from utils.io import write_text_atomic
    out = {'name': name, 'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
           'git_commit': git_commit(), 'machine': machine_info(),
           'load_average': {'start': load_start, 'end': load_average()}, **payload}
    path = os.path.join(folder, f'{name}.json')
    write_text_atomic(path, json.dumps(out, indent=2, default=str) + '\n')
    print(f"wrote {os.path.relpath(path)}")
    return path


def print_table(rows, title=None):
    """Print rows (first = header) as a terminaltables AsciiTable; returns the text."""
    from terminaltables import AsciiTable
    text = AsciiTable([[str(c) for c in r] for r in rows], title).table
    print(text)
    return text
