"""Tests for support/presets.py and how the scripts use it: explicit presets, None as unset, flags win,
contradictions refused with the reason."""
import pytest

import eval as ev
import train
from support import policy, presets


def test_every_preset_key_is_a_flag_of_train_or_eval_or_a_world_key():
    train_flags = {f.name for f in __import__("dataclasses").fields(train.Args)}
    eval_flags = set(vars(ev.parse_args(["--preset", "paper", "--model", "org/model", "--data", "d.jsonl"])))
    for name in presets.NAMES:
        preset = presets.get(name)
        unknown = set(preset) - train_flags - eval_flags - set(presets.WORLD_KEYS)
        assert not unknown, (name, unknown)


def test_the_toy_preset_is_the_default_and_flags_win(toy_base):
    a = train.parse_args(["--model", toy_base])
    assert (a.preset, a.lr, a.steps, a.crop_snap, a.grad_ckpt) == ("toy", 1e-4, 60, 28, False)
    a = train.parse_args(["--model", toy_base, "--lr", "3e-5", "--crop-snap", "0", "--grad-ckpt"])
    assert (a.lr, a.crop_snap, a.grad_ckpt) == (3e-5, 0, True)          # 0 is a value, not "unset"


def test_paper_preset_fills_the_paper_and_no_grad_ckpt_turns_it_off(tmp_path):
    data = str(tmp_path / "d.jsonl")
    a = train.parse_args(["--preset", "paper", "--data", data])
    assert (a.model, a.lr, a.prompts, a.group, a.max_response_tokens, a.grad_ckpt, a.lora) == \
        ("Qwen/Qwen2.5-VL-7B-Instruct", 1e-6, 256, 16, 2048, True, 0)
    assert train.parse_args(["--preset", "paper", "--data", data, "--no-grad-ckpt"]).grad_ckpt is False
    assert train.parse_args(["--preset", "one-gpu", "--data", data]).lora == 64


def test_stage2_starts_from_stage1s_run_unless_told(toy_base, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)               # no runs/stage1/ckpt here (the README's run command writes one)
    with pytest.raises(SystemExit):
        train.parse_args(["--stage", "2", "--out", "x"])
    assert train.parse_args(["--stage", "2", "--model", toy_base]).model == toy_base


@pytest.mark.parametrize("argv, message", [
    (["--preset", "paper"], "pass --data"),
    (["--preset", "gpu"], "--preset must be one of"),
])
def test_train_refuses_contradictions_with_the_reason(argv, message, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(argv)
    assert message in capsys.readouterr().err


def test_toy_preset_refuses_a_real_checkpoint(tiny, tmp_path, capsys):
    """A model whose saved prompts are not the toy's (here the tiny model with Qwen's prompts; a LoRA
    stage-1 folder of a real model likewise) would train with lr 1e-4 and toy crops: refused."""
    policy.save_agent(tiny, str(tmp_path / "real"))
    with pytest.raises(SystemExit):
        train.parse_args(["--model", str(tmp_path / "real")])
    assert "pick --preset paper or one-gpu" in capsys.readouterr().err
    assert presets.check_model("paper", str(tmp_path / "real")) is None


def test_rollout_config_converts_tokens_to_pixels(toy_base):
    a = train.parse_args(["--model", toy_base])
    cfg = presets.rollout_config(a, 64, temperature=0.5)
    assert cfg.global_max_pixels == 64 * 784 and cfg.global_min_pixels == 784 and cfg.global_resample == "box"
    assert (cfg.crop.max_pixels, cfg.crop.snap, cfg.crop.resample, cfg.temperature) == (16 * 784, 28, "box", 0.5)
    import toy.world
    assert cfg == toy.world.rollout_config(temperature=0.5, batch_size=cfg.batch_size)    # the toy's own settings
