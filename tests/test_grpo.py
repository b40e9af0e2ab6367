"""grpo.py end to end: it learns, FSDP matches one process, resume is exact, the demo runs."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

import checkpoint
import config
from conftest import assert_resume_is_exact
import grpo
import model
from train_worker import letters_reward

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "demo.yaml")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def demo_cfg(model_dir, out_dir, *overrides):
    return config.load_config(DEMO, [f"model.path={model_dir}", f"train.out_dir={out_dir}",
                                     "train.warm_start=false",
                                     f"data.train={ROOT}/tests/data/train.jsonl",
                                     f"data.prompt_file={ROOT}/prompts/think.txt", *overrides])


def rewards_logged(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["reward"] for line in f]


LEARN = ["train.steps=30", "train.lr=3e-3", "sampling.group_size=8", "sampling.max_new_tokens=16",
         "train.prompts_per_rank=2",
         "train.micro_batch_size=16", "train.checkpoint_every=0", "train.export=false",
         "train.sample_every=0"]


@pytest.mark.slow
@pytest.mark.parametrize("sign", [1, -1])
def test_it_learns_a_toy_reward_and_not_with_the_sign_flipped(tiny_model_dir, tmp_path, monkeypatch, sign):
    """The mean reward rises clearly within 30 steps; with -A instead of A it must not
    (this is what shows the test can fail)."""
    path = tiny_model_dir("qwen2_vl")
    if sign < 0:
        advantages = grpo.group_advantages
        monkeypatch.setattr(grpo, "group_advantages", lambda *a, **k: -advantages(*a, **k))
    grpo.train(demo_cfg(path, tmp_path, *LEARN), reward_fn=letters_reward(path))
    r = rewards_logged(tmp_path)
    first, last = sum(r[:5]) / 5, sum(r[-5:]) / 5
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    updates = [m for m in lines if "loss" in m]
    assert updates and all(m["ratio_min"] == m["ratio_max"] == 1.0 for m in updates)  # on-policy: rho == 1
    if sign > 0:
        assert last > first + 0.3, (first, last)
    else:
        assert last < first, (first, last)


@pytest.mark.slow
@pytest.mark.parametrize("agg, checkpointing", [("seq-mean-token-mean", "false"), ("token-mean", "true")])
def test_fsdp_two_ranks_equal_one_process(tiny_model_dir, tmp_path, agg, checkpointing):
    """Two ranks with prefix-shared passes (each group's prompt once, the groups split over micro-batches)
    give the parameters of one process that runs every completion with its own copy of the prompt."""
    path = tiny_model_dir("qwen2_vl")
    results = []
    for n, shared in ((1, "false"), (2, "true")):
        out = tmp_path / f"world{n}.pt"
        script = [f"{ROOT}/tests/fsdp_step.py", path, str(out), agg, checkpointing, "1", shared]
        proc = subprocess.run(TORCHRUN + [f"--nproc_per_node={n}", *script],
                              capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results.append(torch.load(out))
    one, two = results
    assert one["grad_norm"] > 0
    assert two["loss"] == pytest.approx(one["loss"], abs=1e-5)
    assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)
    for name, p in one["params"].items():
        assert torch.allclose(two["params"][name], p, atol=1e-5), name


def test_nonfinite_losses_are_skipped_then_stop_the_run(tiny_model_dir, tmp_path, monkeypatch):
    path = tiny_model_dir("qwen2_vl")
    loss_fn = grpo.policy_loss

    def nan_loss(*args, **kwargs):
        loss, stats = loss_fn(*args, **kwargs)
        return loss * float("nan"), stats
    monkeypatch.setattr(grpo, "policy_loss", nan_loss)
    cfg = demo_cfg(path, tmp_path, *LEARN, "train.max_nonfinite_steps=2", "train.export=true")
    with pytest.raises(RuntimeError, match="3 steps in a row had a non-finite loss"):
        grpo.train(cfg, reward_fn=letters_reward(path))
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [m["nonfinite"] for m in lines] == [1, 1]  # counted and logged; the third step stops the run
    assert not os.path.exists(tmp_path / "export")


def test_resume_is_exact(tiny_model_dir, tmp_path):
    """4 steps straight == 2 steps, a stop, and 2 resumed steps (same parameters)."""
    path = tiny_model_dir("qwen2_vl")
    reward_fn = letters_reward(path)
    common = [*LEARN[1:], "train.export=true", "train.checkpoint_every=2"]
    grpo.train(demo_cfg(path, tmp_path / "straight", *common, "train.steps=4"), reward_fn=reward_fn)
    grpo.train(demo_cfg(path, tmp_path / "resumed", *common, "train.steps=2"), reward_fn=reward_fn)
    grpo.train(demo_cfg(path, tmp_path / "resumed", *common, "train.steps=4"), reward_fn=reward_fn)
    assert_resume_is_exact(tmp_path / "straight", tmp_path / "resumed", path)
    assert rewards_logged(tmp_path / "straight") == rewards_logged(tmp_path / "resumed")
    assert sorted(os.listdir(tmp_path / "resumed/checkpoints")) == ["step-000002", "step-000004"]


def run_grpo(args, nproc=1, timeout=300):
    cmd = TORCHRUN + [f"--nproc_per_node={nproc}", "grpo.py"] if nproc > 1 else [sys.executable, "grpo.py"]
    return subprocess.run(cmd + args, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_demo_end_to_end(tiny_model_dir, tmp_path, nproc):
    path = tiny_model_dir("qwen2_vl")
    proc = run_grpo(["demo.yaml", f"model.path={path}", f"train.out_dir={tmp_path}", "train.steps=3",
                     "train.checkpoint_every=2", "train.prompts_per_rank=1", "sampling.max_new_tokens=32",
                     f"sft.out_dir={tmp_path}/sft", "sft.steps=2"], nproc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done: 3 steps" in proc.stdout
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert [m["step"] for m in lines] == [1, 2, 3]
    for key in ("reward", "reward_format", "reward_think", "reward_event", "dropped_groups", "completion_len",
                "truncated", "time_rollout", "time_reward", "rollout_tok_s", "peak_mem_gb"):
        assert key in lines[-1], key
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-000002", "step-000003"]
    assert "done: 2 SFT steps" in proc.stdout  # the warm start ran first, and GRPO started from its export
    saved = config.load_config(tmp_path / "config.yaml")
    assert saved.train.steps == 3 and saved.model.path == f"{tmp_path}/sft/export"
    if nproc == 1:  # a warm start made from another model is refused, not silently reused
        again = run_grpo(["demo.yaml", f"model.path={path}-other", f"train.out_dir={tmp_path}",
                          f"sft.out_dir={tmp_path}/sft"])
        assert again.returncode == 1
        assert f"{tmp_path}/sft/export was made from model.path={path}" in again.stderr
    hf, kind = model.load_model(str(tmp_path / "export"), saved.model, "cpu", train=False)
    assert kind == "qwen2_vl" and model.load_tokenizer(str(tmp_path / "export")).pad_token_id is not None


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "did you mean 'train.lr'"),
    ("sampling.group_size=1", "group_size must be >= 2"),
    ("train.loss_agg=mean", "train.loss_agg must be one of"),
    ("model.path=/nonexistent/model", "/nonexistent/model"),
])
def test_bad_configs_fail_clearly(tmp_path, override, message):
    proc = run_grpo(["demo.yaml", f"train.out_dir={tmp_path}", f"sft.out_dir={tmp_path}/sft",
                     "model.build_tiny=", override], timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]


def test_a_changed_setting_is_honoured_and_recorded_or_refused(tiny_model_dir, tmp_path):
    path = tiny_model_dir("qwen2_vl")
    reward_fn = letters_reward(path)
    common = [*LEARN[1:], "train.checkpoint_every=2"]
    grpo.train(demo_cfg(path, tmp_path, *common, "train.steps=2", "train.lr=1e-3"), reward_fn=reward_fn)
    grpo.train(demo_cfg(path, tmp_path, *common, "train.steps=4", "train.lr=2e-3"), reward_fn=reward_fn)
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [m["lr"] for m in lines] == [1e-3, 1e-3, 2e-3, 2e-3]  # the new lr, not the checkpoint's
    changes = [json.loads(line) for line in open(tmp_path / "changes.jsonl")]
    assert {"step": 2, "key": "train.lr", "old": 1e-3, "new": 2e-3} in changes
    assert {"step": 2, "key": "train.steps", "old": 2, "new": 4} in changes
    with pytest.raises(checkpoint.CheckpointError,
                       match="seed was 0 in the checkpoint at step 4, now 7.*resume=never"):
        grpo.train(demo_cfg(path, tmp_path, *common, "train.steps=6", "seed=7"), reward_fn=reward_fn)


def test_steps_redone_after_a_crash_are_logged_once(tiny_model_dir, tmp_path):
    path = tiny_model_dir("qwen2_vl")
    reward_fn = letters_reward(path)
    common = [*LEARN[1:], "train.checkpoint_every=2"]
    grpo.train(demo_cfg(path, tmp_path, *common, "train.steps=3"), reward_fn=reward_fn)
    # killed after logging step 3, before its checkpoint
    shutil.rmtree(tmp_path / "checkpoints" / "step-000003")
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "rew')  # and a line torn by the kill
    grpo.train(demo_cfg(path, tmp_path, *common, "train.steps=4"), reward_fn=reward_fn)
    for name in ("metrics.jsonl", "samples.jsonl"):
        steps = [json.loads(line)["step"] for line in open(tmp_path / name)]
        assert steps == [1, 2, 3, 4], (name, steps)


def test_a_judge_gone_for_good_stops_the_run_with_a_checkpoint(tiny_model_dir, tmp_path, capsys):
    path = tiny_model_dir("qwen2_vl")
    letters = letters_reward(path)

    def judge_down_from_step_3(texts, records, roll, calls=[]):
        calls.append(1)
        reward, parts, stats = letters(texts, records, roll)
        return (reward * math.nan if len(calls) >= 3 else reward), parts, stats
    cfg = demo_cfg(path, tmp_path, *LEARN, "judge.failed_window=2", "judge.max_failed_share=0.5")
    with pytest.raises(grpo.JudgeOutage, match="judging failed for 100% of the groups of the last 2 steps.*"
                                                "checkpoint is written at step 4"):
        grpo.train(cfg, reward_fn=judge_down_from_step_3)
    assert os.listdir(tmp_path / "checkpoints") == ["step-000004"]
    assert "groups dropped from the loss: 4 of 8: 4 because a judge call failed" in capsys.readouterr().out


def run_main(main, argv, capsys):
    """A command's main(argv) in this process -> (exit status, stdout, stderr)."""
    try:
        status = main(argv) or 0
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return status, out, err


def test_commands_answer_help_and_refuse_unknown_options(capsys):
    import bench
    import evaluate
    import prepare
    import sft
    for main, argv in [(grpo.main, ["--help"]), (sft.main, ["--help"]), (evaluate.main, ["--help"]),
                       (prepare.main, ["--help"]), (prepare.main, ["--check", "--help"]),
                       (bench.main, ["--help"])]:
        status, out, err = run_main(main, argv, capsys)
        assert status == 0 and "usage" in out.lower(), (main.__module__, argv, out[-500:], err)
    for main in (grpo.main, sft.main, evaluate.main):
        status, out, err = run_main(main, ["demo.yaml", "--frobnicate"], capsys)
        assert status == 2 and "--frobnicate" in err and len(err.splitlines()) == 1, (main.__module__, err)
    # and the scripts themselves, once
    proc = subprocess.run([sys.executable, "grpo.py", "--help"], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: python grpo.py")


def test_logged_loss_is_the_mean_of_the_passes_applied(tiny_model_dir, tmp_path, monkeypatch):
    """num_iterations=3 with the second pass non-finite: the loss logged is the mean of passes 1 and 3."""
    path = tiny_model_dir("qwen2_vl")
    loss_fn, losses = grpo.policy_loss, []

    def second_pass_nan(*args, **kwargs):
        loss, stats = loss_fn(*args, **kwargs)
        if len(losses) == 1:
            loss = loss * math.nan
        losses.append(loss.item())
        return loss, stats
    monkeypatch.setattr(grpo, "policy_loss", second_pass_nan)
    # 2 videos x G = 8 rows in one micro-batch of 16: one policy_loss call per pass
    cfg = demo_cfg(path, tmp_path, *LEARN, "train.steps=1", "train.num_iterations=3", "train.lr=1e-4")
    metrics = grpo.train(cfg, reward_fn=letters_reward(path))
    assert len(losses) == 3 and math.isnan(losses[1]) and metrics["nonfinite"] == 1
    assert metrics["loss"] == pytest.approx((losses[0] + losses[2]) / 2)


def test_held_out_rewards_are_logged(tiny_model_dir, tmp_path):
    path = tiny_model_dir("qwen2_vl")
    cfg = demo_cfg(path, tmp_path, *LEARN, "train.steps=2", "train.eval_every=2",
                   f"data.val={ROOT}/tests/data/heldout/val.jsonl")
    grpo.train(cfg, reward_fn=letters_reward(path))
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert "val_reward" not in lines[0] and 0 < lines[1]["val_reward"] <= 1
    assert lines[1]["val_reward"] == lines[1]["val_reward_letters"]


@pytest.mark.slow
def test_a_full_disk_while_logging_names_the_file(tiny_model_dir, tmp_path):
    path = tiny_model_dir("qwen2_vl")
    # ulimit -f 4: no file past 4 KiB; config.yaml (3 KiB) fits, metrics.jsonl fills up after some 5 steps
    proc = subprocess.run(["bash", "-c", 'ulimit -f 4; exec "$0" "$@"', sys.executable, "grpo.py",
                           "demo.yaml", f"model.path={path}", f"train.out_dir={tmp_path}",
                           "train.warm_start=false", "train.steps=40", "train.checkpoint_every=0",
                           "train.export=false", "sampling.max_new_tokens=48", "train.prompts_per_rank=1"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"grpo.py: cannot write {tmp_path}/metrics.jsonl (disk full or not writable?)" in proc.stderr
    assert "Traceback" not in proc.stderr
