"""README.md's pipeline commands run as written, at toy size: each ```bash line of the pipeline section runs from
the repository root with only its epochs, dataset size and input size made small and `runs/` moved into tmp_path;
then the ```python snippet loads the result in OpenCV."""
import re
import shlex
import subprocess
import sys

import pytest

from tests.helpers import REPO

SMALL = [(r'--epochs \d+', '--epochs 1'), (r'--n-train \d+', '--n-train 8'), (r'--n-val \d+', '--n-val 4'),
         (r'--img-size \d+', '--img-size 64'), (r'--distill \d+', '--distill 2')]


def readme_blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", (REPO / 'README.md').read_text(), flags=re.S)


def commands(block):
    """Shell lines of a block: continuation lines joined, comments and `. .venv/bin/activate` dropped."""
    lines = block.replace('\\\n', ' ').splitlines()
    return [line.split(' #')[0].strip() for line in lines
            if line.strip() and not line.lstrip().startswith(('#', '. '))]


def test_readme_pipeline_commands_run(tmp_path):
    (block,) = readme_blocks('bash')
    cmds = commands(block)
    assert any(c.startswith('python shortcut_prune.py') for c in cmds)  # the block is the pipeline one
    scripts = set()
    for cmd in cmds:
        for pattern, repl in SMALL:
            cmd = re.sub(pattern, repl, cmd)
        argv = shlex.split(cmd.replace('runs/', f'{tmp_path}/'))
        assert argv[0] == 'python', cmd
        scripts.add(argv[1])
        r = subprocess.run([sys.executable] + argv[1:], cwd=REPO, capture_output=True, text=True)
        assert r.returncode == 0, f"{cmd}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    assert {'train.py', 'normal_prune.py', 'regular_prune.py', 'shortcut_prune.py', 'tiny_prune.py', 'test.py',
            'detect.py', 'models.py'} <= scripts

    (snippet,) = [b for b in readme_blocks('python') if 'readNetFromDarknet' in b]
    namespace = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        exec(snippet.replace('runs/', f'{tmp_path}/'), namespace)
    assert not namespace['net'].empty()
    assert len(namespace['net'].getUnconnectedOutLayers()) == 3  # yolov3-demo.cfg's three [yolo] heads
