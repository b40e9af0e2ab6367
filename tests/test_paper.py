"""paper.py at toy size: every arm of Tables 2 and 3 trains and is scored through evaluate.py with the world
judge, with the same number of training videos; the tables and the picture are written."""
import json
import os

import yaml

import paper

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "paper.yaml")


def test_every_arm_sees_the_same_number_of_videos():
    for arm, (kind, _) in paper.ARMS.items():
        cfg = paper.arm_config(arm, 0, "runs/x", 96, [], CONFIG)
        sft_videos = cfg.sft.steps * cfg.sft.prompts_per_rank
        grpo_videos = cfg.train.steps * cfg.train.prompts_per_rank
        seen = {"none": 0, "sft": sft_videos, "grpo": 96 // 2 + grpo_videos}[kind]
        if arm == "cold_start":
            assert seen == 48
        elif kind != "none":
            assert seen == 96, arm


def test_the_runner_at_toy_size(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert paper.main(["--toy", "--seeds", "0", "--arms", "base", "sft_caption", "grpo", "dr_grpo",
                       "--out", str(tmp_path), "--config", CONFIG]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [r["arm"] for r in rows] == ["base", "sft_caption", "cold_start", "grpo", "dr_grpo"]
    assert all(len(r["curve"]) == 1 for r in rows if r["arm"] in ("grpo", "dr_grpo"))
    assert rows[0]["format"] == 0.0 and rows[1]["format"] is None  # a caption model is asked no think block
    text = (tmp_path / "results.md").read_text()
    assert "### Table 2" in text and "### Table 3" in text and "| GRPO, Dr. GRPO loss |" in text
    assert "<polyline" in (tmp_path / "curves.svg").read_text()
    grpo_cfg = yaml.safe_load((tmp_path / "seed0" / "grpo" / "config.yaml").read_text())
    assert grpo_cfg["model"]["path"].endswith("seed0/cold_start/export")
    assert grpo_cfg["judge"]["url"] == "world"
