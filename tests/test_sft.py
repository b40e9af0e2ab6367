"""sft.py: the loss falls, resume is exact, the export is a model folder grpo.py and evaluate.py take,
and the targets are what the docstring says."""
import json
import os
import subprocess
import sys
import time

import pytest

import config
from conftest import assert_resume_is_exact
import data
import rewards
import sft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "tiny.yaml")


def sft_cfg(model_dir, out_dir, *overrides):
    return config.load_config(TINY, [f"model.path={model_dir}", f"sft.out_dir={out_dir}",
                                     f"data.train={ROOT}/tests/data/train.jsonl",
                                     f"data.prompt_file={ROOT}/prompts/think.txt", "sft.prompts_per_rank=2",
                                     "sft.micro_batch_size=1", "sft.log_every=1", *overrides])


def logged(out_dir, key="loss"):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line)[key] for line in f if key in json.loads(line)]


def test_loss_falls_and_held_out_loss_is_logged(tiny_model_dir, tmp_path):
    path = tiny_model_dir("qwen2_vl")
    val = tmp_path / "val.jsonl"
    records = [json.loads(line) for line in open(f"{ROOT}/tests/data/train.jsonl")][:2]
    val.write_text("".join(json.dumps({**r, "video": f"{ROOT}/tests/data/{r['video']}"}) + "\n"
                           for r in records))
    sft.train(sft_cfg(path, tmp_path, "sft.steps=20", "sft.lr=3e-3", "sft.export=false", "sft.eval_every=10",
                      f"data.val={val}"))
    loss = logged(tmp_path)
    assert len(loss) == 20
    assert sum(loss[-4:]) / 4 < 0.8 * sum(loss[:4]) / 4, loss
    held_out = logged(tmp_path, "val_loss")
    assert len(held_out) == 2 and held_out[1] < held_out[0]


def test_resume_is_exact(tiny_model_dir, tmp_path):
    """4 steps straight == 2 steps, a stop, and 2 resumed steps (same parameters, same losses)."""
    path = tiny_model_dir("qwen2_vl")
    common = ["sft.lr=1e-3", "sft.checkpoint_every=2"]
    sft.train(sft_cfg(path, tmp_path / "straight", *common, "sft.steps=4"))
    sft.train(sft_cfg(path, tmp_path / "resumed", *common, "sft.steps=2"))
    sft.train(sft_cfg(path, tmp_path / "resumed", *common, "sft.steps=4"))
    assert_resume_is_exact(tmp_path / "straight", tmp_path / "resumed", path)
    assert logged(tmp_path / "straight") == logged(tmp_path / "resumed")


@pytest.mark.slow
def test_the_export_is_a_model_for_grpo_and_evaluate(tiny_model_dir, tmp_path):
    path = tiny_model_dir("qwen2_5_vl")
    sft.train(sft_cfg(path, tmp_path / "sft", "sft.steps=1", "sft.target=caption"))
    export = str(tmp_path / "sft/export")
    grpo = subprocess.run([sys.executable, "grpo.py", "tests/tiny.yaml", f"model.path={export}",
                           "train.warm_start=false", f"train.out_dir={tmp_path}/grpo", "train.steps=1",
                           "train.prompts_per_rank=1",
                           "sampling.max_new_tokens=8", "train.export=false"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert grpo.returncode == 0, grpo.stderr[-3000:]
    assert f"GRPO: qwen2_5_vl from {export}" in grpo.stdout
    annotations = tmp_path / "dream.jsonl"
    annotations.write_text(json.dumps({
        "vid": 1, "dataset": "DREAM/youtube", "extra_info": {"events": ["a red square moves right"]},
        "messages": [{"role": "user", "content": [{"type": "video"}]},
                     {"role": "assistant", "content": [{"type": "text", "text": "",
                                                        "reference": "A red square moves right."}]}]}) + "\n")
    os.symlink(f"{ROOT}/tests/data/red_square_right.mp4", tmp_path / "1.mp4")
    ev = subprocess.run([sys.executable, "evaluate.py", "tests/tiny.yaml", f"eval.annotations={annotations}",
                         f"eval.video_dir={tmp_path}", f"eval.model={export}",
                         f"eval.out_dir={tmp_path}/eval", "eval.baseline=",
                         "eval.max_new_tokens=8", "eval.think=false", "eval.max_frames=4"],
                        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert ev.returncode == 0, ev.stderr[-3000:]
    prediction = json.loads((tmp_path / "eval/predictions.jsonl").read_text())
    assert prediction["id"] == "1" and prediction["failed"] is None and prediction["tokens"] > 0


def test_targets(tiny_tokenizer):
    record = data.Record("r", "v.mp4", "A man waves.",
                         [{"name": "man", "attributes": [], "actions": ["waves"]}], None)
    assert sft.target_text(record, "caption") == "A man waves."
    think = sft.target_text(record, "think")
    assert rewards.parse_output(think).error is None and think.endswith("<answer>A man waves.</answer>")
    ids, lengths = sft.target_batch([record], tiny_tokenizer, "caption")
    text = tiny_tokenizer.decode(ids[0, :lengths[0]])
    assert text == "A man waves.<|im_end|>"  # the end token is a target: the model learns to stop


def test_think_target_needs_subjects_and_bad_settings_fail(tiny_model_dir, tmp_path):
    bare = tmp_path / "bare.jsonl"
    bare.write_text(json.dumps({"video": f"{ROOT}/tests/data/red_square_right.mp4", "caption": "x"}) + "\n")
    with pytest.raises(data.DataError, match=r"bare.jsonl:1: no 'subjects' .*which sft.target=think needs"):
        sft.train(sft_cfg(tiny_model_dir("qwen2_vl"), tmp_path, f"data.train={bare}",
                          "sft.prompts_per_rank=1"))
    for override, message in [("sft.target=both", "sft.target must be one of"),
                              ("sft.grad_clip=-1", "sft.grad_clip must be >= 0"),
                              ("sft.eval_every=5", "needs data.val")]:
        with pytest.raises(SystemExit) as stop:
            sft.main([TINY, override, "data.val="])
        assert message in str(stop.value.code), stop.value.code
    help_ = subprocess.run([sys.executable, "sft.py", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert help_.returncode == 0 and "sft.target=caption" in help_.stdout


def test_an_unwritable_out_dir_is_refused_in_one_line(tmp_path, capsys):
    """sft.py, grpo.py and evaluate.py name the key and the folder they cannot write, in one line, before any
    work (a regular file where the folder should be: refused for root too, unlike a read-only mode)."""
    import evaluate
    import grpo
    (tmp_path / "file").write_text("")
    folder = tmp_path / "file" / "run"
    for main, key in [(sft.main, "sft.out_dir"), (grpo.main, "train.out_dir"),
                      (evaluate.main, "eval.out_dir")]:
        with pytest.raises(SystemExit) as stop:
            main([TINY, f"{key}={folder}", "model.build_tiny="])
        message = str(stop.value.code)
        assert message.endswith(f"{key}={folder}: cannot write into the folder (disk full or not writable?): "
                                "Not a directory"), message
        assert "\n" not in message and capsys.readouterr().err == ""


def test_a_record_over_max_target_tokens_is_refused_at_start(tiny_model_dir, tmp_path, monkeypatch):
    """A 1 MB caption stops the run at its FILE:LINE before any weight loads or step runs, in seconds: the
    SFT step never sees it (it took over 30 s and 4.2 GB before). Refused rather than cut: a cut target would
    teach the model to stop mid-caption without </answer> and its end token."""
    records = [json.loads(line) for line in open(f"{ROOT}/tests/data/train.jsonl")][:3]
    for r in records:
        r["video"] = f"{ROOT}/tests/data/{r['video']}"
    records[1]["caption"] = "A man walks to the door. " * 42_000  # 1 MB
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in records))
    def step(*args):
        raise AssertionError("a step ran with the 1 MB target")  # where the old code spent 4.2 GB and minutes
    monkeypatch.setattr(sft, "train_step", step)
    start = time.time()
    with pytest.raises(data.DataError, match=rf"^{train}:2: the target \(<think>subjects</think><answer>"
                                             r"caption</answer>\) is [\d,]+\+ tokens, over "
                                             "data.max_target_tokens=2048; shorten the caption"):
        sft.train(sft_cfg(tiny_model_dir("qwen2_vl"), tmp_path / "out", f"data.train={train}"))
    assert time.time() - start < 30 and not (tmp_path / "out" / "metrics.jsonl").exists()
