"""Tests for support/policy.py's selective gradient checkpointing: which layers, that only they run again in the
backward, gradients unchanged, the memory it trades (memory.ckpt_sweep on the tiny config), the flag; LoRA
adapters under autocast; a checkpoint loaded with the model's own layers."""
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
    none = memory.fit_sweep(r, device_gib=1.0)                      # 1 GiB less the CUDA context: nothing fits
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


def _saved_bytes_logits_grads(agent, ids):
    """Bytes of the distinct storages autograd saves in a forward under CPU bf16 autocast (the GPU path's
    precision, on this CPU), its logits and the adapters' gradients after a backward."""
    agent.model.train()
    with memory.kept_for_backward() as kept, torch.autocast("cpu", dtype=torch.bfloat16):
        logits = agent.model(input_ids=ids).logits                                   # [2, 24, V]
    logits.float().logsumexp(-1).sum().backward()
    grads = {n: p.grad.clone() for n, p in agent.model.named_parameters() if p.grad is not None}
    agent.model.zero_grad(set_to_none=True)
    return kept["bytes"], logits.detach(), grads


def test_adapters_under_autocast_save_less_and_compute_the_same(monkeypatch):
    """policy.autocast_adapters: under autocast the adapters take the bf16 input as it is. Bit-equal logits
    and adapter gradients to peft's own fp32 cast; autograd saves less (peft's cast leaves autocast a bf16
    copy of each adapted layer's input to keep). apply_lora turns it on exactly where precision autocasts."""
    import copy
    agent = models.tiny_agent(seed=0, layers=2)
    agent.model.to(torch.bfloat16)
    agent = policy.apply_lora(agent, 4)                            # on a CPU: peft's casts, as they were
    for n, p in agent.model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(1))
    uncast = copy.deepcopy(agent)
    uncast.model = copy.deepcopy(agent.model)
    assert policy.autocast_adapters(uncast.model) == 7 * 2        # q k v o gate up down, 2 layers
    ids = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(2))
    before, logits, grads = _saved_bytes_logits_grads(agent, ids)
    after, logits2, grads2 = _saved_bytes_logits_grads(uncast, ids)
    torch.testing.assert_close(logits2, logits, rtol=0, atol=0)
    assert grads.keys() == grads2.keys() and any("lora_A" in n for n in grads)
    for n in grads:
        torch.testing.assert_close(grads2[n], grads[n], rtol=0, atol=0)
    # per token and layer (bf16, 2 bytes), the copies peft's cast left where the input itself is kept now:
    # q, k, v three of the normed input (one kept now: 2 more), gate and up two (1 more), o one of the
    # attention's output, which SDPA keeps anyway (1 more); down's copy stood in for its input, which
    # nothing else keeps (0): 2 x (3 x 128 + 128) bytes x 2 layers x 48 tokens
    assert before - after == 2 * (3 * 128 + 128) * 2 * 48
    with pytest.raises(RuntimeError):                              # outside autocast: loud, never silent
        uncast.model(input_ids=ids)
    monkeypatch.setattr(policy, "autocasts", lambda agent: True)   # where precision autocasts (a GPU)
    wired = policy.apply_lora(models.tiny_agent(seed=0, layers=2), 4)
    flags = [m.cast_input_dtype_enabled for m in wired.model.modules() if hasattr(m, "cast_input_dtype_enabled")]
    assert len(flags) == 14 and not any(flags)


def test_a_checkpoint_loads_with_the_models_own_layers(toy_base, monkeypatch):
    """load_agent asks for no Hub kernels: transformers 5.25 on swaps layers for downloaded kernels by
    default (and cannot load at all without the `kernels` package); the parity tests hold for the model's
    own PyTorch layers."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    real, seen = Qwen2_5_VLForConditionalGeneration.from_pretrained, {}

    def spy(*a, **kw):
        seen.update(kw)
        return real(*a, **kw)
    monkeypatch.setattr(Qwen2_5_VLForConditionalGeneration, "from_pretrained", spy)
    agent = policy.load_agent(toy_base, "cpu", torch.float32)
    assert seen["use_kernels"] is False and not getattr(agent.model, "use_kernels", False)
