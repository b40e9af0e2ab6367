"""grpo.py end to end: it learns, FSDP matches one process, resume is exact, the demo runs."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoint
import config
from conftest import assert_resume_is_exact
import grpo
import model
from train_worker import letters_reward

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "tiny.yaml")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def demo_cfg(model_dir, out_dir, *overrides):
    return config.load_config(TINY, [f"model.path={model_dir}", f"train.out_dir={out_dir}",
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
    proc = run_grpo(["tests/tiny.yaml", f"model.path={path}", f"train.out_dir={tmp_path}", "train.steps=3",
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
        again = run_grpo(["tests/tiny.yaml", f"model.path={path}-other", f"train.out_dir={tmp_path}",
                          f"sft.out_dir={tmp_path}/sft"])
        assert again.returncode == 1
        assert f"{tmp_path}/sft/export was made from model.path={path}" in again.stderr
    hf, kind = model.load_model(str(tmp_path / "export"), saved.model, "cpu", train=False)
    assert kind == "qwen2_vl" and model.load_tokenizer(str(tmp_path / "export")).pad_token_id is not None


def wait_for_lines(path, n, proc, timeout=120):
    """Wait until `path` has `n` lines (a running program's metrics.jsonl)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and \
            not (path.exists() and len(path.read_text().splitlines()) >= n):
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.parametrize("sig, code, name", [(signal.SIGTERM, 0, "SIGTERM"), (signal.SIGINT, 130, "Ctrl-C")])
def test_sigterm_and_ctrl_c_write_a_checkpoint_and_resume_continues(tiny_model_dir, tmp_path, sig, code,
                                                                     name):
    """As a user stops a run: the step ends, a checkpoint is written, one line says so (Ctrl-C: one more on
    receipt), no traceback; exit 0 for SIGTERM (a scheduler's), 130 for Ctrl-C; the rerun resumes there."""
    path = tiny_model_dir("qwen2_vl")
    args = ["tests/tiny.yaml", f"model.path={path}", f"train.out_dir={tmp_path}", "train.checkpoint_every=0",
            "train.warm_start=false",
            "train.export=false", "sampling.max_new_tokens=32"]
    proc = subprocess.Popen([sys.executable, "grpo.py", *args, "train.steps=10000"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    wait_for_lines(metrics, 2, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-3000:]
    assert f"{name}: checkpoint written at step" in out and "Traceback" not in err
    said = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("Ctrl-C")]
    assert said == (["Ctrl-C: stopping after this step, with a checkpoint; Ctrl-C again stops at once, "
                     "without one"] if name == "Ctrl-C" else [])
    step = int(out.split("checkpoint written at step ")[1].split(";")[0])
    assert sorted(os.listdir(tmp_path / "checkpoints")) == [f"step-{step:06d}"]
    assert not (tmp_path / "run.lock").exists()  # released
    resumed = run_grpo(args + [f"train.steps={step + 1}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {tmp_path}/checkpoints/step-{step:06d} at step {step}" in resumed.stdout
    assert json.loads(metrics.read_text().splitlines()[-1])["step"] == step + 1


@pytest.mark.slow
def test_a_live_run_keeps_its_folder_and_sigterm_in_the_warm_start_exits_0(tiny_model_dir, tmp_path):
    """While a run is in its warm start's SFT stage, a second start on its train.out_dir (a requeued job, a
    second terminal) is refused in one line naming the folder and the holder, before writing anything. Then
    SIGTERM ends the first after the SFT checkpoint with exit 0 (not 1, advising a random model), and the
    rerun continues the SFT stage, then GRPO."""
    path = tiny_model_dir("qwen2_vl")
    args = ["tests/tiny.yaml", f"model.path={path}", f"train.out_dir={tmp_path}",
            f"sft.out_dir={tmp_path}/sft", "sampling.max_new_tokens=16", "train.prompts_per_rank=1",
            "sft.prompts_per_rank=2", "sft.checkpoint_every=0", "train.export=false"]
    first = subprocess.Popen([sys.executable, "grpo.py", *args, "sft.steps=10000", "train.steps=1"], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_lines(tmp_path / "sft" / "metrics.jsonl", 1, first)
    second = run_grpo(args + ["train.steps=1"])
    assert second.returncode == 1 and len(second.stderr.splitlines()) == 1, second.stderr[-3000:]
    assert second.stderr.startswith(f"grpo.py: train.out_dir={tmp_path} is in use by grpo.py pid {first.pid} "
                                    "on ")
    assert sorted(os.listdir(tmp_path)) == ["run.lock", "sft"]  # the second wrote nothing
    first.send_signal(signal.SIGTERM)
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err[-3000:]
    step = int(out.split("SIGTERM: checkpoint written at step ")[1].split(";")[0])
    assert os.listdir(tmp_path / "sft" / "checkpoints") == [f"step-{step:06d}"] and "GRPO:" not in out
    again = run_grpo(args + [f"sft.steps={step + 1}", "train.steps=1"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {tmp_path}/sft/checkpoints/step-{step:06d} at step {step}" in again.stdout
    assert f"GRPO: qwen2_vl from {tmp_path}/sft/export" in again.stdout and "done: 1 steps" in again.stdout


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "did you mean 'train.lr'"),
    ("sampling.group_size=1", "group_size must be >= 2"),
    ("train.loss_agg=mean", "train.loss_agg must be one of"),
    ("model.path=/nonexistent/model", "/nonexistent/model"),
])
def test_bad_configs_fail_clearly(tmp_path, override, message):
    proc = run_grpo(["tests/tiny.yaml", f"train.out_dir={tmp_path}", f"sft.out_dir={tmp_path}/sft",
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


def test_a_short_run_whose_judge_is_down_exits_non_zero_and_keeps_its_url_secret(tiny_model_dir, tmp_path,
                                                                                  capsys, monkeypatch):
    # 4 steps, judge.failed_window 10: the window is the 4 steps the run does. The judge URL carries
    # credentials and nothing listens there: every call fails (no health check, as when it dies later).
    # A random model writes no <answer> to judge, so the reward asks the judge about the raw outputs.
    import socket

    def judged(reward_cfg, judge):  # the configured judge, asked about every raw output once the rollout ends
        def reward(texts, records, roll):
            r = torch.tensor([math.nan if e is None else 0.0 for e in judge.extract_events(texts)])
            return r, {"event": r}, {"judge_failed": int(r.isnan().sum())}
        return grpo.after_rollout(reward)
    monkeypatch.setattr(grpo, "judged_rewards", judged)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    argv = [TINY, f"model.path={tiny_model_dir('qwen2_vl')}", f"train.out_dir={out}",
            "train.warm_start=false",
            f"data.train={ROOT}/tests/data/train.jsonl", f"data.prompt_file={ROOT}/prompts/think.txt",
            "train.steps=4", "train.prompts_per_rank=1", "sampling.group_size=2", "sampling.max_new_tokens=8",
            "train.checkpoint_every=0", "train.sample_every=0", "reward.think_weight=0",
            f"judge.url=http://judge-user:pw-secret@127.0.0.1:{port}/v1", "judge.health_check=false",
            "judge.retries=0", "judge.timeout=2", "judge.cache_dir=''"]
    with pytest.raises(SystemExit) as done:  # exit status 1, with this one line on stderr
        grpo.main(argv)
    stdout, err = capsys.readouterr()
    message = done.value.code
    assert message.startswith("grpo.py: judging failed for 100% of the groups of the last 4 steps") and \
        f"judge http://***@127.0.0.1:{port}/v1" in message and "this was the last step" in message
    assert "\n" not in message and f"@ http://***@127.0.0.1:{port}/v1: gave up after 1 attempts" in err
    assert os.listdir(out / "checkpoints") == ["step-000004"] and not (out / "export").exists()
    stored = [(out / "config.yaml").read_text(), (out / "checkpoints/step-000004/meta.json").read_text()]
    assert "http://***@127.0.0.1" in stored[0] and "http://***@127.0.0.1" in stored[1]
    assert not [text for text in (stdout, err, message, *stored) if "pw-secret" in text]


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
        status, out, err = run_main(main, ["tests/tiny.yaml", "--frobnicate"], capsys)
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
                           "tests/tiny.yaml", f"model.path={path}", f"train.out_dir={tmp_path}",
                           "train.warm_start=false", "train.steps=40", "train.checkpoint_every=0",
                           "train.export=false", "sampling.max_new_tokens=48", "train.prompts_per_rank=1"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"grpo.py: cannot write {tmp_path}/metrics.jsonl (disk full or not writable?)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_rewards_as_rows_end_train_exactly_as_the_sequential_path(tiny_model_dir, tmp_path, monkeypatch):
    """The configured reward with its judge questions sent as each completion ends, replies arriving in any
    order (a judge with random delays), gives the rewards, losses, gradient norms and model of the same
    steps scored after the rollout with compute_rewards."""
    import judge as judge_lib
    import rewards
    from judge_speed_worker import SlowJudge, in_layout
    path = tiny_model_dir("qwen2_vl")
    monkeypatch.setattr(model.Tokens, "decode", in_layout(model.Tokens.decode))
    monkeypatch.setattr(judge_lib, "make_judge", lambda cfg, feedback=True: SlowJudge(0.01, 0))
    common = ["train.steps=2", "sampling.group_size=4", "sampling.max_new_tokens=12",
              "train.prompts_per_rank=2", "train.micro_batch_size=3", "train.checkpoint_every=0",
              "train.sample_every=0", "train.lr=1e-2",
              "reward.cn_weight=1.0", "reward.think_weight=0", "train.num_iterations=2", "train.beta=0.04"]
    cfg = demo_cfg(path, tmp_path / "as-rows-end", *common)
    grpo.train(cfg)

    def sequential(texts, records, roll):
        return rewards.compute_rewards(texts, records, cfg.reward, judge_lib.LexicalJudge())
    grpo.train(demo_cfg(path, tmp_path / "sequential", *common), reward_fn=sequential)
    lines = {}
    for name in ("as-rows-end", "sequential"):
        with open(tmp_path / name / "metrics.jsonl") as f:
            lines[name] = [json.loads(line) for line in f]
    keys = [k for k in lines["sequential"][0]
            if k.startswith(("reward", "loss", "kl", "grad_norm", "dropped"))]
    assert {"reward_cn", "loss", "grad_norm"} <= set(keys) and lines["sequential"][0]["grad_norm"] > 0
    for got, want in zip(lines["as-rows-end"], lines["sequential"]):
        assert {k: got[k] for k in keys} == {k: want[k] for k in keys}
    assert_resume_is_exact(tmp_path / "as-rows-end", tmp_path / "sequential", path)


def test_two_ranks_whose_judges_answer_at_different_speeds_stay_in_step(tiny_model_dir, tmp_path):
    """Under torchrun, rank 1's judge answering 20x slower than rank 0's (then the other way round) changes
    neither the steps' figures nor the model: every rank made the same collective calls."""
    path = tiny_model_dir("qwen2_vl")
    for delays in ("0.005,0.1", "0.1,0.005"):
        proc = subprocess.run(TORCHRUN + ["--nproc_per_node=2", f"{ROOT}/tests/judge_speed_worker.py", path,
                                          str(tmp_path / delays), delays],
                              capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "0.005,0.1" / "metrics.jsonl") as a, \
            open(tmp_path / "0.1,0.005" / "metrics.jsonl") as b:
        first, second = [json.loads(x) for x in a], [json.loads(x) for x in b]
    assert [m["step"] for m in first] == [1, 2] and first[0]["grad_norm"] > 0
    assert [m["reward"] for m in first] == [m["reward"] for m in second]
    assert [m["loss"] for m in first] == [m["loss"] for m in second]
    assert_resume_is_exact(tmp_path / "0.005,0.1", tmp_path / "0.1,0.005", path)
