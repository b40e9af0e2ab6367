"""What tests/test_multinode.py runs under torchrun, one process per rank.

    torchrun --nproc_per_node 4 tests/multinode_worker.py load MODEL_DIR OUT.json
        (in a folder where ./model is MODEL_DIR; rank 3 moves to ./blind, where it is not)
    torchrun ... tests/multinode_worker.py grpo [key=value ...]      # grpo.train with the recording reward

`load`: load_policy (every rank on the meta device, rank 0 streaming the weights) against every rank reading
the whole model as before, for the policy and the reference: every parameter and buffer equal, and so are the
log-probs of a forward; rank 3 sees no model folder and still loads; check_shared names rank 3; and one GRPO
update over a 2x2 HSDP mesh gives the parameters a 1x4 FSDP mesh gives. Rank 0 writes what it found to
OUT.json.

`grpo`: grpo.train on tests/tiny.yaml with `recording_reward`, which appends each rank's videos of each step
to train.out_dir/videos-world<W>-rank<R>.jsonl, so that a test can tell which videos were consumed.
"""
import json
import os
import sys

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
import bench  # noqa: E402
import checkpoint  # noqa: E402
import config  # noqa: E402
import data  # noqa: E402
import fsdp_step  # noqa: E402
import grpo  # noqa: E402
import training  # noqa: E402
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: E402


def full_state(policy):
    return get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def forward_logp(policy, tokenizer, kind, cfg):
    """Log-probs (N, T) of fixed completions of one shipped clip under `policy`."""
    records = data.load_records(os.path.join(ROOT, "tests", "data", "train.jsonl"))[:1]
    prompt = data.encode(records[0].video, "Describe the video.", tokenizer, cfg.data, kind,
                                   policy.hf.config.vision_config)
    batch = data.collate([prompt], tokenizer.pad_token_id)
    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(0))       # (2, 5)
    with torch.no_grad():
        return policy(data.repeat_batch(batch, 2), ids, torch.tensor([5, 3]), 1.0)[0]


def load(model_dir, out_path):
    rank, world, device, mesh = training.init_distributed()
    found = {}
    cfg = fsdp_step.step_config(model_dir)
    relative = config.ModelConfig(path="model", gradient_checkpointing=False)
    if rank == 3:
        os.chdir("blind")  # this rank sees no ./model (and no ./shared below)
    for train in (True, False):
        new, tokenizer, kind = training.load_policy(relative, device, mesh, train=train)
        old = bench.load_every_rank(cfg.model, device, mesh, train)  # what it replaced
        a, b = full_state(new), full_state(old)
        buffers = {k: torch.equal(v, dict(old.named_buffers())[k]) for k, v in new.named_buffers()}
        found[f"train={train}"] = {
            "keys": sorted(a) == sorted(b), "params_equal": all(torch.equal(a[k], b[k]) for k in a),
            "dtypes": sorted({str(p.dtype) for p in new.parameters()}),
            "buffers_equal_on_every_rank": all(training.gather(all(buffers.values()))) and len(buffers) > 0,
            "logp_equal": torch.equal(forward_logp(new, tokenizer, kind, cfg),
                                      forward_logp(old, tokenizer, kind, cfg))}
    try:
        checkpoint.check_shared("shared", timeout=1.0)
        found["check_shared"] = "passed"
    except checkpoint.CheckpointError as e:
        found["check_shared"] = str(e)
    params = {0: full_state(new)}  # the weights as loaded
    for replicate in (1, 2):
        step_mesh = training.device_mesh(device.type, replicate)
        acc, params[replicate] = fsdp_step.update_once(cfg, device, step_mesh, rank, world)
        found[f"loss_replicate={replicate}"] = acc["loss"]
    if rank == 0:
        found["hsdp_max_diff"] = max((params[2][k] - v).abs().max().item() for k, v in params[1].items())
        found["hsdp_moved"] = max((params[1][k] - v).abs().max().item() for k, v in params[0].items())
        with open(out_path, "w") as f:
            json.dump(found, f)
    training.end_distributed()


def recording_reward(texts, records, roll):
    """A reward with spread (the completion's length mod 5, over 5) that writes down this rank's videos."""
    out = os.path.join(os.environ["RECORD_DIR"],
                       f"videos-world{dist.get_world_size()}-rank{dist.get_rank()}.jsonl")
    with open(out, "a") as f:
        f.write(json.dumps(list(dict.fromkeys(r.id for r in records))) + "\n")
    reward = torch.tensor([len(t) % 5 for t in texts], dtype=torch.float32) / 5
    return reward, {"length": reward}, {}


def run_grpo(overrides):
    cfg = config.load_config(os.path.join(ROOT, "tests", "tiny.yaml"), overrides)
    os.environ["RECORD_DIR"] = os.path.abspath(cfg.train.out_dir)
    os.makedirs(os.environ["RECORD_DIR"], exist_ok=True)
    return grpo.train(cfg, reward_fn=recording_reward)


if __name__ == "__main__":
    if sys.argv[1] == "load":
        load(sys.argv[2], sys.argv[3])
    else:
        run_grpo(sys.argv[2:])
