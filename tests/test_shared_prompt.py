"""A GRPO group's prompt computed once in the training forward (support/shared_prompt.py, batches.collate
share_prompt=True, batches.pack_groups, train.py --pack shared): the layout by hand, the attention against
a dense mask, and log-probs and gradients against the padded forward on the toy base (crops after the
prompt) and on the real-shape model (real tokenizer, grouped-query heads)."""
import random
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F

import lfpc
import toy.world
from conftest import QWEN_TOKENIZER, ROOT, noise_image
from support import batches, models, policy, shared_prompt


@dataclass
class Row:
    token_ids: list[int]
    loss_mask: list[int]
    images: list = field(default_factory=list)
    grids: list = field(default_factory=list)
    logprobs: list[float] = None
    task_index: int = 0
    seed: int = 0

    def __post_init__(self):
        self.logprobs = self.logprobs or [0.0] * len(self.token_ids)


def test_layout_by_hand(tiny):
    """Rows 0 and 2 share the prompt [5, 6, 7] (their first sampled token is at 3); row 1 has another
    prompt. Row: 0's prompt, 0's own, 2's own, then row 1 whole."""
    rows = [Row([5, 6, 7, 8, 9], [0, 0, 0, 1, 1]), Row([5, 6, 4, 8], [0, 0, 0, 1]), Row([5, 6, 7, 3], [0, 0, 0, 1])]
    b = batches.collate(tiny, rows, packed=True, share_prompt=True)
    assert b.input_ids[0].tolist() == [5, 6, 7, 8, 9, 3, 5, 6, 4, 8]
    assert b.layout.groups == [(0, 3, [(3, 2), (5, 1)]), (6, 4, [])]
    assert b.unpack.tolist() == [[0, 1, 2, 3, 4], [6, 7, 8, 9, -1], [0, 1, 2, 5, -1]]
    assert b.prev[0].tolist() == [-1, 0, 1, 2, 3, 2, -1, 6, 7, 8]     # row 2's first own token follows the prompt
    assert b.shared == 3 and b.padding == 0                            # 13 tokens of episodes, 10 computed
    assert b.unpacked(b.loss_mask).tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 1, 0], [0, 0, 0, 1, 0]]
    assert b.position_ids[0, 0].tolist() == [0, 1, 2, 3, 4, 3, 0, 1, 2, 3]   # text positions: each episode's own


def test_prompts_are_shared_only_with_the_same_image_object(tiny):
    img, other = noise_image(56, 56, 0), noise_image(56, 56, 0)           # equal pixels, two objects
    grid = tiny.image_grid(img)
    block = tiny.image_block(grid)
    make = lambda im: Row([5, *block, 6, 8], [0] * (len(block) + 2) + [1], [im], [grid])
    assert batches.prompt_groups(tiny, [make(img), make(other), make(img)]) == [[0, 2], [1]]
    assert batches.prompt_groups(tiny, [Row([5, 6], [0, 0]), Row([5, 6], [0, 0])]) == [[0], [1]]   # nothing sampled


def test_attention_equals_sdpa_under_the_dense_mask_of_the_layout():
    """Two groups (a prompt of 4 with suffixes of 3 and 2; a lone episode of 5), 4 query heads on 2 KV heads:
    `attention` equals one SDPA call on the whole row under the mask the layout means, values and gradients."""
    layout = shared_prompt.Layout([(0, 4, [(4, 3), (7, 2)]), (9, 5, [])])
    N = layout.tokens
    sees = torch.zeros(N, N, dtype=torch.bool)                            # [query, key]
    for start, n, suffixes in layout.groups:
        sees[start:start + n, start:start + n] = torch.ones(n, n, dtype=torch.bool).tril()
        for s, m in suffixes:
            sees[s:s + m, start:start + n] = True
            sees[s:s + m, s:s + m] = torch.ones(m, m, dtype=torch.bool).tril()
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, h, N, 8, requires_grad=True) for h in (4, 2, 2))
    out, _ = shared_prompt.attention(None, q, k, v, layout, scaling=0.3)                  # [1, N, 4, 8]
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=sees,
                                         scale=0.3).transpose(1, 2)
    torch.testing.assert_close(out, ref)
    grads = [torch.autograd.grad(x.sum(), (q, k, v)) for x in (out * torch.arange(8.0), ref * torch.arange(8.0))]
    for g, h in zip(*grads):
        torch.testing.assert_close(g, h)


def test_the_cuda_suffix_mask_means_the_cpu_one():
    """On CUDA a suffix attends under torch's CausalBias (lower right), elsewhere under a bool tensor: the
    same attention, values and gradients (checked here on CPU, where both run)."""
    from torch.nn.attention.bias import causal_lower_right
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, t, 8, requires_grad=True) for t in (3, 7, 7))
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(3, 7), scale=0.3)
    b = F.scaled_dot_product_attention(q, k, v, attn_mask=shared_prompt.suffix_mask(3, 4, q.device), scale=0.3)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(torch.autograd.grad(a.sum(), (q, k, v)), torch.autograd.grad(b.sum(), (q, k, v)))
    assert shared_prompt.suffix_mask(2, 3, q.device).tolist() == [[True] * 4 + [False], [True] * 5]


@pytest.mark.parametrize("name", ["toy", "real-shape"])
def test_shared_row_gives_the_padded_log_probs_and_gradients(name):
    """One forward and backward of the same episodes, right-padded and shared: equal log-probs and gradients,
    and the row holds each group's prompt once (the toy's episodes crop: their images follow the prompt)."""
    if name == "toy":
        agent = policy.load_agent(f"{ROOT}/toy/base", dtype=torch.float32)
        tasks = toy.world.make_tasks(3, seed=3)
        episodes = lfpc.rollout(agent, tasks, 3, toy.world.rollout_config(global_max_pixels=16 * 784), seed=1)
        assert all(len(e.images) >= 2 for e in episodes), "a crop after the prompt"
    else:
        agent = models.real_shape_agent(QWEN_TOKENIZER)
        tasks = [lfpc.Task(noise_image(300 + 120 * k, 200, k), "What colour is the sign?", "red") for k in range(2)]
        cfg = lfpc.RolloutConfig(global_max_pixels=64 * 784, max_new_tokens=6, max_turns=1, use_tool=False)
        episodes = lfpc.rollout(agent, tasks, 3, cfg, seed=1)
    out = {}
    for shared in (False, True):
        agent.model.zero_grad(set_to_none=True)
        batch = batches.collate(agent, episodes, packed=shared, share_prompt=shared)
        lp = batch.unpacked(lfpc.token_logprobs(agent.model, batch))                     # [B, T]
        (lp * torch.linspace(1, 2, lp.shape[1])).sum().backward()
        out[shared] = lp.detach(), {n: p.grad.clone() for n, p in agent.model.named_parameters() if p.grad is not None}
        if shared:
            prompts = [shared_prompt.prompt_length(e.loss_mask) for e in episodes]
            assert batch.input_ids.shape[1] == sum(len(e.token_ids) for e in episodes) - 2 * sum(prompts[::3])
            assert batch.shared == 2 * sum(prompts[::3]) and batch.image_encodes == len({id(i) for e in episodes
                                                                                        for i in e.images})
    torch.testing.assert_close(out[True][0], out[False][0], rtol=0, atol=1e-5)
    assert out[True][1].keys() == out[False][1].keys()
    for n, g in out[False][1].items():
        torch.testing.assert_close(out[True][1][n], g, rtol=1e-4, atol=1e-5, msg=n)


def test_group_chunks_by_hand():
    # longest first: 300 (+ the prompt 40 = 340); 100 would make 440 > 400: a new chunk; 50 joins it (190);
    # 20 would be a third episode over max_rows 2: a chunk of its own. Each chunk runs the prompt once.
    assert batches.group_chunks([100, 50, 300, 20], 40, max_rows=2, max_tokens=400) == [[2], [0, 1], [3]]
    assert batches.group_chunks([100, 50, 300, 20], 40, max_rows=16) == [[2, 0, 1, 3]]
    assert batches.group_chunks([500], 40, max_rows=4, max_tokens=100) == [[0]]        # over the bound: alone


@pytest.mark.parametrize("seed", range(6))
def test_pack_groups_keeps_groups_together_within_both_budgets(tiny, seed):
    rng = random.Random(seed)
    tagged = []
    for g in range(rng.randint(1, 8)):
        prompt = [5, 6, g + 10] + [7] * rng.randint(0, 40)
        for _ in range(rng.randint(1, 5)):
            own = rng.randint(1, 60)
            tagged.append((g, Row(prompt + [8] * own, [0] * len(prompt) + [1] * own)))
    rng.shuffle(tagged)
    rows = [r for _, r in tagged]
    groups = [[i for i, (g, _) in enumerate(tagged) if g == k] for k in sorted({g for g, _ in tagged})]
    assert sorted(map(sorted, batches.prompt_groups(tiny, rows))) == sorted(groups)     # built here, not by it
    max_rows, max_tokens = rng.randint(2, 8), rng.randint(60, 300)
    packed = batches.pack_groups(tiny, rows, max_rows, max_tokens)
    assert sorted(i for b in packed for i in b) == list(range(len(rows)))
    for b in packed:
        row = batches.collate(tiny, [rows[i] for i in b], packed=True, share_prompt=True).input_ids.shape[1]
        assert len(b) == 1 or (len(b) <= max_rows and row <= max_tokens)
    where = {i: k for k, b in enumerate(packed) for i in b}
    for g in groups:                                              # a group is split only where it must be
        chunks = {where[i] for i in g}
        prompt = shared_prompt.prompt_length(rows[g[0]].loss_mask)
        need = sum(len(rows[i].token_ids) - prompt for i in g) + prompt
        assert len(chunks) == 1 or len(g) > max_rows or need > max_tokens


def test_an_eager_model_is_refused_with_the_fix(tiny):
    model = models.tiny_agent(seed=1).model
    model.config.get_text_config()._attn_implementation = "eager"
    with pytest.raises(ValueError, match="--pack on/off"):
        shared_prompt.install(model)


def test_lora_with_the_rollouts_features_and_a_reference_model_train_the_same_shared(toy_base):
    """LoRA: the rollout's image features (FeatureStore) fill a shared row in its own block order, and the
    reference model (beta > 0) reads the same row: the update's gradients and kl_ref equal the padded path's
    (fp32 here: under the bf16 base the two layouts round differently, ~1e-4 in a log-prob on the toy)."""
    import train
    from support import engine, policy
    a = train.parse_args(["--stage", "1", "--model", toy_base, "--lora", "4", "--global-image", "full",
                          "--n-train", "8", "--prompts", "2", "--group", "3", "--micro-batch", "6",
                          "--max-new-tokens", "8", "--beta", "0.1"])
    agent = policy.load_model(a)
    agent.model.float()                           # the layouts compared in fp32 (the bf16 base rounds differently)
    for name, p in agent.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    ref = policy.load_model(a).model.float()
    tasks = train.load_data(a, agent)[:2]
    store = engine.FeatureStore()
    episodes, _ = train.collect_episodes(a, agent, tasks, toy.world.rollout_config(max_new_tokens=8, max_turns=2), 0,
                                         store=store)
    for i, e in enumerate(episodes):
        e.reward = float(i % 2)
    out = {}
    for mode, s in (("off", None), ("shared", store)):
        a.pack = mode
        agent.model.zero_grad(set_to_none=True)
        opt = torch.optim.SGD([p for p in agent.model.parameters() if p.requires_grad], lr=0.0)
        real = opt.zero_grad
        opt.zero_grad = lambda set_to_none=True: None                      # keep the gradients to compare
        m = train.update_policy(a, agent, opt, episodes, tasks, ref_model=ref, store=s)
        opt.zero_grad = real
        out[mode] = m, {n: p.grad.clone() for n, p in agent.model.named_parameters() if p.grad is not None}
    assert out["shared"][0]["work/train_image_encodes"] == 0 < out["off"][0]["work/train_image_encodes"]
    assert out["shared"][0]["work/train_shared_frac"] > 0
    assert out["off"][0]["loss/kl_ref"] > 0
    assert out["shared"][0]["loss/kl_ref"] == pytest.approx(out["off"][0]["loss/kl_ref"], rel=1e-4)
    assert out["off"][1]
    for n, g in out["off"][1].items():
        torch.testing.assert_close(out["shared"][1][n], g, rtol=1e-4, atol=1e-6, msg=n)
