"""evaluate.py's before/after table, the demo's closing step: with eval.baseline it scores the warm-start
model and the GRPO model on the held-out clips (the official DREAM-1K layout, integer vids) and prints them
side by side. Here on the tests' 4 held-out clips (tests/tiny.yaml, what make_clips.py writes)."""
import json
import os
import subprocess
import sys

import pytest

import benchmarks
import config
import data
import evaluate
import rewards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELD_OUT = os.path.join(ROOT, "tests", "data", "heldout")


def test_the_held_out_clips_load_as_dream1k_with_subjects():
    cfg = config.load_config(os.path.join(ROOT, "tests", "tiny.yaml"))
    items = benchmarks.load_items(cfg)
    val = [json.loads(line) for line in open(os.path.join(HELD_OUT, "val.jsonl"))]
    assert [it.id for it in items] == ["1", "2", "3", "4"]  # integer vids in the file, as the official one
    assert all(os.path.isfile(it.video) for it in items)
    for it, record in zip(items, val):
        assert it.group == "shapes" and it.reference == record["caption"]
        assert it.events == record["events"] and it.subjects == record["subjects"]
        assert it.video.endswith(f"{it.id}.mp4") and record["video"] == f"{it.id}.mp4"


def test_the_demo_runs_on_the_world_and_ends_on_its_held_out_test():
    """demo.yaml: trained on data/world's train split with the world judge, compared on its 60 test clips,
    the official DREAM-1K layout, whose every clip holds a colour-action pair never trained on."""
    cfg = config.load_config(os.path.join(ROOT, "demo.yaml"))
    config.check_program(cfg, "grpo.py")
    assert (cfg.judge.url, cfg.data.train, cfg.train.warm_start) == ("world", "data/world/train.jsonl", True)
    items = benchmarks.load_items(cfg)
    assert len(items) == 60 and all(os.path.isfile(os.path.join(ROOT, it.video)) for it in items)
    assert all(it.subjects and it.events for it in items)  # test_world checks the pairs never trained on


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


def table(stdout):
    """The before/after table's rows: {figure: (before, after, change)}, as printed."""
    rows = stdout.split("## Before and after")[1].split("|---|---|---|---|\n")[1].strip().splitlines()
    cells = ([c.strip() for c in row.strip("|").split("|")] for row in rows)
    return {row[0]: tuple(row[1:]) for row in cells}


def figures(results):
    """A results.json's figures as the table prints them."""
    overall, structure = results["metrics"]["events"]["overall"], results["structure"]
    return {**{f"events {k} (%)": f"{100 * overall[k]:.1f}" for k in ("f1", "precision", "recall")},
            "<think>/<answer> format (%)": f"{100 * structure['format']:.1f}",
            "Tscore (0-1)": f"{structure['think']:.3f}",
            "subjects named (%)": f"{100 * structure['named']:.1f}"}


@pytest.mark.slow
def test_evaluate_demo_prints_before_and_after(tiny_model_dir, tmp_path):
    """Two different models caption the held-out clips: the baseline's captions and figures go to baseline/,
    the model's to eval.out_dir, and the table holds each one's figures."""
    before_model, after_model = tiny_model_dir("qwen2_5_vl"), tiny_model_dir("qwen2_vl")
    proc = subprocess.run([sys.executable, "evaluate.py", "tests/tiny.yaml", f"eval.model={after_model}",
                           f"eval.baseline={before_model}", f"eval.out_dir={tmp_path}",
                           "eval.max_new_tokens=16"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"## Before and after: {before_model} -> {after_model}" in proc.stdout
    before = json.loads((tmp_path / "baseline" / "results.json").read_text())
    after = json.loads((tmp_path / "results.json").read_text())
    assert (before["model"], after["model"]) == (before_model, after_model)
    captions = [[r["output"] for r in map(json.loads, open(folder / "predictions.jsonl"))]
                for folder in (tmp_path / "baseline", tmp_path)]
    assert len(captions[0]) == len(captions[1]) == 4 and captions[0] != captions[1]  # each model's own
    rows = table(proc.stdout)
    old, new = figures(before), figures(after)
    assert {k: v[:2] for k, v in rows.items()} == {k: (old[k], new[k]) for k in new}


def test_the_before_and_after_table_worked_example(tmp_path):
    """Captions written here, scored (eval.score_only): before, each held-out clip's caption as plain text;
    after, the same caption in the output format with the clip's subjects. Format 0 % -> 100 %, Tscore 0 -> 1
    (every subject, attribute and action matched), the event figures unchanged (the same answer texts)."""
    records = data.load_records(os.path.join(HELD_OUT, "val.jsonl"))
    plain, structured = (lambda r: r.caption), rewards.reference_output
    for folder, output in ((tmp_path / "baseline", plain), (tmp_path, structured)):
        folder.mkdir(exist_ok=True)
        (folder / "predictions.jsonl").write_text("".join(
            json.dumps({"id": str(k), "output": output(r)}) + "\n" for k, r in enumerate(records, 1)))
    proc = subprocess.run([sys.executable, "evaluate.py", "tests/tiny.yaml", "eval.score_only=true",
                           "eval.model=after", "eval.baseline=before", f"eval.out_dir={tmp_path}"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = table(proc.stdout)
    assert rows["<think>/<answer> format (%)"] == ("0.0", "100.0", "+100.0")
    assert rows["Tscore (0-1)"] == ("0.000", "1.000", "+1.000")
    events = [rows[f"events {k} (%)"] for k in ("f1", "precision", "recall")]
    assert all(before == after and change == "+0.0" for before, after, change in events), events
    assert float(events[1][0]) > 0  # the captions do describe the clips
