"""Supervised fine-tuning of Qwen2-VL / Qwen2.5-VL on the training records: the paper's SFT baseline
(its Table 2) or a structured cold start before GRPO.

    python sft.py demo.yaml                                          # one process (CPU or one GPU)
    torchrun --nproc_per_node 8 sft.py config.yaml [key=value ...]
    torchrun --nproc_per_node 8 grpo.py config.yaml model.path=runs/sft/export    # GRPO from its export

Every step, each rank takes its sft.prompts_per_rank videos; the prompt is the video and an instruction,
the target is what the model should answer:
  sft.target=think    <think>{"subjects": [...]}</think><answer>caption</answer> from the record's subjects
                      and caption (rewards.reference_output), prompted with data.prompt_file as GRPO is:
                      a cold start in the format GRPO rewards
  sft.target=caption  the caption alone, prompted with data.CAPTION_PROMPT ("Describe the video in
                      detail."): the paper's SFT baseline (evaluate it with eval.think=false)
The loss is the negative log-likelihood of the target tokens (the closing <|im_end|> included, the prompt
excluded), averaged over every target token of the global batch, so that it does not depend on how the
batch is split into ranks and micro-batches. Gradients accumulate over a step's micro-batches
(sft.micro_batch_size videos each), then AdamW steps. Checkpoints, exact resume, SIGTERM, metrics and the
HF export (sft.out_dir/export, the model folder to give grpo.py or evaluate.py) are checkpoint.py's, as in
grpo.py. With sft.eval_every and data.val, the held-out loss is logged as val_loss.

The paper gives no SFT settings; config.yaml's sft: section holds ours (lr 1e-5, one epoch).
"""
import dataclasses
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
import training
from training import print0, reduce

# Settings a resumed run must share with its checkpoint (grpo.py's, and the target)
FIXED_ON_RESUME = ("seed", "model.path", "data.train", "data.shuffle", "sft.target")


def target_text(record, target):
    """What the model learns to write for `record`: the think and answer blocks, or the caption."""
    return data.target_text(record, target)


def target_batch(records, tokenizer, target):
    """The targets of `records` as completions: ids (n, T) right-padded with <|endoftext|>, lengths (n,), each
    target followed by <|im_end|>, the end token the model must learn to write."""
    targets = [tokenizer(target_text(r, target) + "<|im_end|>", add_special_tokens=False)["input_ids"]
               for r in records]
    lengths = torch.tensor([len(t) for t in targets])                                  # (n,)
    ids = torch.full((len(targets), int(lengths.max())), tokenizer.pad_token_id)       # (n, T)
    for i, t in enumerate(targets):
        ids[i, :len(t)] = torch.tensor(t)
    return ids, lengths


def micro_batches(items, size, tokenizer, target):
    """(record, prompt) pairs -> [(items, target ids, target lengths)] of `size` videos each."""
    chunks = [items[k:k + size] for k in range(0, len(items), size)]
    return [(chunk, *target_batch([r for r, _ in chunk], tokenizer, target)) for chunk in chunks]


def nll_sum(policy, items, ids, lengths, pad_id, device):
    """Summed negative log-likelihood of the targets ids (n, T), lengths (n,) of `items` ((record, prompt)
    pairs). One forward: the prompts, then the targets as completions (Policy.forward)."""
    batch = {k: v.to(device) for k, v in data.collate([p for _, p in items], pad_id).items()}
    logp, _ = policy(batch, ids.to(device), lengths.to(device), 1.0)                  # (n, T), 0 past lengths
    return -logp.sum()


def train_step(policy, optimizer, items, tokenizer, cfg, device, world):
    """One optimizer step on this rank's items: micro-batches of sft.micro_batch_size videos, each loss
    divided by the global token count, then clip and AdamW."""
    s = cfg.sft
    chunks = micro_batches(items, s.micro_batch_size, tokenizer, s.target)
    tokens = reduce([sum(int(lengths.sum()) for _, _, lengths in chunks)])[0]
    optimizer.zero_grad(set_to_none=True)
    loss_sum = 0.0
    for chunk, ids, lengths in chunks:  # every rank has prompts_per_rank items, so the same number of chunks
        loss = nll_sum(policy, chunk, ids, lengths, tokenizer.pad_token_id, device) / tokens
        # FSDP averages gradients over ranks; the loss is already divided by the global token count
        (loss * world).backward()
        loss_sum += loss.item()
    loss_total = reduce([loss_sum])[0]
    grad_norm, stepped = training.clip_and_step(policy, optimizer, s.grad_clip, math.isfinite(loss_total))
    return {"loss": loss_total, "grad_norm": grad_norm, "nonfinite": int(not stepped), "tokens": tokens}


@torch.no_grad()
def heldout_loss(policy, prompts, tokenizer, cfg, device):
    """Mean NLL per target token of this rank's held-out (record, prompt) pairs, over every rank's."""
    policy.eval()
    chunks = micro_batches(prompts, cfg.sft.micro_batch_size, tokenizer, cfg.sft.target)
    rounds = int(reduce([len(chunks)], dist.ReduceOp.MAX)[0])
    total, count = 0.0, 0
    for k in range(rounds):  # a rank with fewer chunks repeats its first, unused, in step with the others
        chunk, ids, lengths = chunks[k] if k < len(chunks) else chunks[0]
        nll = nll_sum(policy, chunk, ids, lengths, tokenizer.pad_token_id, device)
        if k < len(chunks):
            total, count = total + nll.item(), count + int(lengths.sum())
    policy.train()
    total, count = reduce([total, count])
    return total / max(count, 1)


def train(cfg):
    """The whole supervised run, its settings checked, in its own process group. Returns the last metrics."""
    config_lib.check_program(cfg, "sft.py")
    s = cfg.sft
    with training.process_group("sft.py", s.collective_timeout, s.replicate) as (rank, world, device, mesh):
        return run(cfg, rank, world, device, mesh)


def run(cfg, rank, world, device, mesh):
    """The supervised loop on an initialised process group (grpo.py's train.warm_start calls it too), rank 0
    holding the lock on sft.out_dir."""
    with training.run_folder(cfg.sft.out_dir, "sft.out_dir", "sft.py"):
        return _run(cfg, rank, world, device, mesh)


def _run(cfg, rank, world, device, mesh):
    s = cfg.sft
    training.seed_everything(cfg.seed)
    # the think block is made from the record's subjects
    need = {"subjects": "sft.target=think"} if s.target == "think" else {}
    records = data.load_records(cfg.data.train, need)
    val = data.load_heldout(cfg.data.val, need, world) if s.eval_every else []
    if s.target == "think":
        with open(cfg.data.prompt_file) as f:
            instruction = f.read().strip()
    else:
        instruction = data.CAPTION_PROMPT

    # on a disk every node reaches? Checked before any load
    checkpoint.check_shared(os.path.join(s.out_dir, "checkpoints"))
    training.ensure_model(cfg.model, cfg.data, cfg.seed, data.tokenizer_texts(records, instruction))
    training.check_targets(cfg.model, s.target, cfg.data.max_target_tokens, (records, cfg.data.train),
                           (val, cfg.data.val))
    policy, tokenizer, model_type = training.load_policy(cfg.model, device, mesh)
    vision_cfg = policy.hf.config.vision_config

    def encode(record):
        return data.encode(record.video, instruction, tokenizer, cfg.data, model_type, vision_cfg)
    stream = data.PromptStream(records, encode, rank, world, cfg.seed, s.prompts_per_rank,
                               cfg.data.shuffle, cfg.data.max_bad_fraction)
    heldout = [(rec, encode(rec)) for rec in val[rank::world]]
    steps = s.steps or s.epochs * stream.steps_per_epoch()
    cfg = dataclasses.replace(cfg, sft=dataclasses.replace(s, steps=steps))
    s = cfg.sft

    optimizer = training.make_optimizer(policy, s)
    shown = judge_lib.redacted_config(cfg)  # recorded, saved and logged: judge.url without credentials
    settings = config_lib.settings(shown, ("model", "data", "sft"), ("sft.resume",))
    start, extra, resumed_from = checkpoint.resume(s, policy, optimizer, rank, settings, FIXED_ON_RESUME)
    nonfinite_run = 0
    if extra:
        nonfinite_run = extra["nonfinite_run"]
        stream.load_state_dict(extra["data"])
        checkpoint.set_rng_state(extra["rng"])
        print0(f"resumed from {resumed_from} at step {start}")
    if rank == 0:
        os.makedirs(s.out_dir, exist_ok=True)
        config_lib.save_config(shown, os.path.join(s.out_dir, "config.yaml"))
    log = logs.make_logger(s, config_lib.to_dict(shown), rank)

    def save(step):
        extra = {"step": step, "nonfinite_run": nonfinite_run, "data": stream.state_dict(),
                 "rng": checkpoint.rng_state()}
        checkpoint.save_checkpoint(os.path.join(s.out_dir, "checkpoints"), step, policy, optimizer, extra,
                                   rank, s.keep_checkpoints, meta={"settings": settings})

    print0(f"SFT (target {s.target}): {model_type} from {cfg.model.path}, {len(records)} videos, "
           f"{world} ranks, {s.steps} steps of {world * s.prompts_per_rank} videos")
    metrics = {}
    bar = tqdm(range(start, s.steps), initial=start, total=s.steps, disable=rank != 0, desc="sft")
    with training.stop_watch() as stop:  # SIGTERM, Ctrl-C: a checkpoint after the step, then Stopped
        for step in bar:
            t0 = time.perf_counter()
            lr = training.set_lr(optimizer, s, step)
            metrics = train_step(policy, optimizer, stream.next(), tokenizer, cfg, device, world)
            nonfinite_run = nonfinite_run + 1 if metrics["nonfinite"] else 0
            if nonfinite_run > s.max_nonfinite_steps:
                raise training.StopRun(f"{nonfinite_run} steps in a row had a non-finite loss or gradient; "
                                       "lower sft.lr")
            seconds = reduce([time.perf_counter() - t0], dist.ReduceOp.MAX)[0]
            metrics.update(lr=lr, tokens_s=metrics["tokens"] / seconds, time_step=seconds,
                           bad_videos=stream.bad, epoch=stream.epoch,
                           peak_mem_gb=logs.peak_memory_gb(device))
            if s.eval_every and (step + 1) % s.eval_every == 0:
                metrics["val_loss"] = heldout_loss(policy, heldout, tokenizer, cfg, device)
            if (step + 1) % s.log_every == 0:
                log(metrics, step + 1)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}")
            training.end_of_step(step + 1, s, stop, save)
    bar.close()
    checkpoint.export(policy, tokenizer, s, cfg.model, device, rank)
    if rank == 0:
        print(summary(s.out_dir, s))
    return metrics


def summary(out, s):
    """The loss (and held-out loss) over the first and last quarter of the steps, with its curve."""
    lines = logs.read_jsonl(os.path.join(out, "metrics.jsonl"))
    return (f"done: {s.steps} SFT steps; mean of the first and last quarter of the logged steps, "
            "and the curve:\n"
            + "\n".join(logs.curves(lines, ("loss", "val_loss")))
            + f"\nmetrics: {out}/metrics.jsonl, export: {out}/export")


def main(argv):
    with training.one_line_errors("sft.py"):
        if cfg := training.command_line("sft.py", argv, __doc__):  # None after --help
            train(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
