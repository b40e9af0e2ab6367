"""One GRPO update on a fixed global batch, under torchrun with any number of ranks.

    torchrun --nproc_per_node 2 tests/fsdp_step.py MODEL_DIR OUT.pt [LOSS_AGG] [CHECKPOINTING]

Rank r takes videos r, r + world, ... of a fixed global batch of 2 videos x G samples
with fixed completions and rewards, so the rollout's randomness is out of the picture:
what is compared across world sizes is FSDP2 sharding, the global loss normalisation
and the gradient reduction. Rank 0 saves the step's loss and the full parameters.
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

G, T, VIDEOS = 4, 6, 2


def main(model_dir, out_path, agg, checkpointing):
    cfg = config.load_config(None, [f"model.path={model_dir}", f"model.gradient_checkpointing={checkpointing}",
                                    f"sampling.group_size={G}", f"sampling.max_new_tokens={T}",
                                    "train.micro_batch_size=3", "train.lr=0.1", f"train.loss_agg={agg}",
                                    "data.max_pixels=12544"])
    rank, world, device, mesh = training.init_distributed()
    torch.manual_seed(0)
    tokenizer = model.load_tokenizer(model_dir)
    hf, kind = model.load_model(model_dir, cfg.model, "cpu", train=True)
    policy = training.shard(model.Policy(hf), mesh, device, train=True)
    ref_hf, _ = model.load_model(model_dir, cfg.model, "cpu", train=False)
    ref = training.shard(model.Policy(ref_hf), mesh, device, train=False)
    # SGD: the parameters then show the gradient itself (Adam's first step is lr * sign(grad),
    # which turns float-rounding noise in near-zero gradients into full-size differences)
    optimizer = torch.optim.SGD(policy.parameters(), lr=cfg.train.lr)

    records = data.load_records(os.path.join(os.path.dirname(__file__), "data", "train.jsonl"))[:VIDEOS]
    instruction = "Describe the video."
    mine = list(range(rank, VIDEOS, world))  # this rank's videos
    prompts = [data.encode(records[i].video, instruction, tokenizer, cfg.data, kind, hf.config.vision_config)
               for i in mine]
    batch = data.repeat_batch(data.collate(prompts, tokenizer.pad_token_id), G)

    g = torch.Generator().manual_seed(1)  # the same global completions and rewards on every rank
    ids = torch.randint(0, 256, (VIDEOS * G, T), generator=g)  # (2G, T) byte tokens
    lengths = torch.randint(1, T + 1, (VIDEOS * G,), generator=g)
    rewards = torch.rand(VIDEOS, G, generator=g)
    adv = grpo.group_advantages(rewards).flatten()
    rows = torch.cat([torch.arange(i * G, (i + 1) * G) for i in mine])
    roll = model.Rollout(ids[rows], lengths[rows], torch.ones(len(rows), dtype=torch.bool))
    keep = torch.ones(len(rows), dtype=torch.bool)

    chunks = grpo.micro_batches(keep, cfg.train.micro_batch_size)
    n_seq, n_tok = training.reduce([len(rows), roll.lengths.sum().item()])
    denom = n_tok if agg == "token-mean" else n_seq
    with torch.no_grad():
        ref_logps = [grpo.completion_logprobs(ref, batch, roll, r, 1.0)[0] for r, _ in chunks]
    acc = grpo.update(policy, optimizer, chunks, batch, roll, adv[rows], ref_logps, [None] * len(chunks),
                      denom, cfg, world)
    params = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save({"loss": acc["loss"], "grad_norm": acc["grad_norm"], "params": params}, out_path)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "seq-mean-token-mean",
         sys.argv[4] if len(sys.argv) > 4 else "false")
