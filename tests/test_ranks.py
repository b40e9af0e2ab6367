"""grpo.train on several ranks, value for value: two ranks give the metrics and weights of one process (the
loss denominators and the batch std are global all-reduces in train_step), a checkpoint of two ranks loads
exactly on one rank and with train.replicate=2 (weights and AdamW state), and a rank that stops responding
ends the run within train.collective_timeout with a message that names the rank that waited and why.

Every run here is tests/train_worker.py's: a toy reward, and each video's completions drawn from its own
generator, so that the completions do not depend on the number of ranks."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

import checkpoint
import config
import grpo
import model
import train_worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
WORKER = os.path.join(ROOT, "tests", "train_worker.py")
# 2 videos a step (1 per rank on 2 ranks), G = 4 split over micro-batches of 3, the loss over the tokens
# (its denominator a global token count) and advantages scaled by the global batch's std
RUN = ["train.warm_start=false", f"data.train={ROOT}/tests/data/train.jsonl",
       f"data.prompt_file={ROOT}/prompts/think.txt", "sampling.group_size=4", "sampling.max_new_tokens=16",
       "train.micro_batch_size=3", "train.loss_agg=token-mean", "train.adv_scale=batch", "train.lr=1e-3",
       "train.checkpoint_every=2", "train.sample_every=0"]
pytestmark = pytest.mark.slow  # every test here runs torchrun, or shares the two-rank run
STEP_FIGURES = ("loss", "grad_norm", "kl", "entropy", "clip_frac", "completion_len")


def torchrun(nproc, mode, overrides, env=None, timeout=300):
    return subprocess.run(TORCHRUN + [f"--nproc_per_node={nproc}", WORKER, mode, *overrides], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def in_process(overrides, monkeypatch, state_out=None):
    """train_worker's `ranks` in this process: a world of one."""
    cfg = config.load_config(os.path.join(ROOT, "tests", "tiny.yaml"), overrides)
    monkeypatch.setattr(model, "generate", train_worker.per_video_sampling(model.generate))
    if state_out:
        monkeypatch.setattr(checkpoint, "resume",
                            train_worker.record_resumed_state(checkpoint.resume, state_out))
    grpo.train(cfg, reward_fn=train_worker.letters_reward(cfg.model.path))


def logged(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]


def assert_same_run(one, two, steps):
    """The metrics of `steps` (1-based) logged by the runs in the folders `one` and `two`: the same
    completions (rewards exactly equal), and the loss, gradient norm, KL, entropy... of the same update."""
    a, b = ({m["step"]: m for m in logged(out)} for out in (one, two))
    for step in steps:
        assert a[step]["reward"] == b[step]["reward"], step
        for key in STEP_FIGURES:
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-7), (step, key)


def assert_same_weights(one, two, initial):
    """The exports of two runs are equal within 3e-4 (AdamW divides each gradient by its own running scale,
    so the rounding noise of a near-zero gradient becomes a step of up to lr = 1e-3), and within a tenth of
    how far the runs moved the weights."""
    a, b, start = (load_file(f"{path}/model.safetensors")
                   for path in (f"{one}/export", f"{two}/export", initial))
    moved = max((a[k] - start[k]).abs().max().item() for k in a)
    differ = max((a[k] - b[k]).abs().max().item() for k in a)
    assert differ < 3e-4 and moved > 10 * differ, (differ, moved)


def saved_state(ckpt, tmp_path):
    """A checkpoint folder's weights and optimizer state as full tensors, read by DCP itself."""
    dcp_to_torch_save(ckpt, tmp_path / "saved.pt")
    return torch.load(tmp_path / "saved.pt", weights_only=True)


def assert_state_equals_checkpoint(loaded, saved):
    """Every weight and every AdamW tensor (step, exp_avg, exp_avg_sq) bit-identical, after 2 steps."""
    assert sorted(loaded["model"]) == sorted(saved["model"])
    for k, v in saved["model"].items():
        assert torch.equal(loaded["model"][k], v), k
    assert sorted(loaded["optim"]["state"]) == sorted(saved["optim"]["state"])
    for k, state in saved["optim"]["state"].items():
        assert sorted(state) == ["exp_avg", "exp_avg_sq", "step"] and state["step"].item() == 2, k
        for name, v in state.items():
            assert torch.equal(loaded["optim"]["state"][k][name], v), (k, name)


@pytest.fixture(scope="module")
def two_ranks(tiny_model_dir, tmp_path_factory):
    """4 steps on 2 ranks, checkpoints at steps 2 and 4, the export: the run the others are compared with."""
    out = tmp_path_factory.mktemp("two-ranks")
    proc = torchrun(2, "ranks", [*RUN, f"model.path={tiny_model_dir('qwen2_vl')}", f"train.out_dir={out}",
                                "train.steps=4", "train.prompts_per_rank=1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_two_ranks_equal_one_process(two_ranks, tiny_model_dir, tmp_path, monkeypatch):
    """Through grpo.train, 4 steps: the same rewards, every step's loss, gradient norm, KL and entropy equal
    (a loss denominator or a batch std taken per rank changes the first step's loss and gradient norm), and
    the same weights."""
    path = tiny_model_dir("qwen2_vl")
    in_process([*RUN, f"model.path={path}", f"train.out_dir={tmp_path}", "train.steps=4",
                "train.prompts_per_rank=2"], monkeypatch)
    assert_same_run(tmp_path, two_ranks, steps=[1, 2, 3, 4])
    assert_same_weights(tmp_path, two_ranks, path)


def test_a_two_rank_checkpoint_resumes_exactly_on_one_rank(two_ranks, tiny_model_dir, tmp_path, monkeypatch):
    """Resumed from the two ranks' step 2 on one rank: the weights and AdamW state it loads are those saved,
    bit for bit, and steps 3 and 4 then are the two ranks' steps 3 and 4."""
    path = tiny_model_dir("qwen2_vl")
    shutil.copytree(two_ranks / "checkpoints" / "step-000002", tmp_path / "run/checkpoints/step-000002")
    in_process([*RUN, f"model.path={path}", f"train.out_dir={tmp_path}/run", "train.steps=4",
                "train.prompts_per_rank=2"], monkeypatch, state_out=tmp_path / "loaded.pt")
    saved = saved_state(two_ranks / "checkpoints" / "step-000002", tmp_path)
    assert_state_equals_checkpoint(torch.load(tmp_path / "loaded.pt", weights_only=True), saved)
    assert [m["step"] for m in logged(tmp_path / "run")] == [3, 4]
    assert_same_run(tmp_path / "run", two_ranks, steps=[3, 4])
    assert_same_weights(tmp_path / "run", two_ranks, path)


def test_a_checkpoint_resumes_exactly_with_another_replicate(two_ranks, tiny_model_dir, tmp_path):
    """The two ranks' step 2 (one copy sharded over both) loaded by two ranks with train.replicate=2 (a whole
    copy on each): the weights and AdamW state loaded are those saved, bit for bit, and steps 3 and 4 then
    are the sharded run's."""
    path = tiny_model_dir("qwen2_vl")
    shutil.copytree(two_ranks / "checkpoints" / "step-000002", tmp_path / "run/checkpoints/step-000002")
    proc = torchrun(2, "ranks", [*RUN, f"model.path={path}", f"train.out_dir={tmp_path}/run", "train.steps=4",
                                 "train.prompts_per_rank=1", "train.replicate=2"],
                    env={"STATE_OUT": str(tmp_path / "loaded.pt")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = saved_state(two_ranks / "checkpoints" / "step-000002", tmp_path)
    assert_state_equals_checkpoint(torch.load(tmp_path / "loaded.pt", weights_only=True), saved)
    assert_same_run(tmp_path / "run", two_ranks, steps=[3, 4])
    assert_same_weights(tmp_path / "run", two_ranks, path)


def test_a_hung_rank_ends_the_run_naming_the_rank_that_waited(tiny_model_dir, tmp_path):
    """Rank 1 stops responding in its reward at step 2; rank 0 waits train.collective_timeout (4 s) in its
    next collective, then says which rank it is and why it stopped, and torchrun ends the run."""
    proc = torchrun(2, "hang", [*RUN, f"model.path={tiny_model_dir('qwen2_vl')}", f"train.out_dir={tmp_path}",
                                "train.steps=4", "train.prompts_per_rank=1", "train.export=false",
                                "train.collective_timeout=4"], timeout=200)  # with 1800 s it would not end
    assert proc.returncode != 0
    said = re.split(r"(?:^|\n)\[rank 0\] ", proc.stderr)  # process_group's message, printed in one write
    assert len(said) == 2, proc.stderr[-3000:]
    assert "Timed out waiting 4000ms" in said[1].split("\n[rank", 1)[0], said[1][-3000:]  # gloo's, after 4 s
    assert [m["step"] for m in logged(tmp_path)] == [1]
