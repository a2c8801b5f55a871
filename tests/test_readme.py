"""The README's training-loop example runs as written (with a tiny backbone)."""

import re
from pathlib import Path

import torch
from torch import nn

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs():
    text = README.read_text()
    assert text.lstrip().startswith("# mskd-fast")
    commands = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    assert [line.split()[1] for line in commands.strip().splitlines()] == ["train", "test"]
    example = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    torch.manual_seed(0)
    b, s, c = 3, 4, 5
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.ReLU())
    head = nn.Linear(8, c)
    x = torch.randn(b, 3, 32, 32)
    boxes = torch.tensor([[2.0, 3.0, 20.0, 25.0], [0.0, 0.0, 16.0, 16.0], [16.0, 16.0, 32.0, 32.0], [5, 9, 30, 14]])
    namespace = {
        "backbone": backbone, "head": head, "x": x, "y": (torch.rand(b, c) < 0.4).float(),
        "boxes": boxes.expand(b, s, 4).contiguous(), "q_prev": torch.randn(b, c),
    }
    exec(compile(example, str(README), "exec"), namespace)
    assert torch.isfinite(namespace["total"])
    assert set(namespace["terms"]) == {"bce", "lsd", "rsd", "ssd"}
    assert head.weight.grad is not None and backbone[0].weight.grad is not None
