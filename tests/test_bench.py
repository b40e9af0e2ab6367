"""bench.py: the quick run end to end (figures printed, greedy outputs identical to HF generate's, GPU
sections skipped cleanly without CUDA), its memory measure, and the GPU sections' functions exercised on
CPU."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bench

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quick_bench_prints_its_figures_and_skips_the_gpu():
    run = subprocess.run([sys.executable, "bench.py", "--quick", "--no-gpu"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("visual tokens"))
    rows = lines[header + 1:header + 3]
    assert [int(r.split()[0]) for r in rows] == [64, 256]
    assert all(r.endswith("x  identical") for r in rows), rows  # greedy outputs identical to HF generate's
    ratio = next(line for line in lines if "memory ratio" in line)
    assert float(ratio.split()[-1]) <= 1e-5                     # largest difference, chunked vs plain
    assert float(ratio.split()[2].rstrip(",")) < 0.5
    header = next(i for i, line in enumerate(lines) if line.startswith("Training passes, CPU")) + 1
    rows = [line.split() for line in lines[header + 1:header + 5]]
    assert [(r[0], r[1]) for r in rows] == [("64", "reference"), ("64", "update"), ("256", "reference"),
                                            ("256", "update")]
    # log-probs, prefix-shared vs per row
    assert all(float(r[-2]) <= 1e-5 for r in rows)
    assert all(float(r[-1]) <= 1e-5 for r in rows[1::2])                  # gradients (update rows)
    header = next(i for i, line in enumerate(lines) if line.startswith("Whole GRPO step, CPU")) + 1
    rows = [line.split() for line in lines[header + 1:header + 13]]
    assert [(r[0], r[1], r[-11]) for r in rows] == [(n, judge, way) for n in ("64", "256")
                                                    for judge in ("HTTP,", "HTTP,", "lexical")
                                                    for way in ("ours", "usual")]
    assert all(float(r[-1].rstrip("x")) > 0 for r in rows)
    http_ours = [r for r in rows if r[1] == "HTTP," and r[-11] == "ours"]
    assert len(http_ours) == 4
    assert all(float(r[-4]) <= float(r[-5]) + 0.01 for r in http_ours)      # the least is at most what we saw
    assert all(r[-4] == "-" for r in rows if r not in http_ours)
    assert lines[-1] == "GPU sections skipped: --no-gpu"


def test_the_memory_measure_sees_an_allocation():
    cpu = torch.device("cpu")
    _, peak, _ = bench.measured(lambda: torch.ones(50_000_000).sum(), cpu)      # 200 MB, freed at once
    assert 190e6 < peak < 260e6
    _, idle, _ = bench.measured(lambda: torch.ones(10).sum(), cpu)
    assert idle < 20e6


@pytest.fixture(scope="module")
def quick_model():
    return bench.random_model("quick", torch.float32, torch.device("cpu"))


def test_group_rollout_equals_hf_generate_with_repeated_prompts(quick_model):
    batch = bench.video_prompt(quick_model, 128, quick_model.device)
    ours, usual = bench.ours(quick_model, batch, 4, 12), bench.usual(quick_model, batch, 4, 12)
    assert ours.shape == usual.shape == (4, 12)
    assert torch.equal(ours, usual)
    assert len(set(map(tuple, ours.tolist()))) == 1              # greedy: the G rows agree
    other = bench.ours(quick_model, bench.video_prompt(quick_model, 128, quick_model.device, seed=3), 1, 12)
    assert not torch.equal(other[0], ours[0])                     # and depend on the video


def test_gpu_sections_run_on_cpu(quick_model):
    d = bench.bench_decode(quick_model, 64, 4, 4, bandwidth=None)
    assert d["tok_s"] > 0 and math.isnan(d["bandwidth_share"])
    params = sum(p.numel() for p in quick_model.model.language_model.layers.parameters())
    norm_params = quick_model.model.language_model.norm.weight.numel()
    assert bench.text_weight_bytes(quick_model) == 4 * (params + norm_params
                                                        + quick_model.lm_head.weight.numel())
    m = bench.bench_mfu(quick_model, 64, 8, peak_flops=None)
    assert m["tokens"] == 64 + 63 + 8 and m["seconds"] > 0 and math.isnan(m["mfu"])
    assert not quick_model.training and not any(p.requires_grad for p in quick_model.parameters())


def test_training_passes_run_on_cpu():
    hf = bench.random_model("quick", torch.float32, torch.device("cpu"), std=0.02)
    r = bench.bench_training(hf, 64, 4, 8)
    assert r["per_row_tokens"] == 4 * (64 + 63 + 8) and r["shared_tokens"] == 64 + 63 + 4 * 7
    for name in ("reference", "update"):
        assert r[name]["per_row_s"] > 0 and r[name]["shared_s"] > 0 and r[name]["logp_diff"] <= 1e-5
    assert 0 < r["update"]["grad_diff"] <= 1e-5 and math.isnan(r["reference"]["grad_diff"])
    assert not hf.training and not any(p.requires_grad or p.grad is not None for p in hf.parameters())
    assert not hf.model.language_model.layers[0].gradient_checkpointing


def test_the_reference_dtype_section_runs_on_cpu():
    hf = bench.random_model("quick", torch.bfloat16, torch.device("cpu"))
    r = bench.bench_reference_dtype(hf, 64, 8)
    assert r["bf16_s"] > 0 and r["fp32_s"] > 0 and r["speedup"] > 0
    assert hf.dtype == torch.bfloat16          # handed back as it came


def test_the_least_last_reply_by_hand():
    """The reference's extraction is asked at 0; each answer's CN rating when its row ends, its entailment
    then too but not before the extraction's reply; each request takes `latency`, `capacity` at a time."""
    assert bench.least_last_reply([], 1.0, 4) == 1.0                  # the extraction alone
    assert bench.least_last_reply([0.2], 1.0, 8) == 2.0               # the entailment waits for it: 1 + 1
    # 2 slots: extraction 0-1, rating 0.5-1.5, entailment 1-2; at 2.0 four requests on two slots: 2-3, 3-4
    assert bench.least_last_reply([0.5, 2.0, 2.0], 1.0, 2) == 4.0
    assert bench.least_last_reply([0.5, 2.0, 2.0], 1.0, 4) == 3.0     # at 2.0: the four at once, 2-3


def test_demo_learning_figures_from_metrics(tmp_path):
    """bench.py --demo's figures: quarter means of the reward and its parts, worked out by hand."""
    rewards = [0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6]           # 8 steps: quarters of 2
    formats = [0.0, 0.5, 0.5, 0.5, 0.5, 0.5, 1.0, 1.0]
    thinks = [0.1, 0.3, 0.2, 0.2, 0.2, 0.2, 0.4, 0.2]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": k + 1, "reward": r, "reward_format": f, "reward_think": t,
                                        "reward_event": 0.5}) + "\n"
                            for k, (r, f, t) in enumerate(zip(rewards, formats, thinks))))
    figures = bench.demo_learning(path)
    assert figures["steps"] == 8
    assert figures["reward_first"] == pytest.approx(0.3) and figures["reward_last"] == pytest.approx(1.5)
    assert figures["rise"] == pytest.approx(1.2)
    assert figures["format_first"] == pytest.approx(0.25) and figures["format_last"] == pytest.approx(1.0)
    assert figures["think_first"] == pytest.approx(0.2) and figures["think_last"] == pytest.approx(0.3)
    assert figures["event_first"] == figures["event_last"] == 0.5


def test_demo_held_out_figures_from_the_results(tmp_path):
    """The held-out figures come from the two results.json files evaluate.py writes: the baseline's (the
    warm start) in eval_dir/baseline, GRPO's in eval_dir."""
    for folder, f1, named in ((tmp_path / "baseline", 0.25, 0.5), (tmp_path, 0.4, 0.625)):
        folder.mkdir(exist_ok=True)
        (folder / "results.json").write_text(json.dumps({
            "metrics": {"events": {"overall": {"f1": f1, "precision": 0.0, "recall": 0.0}}},
            "structure": {"named": named, "format": 1.0}}))
    assert bench.demo_held_out(str(tmp_path)) == {"f1_before": 0.25, "named_before": 0.5,
                                                  "f1_after": 0.4, "named_after": 0.625}
