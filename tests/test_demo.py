"""The demo's closing step: `python evaluate.py demo.yaml` scores the warm-start model and the GRPO model on
the held-out clips (the official DREAM-1K layout, integer vids) and prints them side by side; the shipped
held-out data is what make_clips.py writes."""
import json
import os
import subprocess
import sys

import benchmarks
import config
import evaluate
import rewards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELD_OUT = os.path.join(ROOT, "tests", "data", "heldout")


def test_the_held_out_clips_load_as_dream1k_with_subjects():
    cfg = config.load_config(os.path.join(ROOT, "demo.yaml"))
    items = benchmarks.load_items(cfg)
    val = [json.loads(line) for line in open(os.path.join(HELD_OUT, "val.jsonl"))]
    assert [it.id for it in items] == ["1", "2", "3", "4"]  # integer vids in the file, as the official one
    assert all(os.path.isfile(it.video) for it in items)
    for it, record in zip(items, val):
        assert it.group == "shapes" and it.reference == record["caption"]
        assert it.events == record["events"] and it.subjects == record["subjects"]
        assert it.video.endswith(f"{it.id}.mp4") and record["video"] == f"{it.id}.mp4"


def test_structure_scores_worked_example():
    """format and Tscore of raw outputs: one perfect, one without tags, one failed caption."""
    items = [benchmarks.Item("1", "1.mp4", "g", "p", subjects=[{"name": "square", "attributes": ["red"],
                                                             "actions": ["moves right"]}]),
             benchmarks.Item("2", "2.mp4", "g", "p",
                             subjects=[{"name": "ball", "attributes": [], "actions": []}]),
             benchmarks.Item("3", "3.mp4", "g", "p")]
    perfect = ('<think>{"subjects": [{"name": "square", "attributes": ["red"], "actions": ["moves right"]}]}'
               "</think><answer>A red square moves right.</answer>")
    s = evaluate.score_structure(items, [perfect, "A ball.", None], config.ThinkConfig())
    # format: 1 of the 2 outputs; Tscore: 1.0 for the first, 0 for the untagged one (nothing parses)
    # subjects named: "square" by the first, nothing by the untagged one: 1 of 2
    assert s == {"outputs": 2, "format": 0.5, "think": 0.5, "think_outputs": 2, "named": 0.5, "subjects": 2}
    assert rewards.parse_output(perfect).error is None


def test_evaluate_demo_prints_before_and_after(tiny_model_dir, tmp_path):
    path = tiny_model_dir("qwen2_vl")
    proc = subprocess.run([sys.executable, "evaluate.py", "demo.yaml", f"eval.model={path}",
                           f"eval.baseline={path}", f"eval.out_dir={tmp_path}", "eval.max_new_tokens=16"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "## Before and after" in proc.stdout and "| events f1 (%) |" in proc.stdout
    assert "| <think>/<answer> format (%) |" in proc.stdout and "| Tscore (0-1) |" in proc.stdout
    before = json.loads((tmp_path / "baseline" / "results.json").read_text())
    after = json.loads((tmp_path / "results.json").read_text())
    assert before["metrics"] == after["metrics"]  # the same model twice: the same figures, change +0.0
    assert "| +0.0 |" in proc.stdout
