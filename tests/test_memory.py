"""Tests for support/memory.py: the fake-tensor estimate agrees with the same step on real tensors (tiny model),
its LoRA stand-in computes what peft computes, the exact formulas by hand, host bytes of episodes."""
import pytest
import torch

import lfpc
from support import memory, models

TINY = dict(config="tiny", visual_tokens=16, text_tokens=40, response_tokens=48, crops=2, crop_tokens=16,
            rollout_rows=4, group=2, train_tokens=512, logprob_chunk=16)


@pytest.mark.parametrize("lora", [0, 4])
def test_fake_tensor_estimate_equals_real_tensors_byte_for_byte(lora):
    """The same phases, tracked by the same MemTracker, once on fake tensors (what the 7B estimate uses)
    and once on real CPU tensors of the tiny model: every part of every phase the same bytes (the
    activations, which the tracker measures, included: a fake path that kept more would show)."""
    s = memory.StepShape(**TINY, lora=lora)
    fake, real = memory.estimate(s, vision=False, fake=True), memory.estimate(s, vision=False, fake=False)
    for phase in ("rollout", "training"):
        assert fake[phase] == real[phase], phase
        assert fake[phase]["activations"] > 0
    assert fake["logits_per_chunk"] == real["logits_per_chunk"]
    assert fake["tracked_training_step"] == real["tracked_training_step"]    # the tracker's breakdown, kind by kind


def test_measure_training_runs_the_estimates_step_on_real_tensors_of_a_device():
    """memory.measure_training (what .ci/gpu runs on the GPU for 7B): the training micro-batch on real tensors
    of the device, beside the fake-tensor estimate; here on the CPU, where there is no allocator peak."""
    r = memory.measure_training(memory.StepShape(**TINY, lora=4), device="cpu")
    assert r["allocator_peak"] is None and r["device"] == "cpu"
    assert r["tracked"]["activations"] == r["estimate"]["activations"] > 0


def test_lora_stand_in_computes_what_peft_computes_and_keeps_its_bytes(tiny):
    """Under bf16 autocast (the GPU path's precision, here on the CPU), with policy.autocast_adapters: the
    same output and gradients as peft's LoRA layer, and autograd keeps the same bytes for the backward."""
    import peft
    from support import policy
    base = torch.nn.Linear(8, 6).to(torch.bfloat16).requires_grad_(False)        # frozen, as under LoRA
    ours = memory.LoRALinear(base, 2)
    torch.nn.init.normal_(ours.lora_B.weight)
    model = torch.nn.Sequential()
    model.add_module("q_proj", torch.nn.Linear(8, 6).to(torch.bfloat16))
    model.q_proj.load_state_dict(base.state_dict())
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]),
                                  autocast_adapter_dtype=True)
    assert policy.autocast_adapters(wrapped) == 1
    layer = wrapped.base_model.model.q_proj
    layer.lora_A["default"].weight.data.copy_(ours.lora_A.weight)
    layer.lora_B["default"].weight.data.copy_(ours.lora_B.weight)
    assert layer.lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(3, 8, dtype=torch.bfloat16)

    def run(m):
        with memory.kept_for_backward() as kept, torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x)
        y.float().sum().backward()
        return y, [p.grad for p in m.parameters() if p.requires_grad], kept["bytes"]
    (y1, g1, b1), (y2, g2, b2) = run(ours), run(layer)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert b1 == b2 > 0


def test_kv_cache_bytes_by_hand():
    text = memory.model_config("7b").get_text_config()
    # 2 (keys, values) x 28 layers x 4 kv heads x 128 dims x 2 bytes = 57,344 bytes a token
    assert memory.kv_bytes(text, 1, 1) == 57_344 and memory.kv_bytes(text, 16, 8512) == 16 * 8512 * 57_344


def test_kv_bytes_is_what_the_slot_engines_cache_allocates(tiny, monkeypatch):
    """kv_bytes per row and token against the slot engine's own cache after a rollout: its keys and values
    of every layer, [slots, kv heads, capacity + 1 (the scratch position), head dim] in the compute dtype."""
    from conftest import noise_image
    from support import engine
    made = []

    class Recorded(engine.SlotKV):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)
    monkeypatch.setattr(engine, "SlotKV", Recorded)
    cfg = lfpc.RolloutConfig(global_max_pixels=64 * 784, max_new_tokens=6, max_turns=2, batch_size=3)
    lfpc.rollout(tiny, [lfpc.Task(noise_image(200, 150, k), "Colour?", "red") for k in range(2)], 2, cfg, seed=0)
    (kv,) = made
    held = sum(t.numel() * t.element_size() for c in (kv.k, kv.v) for t in c.values())
    text = tiny.model.config.get_text_config()
    assert len(kv.k) == text.num_hidden_layers and held > 0
    assert held == memory.kv_bytes(text, kv.slots, kv.capacity + 1, bytes_per=next(iter(kv.k.values())).element_size())


def test_weights_bytes_of_7b_lora_and_full():
    c = memory.model_config("7b")
    # adapters: r x (in + out) for q, k, v, o (3584+3584, 3584+512 twice, 3584+3584), gate, up, down
    per_layer = 64 * (7168 + 4096 + 4096 + 7168 + 3 * (3584 + 18944))
    assert memory._trainable_bytes(c, 64) == 4 * 28 * per_layer
    assert memory._weights_bytes(c, 64) == 2 * 8_292_166_656 + 4 * 28 * per_layer
    assert memory._weights_bytes(c, 0) == 4 * 8_292_166_656


def test_the_rollout_holds_the_merged_copy_under_lora_and_a_prefill_within_its_cap():
    config = memory.model_config("tiny")
    lora = memory.estimate(memory.StepShape(**TINY, lora=4), vision=False)
    full = memory.estimate(memory.StepShape(**TINY, lora=0), vision=False)
    assert lora["rollout"]["merged_copy"] == 2 * memory._parameters(config) and "merged_copy" not in full["rollout"]
    # the crop observations of 4 rows (4 x 46 tokens) in one forward, or one row a forward under a cap of 46
    wide = memory.estimate(memory.StepShape(**{**TINY, "visual_tokens": 4}, lora=0, prefill_tokens=4096), vision=False)
    one = memory.estimate(memory.StepShape(**{**TINY, "visual_tokens": 4}, lora=0, prefill_tokens=46), vision=False)
    assert one["rollout"]["activations"] < wide["rollout"]["activations"] / 2


def test_episode_bytes_counts_shared_images_once():
    from PIL import Image
    im = Image.new("RGB", (56, 28))
    eps = [lfpc.Episode(0) for _ in range(4)]
    for e in eps:
        e.append([1, 2, 3], images=[(im, (1, 2, 4))])
    b = memory.episode_bytes(eps)
    assert b["images"] == 56 * 28 * 3 and b["distinct_images"] == 1 and b["token_lists"] == 4 * 3 * 3 * 8
    # before: each episode kept its own fp32 patches: 8 patches x 1176 values x 4 bytes
    assert b["fp32_pixels_per_episode_before"] == 4 * 8 * 1176 * 4


def test_host_memory_of_16_rollouts_holds_each_image_once(tiny):
    """The issue's 1 task x 16 rollouts x 4 turns on a 4000x3000 original (real-shape model, scripted turns):
    the episodes share one global image (uint8, as shown) and hold their own crops, instead of fp32
    patches per episode and image."""
    import crop_tool
    from conftest import QWEN_TOKENIZER, noise_image, scripted
    agent = models.real_shape_agent(QWEN_TOKENIZER)
    cfg = lfpc.RolloutConfig(global_max_pixels=1024 * 784, max_turns=4, max_new_tokens=64,
                             crop=crop_tool.CropConfig(max_pixels=256 * 784))
    t = lfpc.Task(noise_image(4000, 3000), "What colour?", "red")
    calls = [crop_tool.format_tool_call(b) for b in ([0, 0, 224, 168], [112, 112, 336, 280], [200, 120, 600, 400])]
    eps = lfpc.rollout(agent, [t], 16, cfg, sample_fn=scripted(agent, {0: [(c, "stop") for c in calls] +
                                                                          [("<answer>red</answer>", "eos")]}))
    b = memory.episode_bytes(eps)
    shown = eps[0].images[0]
    crops = [c.image for e in eps for c in e.crops]
    assert b["distinct_images"] == 1 + 16 * 3 and all(e.images[0] is shown for e in eps)
    assert b["images"] == shown.width * shown.height * 3 + sum(c.width * c.height * 3 for c in crops)
    # before: per episode and image, the processor's fp32 patches: 2 frames x 3 channels x the pixels x 4 bytes
    assert b["fp32_pixels_per_episode_before"] == 16 * 24 * (shown.width * shown.height + sum(
        c.width * c.height for c in crops) // 16)
    print(f"host bytes, 16 rollouts: {b['images'] / 2**20:.1f} MiB of images + {b['token_lists'] / 2**20:.2f} MiB "
          f"of token lists; fp32 pixels per episode: {b['fp32_pixels_per_episode_before'] / 2**20:.1f} MiB")


def test_ranks_shard_full_fine_tunings_training_state_and_gather_it_to_sample():
    one = memory.estimate(memory.StepShape(**TINY, lora=0), vision=False)
    two = memory.estimate(memory.StepShape(**TINY, lora=0, world=2), vision=False)
    text = memory.model_config("tiny").get_text_config()
    head = 4 * text.vocab_size * text.hidden_size              # the lm_head, fp32, whole on every rank
    assert two["training"]["weights"] == (one["training"]["weights"] - head) // 2 + head
    assert two["training"]["gradients"] == (one["training"]["gradients"] - head) // 2 + head
    assert two["training"]["optimizer"] == 2 * ((one["training"]["optimizer"] // 2 - head) // 2 + head)
    assert two["rollout"]["gathered_weights"] == (one["rollout"]["weights"] - head) // 2   # the shards, in bf16
    lora = memory.estimate(memory.StepShape(**TINY, lora=4, world=2), vision=False)   # LoRA: whole on every rank
    assert "gathered_weights" not in lora["rollout"]
