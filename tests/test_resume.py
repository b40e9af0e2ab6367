"""Stopping and resuming, value for value. A run stopped by a real SIGTERM, resumed, then killed after logging
a step but before its checkpoint and resumed again, ends bit-identical to an uninterrupted run, each step
logged once with the same values (GRPO with its own rollout generator, and SFT). Settings changed on resume
are the ones used from then on (the learning rate, AdamW's betas and weight decay) and recorded, and
changes.jsonl is cut back with the logs; each key a checkpoint depends on is refused. The export replaces the
previous one only once complete. A judge gone for good stops the run with a checkpoint, quoting its last
error."""
import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

import checkpoint
import config
import logs
from conftest import assert_resume_is_exact
import grpo
import model
import sft
import train_worker
import training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "tiny.yaml")
DATA = [f"data.train={ROOT}/tests/data/train.jsonl", f"data.prompt_file={ROOT}/prompts/think.txt"]
GRPO = [*DATA, "train.warm_start=false", "sampling.group_size=4", "sampling.max_new_tokens=16",
        "train.prompts_per_rank=2", "train.micro_batch_size=8", "train.lr=3e-3", "train.checkpoint_every=0",
        "train.sample_every=0"]
SFT = [*DATA, "sft.prompts_per_rank=2", "sft.micro_batch_size=1", "sft.lr=1e-3", "sft.checkpoint_every=0"]


def grpo_cfg(model_dir, out_dir, *overrides):
    return config.load_config(TINY, [*GRPO, f"model.path={model_dir}", f"train.out_dir={out_dir}",
                                     *overrides])


def sft_cfg(model_dir, out_dir, *overrides):
    return config.load_config(TINY, [*SFT, f"model.path={model_dir}", f"sft.out_dir={out_dir}", *overrides])


def logged(out_dir, name="metrics.jsonl"):
    return logs.read_jsonl(os.path.join(out_dir, name))


def stop_with_sigterm(command, out_dir):
    """Start `command`, send it SIGTERM once it has logged 2 steps -> the step its checkpoint holds."""
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(out_dir, "metrics.jsonl")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(logged(out_dir)) < 2 and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and os.path.exists(metrics), err[-3000:]
    step = int(re.search(r"SIGTERM: checkpoint written at step (\d+);", out).group(1))
    assert os.listdir(os.path.join(out_dir, "checkpoints")) == [f"step-{step:06d}"]
    return step


def kill_after_logging(out_dir, step):
    """What a kill after logging `step` but before its checkpoint would leave: that step in the logs, no
    checkpoint of it, and the next line torn."""
    shutil.rmtree(os.path.join(out_dir, "checkpoints", f"step-{step:06d}"))
    with open(os.path.join(out_dir, "metrics.jsonl"), "a") as f:
        f.write(f'{{"step": {step + 1}, "rew')


def assert_logged_alike(straight, resumed, key, steps):
    """Each step logged once, with the same `key` as the uninterrupted run (the same samples for GRPO)."""
    a, b = logged(straight), logged(resumed)
    assert [m["step"] for m in b] == [m["step"] for m in a] == list(range(1, steps + 1))
    assert [m[key] for m in b] == [m[key] for m in a]


@pytest.mark.slow
def test_grpo_stopped_killed_and_resumed_equals_an_uninterrupted_run(tiny_model_dir, tmp_path, capsys):
    """SIGTERM at step k (grpo.train in its own process, the program's rollout generator), resume to k + 2, a
    kill after logging k + 2, resume again: the weights, every step's reward and loss, and the samples equal
    those of k + 2 steps straight, bit for bit."""
    path = tiny_model_dir("qwen2_vl")
    stopped, straight = tmp_path / "stopped", tmp_path / "straight"
    k = stop_with_sigterm([sys.executable, train_worker.__file__, "grpo", *GRPO, f"model.path={path}",
                           f"train.out_dir={stopped}", "train.steps=1000"], stopped)
    reward_fn = train_worker.letters_reward(path)
    grpo.train(grpo_cfg(path, stopped, f"train.steps={k + 2}"), reward_fn=reward_fn)
    assert f"resumed from {stopped}/checkpoints/step-{k:06d} at step {k}" in capsys.readouterr().out
    kill_after_logging(stopped, k + 2)
    grpo.train(grpo_cfg(path, stopped, f"train.steps={k + 2}"), reward_fn=reward_fn)
    grpo.train(grpo_cfg(path, straight, f"train.steps={k + 2}"), reward_fn=reward_fn)
    assert_resume_is_exact(straight, stopped, path)
    for key in ("reward", "loss", "grad_norm"):
        assert_logged_alike(straight, stopped, key, k + 2)
    assert logged(stopped, "samples.jsonl") == logged(straight, "samples.jsonl")


@pytest.mark.slow
def test_sft_stopped_killed_and_resumed_equals_an_uninterrupted_run(tiny_model_dir, tmp_path):
    """The same for sft.py, stopped as `python sft.py` by SIGTERM: the weights and every step's loss."""
    path = tiny_model_dir("qwen2_vl")
    stopped, straight = tmp_path / "stopped", tmp_path / "straight"
    k = stop_with_sigterm([sys.executable, "sft.py", TINY, *SFT, f"model.path={path}",
                           f"sft.out_dir={stopped}", "sft.steps=1000"], stopped)
    sft.train(sft_cfg(path, stopped, f"sft.steps={k + 2}"))
    kill_after_logging(stopped, k + 2)
    sft.train(sft_cfg(path, stopped, f"sft.steps={k + 2}"))
    sft.train(sft_cfg(path, straight, f"sft.steps={k + 2}"))
    assert_resume_is_exact(straight, stopped, path)
    for key in ("loss", "grad_norm"):
        assert_logged_alike(straight, stopped, key, k + 2)


def test_changed_settings_are_used_recorded_and_cut_back_with_the_logs(tiny_model_dir, tmp_path, monkeypatch):
    """Resumed at step 2 with another lr, betas and weight decay: AdamW steps with the new ones (not the
    checkpoint's copy) and changes.jsonl says so at step 2. Resumed then from the checkpoint of step 1: the
    logs and changes.jsonl are cut back to step 1 before the new changes are written."""
    path = tiny_model_dir("qwen2_vl")
    used = {}  # step -> (betas, weight decay) of the optimizer that takes it
    set_lr = training.set_lr

    def record(optimizer, run, step):
        group = optimizer.param_groups[0]
        used[step + 1] = (tuple(group["betas"]), group["weight_decay"])
        return set_lr(optimizer, run, step)
    monkeypatch.setattr(training, "set_lr", record)
    reward_fn = train_worker.letters_reward(path)
    common = ["train.checkpoint_every=1", "train.keep_checkpoints=0"]  # keep them all
    grpo.train(grpo_cfg(path, tmp_path, *common, "train.steps=2", "train.lr=1e-3"), reward_fn=reward_fn)
    grpo.train(grpo_cfg(path, tmp_path, *common, "train.steps=3", "train.lr=2e-3",
                        "train.adam_betas=[0.5,0.9]", "train.weight_decay=0.1"), reward_fn=reward_fn)
    assert used == {1: ((0.9, 0.999), 0.0), 2: ((0.9, 0.999), 0.0), 3: ((0.5, 0.9), 0.1)}
    assert [(m["step"], m["lr"]) for m in logged(tmp_path)] == [(1, 1e-3), (2, 1e-3), (3, 2e-3)]
    assert logged(tmp_path, "changes.jsonl") == [
        {"step": 2, "key": "train.steps", "old": 2, "new": 3},
        {"step": 2, "key": "train.lr", "old": 1e-3, "new": 2e-3},
        {"step": 2, "key": "train.weight_decay", "old": 0.0, "new": 0.1},
        {"step": 2, "key": "train.adam_betas", "old": [0.9, 0.999], "new": [0.5, 0.9]}]
    grpo.train(grpo_cfg(path, tmp_path, *common, "train.steps=3", "train.lr=3e-3",
                        f"train.resume={tmp_path}/checkpoints/step-000001"), reward_fn=reward_fn)
    assert used[2] == used[3] == ((0.9, 0.999), 0.0)
    assert [(m["step"], m["lr"]) for m in logged(tmp_path)] == [(1, 1e-3), (2, 3e-3), (3, 3e-3)]
    assert logged(tmp_path, "changes.jsonl") == [
        {"step": 1, "key": "train.steps", "old": 2, "new": 3},
        {"step": 1, "key": "train.lr", "old": 1e-3, "new": 3e-3}]


@pytest.fixture(scope="module")
def checkpointed(tiny_model_dir, tmp_path_factory):
    """A GRPO and an SFT run of one step each, with their checkpoints, and a second name for the model folder
    and for the data folder (the same files, other paths)."""
    base = tmp_path_factory.mktemp("checkpointed")
    path = tiny_model_dir("qwen2_vl")
    os.symlink(path, base / "model-again")
    os.symlink(f"{ROOT}/tests/data", base / "data-again")
    grpo.train(grpo_cfg(path, base / "grpo", "train.steps=1", "train.export=false"),
               reward_fn=train_worker.letters_reward(path))
    sft.train(sft_cfg(path, base / "sft", "sft.steps=1", "sft.export=false"))
    return base, path


# the keys the README says a resume refuses, each with another value
REFUSED = {"seed": "7", "model.path": "{base}/model-again", "data.train": "{base}/data-again/train.jsonl",
           "data.shuffle": "false", "sft.target": "caption"}


@pytest.mark.parametrize("program, key", [*(("grpo.py", k) for k in list(REFUSED)[:4]),
                                          *(("sft.py", k) for k in REFUSED)])
def test_a_key_the_checkpoint_depends_on_is_refused_on_resume(checkpointed, tmp_path, program, key):
    base, path = checkpointed
    run = shutil.copytree(base / program.removesuffix(".py"), tmp_path / "run")
    change = f"{key}={REFUSED[key].format(base=base)}"
    refusal = (rf"^{re.escape(key)} was .* in the checkpoint at step 1, now .*: "
               "the checkpoint's state depends on it")
    with pytest.raises(checkpoint.CheckpointError, match=refusal):
        if program == "grpo.py":
            grpo.train(grpo_cfg(path, run, "train.steps=2", change),
                       reward_fn=train_worker.letters_reward(path))
        else:
            sft.train(sft_cfg(path, run, "sft.steps=2", change))


def test_the_export_replaces_the_previous_one_only_once_complete(tiny_model_dir, tmp_path, monkeypatch):
    """The disk fills while the second run's export copies the source folder's model card, its last file: the
    run stops saying so, and the first run's export is there as it was, with no .tmp left."""
    source = tmp_path / "model"
    shutil.copytree(tiny_model_dir("qwen2_vl"), source)
    (source / "README.md").write_text("a model card, which the export copies last\n")
    reward_fn = train_worker.letters_reward(str(source))
    grpo.train(grpo_cfg(source, tmp_path / "run", "train.steps=1"), reward_fn=reward_fn)
    export = tmp_path / "run" / "export"
    before = {name: (export / name).read_bytes() for name in os.listdir(export)}
    assert "README.md" in before and "model.safetensors" in before
    copy = shutil.copy2

    def full_disk_at_the_card(src, dst, *args, **kwargs):
        if str(src).endswith("README.md"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return copy(src, dst, *args, **kwargs)
    monkeypatch.setattr(shutil, "copy2", full_disk_at_the_card)
    with pytest.raises(checkpoint.CheckpointError, match=f"cannot write the export {export} \\(disk full"):
        grpo.train(grpo_cfg(source, tmp_path / "run", "train.steps=2"), reward_fn=reward_fn)
    assert {name: (export / name).read_bytes() for name in os.listdir(export)} == before
    assert not os.path.exists(tmp_path / "run" / "export.tmp")


def test_a_judge_gone_for_good_stops_the_run_quoting_its_last_error(tiny_model_dir, tmp_path, judge_server,
                                                                   monkeypatch):
    """The configured reward through the HTTP judge, which answers every request with HTTP 400: each group's
    Escore fails, and after judge.failed_window=2 such steps the run writes a checkpoint and stops, quoting
    the judge's last error. (The completions are wrapped in the output format, as a warm-started model writes
    them, so that every one has an answer to judge.)"""
    decode = model.Tokens.decode
    monkeypatch.setattr(model.Tokens, "decode", lambda self, roll, rows=None: [
        f'<think>{{"subjects": []}}</think><answer>A square {text[:20]}.</answer>'
        for text in decode(self, roll, rows)])
    judge_server.fail(*["400"] * 1000)
    cfg = grpo_cfg(tiny_model_dir("qwen2_vl"), tmp_path, "train.steps=10", f"judge.url={judge_server.url}",
                   f"judge.model={judge_server.model}", "judge.health_check=false", "judge.retries=0",
                   "judge.failed_window=2", "judge.max_failed_share=0.5")
    last = f"judge {judge_server.model} @ {judge_server.url} answered HTTP 400: "
    stop = (r"judging failed for 100% of the groups of the last 2 steps, .*"
            rf"\(judge {re.escape(judge_server.url)}; last judge error: {re.escape(last)}"
            r".*told to fail with 400.*\)\. "
            "A checkpoint is written at step 2")
    with pytest.raises(grpo.JudgeOutage, match=stop):
        grpo.train(cfg)
    assert os.listdir(tmp_path / "checkpoints") == ["step-000002"]
    assert [m["judge_failed_groups"] for m in logged(tmp_path)] == [1.0, 1.0]
