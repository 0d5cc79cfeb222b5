"""LFPC training: stage 1 (information gap) and stage 2 (grounding), hand-written GRPO.

    python train.py --stage 1            # toy preset: the shipped base on the toy world, CPU, minutes
    python train.py --stage 2            # toy: continues from runs/stage1/ckpt with the grounding reward
    python train.py --stage 1 --preset one-gpu --data train.jsonl        # 7B, LoRA r64, one 80 GB GPU
    python train.py --stage 1 --preset paper --data train.jsonl          # the paper's set-up (needs 8 x A100)
    python train.py --stage 1 --resume   # continue the run in --out exactly where it stopped

Each step: sample `prompts` tasks, roll out `group` episodes each (multi-turn, crop tool),
reward them, group-normalise the advantages, and take ONE optimizer step on the clipped token
loss, in micro-batches whose losses are divided by the token count of the whole step.
`--preset` (support/presets.py) fills every flag left unset; flags always win.

Stage 1 shows each task's global image at its information-gap budget (`info_gap.py`: the highest
budget at which the model's direct answer stops agreeing with its full-resolution answer; probed
once and cached); crops always come from the original. `--global-image full` shows the full image
instead: the DeepEyes-style baseline (the paper's "global and crop source at the same resolution",
exactly so for images within --full-tokens; a larger original is shown at --full-tokens while its
crops are still cut from it). Stage 2 adds LFPC's grounding reward on tasks with nested
boxes, paid on the FIRST successful crop's box (`rewards.stage2_reward`, `--stage2-mode`).

Metrics (one line a step in <out>/metrics.jsonl; names and populations in support/metrics.py): the
episode metrics (acc, tool/*, box/*, format/*, stop/*, len/*), reward/mean and reward/<part>,
adv/frac_zero_std, loss/policy (the summed clipped loss: at ratio 1, -sum A_i n_i / N, how length goes with reward;
watch the reward, grpo.py),
loss/clip_frac, loss/ratio_mean, loss/approx_kl, loss/grad_norm, loss/trained_episodes, loss/sampler_gap; work/* (the
rollout engine's image encodes, vision patches, prefill and decode tokens, distinct context tokens,
prefill ratio) and time/* (rollout, log-prob forwards, update, step, in seconds).

Departures from the paper, on purpose:
- One GRPO update per batch (the paper's mini-batch count is unpublished), so the "old" policy is the
  current one: old log-probs are the training forward's own, detached (the ratio is exactly 1 and
  clipping never fires). The rollout's log-probs (KV cache, another batch shape, bf16 sampling) never
  enter the update; their distance to the training forward's is logged as loss/sampler_gap (mean
  |log p_train - log p_sample| over sampled tokens), a check that sampler and trainer see one policy.
- Token-mean aggregation over the whole step (DeepEyes); no KL (beta 0, no reference model
  loaded) and no entropy term, as the paper. Advantages (r - mean) / (sample std + 1e-6) (verl).
- Episodes whose advantage is exactly 0 (every episode of an all-equal group; rarely one at its
  group's mean) are not forwarded: their gradient is exactly 0, but their tokens still count in the
  step's token total, so the gradient is unchanged.
- Binary search over a resolution ladder instead of the paper's level-by-level scan.
- Unpublished, so chosen here: AdamW betas (0.9, 0.999) without weight decay; gradients clipped to norm
  1.0, and a step whose norm is not finite or above 1e3 skipped (loss/skipped); stage 2's global image
  keeps stage 1's rule: its tasks are probed for their information gap with the model stage 2 starts
  from (the stage-1 checkpoint), cached in its own --out (`--global-image full` shows them whole).
- Toy preset: lr 1e-4 (2e-5 left the toy flat over 60 steps), 8 prompts x 8 rollouts, 60 steps,
  fp32 on CPU. Paper preset: lr 1e-6, 256 x 16 (paper), gradient checkpointing, bf16 autocast over
  fp32 master weights. One-gpu preset: LoRA r64 (alpha 128) on the language model's projections, the
  frozen base in bf16, the adapters and their AdamW state in fp32; 32 prompts x 16 rollouts a step
  (an eighth of the paper's prompts over the same 80 steps) and the paper's lr 1e-6 kept, untuned for
  LoRA (adapters often want a higher one: unmeasured at this scale).
- Precision: rollouts, the info-gap prober and the training forward all run under the same
  `precision` (bf16 autocast on a GPU), so the policy that samples is the policy that is trained.
- Speed, not method: the training forward computes a group's prompt (system text, question, global
  image) ONCE for the episodes of the group in each micro-batch (`--pack shared`, the default under sdpa
  or flash attention; support/shared_prompt.py). Exact: log-probs and gradients equal the padded
  forward's (tested); work/train_shared_frac is the share of the episodes' tokens this skipped.
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, replace

import torch

import crop_tool
import grpo
import info_gap
import lfpc
import rewards
from support import batches, checkpoint, data, dist, engine, metrics, policy, presets, shared_prompt
from support.judge import Judge, RuleJudge, make_judge
from support import train_args
from support.train_args import Args


def parse_args(argv=None) -> Args:
    """The command line: every flag in support/train_args.py, the preset filling the rest, ranges checked."""
    return train_args.parse_args(argv, __doc__)


SKIP_GRAD_NORM = 1e3     # a step whose gradient norm (before clipping) exceeds this is skipped, not taken
MAX_NORM_GROWTH = 10.0   # an update that multiplies the weights' norm by more stops the run, before any save
MAX_BAD_STEPS = 3        # skipped steps in a row that stop the run
COLLAPSE_DROP = 0.5      # a format-valid rate this far below the run's best, and below it, stops the run: the
                         # weights look sane (the norm guard passes) but the policy no longer writes turns


def main(argv=None) -> None:
    w = dist.setup()                                   # a world of one unless launched by torchrun
    a = parse_args(argv)
    a.device = dist.device(w, a.device)
    if a.prompts % w.size:
        raise SystemExit(f"--prompts {a.prompts} must divide by the {w.size} ranks (whole GRPO groups per rank)")
    run = checkpoint.RunFolder(a.out)
    if w.main:
        run.check_writable()                           # a read-only, full or misnamed --out: before any work
    saved = None
    if a.resume:
        a, saved = train_args.resume_args(a, run, train_args.given_flags(argv, __doc__), w)
    elif run.used():
        raise SystemExit(f"{a.out} already holds a run ({', '.join(run.used())}): pass --resume to continue it, "
                         f"or another --out for a new run")
    dist.barrier(w)                                    # every rank has looked at the folder before rank 0 writes
    if w.main:
        run.lock()
        if not a.resume:
            run.write_run({"args": asdict(a), "world_size": w.size})
    dist.barrier(w)
    try:
        with checkpoint.StopSignal() as stop:          # SIGTERM / SIGINT: stop cleanly at the next safe point
            try:
                train(a, run, saved, w, stop)
            except checkpoint.Preempted as e:
                print(f"{stop.requested}: {e}. Continue (the cache is kept, its items not probed again) with:\n"
                      f"  python train.py --resume --out {a.out}", file=sys.stderr)
                raise SystemExit(stop.code) from None
            except checkpoint.CheckpointError as e:
                raise SystemExit(str(e)) from None
    finally:
        if w.main:
            run.unlock()


def train(a: Args, run: checkpoint.RunFolder, saved: dict | None, w: dist.World = dist.World(),
          stop: checkpoint.StopSignal | None = None) -> None:
    """The run: data, model, information gap, then the steps, a checkpoint every --save-every. After `stop`
    is requested (SIGTERM, SIGINT) the run ends after its current step with a checkpoint (in the prober:
    checkpoint.Preempted after its current batch, the cache kept)."""
    stop = stop or checkpoint.StopSignal()
    tasks = read_tasks(a)                               # every data problem, before the model loads
    random.seed(a.seed)
    torch.manual_seed(a.seed)
    agent = policy.load_model(a, os.path.join(a.out, "ckpt") if saved else "")
    if a.prompt:
        agent = replace(agent, style=a.prompt)
    if agent.device.type == "cuda":                    # before hours of probing and rollouts, not at the first step
        problem = policy.training_state_problem(sum(p.numel() for p in agent.model.parameters()), a.lora, w.size,
                                                torch.cuda.get_device_properties(agent.device).total_memory)
        if problem:
            raise SystemExit(problem)
    if pack_mode(a, agent.model) == "shared":          # --pack shared on an attention it cannot route: now, not
        try:                                           # after the probing and the first rollout
            shared_prompt.install(agent.model)
        except ValueError as e:
            raise SystemExit(f"--pack: {e}")
    if w.main:                                         # the weights and AdamW's two moments of what trains
        trained = sum(p.numel() * (p.element_size() + 8) for p in agent.model.parameters() if p.requires_grad)
        frozen = sum(p.numel() * p.element_size() for p in agent.model.parameters() if not p.requires_grad)
        run.check_space(trained + (0 if a.lora else frozen))          # a LoRA run saves its adapters only
    if w.distributed and not a.lora:
        dist.shard(agent.model, w)                     # FSDP2: full fine-tuning needs the training state sharded
    a.judge_cache = a.judge_cache or os.path.join(a.out, "judge_cache.jsonl")
    judge = make_judge(a.judge, a.judge_url, a.judge_model, a.judge_cache,
                       **({"timeout": a.judge_timeout} if a.judge == "llm" else {}))
    cfg = rollout_config(a)
    if (why := lfpc.prompt_problem(agent, tasks, cfg)):             # before hours of probing
        raise SystemExit(f"--data: {why}")
    set_budgets(a, agent, tasks, judge, w, stop)
    ref_model = None
    if a.beta > 0:                     # a frozen copy of the starting policy (doubles the weights in memory)
        ref_model = policy.load_agent(a.model, device=a.device, dtype=policy.base_dtype(a)).model.eval().requires_grad_(False)
    params = [p for p in agent.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(dist.param_groups(params), lr=a.lr, betas=(0.9, 0.999), weight_decay=0.0,
                            fused=agent.device.type == "cuda")           # fused: no full-size temporaries
    start = 0
    if saved:
        dist.load_optimizer(agent.model, opt, saved["optimizer"])
        for group in opt.param_groups:
            group["lr"] = a.lr                                           # --resume --lr applies
        start = saved["step"]
        random.setstate(saved["rng"]["python"])
        torch.set_rng_state(saved["rng"]["torch"])
        if w.main:
            run.truncate_metrics(start)
    order = random.Random(a.seed).sample(range(len(tasks)), len(tasks))   # data order, epoch after epoch
    budgets = ([t.max_pixels // crop_tool.TOKEN_PIXELS for t in tasks] if a.global_image == "info-gap" else None)
    curves = os.path.join(a.out, "curves.png")
    bad, best_valid = 0, 0.0
    for step in range(start, a.steps):
        t0 = time.time()
        pos = step * a.prompts
        batch_tasks = [tasks[order[(pos + i) % len(tasks)]] for i in range(a.prompts)]
        m = train_step(a, agent, opt, batch_tasks, cfg, step, ref_model, judge, w)
        m.update({"step": step + 1, "time/step_s": round(time.time() - t0, 2)})
        if w.main:
            run.log(m)
            print(console_line(m, a.steps), flush=True)        # the full record: metrics.jsonl
        valid = m.get("format/valid_rate")
        if valid is not None and best_valid - valid >= COLLAPSE_DROP and valid < COLLAPSE_DROP:
            raise SystemExit(f"format-valid rate fell from {best_valid:.2f} to {valid:.2f} at step {step + 1}: the "
                             f"update of step {step} destroyed the policy (--lr {a.lr:g} too high?); nothing was saved "
                             f"from this step and a checkpoint of step {step} (if --save-every wrote one) holds the "
                             f"damage: continue from an earlier checkpoint with a lower --lr")
        best_valid = max(best_valid, valid or 0.0)
        bad = bad + 1 if "loss/skipped" in m else 0
        if bad >= MAX_BAD_STEPS:
            raise SystemExit(f"{bad} steps in a row skipped (non-finite or exploding gradients): stopping; the last "
                             f"good checkpoint is in {a.out} (lower --lr?)")
        stopping = dist.all_sum(float(stop()), w) > 0               # every rank stops after the same step
        if (step + 1) % a.save_every == 0 or step + 1 == a.steps or stopping:
            model_state, opt_state = dist.full_state(agent.model, opt, w)     # every rank: a collective
            if w.main:
                run.save(lambda folder: policy.save_agent(agent, folder, model_state),
                         {"optimizer": opt_state, "step": step + 1, "args": asdict(a), "world_size": w.size,
                          "rng": {"python": random.getstate(), "torch": torch.get_rng_state()}})
                metrics.plot_curves({"run": [run.metrics]}, metrics.CURVES, curves, budgets)
            dist.barrier(w)
        if stopping and step + 1 < a.steps:
            if w.main:
                print(f"{stop.requested or 'a signal on another rank'}: stopped after step {step + 1} of {a.steps}; "
                      f"checkpoint {os.path.join(a.out, 'ckpt')}. Continue exactly where it stopped with:\n"
                      f"  python train.py --resume --out {a.out}", file=sys.stderr, flush=True)
            raise SystemExit(stop.code or 143)
    if w.main:
        print(run_summary(a, run.read_metrics(), os.path.join(a.out, "ckpt"), curves))


# ----------------------------------------------------------------------------- what the console says

CONSOLE = (("acc", "acc", "{:.2f}"), ("reward/mean", "reward", "{:.2f}"), ("tool/call_rate", "tool", "{:.2f}"),
           ("box/iou_b1", "iou", "{:.2f}"))
SUMMARY = (("acc", "accuracy"), ("reward/mean", "reward"), ("tool/call_rate", "tool-call rate"),
           ("box/iou_b1", "first box IoU with B1"))


def console_line(m: dict, steps: int) -> str:
    """One short line a step: step, accuracy, reward, tool-call rate, box IoU (when boxes), seconds a step."""
    parts = [f"step {m['step']}/{steps}"]
    parts += [f"{short} {fmt.format(m[k])}" for k, short, fmt in CONSOLE if m.get(k) is not None]
    parts.append(f"{m['time/step_s']:.1f} s/step" + (" SKIPPED (bad gradient)" if "loss/skipped" in m else ""))
    return "  ".join(parts)


def run_summary(a: Args, rows: list[dict], ckpt: str, curves: str) -> str:
    """What happened (the first and the last tenth of the run), where it is, and what to run next."""
    n = len(rows)
    k = max(1, n // 10)
    head, tail = rows[:k], rows[-k:]
    lines = [f"\nstage {a.stage}: {n} steps in {a.out} (first {k} vs last {k} step(s))"]
    for key, name in SUMMARY:
        first, last = metrics.mean(r[key] for r in head if r.get(key) is not None), \
            metrics.mean(r[key] for r in tail if r.get(key) is not None)
        if first is not None and last is not None:
            lines.append(f"  {name:<22} {first:.3f} -> {last:.3f}")
    lines += [f"checkpoint: {ckpt}", f"curves:     {curves}", f"metrics:    {os.path.join(a.out, 'metrics.jsonl')}"]
    data = "" if a.preset == "toy" else " --data YOUR_EVAL.jsonl"
    if a.stage == 1:
        stage2 = "python train.py --stage 2" + ("" if ckpt == os.path.join("runs", "stage1", "ckpt") else f" --model {ckpt}")
        stage2 += "" if a.preset == "toy" else f" --preset {a.preset} --data YOUR_BOXED.jsonl"
        lines.append(f"next:       {stage2}")
    lines.append(f"evaluate:   python eval.py --preset {a.preset} --model {ckpt}{data}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- one step

def train_step(a: Args, agent: lfpc.Agent, opt, tasks: list[lfpc.Task], cfg: lfpc.RolloutConfig,
               step: int, ref_model=None, judge: Judge | None = None, w: dist.World = dist.World()) -> dict[str, float]:
    """One GRPO step: roll out, reward, one optimizer step. Returns the step's metrics (over every rank's
    episodes). Under torchrun each rank takes its share of `tasks`."""
    t0 = time.perf_counter()
    asked = dict(judge.stats) if judge is not None else {}
    mine, offset = dist.share(tasks, w)
    store = engine.FeatureStore() if policy.vision_frozen(agent) else None    # LoRA: training reuses the features
    episodes, work = collect_episodes(a, agent, mine, cfg, step, offset * a.group, store)
    score(a, episodes, mine, judge or RuleJudge())
    t_rollout = time.perf_counter() - t0
    m = update_policy(a, agent, opt, episodes, mine, ref_model, judge, w, store)
    work = engine.Work(**{k: int(dist.all_sum(v, w)) for k, v in work.__dict__.items()})
    if a.judge == "llm":        # what the model judge did this step (a fallback: the rules decided)
        m.update({f"judge/{k}": int(dist.all_sum(judge.stats[k] - asked.get(k, 0), w))
                  for k in ("calls", "requests", "cached", "fallbacks", "skipped")})
    return {**m, **work.metrics(), "time/rollout_s": t_rollout}


def collect_episodes(a: Args, agent: lfpc.Agent, tasks: list[lfpc.Task], cfg: lfpc.RolloutConfig, step: int,
                     first: int = 0, store: engine.FeatureStore | None = None) -> tuple[list[lfpc.Episode], engine.Work]:
    """`a.group` rollouts of each task and what the rollout engine did. Episode k samples from stream
    (seed, step, first + k): `first` is the index of this rank's first episode in the whole step (0 alone)."""
    agent.model.eval()
    work = engine.Work()
    seed = a.seed * 1_000_000_007 + step * 1_000_003 + first       # disjoint streams for every step and episode
    with policy.precision(agent), dist.gathered(agent.model), policy.sampler(agent) as sampler:   # LoRA: merged
        episodes = lfpc.rollout(sampler, tasks, a.group, cfg, seed=seed, work=work, store=store)   # update's precision
    return episodes, work


def score(a: Args, episodes: list[lfpc.Episode], tasks: list[lfpc.Task], judge: Judge) -> None:
    """Fill episode.reward and episode.reward_parts; `judge` decides whether the answer is right."""
    w = rewards.RewardWeights(a.w_acc, a.w_format, a.w_tool, a.w_geo)
    for e in episodes:
        t = tasks[e.task_index]
        acc = judge.correct(e.answer, t.answer, t.choices, t.question)
        if a.stage == 1:
            e.reward, e.reward_parts = rewards.outcome_reward(e.answer, t.answer, t.choices, e.malformed_turns,
                                                              len(e.crops), w, acc)
        else:
            box = e.crops[0].box_original if e.crops else None
            e.reward, e.reward_parts = rewards.stage2_reward(
                e.answer, t.answer, t.choices, e.malformed_turns, len(e.crops), box, t.boxes,
                t.image_size, w, a.tau, a.omega, a.stage2_mode, acc)


def update_policy(a: Args, agent: lfpc.Agent, opt, episodes: list[lfpc.Episode], tasks: list[lfpc.Task],
                  ref_model=None, judge: Judge | None = None, w: dist.World = dist.World(),
                  store: engine.FeatureStore | None = None) -> dict[str, float]:
    """Group-normalised advantages, the clipped loss over micro-batches (divided by the token count of the
    WHOLE step: of every rank under torchrun), one optimizer step. Returns the step's metrics, with
    time/forward_s (the log-prob forwards) and time/update_s (all of it)."""
    t_start, t_forward = time.perf_counter(), 0.0
    model = agent.model
    adv, adv_m = grpo.group_advantages(torch.tensor([e.reward for e in episodes]), a.group)
    num_tokens = dist.all_sum(sum(e.num_generated for e in episodes), w)   # the WHOLE step's token count
    num_seqs = dist.all_sum(len(episodes), w)
    # Episodes with advantage 0 have zero policy gradient: not forwarded (their tokens still count), unless a
    # KL term gives every token a gradient.
    live = [i for i in range(len(episodes)) if adv[i] != 0 or a.beta > 0]
    model.train()
    opt.zero_grad(set_to_none=True)
    mode = pack_mode(a, model)    # shared: a padding-free row, each group's prompt once; on: a row; off: padded
    micro = [[live[j] for j in mb] for mb in batches.training_batches(agent, [episodes[i] for i in live], mode,
                                                                       a.micro_batch, a.train_tokens)]
    micro = dist.micro_batches(micro, w, model)       # under FSDP2 every rank runs as many (a repeat weighs 0)
    tally = metrics.UpdateTally()
    for idx in micro:
        weight = float(w.size if idx is not None else 0)      # x world size: the ranks' average is the sum
        idx = idx if idx is not None else [0]
        batch = batches.collate(agent, [episodes[i] for i in idx], store=store, packed=mode != "off",
                               share_prompt=mode == "shared")                 # store: no vision tower
        t0 = time.perf_counter()
        with policy.precision(agent):
            lp = batch.unpacked(lfpc.token_logprobs(model, batch, a.temperature))       # [b, T]
            ref = None
            if ref_model is not None:
                with torch.no_grad():
                    ref = batch.unpacked(lfpc.token_logprobs(ref_model, batch, a.temperature))   # [b, T]
        t_forward += _elapsed(t0, agent.device)
        mask, sampled = batch.unpacked(batch.loss_mask), batch.unpacked(batch.sampling_logprobs)   # [b, T]
        # One update per batch: the old policy IS the current one, so its log-probs are this forward's own,
        # detached (ratio exactly 1, in the precision of the update). The sampler's are only compared.
        loss, m = grpo.policy_loss(lp, lp.detach(), adv[idx].to(lp.device), mask, clip_low=a.clip,
                                   clip_high=a.clip, agg=a.agg, num_tokens=num_tokens, num_seqs=num_seqs,
                                   ref_logprobs=ref, beta=a.beta)
        (loss * weight if w.distributed else loss).backward()           # every rank the same backwards (FSDP2)
        tally.add(batch, loss, m, lp.detach(), sampled, mask, counted=bool(weight))
    params = [p for p in model.parameters() if p.requires_grad]
    dist.average_gradients(params, w)
    grad_norm = dist.grad_norm(params, w, 1.0) if w.distributed else float(torch.nn.utils.clip_grad_norm_(params, 1.0))
    lm, skip, forward_work = tally.total(w, kl=a.beta > 0, trained=len(live))    # over every rank: one collective
    if skip or not math.isfinite(grad_norm) or grad_norm > SKIP_GRAD_NORM:
        opt.zero_grad(set_to_none=True)                                   # a step that would wreck the weights
        return {**step_metrics(episodes, tasks, judge, adv_m, {"grad_norm": grad_norm}, w), "loss/skipped": 1.0}
    norm_before = _weight_norm(params, w)
    opt.step()
    opt.zero_grad(set_to_none=True)                                       # the rollout of the next step holds no gradients
    norm_after = _weight_norm(params, w)
    if not math.isfinite(norm_after) or norm_after > MAX_NORM_GROWTH * norm_before:
        raise SystemExit(f"the update blew the weights up (norm {norm_before:.4g} -> {norm_after:.4g}); nothing was "
                         f"saved from this step: resume from the last checkpoint with a lower --lr")
    lm.update(grad_norm=grad_norm)
    m = step_metrics(episodes, tasks, judge, adv_m, lm, w)
    m.update({"time/forward_s": t_forward, "time/update_s": _elapsed(t_start, agent.device), **forward_work})
    return m


def pack_mode(a: Args, model) -> str:
    """--pack: shared, on, off, or auto (shared where support/shared_prompt.py routes the attention, else off)."""
    if a.pack != "auto":
        return a.pack
    return "shared" if getattr(model.config.get_text_config(), "_attn_implementation", "") in shared_prompt.SUPPORTED \
        else "off"


def _weight_norm(params: list, w: dist.World) -> float:
    if w.distributed:
        return dist.weight_norm(params, w)
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.detach().float()) for p in params])))


def _elapsed(t0: float, device: torch.device) -> float:
    """Seconds since t0, after the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def step_metrics(episodes, tasks, judge, adv_metrics, loss_metrics, w: dist.World = dist.World()) -> dict[str, float]:
    """The step's line of metrics.jsonl (support/metrics.py): episode metrics, rewards, advantages, loss; under
    torchrun over every rank's episodes."""
    if w.distributed:
        episodes, tasks, zero_std = dist.gather_episodes(episodes, tasks, adv_metrics["frac_zero_std"], w)
        adv_metrics = {"frac_zero_std": zero_std}
    n = len(episodes)
    m = metrics.episode_metrics(episodes, tasks, judge)
    m["reward/mean"] = sum(e.reward for e in episodes) / n
    for part in sorted({p for e in episodes for p in e.reward_parts} - {"total"}):
        m[f"reward/{part}"] = sum(e.reward_parts.get(part, 0.0) for e in episodes) / n
    m["adv/frac_zero_std"] = adv_metrics["frac_zero_std"]
    m.update({f"loss/{k}": v for k, v in loss_metrics.items()})
    return m


# ----------------------------------------------------------------------------- data and model

def read_tasks(a: Args) -> list[lfpc.Task]:
    """The training tasks, every row checked (data.load_tasks), before any model loads."""
    if a.data:
        try:
            tasks = data.load_tasks(a.data)
        except data.DataError as e:
            raise SystemExit(f"--data: {e}") from None
    else:       # a preset that generates its world's tasks (toy: stage 2 gets a small, disjoint annotated set)
        tasks = presets.get(a.preset)["tasks"](a.stage, a.n_train)
    if a.stage == 2 and any(not t.boxes for t in tasks):
        raise SystemExit(f"stage 2 needs 'bboxes' on every task; {sum(not t.boxes for t in tasks)} lack them")
    return tasks


def set_budgets(a: Args, agent: lfpc.Agent, tasks: list[lfpc.Task], judge: Judge | None = None,
                w: dist.World = dist.World(), stop=None) -> None:
    """Each task's global budget: --full-tokens for all (--global-image full), the budget a row carries
    (info_gap.py --out writes it; kept), or else the information gap, probed with the model and cached. Under torchrun
    the ranks probe every w.size-th item each, each into its own part of the cache; the records are
    merged, and rank 0 appends the parts to the cache."""
    if a.global_image == "full":
        for t in tasks:
            t.max_pixels = a.full_tokens * crop_tool.TOKEN_PIXELS
        return
    given = [t for t in tasks if t.max_pixels]
    tasks = [t for t in tasks if not t.max_pixels]          # rows that carry a budget keep it; only the rest are probed
    if given and w.main:
        print(f"info gap: {len(given)} task(s) carry their budget (max_pixels), kept; {len(tasks)} to probe")
    if not tasks:
        return
    cache = a.gap_cache or os.path.join(a.out, "info_gap_cache.jsonl")
    part = f"{cache}.rank{w.rank}" if w.distributed else None
    mine = tasks[w.rank::w.size]
    with policy.precision(agent), dist.gathered(agent.model), policy.sampler(agent) as sampler:
        try:
            records = info_gap.probe(mine, sampler, prober_config(a), os.path.abspath(a.model), cache,
                                     batch_size=a.rollout_batch, judge=judge, write_path=part,
                                     batch_tokens=a.rollout_tokens, prefill_tokens=a.prefill_tokens, stop=stop)
        except info_gap.CacheError as e:
            raise SystemExit(f"--gap-cache: {e}") from None
    if w.distributed:
        merged = dist.gather(records, w)
        records = [merged[i % w.size][i // w.size] for i in range(len(tasks))]
        if w.main:
            info_gap.merge_parts(cache, [f"{cache}.rank{r}" for r in range(w.size)])
        dist.barrier(w)
    if w.main:
        print("info gap:", json.dumps(info_gap.summarize(records)))
    for t, r in zip(tasks, records):
        t.max_pixels = r["max_pixels"]


def load_data(a: Args, agent: lfpc.Agent) -> list[lfpc.Task]:
    """read_tasks, then set_budgets (support/bench.py and tests: one call)."""
    tasks = read_tasks(a)
    set_budgets(a, agent, tasks)
    return tasks


def rollout_config(a: Args) -> lfpc.RolloutConfig:
    """The rollouts' settings from the run's flags (support/bench.py's toy step and .ci/gpu_train take the same)."""
    return presets.rollout_config(a, a.full_tokens, temperature=a.temperature, batch_size=a.rollout_batch,
                                  batch_tokens=a.rollout_tokens, engine=a.engine, sync_every=a.sync_every,
                                  prefill_tokens=a.prefill_tokens, top_p=a.top_p, decode=a.decode)


def prober_config(a: Args) -> info_gap.ProberConfig:
    """The information-gap prober's settings from the run's flags (the same object info_gap.py's CLI builds)."""
    return info_gap.ProberConfig(full_tokens=a.full_tokens, floor_tokens=a.floor_tokens, k=a.probe_k,
                                 temperature=a.temperature, max_new_tokens=a.probe_max_new_tokens, resample=a.resample,
                                 judge=a.judge if a.judge == "rule" else f"llm:{a.judge_model}")


if __name__ == "__main__":
    main()
