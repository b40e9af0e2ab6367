"""What tests/test_ranks.py and tests/test_resume.py run, under torchrun (one process per rank) or alone (a
world of one): grpo.train on tests/tiny.yaml and the overrides, with `letters_reward` (a toy reward that
needs no judge and has spread on a random model).

    python tests/train_worker.py grpo [key=value ...]                          # the program's own rollout
    torchrun --nproc_per_node N tests/train_worker.py ranks [key=value ...]    # per-video sampling
    torchrun --nproc_per_node 2 tests/train_worker.py hang [key=value ...]     # rank 1 hangs at step 2

`grpo`: the run as the program does it, to be stopped (SIGTERM) and resumed.

`ranks`: each video's completions drawn from a generator seeded by the video's own pixels
(`per_video_sampling`) rather than the rank's: a video gets the same completions whichever rank takes it and
however many ranks there are, so runs on different numbers of ranks can be compared value for value (the
rollout's own generator, which this leaves unused, is what the `grpo` runs of test_resume.py check). With
STATE_OUT set, rank 0 writes the full weights and AdamW state that checkpoint.resume loaded into STATE_OUT
(`record_resumed_state`), to compare with the checkpoint as it was saved.

`hang`: as `ranks`, but rank 1 stops responding inside its reward at step 2, as a judge call that never
returns would, so that rank 0 meets train.collective_timeout in its next collective.
"""
import hashlib
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import checkpoint  # noqa: E402
import config  # noqa: E402
import data  # noqa: E402
import grpo  # noqa: E402
import model  # noqa: E402
import training  # noqa: E402

PROMPT_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")


def letters_reward(model_dir):
    """Toy reward: the share of a completion's tokens that are lowercase letters."""
    tokenizer = model.load_tokenizer(model_dir)
    target = torch.tensor(tokenizer.convert_tokens_to_ids(list("abcdefghijklmnopqrstuvwxyz")))

    def reward_fn(texts, records, roll):
        mask = grpo.length_mask(roll.lengths, roll.ids.shape[1])
        share = ((torch.isin(roll.ids, target) & mask).sum(1) / roll.lengths).float()  # (N,)
        return share, {"letters": share}, {}
    return reward_fn


def per_video_sampling(generate):
    """model.generate, but each video of the batch on its own, without the batch's left padding, drawing from
    a generator seeded by a hash of its pixels: the completions depend on the video and the weights only."""
    def one_by_one(hf_model, batch, group_size, *args, generator=None, sync=None, on_end=None):
        rolls = []
        for b in range(batch["input_ids"].shape[0]):
            one = data.select_rows(batch, [b])
            kept = one["attention_mask"][0].bool()  # (L,) the prompt without its padding
            one.update({k: one[k][:, kept] for k in PROMPT_KEYS})
            pixels = one["pixel_values_videos"].cpu().numpy().tobytes()
            seed = int.from_bytes(hashlib.sha256(pixels).digest()[:8], "little")
            own = torch.Generator(device=batch["input_ids"].device).manual_seed(seed)
            rolls.append(generate(hf_model, one, group_size, *args, generator=own, sync=sync))
        parts = zip(*((r.ids, r.lengths, r.ended) for r in rolls))
        roll = model.Rollout(*(torch.cat(part) for part in parts))
        if on_end is not None:  # every row has ended by now: the rewards start as generate's would at the end
            on_end(roll, list(range(len(roll.lengths))))
        return roll
    return one_by_one


def record_resumed_state(resume, out_path):
    """checkpoint.resume, followed by rank 0 writing the full weights and optimizer state it loaded."""
    def resume_and_record(run, policy, optimizer, rank, *args):
        found = resume(run, policy, optimizer, rank, *args)
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights, optim = get_state_dict(policy, optimizer, options=full)
        if rank == 0:
            torch.save({"model": weights, "optim": optim}, out_path)
        return found
    return resume_and_record


def hang_at_step_2(reward_fn):
    """reward_fn, except that rank 1 never returns from its second call (SIGTERM still ends it, as it
    would end a process stuck in a network call)."""
    calls = []

    def reward(texts, records, roll):
        calls.append(1)
        if dist.get_rank() == 1 and len(calls) == 2:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            time.sleep(600)
        return reward_fn(texts, records, roll)
    return reward


def main(mode, overrides):
    cfg = config.load_config(os.path.join(ROOT, "tests", "tiny.yaml"), overrides)
    if mode != "grpo":
        model.generate = per_video_sampling(model.generate)
    if os.environ.get("STATE_OUT"):
        checkpoint.resume = record_resumed_state(checkpoint.resume, os.environ["STATE_OUT"])
    reward_fn = letters_reward(cfg.model.path)
    try:
        grpo.train(cfg, reward_fn=hang_at_step_2(reward_fn) if mode == "hang" else reward_fn)
    except training.Stopped as e:  # SIGTERM: the step's checkpoint is written; exit as grpo.py does
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
