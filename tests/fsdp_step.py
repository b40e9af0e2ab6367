"""One GRPO update on a fixed global batch, under torchrun with any number of ranks.

    torchrun --nproc_per_node 2 tests/fsdp_step.py MODEL_DIR OUT.pt [LOSS_AGG] [CHECKPOINTING]
        [REPLICATE] [SHARED]

Rank r takes videos r, r + world, ... of a fixed global batch of max(2, world) videos x G
samples with fixed completions and rewards, so the rollout's randomness is out of the picture:
what is compared across world sizes (and between FSDP and HSDP, REPLICATE > 1) is FSDP2
sharding, the global loss normalisation and the gradient reduction. Rank 0 saves the step's
loss and the full parameters.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import config  # noqa: E402
import data  # noqa: E402
import grpo  # noqa: E402
import model  # noqa: E402
import training  # noqa: E402
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: E402

G, T = 4, 6


def step_config(model_dir, agg="seq-mean-token-mean", checkpointing="false", shared="true"):
    # micro-batches of 3 rows: groups of 4 split over two micro-batches
    return config.load_config(None, [f"model.path={model_dir}",
                                     f"model.gradient_checkpointing={checkpointing}",
                                     f"sampling.group_size={G}", f"sampling.max_new_tokens={T}",
                                     "train.micro_batch_size=3", "train.lr=0.1", f"train.loss_agg={agg}",
                                     f"train.prefix_shared={shared}", "data.max_pixels=12544"])


def main(model_dir, out_path, agg, checkpointing, replicate, shared):
    cfg = step_config(model_dir, agg, checkpointing, shared)
    rank, world, device, mesh = training.init_distributed(replicate=replicate)
    acc, params = update_once(cfg, device, mesh, rank, world)
    if rank == 0:
        torch.save({"loss": acc["loss"], "grad_norm": acc["grad_norm"], "params": params}, out_path)
    training.end_distributed()


def update_once(cfg, device, mesh, rank, world):
    """Load the policy and reference over `mesh`, take one update on the fixed global batch -> (update's
    statistics, full parameters on rank 0)."""
    torch.manual_seed(0)
    policy, tokenizer, kind = training.load_policy(cfg.model, device, mesh)
    ref = training.load_policy(cfg.model, device, mesh, train=False)[0]
    hf = policy.hf
    # SGD: the parameters then show the gradient itself (Adam's first step is lr * sign(grad),
    # which turns float-rounding noise in near-zero gradients into full-size differences)
    optimizer = torch.optim.SGD(policy.parameters(), lr=cfg.train.lr)

    videos = max(2, world)
    records = data.load_records(os.path.join(os.path.dirname(__file__), "data", "train.jsonl"))[:videos]
    instruction = "Describe the video."
    mine = list(range(rank, videos, world))  # this rank's videos
    prompts = [data.encode(records[i].video, instruction, tokenizer, cfg.data, kind, hf.config.vision_config)
               for i in mine]
    batch = data.collate(prompts, tokenizer.pad_token_id)

    g = torch.Generator().manual_seed(1)  # the same global completions and rewards on every rank
    ids = torch.randint(0, 256, (videos * G, T), generator=g)  # (videos*G, T) byte tokens
    lengths = torch.randint(1, T + 1, (videos * G,), generator=g)
    rewards = torch.rand(videos, G, generator=g)
    adv = grpo.group_advantages(rewards).flatten()
    rows = torch.cat([torch.arange(i * G, (i + 1) * G) for i in mine])
    roll = model.Rollout(ids[rows], lengths[rows], torch.ones(len(rows), dtype=torch.bool))
    keep = torch.ones(len(rows), dtype=torch.bool)

    chunks = grpo.micro_batches(keep, cfg.train.micro_batch_size)
    n_seq, n_tok = training.reduce([len(rows), roll.lengths.sum().item()])
    denom = n_tok if cfg.train.loss_agg == "token-mean" else n_seq
    with torch.no_grad():
        ref_logps = grpo.row_logprobs(ref, batch, roll, cfg)
    acc = grpo.update(policy, optimizer, chunks, batch, roll, adv[rows], ref_logps, None, denom, cfg, world)
    return acc, get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "seq-mean-token-mean",
         sys.argv[4] if len(sys.argv) > 4 else "false", int(sys.argv[5]) if len(sys.argv) > 5 else 1,
         sys.argv[6] if len(sys.argv) > 6 else "true")
