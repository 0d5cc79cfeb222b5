"""Run by tests/test_dist.py, alone (`python`) or under `torchrun --nproc_per_node 2`: one train.py update
of a fixed set of episodes (2 tasks x 4 rollouts of the tiny toy model, the same on every rank), each rank
rolling out its share; writes the updated weights (gathered whole) to OUT.

    python tests/dist_worker.py {lora|full} OUT
"""
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import lfpc  # noqa: E402
import train  # noqa: E402
from support import dist  # noqa: E402
from support import policy  # noqa: E402
import toy.world  # noqa: E402

mode, out = sys.argv[1], sys.argv[2]
# a log-prob head of 3 tokens a chunk: the ranks' chunk counts differ (they sample different lengths)
lfpc.token_logprobs = functools.partial(lfpc.token_logprobs, chunk=3)
w = dist.setup()
torch.manual_seed(0)
agent = toy.world.agent(seed=0)
a = train.Args(lr=1.0, lora=4 if mode == "lora" else 0, group=4, micro_batch=2, train_tokens=1 << 20, temperature=1.0,
               max_turns=2, max_new_tokens=8, max_response_tokens=16)
if a.lora:
    agent.model = agent.model.to(torch.bfloat16)
    agent = policy.apply_lora(agent, a.lora)
    for name, p in agent.model.named_parameters():        # B starts at 0: give the adapters a gradient everywhere
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(len(name)))
elif w.distributed:
    dist.shard(agent.model, w)
tasks = toy.world.eval_tasks(2)
cfg = toy.world.rollout_config(max_new_tokens=8, max_response_tokens=16, max_turns=2, temperature=1.0)
mine, first = dist.share(tasks, w)
episodes, _ = train.collect_episodes(a, agent, mine, cfg, step=0, first=first * a.group)
for i, e in enumerate(episodes):                          # rewards that differ inside each group
    e.reward = float((first * a.group + i) % 3)
opt = torch.optim.SGD([p for p in agent.model.parameters() if p.requires_grad], lr=1e-3)
m = train.update_policy(a, agent, opt, episodes, mine, w=w)
state, _ = dist.full_state(agent.model, opt, w)
state = state if state is not None else agent.model.state_dict()
if w.main:
    torch.save({"weights": {k: v.detach().float().cpu() for k, v in state.items()}, "metrics": m,
                "tokens": [e.token_ids for e in episodes]}, out)
dist.barrier(w)
