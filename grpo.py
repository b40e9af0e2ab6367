"""GRPO post-training for VideoCap-R1, written out by hand.

    python grpo.py demo.yaml                                   # one process (CPU or one GPU)
    torchrun --nproc_per_node 8 grpo.py config.yaml [key=value ...]

Each step, in the order the loop below reads: every rank takes its videos, samples G
completions per video with the current policy (rollout), scores them (format + Tscore +
Escore by default, rewards.py), normalises rewards within each group (advantage),
computes log-probs under the policy and the frozen reference, takes the clipped
surrogate with a k3 KL penalty (loss), steps AdamW, logs, and checkpoints. The scoring
overlaps the rest: a completion's judge questions go out when it ends (judged_rewards), the
reference pass runs while they are answered, and the step waits for the replies only where
the advantage needs them.

Shapes: B videos per rank per step, G samples per video, N = B*G sequences,
L prompt tokens, T completion tokens, V vocabulary.

Where this goes beyond or deviates from the paper (arXiv 2506.01725), all in config.yaml:
- Groups whose rewards all tie, or that hold a failed judge call, are dropped from the
  loss and counted (their advantage is 0 or undefined; keeping them only dilutes the
  per-sequence mean).
- `loss_agg` and `adv_scale` also offer token-mean and Dr. GRPO's variants.
- `adv_scale: batch` divides by the std of every valid reward of the global batch (all
  ranks; groups dropped for a failed judge call left out), as verl and TRL scale it.
- `train.warm_start` runs sft.py's supervised stage first and starts GRPO from its export
  (the demo's way of teaching a random model the output format; a cold start for real runs).
- The reference (and pi_old) log-probs cover every row, the groups later dropped too: they run
  before the rewards say which groups enter the loss.
- The training machinery (FSDP2, fp32 master weights with bf16 compute, the learning rate as a
  function of the step) is training.py's, the checkpoints and the export checkpoint.py's, shared with sft.py.
"""
import dataclasses
import functools
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoint
import config as config_lib
import data
import judge as judge_lib
import logs
import model as model_lib
import rewards
import sft
import training
from training import print0, reduce

# ----------------------------------------------------------------------------- the math


def group_advantages(rewards, scale="group", eps=1e-4, batch_std=None):
    """rewards (B, G) -> advantages (B, G).

    A_i = (r_i - mean(r)) / (std(r) + eps), mean and (unbiased) std over the G samples
    of one video ("group", the paper), std over the whole batch ("batch": `batch_std`,
    the global one from batch_std(); rewards.std() when not given), or no division at
    all ("none", Dr. GRPO).
    """
    centered = rewards - rewards.mean(dim=1, keepdim=True)  # (B, G)
    if scale == "group":
        return centered / (rewards.std(dim=1, keepdim=True) + eps)
    if scale == "batch":
        return centered / ((rewards.std() if batch_std is None else batch_std) + eps)
    if scale == "none":
        return centered
    raise ValueError(f"adv_scale must be group, batch or none, got {scale!r}")


def batch_std(rewards, valid):
    """The unbiased std of the rewards of the `valid` groups of every rank: rewards (B, G),
    valid (B,) -> float. One all-reduce of (count, sum, sum of squares), so the scale is that
    of the concatenated global batch, whatever the number of ranks."""
    x = rewards[valid].double()
    n, total, squares = reduce([x.numel(), x.sum().item(), (x * x).sum().item()])
    return math.sqrt(max(squares - total * total / n, 0.0) / (n - 1)) if n > 1 else 0.0


def kl_k3(logp, ref_logp):
    """Per-token k3 estimate of KL(pi_theta || pi_ref): pi_ref/pi_theta - log(pi_ref/pi_theta) - 1.

    Unbiased and never negative. The log-ratio is clamped to +-20 so exp cannot overflow.
    """
    log_ratio = (ref_logp - logp).clamp(-20.0, 20.0)  # (N, T)
    return torch.exp(log_ratio) - log_ratio - 1.0


def policy_loss(logp, old_logp, ref_logp, adv, mask, eps_low, eps_high, beta, agg,
                norm=None, max_len=None):
    """The GRPO objective, negated for gradient descent.

    logp, old_logp, ref_logp, mask: (N, T); adv: (N,). Per token:
        rho = pi_theta / pi_old = exp(logp - old_logp)
        l_t = -min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A) + beta * D_KL_k3
    agg:  "seq-mean-token-mean"      1/N sum_i 1/|o_i| sum_t l_t    (the paper)
          "token-mean"               sum_i sum_t l_t / sum_i |o_i|
          "seq-mean-token-sum-norm"  1/N sum_i sum_t l_t / max_len   (Dr. GRPO)
    `norm` replaces the local denominator (N, or the token count for token-mean) with a
    global one, so that the loss summed over micro-batches and ranks is the loss of the
    whole batch. `max_len` defaults to T. ref_logp is ignored when beta == 0.
    Returns the loss and statistics over the masked tokens (no grad).
    """
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)  # (N, T)
    a = adv[:, None]  # (N, 1)
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    per_token = -torch.minimum(ratio * a, clipped * a)  # (N, T)
    kl = kl_k3(logp, ref_logp) if beta else torch.zeros_like(logp)
    per_token = per_token + beta * kl
    if agg == "seq-mean-token-mean":
        per_seq = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (N,)
        loss = per_seq.sum() / (norm if norm is not None else logp.shape[0])
    elif agg == "token-mean":
        loss = (per_token * mask).sum() / (norm if norm is not None else mask.sum().clamp(min=1.0))
    elif agg == "seq-mean-token-sum-norm":
        per_seq = (per_token * mask).sum(1) / (max_len or logp.shape[1])  # (N,)
        loss = per_seq.sum() / (norm if norm is not None else logp.shape[0])
    else:
        raise ValueError(f"loss_agg must be one of {config_lib.LOSS_AGGS}, got {agg!r}")
    with torch.no_grad():
        on = mask > 0
        n = on.sum().clamp(min=1)
        # the clipped branch is the active one when the ratio left the trust region in the
        # direction the advantage pushes it
        is_clipped = ((ratio < 1.0 - eps_low) & (a < 0)) | ((ratio > 1.0 + eps_high) & (a > 0))
        stats = {"tokens": on.sum().item(),
                 "clip_frac": ((is_clipped & on).sum() / n).item(),
                 "kl": ((kl * mask).sum() / n).item(),
                 "ratio_min": ratio[on].min().item() if on.any() else 1.0,
                 "ratio_max": ratio[on].max().item() if on.any() else 1.0}
    return loss, stats


# ----------------------------------------------------------------------------- one step


def rollout(policy, batch, cfg, tokens, generator, on_end=None):
    """G completions per video from the current policy; ranks stop decoding together. on_end(i, text) is
    told each completion as it ends, while the other rows decode."""
    def all_done(local_done):
        return reduce([float(local_done)], dist.ReduceOp.MIN)[0] > 0

    def ended(roll, rows):
        for i, text in zip(rows, tokens.decode(roll, rows)):
            on_end(i, text)
    policy.eval()  # HF switches the KV cache off under gradient checkpointing in train mode
    with training.gathered(policy), torch.no_grad():
        roll = model_lib.generate(policy.hf, batch, cfg.sampling.group_size, cfg.sampling.max_new_tokens,
                                  cfg.sampling.temperature, cfg.sampling.top_p, tokens.eos_ids, tokens.pad_id,
                                  generator=generator, sync=all_done, on_end=ended if on_end else None)
    policy.train()
    return roll


def judged_rewards(reward_cfg, judge):
    """The configured reward as a rewarder: records -> (on_end, collect). on_end(i, text) sends completion
    i's judge questions the moment it ends (rewards.start_rewards: the only place where the judge runs
    beside the step); collect(texts, roll) -> (reward (N,), parts, stats) waits for the replies still out."""
    def start(records):
        pending = rewards.start_rewards(records, reward_cfg, judge)
        return (functools.partial(rewards.row_ended, pending),
                lambda texts, roll: rewards.collect_rewards(pending))
    return start


def after_rollout(reward_fn):
    """reward_fn(texts, records, roll) -> (reward (N,), parts, stats) as a rewarder that scores the whole
    batch once the rollout is done (train()'s reward_fn: the tests' toy rewards)."""
    def start(records):
        return None, lambda texts, roll: reward_fn(texts, records, roll)
    return start


def micro_batches(keep, size):
    """Chunks of `size` of the row indices that enter the loss, in order (so a chunk holds whole
    groups when `size` is a multiple of G), with a weight each. Every rank runs the same number
    of chunks because FSDP's collectives must pair up across ranks: a rank with fewer rows adds
    chunks of row 0 with weight 0."""
    chunks = list(keep.nonzero().flatten().split(size)) if keep.any() else []
    n = int(reduce([len(chunks)], dist.ReduceOp.MAX)[0])
    filler = torch.zeros(1, dtype=torch.long, device=keep.device)
    return [(rows, 1.0) for rows in chunks] + [(filler, 0.0)] * (n - len(chunks))


def completion_logprobs(policy, batch, roll, rows, cfg):
    """Log-probs and entropy (n, T) of completions `rows` (sorted; row b*G+g is from prompt b of `batch`, the
    B collated prompts), trimmed to their longest. With train.prefix_shared each prompt runs once for its rows
    in the chunk (model.Policy's packed groups; a group split over two chunks runs it once in each), else once
    per row."""
    G = cfg.sampling.group_size
    lengths = roll.lengths[rows]  # (n,)
    T = int(lengths.max())
    if cfg.train.prefix_shared:
        prompts, counts = torch.unique_consecutive(rows // G, return_counts=True)  # (p,), (p,)
        return policy(data.select_rows(batch, prompts), roll.ids[rows, :T], lengths, cfg.sampling.temperature,
                      group_size=counts.tolist())
    return policy(data.select_rows(batch, rows // G), roll.ids[rows, :T], lengths, cfg.sampling.temperature)


def length_mask(lengths, T):
    """(n,) lengths -> (n, T) mask; the end token is inside the length, so it is trained."""
    return torch.arange(T, device=lengths.device)[None, :] < lengths[:, None]


def row_logprobs(model, batch, roll, cfg):
    """Log-probs (N, T) of every completion of the rollout under `model`, no grad, in micro-batches of
    train.micro_batch_size rows; 0 after each row's end. Every row: it runs before the rewards say which
    groups enter the loss."""
    every = torch.ones_like(roll.ended)
    done = [(rows, completion_logprobs(model, batch, roll, rows, cfg)[0])
            for rows, weight in micro_batches(every, cfg.train.micro_batch_size) if weight]
    out = done[0][1].new_zeros(len(roll.lengths), int(roll.lengths.max()))  # (N, T)
    for rows, logp in done:
        out[rows, :logp.shape[1]] = logp
    return out


def update(policy, optimizer, chunks, batch, roll, adv, ref_logps, old_logps, denom, cfg, world):
    """num_iterations passes of AdamW over the rollout (ref_logps, old_logps: (N, T) from row_logprobs, or
    None); returns summed statistics."""
    t = cfg.train
    acc = {"loss": 0.0, "tokens": 0.0, "kl": 0.0, "clip_frac": 0.0, "entropy": 0.0,
           "ratio_min": math.inf, "ratio_max": -math.inf, "grad_norm": 0.0, "skipped": 0}
    for _ in range(t.num_iterations):
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for rows, weight in chunks:
            logp, entropy = completion_logprobs(policy, batch, roll, rows, cfg)
            T = logp.shape[1]
            mask = length_mask(roll.lengths[rows], T) * weight  # (n, T)
            ref_lp = ref_logps[rows, :T] if ref_logps is not None else None
            old = logp.detach() if old_logps is None else old_logps[rows, :T]  # one update: rho == 1
            loss, st = policy_loss(logp, old, ref_lp, adv[rows], mask, t.eps_low, t.eps_high, t.beta,
                                   t.loss_agg, norm=denom, max_len=cfg.sampling.max_new_tokens)
            # FSDP averages gradients over ranks, but `loss` is already divided by the
            # global denominator: multiplying by world turns the average into the sum.
            (loss * world).backward()
            loss_sum += loss.item()
            n = st["tokens"]
            acc["tokens"] += n
            acc["kl"] += st["kl"] * n
            acc["clip_frac"] += st["clip_frac"] * n
            acc["entropy"] += (entropy * mask).sum().item()
            if n:
                acc["ratio_min"] = min(acc["ratio_min"], st["ratio_min"])
                acc["ratio_max"] = max(acc["ratio_max"], st["ratio_max"])
        loss_total = reduce([loss_sum])[0]
        grad_norm, stepped = training.clip_and_step(policy, optimizer, t.grad_clip, math.isfinite(loss_total))
        if not stepped:  # a non-finite step is skipped, never applied
            acc["skipped"] += 1
            continue
        acc["loss"] += loss_total
        acc["grad_norm"] += grad_norm
    applied = t.num_iterations - acc["skipped"]  # the means are over the passes applied
    acc["loss"], acc["grad_norm"] = acc["loss"] / max(applied, 1), acc["grad_norm"] / max(applied, 1)
    return acc


def train_step(policy, ref, optimizer, items, rewarder, cfg, tokens, generator, device, world):
    """Rollout (each completion's reward started as it ends), the reference's (and pi_old's) log-probs while
    the judge answers, the rewards, advantage, loss and step for this rank's videos -> (metrics, sample).
    rewarder: judged_rewards or after_rollout. The judge's timing changes no collective call: every rank
    runs the same passes in the same order, and only waits longer or shorter in collect."""
    G = cfg.sampling.group_size
    times = {}
    t0 = time.perf_counter()
    batch = {k: v.to(device) for k, v in data.collate([p for _, p in items], tokens.pad_id).items()}
    records = [rec for rec, _ in items for _ in range(G)]  # row b*G+g is video b
    on_end, collect = rewarder(records)
    roll = rollout(policy, batch, cfg, tokens, generator, on_end)  # ids (N, T), lengths (N,), ended (N,)
    rollout_end = time.perf_counter()
    times["rollout"] = rollout_end - t0

    t0 = time.perf_counter()
    with torch.no_grad():
        ref_logps = row_logprobs(ref, batch, roll, cfg) if ref is not None else None  # (N, T)
        # with several updates per rollout, pi_old must be fixed before the first one
        old_logps = row_logprobs(policy, batch, roll, cfg) if cfg.train.num_iterations > 1 else None
    times["logprobs"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    texts = tokens.decode(roll)
    reward, parts, reward_stats = collect(texts, roll)  # (N,), name -> (N,): waits for the last replies
    times["judge_wait"] = time.perf_counter() - t0
    times["judge_after_rollout"] = max(0.0, (reward_stats.get("last_reply") or 0.0) - rollout_end)
    r = reward.to(device).view(-1, G)  # (B, G)
    judged = torch.isfinite(r).all(dim=1)  # (B,) groups without a failed judge call
    valid = judged & (r.amax(dim=1) > r.amin(dim=1))  # (B,) groups with signal
    scale = batch_std(r, judged) if cfg.train.adv_scale == "batch" else None  # a collective: every rank
    adv = group_advantages(torch.nan_to_num(r), cfg.train.adv_scale, cfg.train.adv_eps, scale)  # (B, G)
    adv = (adv * valid[:, None]).flatten()  # (N,)
    keep = valid.repeat_interleave(G)  # (N,)
    times["reward"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    chunks = micro_batches(keep, cfg.train.micro_batch_size)
    kept_tokens = roll.lengths[keep].sum().item()
    n_seq, n_tok = reduce([keep.sum().item(), kept_tokens])
    denom = n_tok if cfg.train.loss_agg == "token-mean" else n_seq
    acc = update(policy, optimizer, chunks, batch, roll, adv, ref_logps, old_logps,
                 max(denom, 1.0), cfg, world) if n_seq > 0 else None
    times["update"] = time.perf_counter() - t0

    metrics = step_metrics(reward, parts, valid, judged, roll, reward_stats.get("judge_failed", 0), times)
    if acc is not None:
        metrics.update(update_metrics(acc))
    metrics.update({f"time_{k}": v for k, v in times.items()})
    sample = {"video": records[0].id, "text": texts[0], "reward": reward[0].item(),
              **{k: v[0].item() for k, v in parts.items()}}
    return metrics, sample


def finite_sum(x):
    """A tensor -> (the sum of its finite values, how many there are): a mean's parts, NaN left out."""
    return x.nan_to_num().sum().item(), torch.isfinite(x).sum().item()


def step_metrics(reward, parts, valid, judged, roll, judge_failures, times):
    """The step's rollout and reward figures over every rank: each reward part's mean (failed judge calls
    left out), the share of groups dropped, completion lengths, rollout throughput."""
    metrics = training.global_means({"reward": finite_sum(reward),
                                     **{f"reward_{k}": finite_sum(v) for k, v in parts.items()}})
    n = training.global_sums({"samples": len(reward), "groups": len(valid), "dropped": (~valid).sum().item(),
                              "judge_failed": (~judged).sum().item(), "gen_tokens": roll.lengths.sum().item(),
                              "truncated": (~roll.ended).sum().item(), "judge_failures": judge_failures})
    rollout_time = reduce([times["rollout"]], dist.ReduceOp.MAX)[0]  # the slowest rank sets the pace
    metrics.update({"groups": n["groups"], "dropped_groups": n["dropped"] / n["groups"],
                    "judge_failed_groups": n["judge_failed"] / n["groups"],
                    "judge_failures": n["judge_failures"],
                    "completion_len": n["gen_tokens"] / n["samples"],
                    "truncated": n["truncated"] / n["samples"],
                    "rollout_tok_s": n["gen_tokens"] / max(rollout_time, 1e-9)})
    return metrics


def update_metrics(acc):
    """update()'s statistics over every rank: the loss, per-token means of KL, clip fraction and entropy,
    the gradient norm, the ratio's range."""
    tok, kl, clip, ent = reduce([acc["tokens"], acc["kl"], acc["clip_frac"], acc["entropy"]])
    return {"loss": acc["loss"], "kl": kl / max(tok, 1), "clip_frac": clip / max(tok, 1),
            "entropy": ent / max(tok, 1), "grad_norm": acc["grad_norm"], "nonfinite": acc["skipped"],
            "ratio_min": reduce([acc["ratio_min"]], dist.ReduceOp.MIN)[0],
            "ratio_max": reduce([acc["ratio_max"]], dist.ReduceOp.MAX)[0]}

# ----------------------------------------------------------------------------- held-out evaluation


def heldout_rewards(policy, prompts, rewarder, cfg, tokens, device):
    """Greedy outputs (one per video) for this rank's held-out (record, prompt) pairs, scored by rewarder ->
    {"val_reward": mean, "val_reward_<part>": mean} over every rank's videos."""
    greedy = dataclasses.replace(cfg, sampling=dataclasses.replace(cfg.sampling, group_size=1,
                                                                   temperature=0.0))
    size = cfg.train.prompts_per_rank
    rounds = int(reduce([math.ceil(len(prompts) / size)], dist.ReduceOp.MAX)[0])
    sums = {}
    for k in range(rounds):
        chunk = prompts[k * size:(k + 1) * size]
        weight = 1.0 if chunk else 0.0
        chunk = chunk or prompts[:1]  # a rank with fewer videos keeps in step with the others' collectives
        batch = {key: v.to(device) for key, v in data.collate([p for _, p in chunk], tokens.pad_id).items()}
        on_end, collect = rewarder([rec for rec, _ in chunk])
        roll = rollout(policy, batch, greedy, tokens, None, on_end)
        reward, parts, _ = collect(tokens.decode(roll), roll)
        for name, v in {"reward": reward, **{f"reward_{p}": x for p, x in parts.items()}}.items():
            total, n = sums.get(name, (0.0, 0.0))
            part_total, part_n = finite_sum(v)
            sums[name] = (total + weight * part_total, n + weight * part_n)
    means = training.global_means({name: sums[name] for name in sorted(sums)})
    return {f"val_{name}": value for name, value in means.items()}

# ----------------------------------------------------------------------------- the run

# Settings a resumed run must share with its checkpoint: the data position is an index into the order that
# the seed and the records define, and model.path is also the frozen reference.
FIXED_ON_RESUME = ("seed", "model.path", "data.train", "data.shuffle")


class JudgeOutage(training.StopRun):
    """The judge failed for too many groups in a row; a checkpoint was written first."""


def train(cfg, reward_fn=None):
    """The whole run: its settings checked, then (train.warm_start) sft.py's stage, then the GRPO loop.
    `reward_fn(texts, records, rollout) -> (reward (N,), parts, stats)` replaces the configured reward
    (tests use a toy one). Returns the last metrics. Rank 0 holds the lock on train.out_dir throughout; a
    SIGTERM or Ctrl-C ends it in training.Stopped after a checkpoint."""
    config_lib.check_program(cfg, "grpo.py")
    t = cfg.train
    group = training.process_group("grpo.py", t.collective_timeout, t.replicate)
    with group as (rank, world, device, mesh), training.run_folder(t.out_dir, "train.out_dir", "grpo.py"):
        if cfg.train.warm_start:
            cfg = warm_start(cfg, rank, world, device, mesh)
        return run(cfg, reward_fn, rank, world, device, mesh)


def warm_start(cfg, rank, world, device, mesh):
    """sft.py's supervised stage (the sft: section) unless its export already exists; GRPO then starts
    from that export, which is also its reference model. An export made from another model.path or
    sft.target (its run folder's config.yaml says) is refused rather than silently trained on. A SIGTERM or
    Ctrl-C in the stage ends the program after its checkpoint (training.Stopped); the rerun continues the
    stage, then GRPO."""
    export = os.path.join(cfg.sft.out_dir, "export")

    def done():
        checkpoint.recover_export(export)  # an export replaced when a kill came: the complete one back
        if not os.path.isfile(os.path.join(export, "config.json")):
            return False
        made = config_lib.load_config(os.path.join(cfg.sft.out_dir, "config.yaml"))
        if (made.model.path, made.sft.target) != (cfg.model.path, cfg.sft.target):
            raise config_lib.ConfigError(
                f"train.warm_start: {export} was made from model.path={made.model.path} with sft.target="
                f"{made.sft.target}, not {cfg.model.path} with {cfg.sft.target}: set sft.out_dir to another "
                f"folder, or delete {cfg.sft.out_dir} to run the warm start again")
        return True
    if training.on_rank0(done):  # as rank 0 sees the disk
        print0(f"warm start: {export} exists, GRPO starts from it")
    else:
        print0(f"warm start: sft.py's stage (sft.target={cfg.sft.target}) into {cfg.sft.out_dir}")
        sft.run(cfg, rank, world, device, mesh)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=export, build_tiny=""))


def run(cfg, reward_fn, rank, world, device, mesh):
    """The GRPO loop on an initialised process group: rollout, reward, advantage, loss and step (train_step),
    then log, held-out rewards, samples and checkpoints."""
    t = cfg.train
    training.seed_everything(cfg.seed)
    generator = torch.Generator(device=device).manual_seed(cfg.seed * 1009 + rank)
    need = rewards.required_fields(cfg.reward)  # e.g. subjects for Tscore: a record without them stops here
    records = data.load_records(cfg.data.train, need)  # before any model loads: bad data fails fast
    val = data.load_heldout(cfg.data.val, need, world) if t.eval_every else []
    with open(cfg.data.prompt_file) as f:
        instruction = f.read().strip()

    # on a disk every node reaches? Checked before any load
    checkpoint.check_shared(os.path.join(t.out_dir, "checkpoints"))

    # model: the policy (fp32 master weights, bf16 compute on GPU) and the frozen reference (bf16 on GPU)
    training.ensure_model(cfg.model, cfg.data, cfg.seed, data.tokenizer_texts(records, instruction))
    training.check_targets(cfg.model, "think", cfg.data.max_target_tokens, (records, cfg.data.train),
                           (val, cfg.data.val))
    policy, tokenizer, model_type = training.load_policy(cfg.model, device, mesh)
    ref = training.load_policy(cfg.model, device, mesh, train=False, offload=t.ref_offload)[0] \
        if t.beta > 0 else None  # with beta == 0 the reference is never loaded
    tokens = model_lib.Tokens.of(tokenizer)

    # data
    vision_cfg = policy.hf.config.vision_config

    def encode(record):
        return data.encode(record.video, instruction, tokenizer, cfg.data, model_type, vision_cfg)
    stream = data.PromptStream(records, encode, rank, world, cfg.seed, t.prompts_per_rank,
                               cfg.data.shuffle, cfg.data.max_bad_fraction)
    heldout = [(rec, encode(rec)) for rec in val[rank::world]]
    steps = t.steps or t.epochs * stream.steps_per_epoch()
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(t, steps=steps))
    t = cfg.train

    # reward
    judge = judge_lib.make_judge(cfg.judge) if reward_fn is None else None
    rewarder = judged_rewards(cfg.reward, judge) if reward_fn is None else after_rollout(reward_fn)

    optimizer = training.make_optimizer(policy, t)
    shown = judge_lib.redacted_config(cfg)  # recorded, saved and logged: judge.url without credentials
    settings = config_lib.settings(shown, ("model", "data", "sampling", "reward", "judge", "train"),
                                   leave_out=("train.resume",))
    start, extra, resumed_from = checkpoint.resume(t, policy, optimizer, rank, settings, FIXED_ON_RESUME)
    nonfinite_run = 0
    if extra:
        nonfinite_run = extra["nonfinite_run"]
        stream.load_state_dict(extra["data"])
        checkpoint.set_rng_state(extra["rng"], generator)
        print0(f"resumed from {resumed_from} at step {start}")
    if rank == 0:
        os.makedirs(t.out_dir, exist_ok=True)
        config_lib.save_config(shown, os.path.join(t.out_dir, "config.yaml"))
    log = logs.make_logger(t, config_lib.to_dict(shown), rank)

    def save(step):
        extra = {"step": step, "nonfinite_run": nonfinite_run, "data": stream.state_dict(),
                 "rng": checkpoint.rng_state(generator)}
        checkpoint.save_checkpoint(os.path.join(t.out_dir, "checkpoints"), step, policy, optimizer, extra,
                                   rank, t.keep_checkpoints, meta={"settings": settings})

    print0(f"GRPO: {model_type} from {cfg.model.path}, {len(records)} videos, {world} ranks, "
           f"{t.steps} steps of {world * t.prompts_per_rank} videos x G={cfg.sampling.group_size}")
    metrics, judged = {}, []  # judged: per step, the share of groups whose judging failed
    bar = tqdm(range(start, t.steps), initial=start, total=t.steps, disable=rank != 0, desc="grpo")
    with training.stop_watch() as stop:  # SIGTERM, Ctrl-C: a checkpoint after the step, then Stopped
        for step in bar:
            items = stream.next()
            lr = training.set_lr(optimizer, t, step)
            metrics, sample = train_step(policy, ref, optimizer, items, rewarder, cfg, tokens,
                                         generator, device, world)
            skipped = metrics.get("nonfinite", 0) == t.num_iterations
            nonfinite_run = nonfinite_run + 1 if skipped else 0
            if nonfinite_run > t.max_nonfinite_steps:
                raise training.StopRun(f"{nonfinite_run} steps in a row had a non-finite loss or gradient; "
                                       "lower train.lr or check the rewards in metrics.jsonl")
            metrics.update(lr=lr, bad_videos=stream.bad, epoch=stream.epoch,
                           peak_mem_gb=logs.peak_memory_gb(device))
            judged.append(metrics["judge_failed_groups"])
            if judge_gone(judged, cfg.judge, t.steps - start):
                log(metrics, step + 1)
                save(step + 1)
                if rank == 0:
                    print(summary(t.out_dir, t))
                raise JudgeOutage(outage_message(judged, cfg.judge, judge, step + 1,
                                                  step + 1 == t.steps))
            if t.eval_every and (step + 1) % t.eval_every == 0:
                metrics.update(heldout_rewards(policy, heldout, rewarder, cfg, tokens, device))
            if (step + 1) % t.log_every == 0:
                log(metrics, step + 1)
            bar.set_postfix(reward=f"{metrics['reward']:.3f}", kl=f"{metrics.get('kl', 0):.4f}")
            if rank == 0:  # every step's first sample is kept; every sample_every-th is printed
                logs.append_jsonl(os.path.join(t.out_dir, "samples.jsonl"), {"step": step + 1, **sample})
                if t.sample_every and (step + 1) % t.sample_every == 0:
                    tqdm.write(f"[step {step + 1}] reward {sample['reward']:.3f}: {sample['text'][:300]!r}")
            training.end_of_step(step + 1, t, stop, save)
    bar.close()
    checkpoint.export(policy, tokenizer, t, cfg.model, device, rank)
    if rank == 0:
        print(summary(t.out_dir, t))
    return metrics


def judge_window(judge_cfg, steps):
    """The steps whose judging is weighed: the last judge.failed_window, or all when the run does fewer."""
    return max(1, min(judge_cfg.failed_window, steps))


def judge_gone(judged, judge_cfg, steps):
    """Whether the share of groups whose judging failed, over the last judge_window steps of a run of
    `steps` steps (this process's), is above judge.max_failed_share (judged: that share per step so far).
    A run shorter than judge.failed_window is weighed over all its steps, so its end cannot pass for a
    success when its judge was down."""
    window = judge_window(judge_cfg, steps)
    return len(judged) >= window and sum(judged[-window:]) / window > judge_cfg.max_failed_share


def outage_message(judged, judge_cfg, judge, step, final):
    """Why the run stops (judge_gone held after `step`; final: it was the run's last step)."""
    window = min(judge_cfg.failed_window, len(judged))  # judge_window's, once judge_gone holds
    last = getattr(judge, "last_error", "") or "see the messages above"
    then = ("this was the last step, so a rerun would only export it: start a new run (train.resume=never) "
            "to train with judged rewards" if final else "rerun the same command to resume")
    return (f"judging failed for {sum(judged[-window:]) / window:.0%} of the groups of the last {window} "
            f"steps, above judge.max_failed_share={judge_cfg.max_failed_share} (judge "
            f"{judge_lib.redact_url(judge_cfg.url)}; last judge error: {last}). A checkpoint is written at "
            f"step {step}: bring the judge back and {then}")


def summary(out, t):
    """What the run did, from its metrics.jsonl and samples.jsonl: each reward part's curve and its mean
    over the first and last quarter of the steps, how many steps updated the model, and the first and the
    last sample of one video side by side."""
    lines = logs.read_jsonl(os.path.join(out, "metrics.jsonl"))
    keys = dict.fromkeys(key for m in lines for key in m if key.startswith(("reward", "val_reward")))
    updated = sum(1 for m in lines if "loss" in m and m["nonfinite"] < t.num_iterations)
    note = ("" if updated else "\nno step had a group with unequal rewards, so none updated the model "
            "(a random model writes no <think>/<answer>: every sample scores 0)")
    groups = sum(m["groups"] for m in lines)
    failed = round(sum(m["judge_failed_groups"] * m["groups"] for m in lines))
    dropped = round(sum(m["dropped_groups"] * m["groups"] for m in lines))
    text = (f"done: {t.steps} steps, {updated} of {len(lines)} logged steps updated the model{note}\n"
            f"groups dropped from the loss: {dropped} of {groups:.0f}: {failed} because a judge call failed, "
            f"{dropped - failed} because all their rewards tied\n"
            "mean of the first and last quarter of the logged steps, and the curve over all of them:\n"
            + "\n".join(logs.curves(lines, keys)))
    samples = logs.read_jsonl(os.path.join(out, "samples.jsonl"))
    text += "\n" + logs.side_by_side(samples, "reward")
    if lines:  # none when a run resumes at its last step with no log of its own
        text += f"\nlast peak memory {lines[-1]['peak_mem_gb']:.2f} GB"
    return (text + f"\nmetrics: {out}/metrics.jsonl, samples: {out}/samples.jsonl, "
            f"checkpoints: {out}/checkpoints, export: {out}/export")


def main(argv):
    with training.one_line_errors("grpo.py"):
        if cfg := training.command_line("grpo.py", argv, __doc__):  # None after --help
            train(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
