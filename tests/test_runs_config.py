import pytest
import torch

from cxredit.checkpoint import save_checkpoint
from cxredit.config import GanConfig, parse_overrides, preset
from cxredit.runs import Run, RunError, find_checkpoint


def test_presets_follow_design_numbers():
    p = preset("paper128")
    assert (p.resolution, p.batch, p.gamma, p.g_lr, p.mbstd_group, p.ema_kimg, p.ema_rampup,
            p.mapping_layers, p.channel_base, p.channel_max) == (
        128, 32, 0.1024, 0.0025, 4, 10.0, 0.05, 2, 16384, 512)
    assert p.num_ws == 12
    d = preset("demo64")
    assert (d.resolution, d.channel_base, d.channel_max, d.w_dim) == (64, 2048, 128, 128)
    assert preset("tiny").resolution == 32 and preset("tiny").w_dim == 64
    assert GanConfig.from_dict(p.to_dict()) == p
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")
    with pytest.raises(ValueError, match="power of two"):
        p.replace(resolution=100)
    with pytest.raises(ValueError, match="unknown GanConfig field"):
        GanConfig.from_dict({"resolutoin": 64})


def test_parse_overrides_types():
    o = parse_overrides(["channel_base=4096", "gamma=0.5", "conv_clamp=none", "aug=fixed",
                         "betas=0.0,0.9", "ema-rampup=None"])
    assert o == {"channel_base": 4096, "gamma": 0.5, "conv_clamp": None, "aug": "fixed",
                 "betas": (0.0, 0.9), "ema_rampup": None}
    with pytest.raises(ValueError, match="unknown config field"):
        parse_overrides(["nope=1"])
    with pytest.raises(ValueError, match="cannot parse"):
        parse_overrides(["batch=eight"])


def test_run_folder_prune_stats_and_lookup(tmp_path):
    run = Run(tmp_path / "r")
    run.write_config({"a": 1}, kind="gan")
    run.log({"step": 0})
    # a run that stopped before its first checkpoint holds nothing to keep: a new start
    # replaces it (its stats are dropped)
    run = Run(tmp_path / "r")
    assert run.read_stats() == []
    with pytest.raises(RunError, match="nothing to resume"):
        Run(tmp_path / "other", resume=True)
    for step in (10, 20, 30, 40, 50):
        save_checkpoint(run.checkpoint_path(step), {"w": torch.full([2], float(step))}, "gan")
        run.log({"step": step, "loss": step / 10})
    with pytest.raises(RunError, match="already exists"):
        Run(tmp_path / "r")
    run.prune(keep=2, keep_steps={20})
    assert [s for s, _ in run.checkpoints()] == [20, 40, 50]
    assert run.latest_checkpoint().name == "ckpt-00000050.json"
    assert find_checkpoint(tmp_path / "r").name == "ckpt-00000050.json"
    assert find_checkpoint(run.checkpoint_path(40)).name == "ckpt-00000040.json"
    # an incomplete checkpoint (tensor file missing) is never picked
    (run.checkpoint_path(50).with_suffix(".safetensors")).unlink()
    (run.ckpt_dir / "ckpt-00000050.safetensors").unlink(missing_ok=True)
    assert run.latest_checkpoint().name == "ckpt-00000040.json"
    run.truncate_stats(30)
    assert [r["step"] for r in run.read_stats()] == [10, 20, 30]
    with pytest.raises(RunError, match="not found"):
        find_checkpoint(tmp_path / "missing.json")


def test_train_seconds_sums_kept_ticks(tmp_path):
    run = Run(tmp_path / "r")
    run.write_config({}, kind="gan")
    assert run.train_seconds() == 0.0
    for step, kimg, spk in [(10, 0.5, 4.0), (20, 1.0, 2.0), (30, 2.0, 3.0)]:
        run.log({"step": step, "kimg": kimg, "sec_per_kimg": spk})
    run.log({"step": 30, "eval/ssim": 0.5})  # lines without timing are ignored
    assert run.train_seconds() == pytest.approx(0.5 * 4 + 0.5 * 2 + 1.0 * 3)
    # a crash after step 20, resumed from there: the lost tick is dropped, its redo counted once
    run.truncate_stats(20)
    run.log({"step": 30, "kimg": 2.0, "sec_per_kimg": 5.0})
    assert run.train_seconds() == pytest.approx(0.5 * 4 + 0.5 * 2 + 1.0 * 5)


@pytest.mark.parametrize("field, value, words", [
    ("z_dim", 0, "z_dim must be positive"), ("channel_base", 0, "channel_base"),
    ("w_dim", -3, "w_dim"), ("mbstd_group", 0, "mbstd_group"),
    ("pl_batch_shrink", 0, "pl_batch_shrink"), ("betas", (0.5,), "betas must be two"),
    ("mapping_layers", 0, "mapping_layers"), ("d_lr", -1.0, "d_lr must be positive"),
    ("g_lr", 0.0, "g_lr"), ("kimg", float("nan"), "kimg must be a finite number"),
    ("gamma", -1.0, "gamma must be >= 0"), ("style_mixing", 2.0, "style_mixing must be in"),
    ("ema_kimg", 0.0, "ema_kimg"), ("r1_interval", -1, "r1_interval"),
    ("keep_checkpoints", 0, "keep_checkpoints must be positive"),
])
def test_gan_config_rejects_values_that_would_break_training(field, value, words):
    with pytest.raises(ValueError, match=words):
        preset("tiny").replace(**{field: value})


def test_encoder_config_and_bool_overrides_are_checked():
    from cxredit.config import EncoderTrainConfig

    with pytest.raises(ValueError, match="cannot parse 'maybe'"):
        parse_overrides(["real_cycle=maybe"], EncoderTrainConfig)
    assert parse_overrides(["real_cycle=off"], EncoderTrainConfig) == {"real_cycle": False}
    for bad in ({"keep_checkpoints": 0}, {"real_ssim": -1.0}, {"betas": (0.9, 1.0)}):
        with pytest.raises(ValueError):
            EncoderTrainConfig(**bad)
