"""Checks shared by several test modules."""

import torch

from cxredit.checkpoint import load_checkpoint
from cxredit.runs import Run


def assert_exact_resume(train, data, tmp_path, cfg, grid_prefix: str, eval_key: str):
    """A 10-step run vs. 5 steps + resume to 10 (`train(data, out, cfg, ...)`, single net).

    Checks: identical final weights, that the resumed half really moved, snapshot grids
    `<grid_prefix>-<step>.png` and eval records (`eval_key`) at steps 5 and 10.

    Returns:
        (the full run's last record, its final checkpoint, its stats records).
    """
    full = train(data, tmp_path / "full", cfg, device="cpu", progress=False)
    train(data, tmp_path / "part", cfg.replace(kimg=cfg.kimg / 2), device="cpu", progress=False)
    train(data, tmp_path / "part", resume=True, device="cpu", progress=False, kimg=cfg.kimg)
    a = load_checkpoint(Run(tmp_path / "full", resume=True).latest_checkpoint())
    b = load_checkpoint(Run(tmp_path / "part", resume=True).latest_checkpoint())
    assert a["step"] == b["step"] == 10
    for k in a["net"]:
        assert torch.equal(a["net"][k], b["net"][k]), k
    # the resumed run really continued: its weights differ from the half-way checkpoint
    half = load_checkpoint(sorted((tmp_path / "part" / "checkpoints").glob("*.json"))[0])
    assert half["step"] == 5
    assert any(not torch.equal(half["net"][k], b["net"][k]) for k in b["net"])
    grids = sorted((tmp_path / "full" / "samples").glob(f"{grid_prefix}-*.png"))
    assert [p.name for p in grids] == [f"{grid_prefix}-00000005.png",
                                       f"{grid_prefix}-00000010.png"]
    stats = Run(tmp_path / "full", resume=True).read_stats()
    assert [r["step"] for r in stats if eval_key in r] == [5, 10]
    return full, a, stats
