"""The README's examples run as written: "Using MSKD in your own training loop" (the three-line loop, on a tiny
timm model) and "Using the fused losses directly" (with a tiny backbone)."""

import re
from pathlib import Path

import timm
import torch
from torch import nn

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks(text):
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_readme_commands():
    text = README.read_text()
    assert text.lstrip().startswith("# mskd-fast")
    commands = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    assert [line.split()[1] for line in commands.strip().splitlines()] == ["train", "test"]


def test_readme_training_loop_example_runs():
    text = README.read_text()
    section = text.split("## Using MSKD in your own training loop", 1)[1]
    example = _python_blocks(section)[0]
    assert "mskd = MSKD(model" in example and 'out["loss"].backward()' in example
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=5, channels=(8, 16, 32, 64), stem_width=8)
    g = torch.Generator().manual_seed(1)
    loader = [(torch.randn(4, 3, 64, 64, generator=g), (torch.rand(4, 5, generator=g) < 0.4).float())
              for _ in range(3)]
    before = [p.detach().clone() for p in model.parameters()]
    namespace = {"model": model, "loader": loader,
                 "optimizer": torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)}
    exec(compile(example, str(README), "exec"), namespace)
    out = namespace["out"]
    assert set(out) == {"loss", "logits", "bce", "lsd", "rsd", "ssd"}
    assert torch.isfinite(out["loss"]) and out["ssd"] != 0  # S-SD active after an update
    assert out["lsd"] == 0 and out["rsd"] == 0  # the default recipe ("step") switches L-SD and R-SD off
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_readme_fused_losses_example_runs():
    text = README.read_text()
    section = text.split("## Using the fused losses directly", 1)[1]
    example = _python_blocks(section)[0]
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
