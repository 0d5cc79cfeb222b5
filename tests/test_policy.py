"""Tests for support/policy.py's selective gradient checkpointing: which layers, that only they run again in the
backward, gradients unchanged, the memory it trades (memory.ckpt_sweep on the tiny config), the flag."""
import pytest
import torch

import train
from support import memory, models, policy


def test_checkpointed_layers_are_evenly_spread_by_hand():
    assert policy.checkpointed_layers(28, 1.0) == list(range(28))
    assert policy.checkpointed_layers(28, 0.5) == list(range(0, 28, 2))
    assert policy.checkpointed_layers(4, 0.75) == [0, 1, 2]
    assert policy.checkpointed_layers(28, 0.25) == [0, 4, 8, 12, 16, 20, 24]
    assert policy.checkpointed_layers(4, 0.01) == [0]              # at least one: 0 is --no-grad-ckpt


def _forward_backward(agent, calls):
    ids = torch.randint(0, 100, (2, 12))
    agent.model.train()
    logits = agent.model(input_ids=ids).logits                     # [2, 12, V]
    logits.float().logsumexp(-1).sum().backward()
    grads = {n: p.grad.clone() for n, p in agent.model.named_parameters() if p.grad is not None}
    agent.model.zero_grad(set_to_none=True)
    return grads, dict(calls)


@pytest.mark.parametrize("lora", [0, 4])
def test_only_the_chosen_layers_run_again_in_the_backward_and_gradients_do_not_change(lora):
    grads = {}
    for fraction in (None, 0.5, 1.0):                               # None: no checkpointing
        torch.manual_seed(0)
        agent = models.tiny_agent(seed=0, layers=4)
        if lora:
            agent = policy.apply_lora(agent, lora)
            for n, p in agent.model.named_parameters():             # B != 0: the adapters carry gradient paths
                if "lora_B" in n:
                    torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(1))
        layers = policy.decoder_layers(agent.model)
        assert len(layers) == 4                                     # the vision blocks are not among them
        chosen = policy.enable_grad_ckpt(agent.model, fraction) if fraction else []
        calls = {i: 0 for i in range(4)}
        for i, layer in enumerate(layers):             # the layer's MLP: the recompute runs the layer's forward
            layer.mlp.register_forward_pre_hook(lambda m, args, i=i: calls.__setitem__(i, calls[i] + 1))
        torch.manual_seed(1)
        grads[fraction], seen = _forward_backward(agent, calls)
        assert chosen == {None: [], 0.5: [0, 2], 1.0: [0, 1, 2, 3]}[fraction]
        assert seen == {i: 2 if i in chosen else 1 for i in range(4)}, fraction    # a recompute per chosen layer
    for fraction in (0.5, 1.0):
        assert grads[fraction].keys() == grads[None].keys() and grads[None]
        for n in grads[None]:
            torch.testing.assert_close(grads[fraction][n], grads[None][n], rtol=1e-5, atol=1e-6)


def test_the_sweep_trades_activations_for_recompute_on_the_tiny_config():
    """Fake tensors, the tiny config (2 layers): fewer checkpointed layers hold more activations and cost
    fewer forwards; the choice is the cheapest that fits."""
    s = memory.StepShape(config="tiny", visual_tokens=16, text_tokens=40, response_tokens=48, crops=2, crop_tokens=16,
                         rollout_rows=4, group=2, train_tokens=2048, logprob_chunk=16, lora=4)
    r = memory.ckpt_sweep(s, device_gib=80)
    act = {x["ckpt_fraction"]: x["activations_bytes"] for x in r["rows"]}
    assert act[0.0] > act[0.5] > act[1.0] > 0
    assert [x["forwards_per_token"] for x in r["rows"]] == [3, 2.75, 2.5, 2.25, 2]       # LoRA: backward = 1
    assert r["choice"] == 0.0                                       # everything fits 80 GiB: no recompute at all
    none = memory.ckpt_sweep(s, device_gib=1.0)                     # 1 GiB less the CUDA context: nothing fits
    assert none["choice"] is None and not any(x["fits"] for x in none["rows"])
    assert "lower --train-tokens" in memory.format_sweep(none)


def test_the_flag_needs_checkpointing_and_a_fraction(toy_base, tmp_path):
    with pytest.raises(SystemExit):
        train.parse_args(["--model", toy_base, "--ckpt-fraction", "0.5"])      # toy: checkpointing off
    assert train.parse_args(["--model", toy_base, "--grad-ckpt", "--ckpt-fraction", "0.5"]).ckpt_fraction == 0.5
    for bad in ("0", "1.5"):
        with pytest.raises(SystemExit):
            train.parse_args(["--model", toy_base, "--grad-ckpt", "--ckpt-fraction", bad])
    data = str(tmp_path / "d.jsonl")
    with pytest.raises(SystemExit):
        train.parse_args(["--preset", "paper", "--data", data, "--no-grad-ckpt", "--ckpt-fraction", "0.5"])
    assert train.parse_args(["--preset", "one-gpu", "--data", data]).ckpt_fraction == \
        __import__("support.presets", fromlist=["x"]).ONE_GPU["ckpt_fraction"]
