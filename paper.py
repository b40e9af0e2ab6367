"""The paper's comparisons in miniature, on the procedural world (world.py) and CPU: Table 2 (the base model,
SFT on captions, SFT on think + caption, GRPO from that cold start) and Table 3 (the reward ablations,
Escore's delta step, a loss variant), each arm on several seeds, scored on the world's held-out test split
through evaluate.py's DREAM-1K metric with the world judge.

    python paper.py            # every arm, seeds 0 1 2: runs/paper/{results.md,results.json,curves.svg}
    python paper.py --seeds 0 --arms grpo cold_start --videos 96
    python paper.py --toy      # a few videos and steps: the runner checked, not the method

Equal budget: every trained arm sees the same number of training videos (--videos). An SFT arm takes them
all in supervised steps. The GRPO arms split them: the first half trains their shared cold start (SFT on
think + caption), the second half GRPO from it (each video sampled G times, counted once). "cold start"
is that first half alone. Settings are paper.yaml's (the tiny model, the world's splits, the world judge);
each arm adds its own overrides (ARMS). Nothing here reads the test split but the scoring: the settings
were chosen on the val split.
"""
import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time

import config as config_lib
import data
import evaluate
import logs
import grpo
import sft
import training

# arm -> (what trains it, its overrides); "grpo" arms start from the seed's cold start
ARMS = {
    "base": ("none", []),
    "sft_caption": ("sft", ["sft.target=caption", "eval.think=false"]),
    "sft_think": ("sft", ["sft.target=think"]),
    "cold_start": ("sft", ["sft.target=think"]),
    "grpo": ("grpo", []),                                      # format + Tscore + Escore: the paper's
    "tscore": ("grpo", ["reward.event_weight=0"]),                      # format + Tscore
    "tscore_cn": ("grpo", ["reward.event_weight=0", "reward.cn_weight=1"]),
    "escore_raw": ("grpo", ["reward.event.step=false"]),                # coverage without the step function
    "delta_low": ("grpo", ["reward.event.delta1=0.15", "reward.event.delta2=0.25"]),
    "delta_high": ("grpo", ["reward.event.delta1=0.5", "reward.event.delta2=0.75"]),
    "dr_grpo": ("grpo", ["train.loss_agg=seq-mean-token-sum-norm", "train.adv_scale=none"]),
}
TABLE2 = ("base", "sft_caption", "sft_think", "cold_start", "grpo")
TABLE3 = ("tscore", "tscore_cn", "grpo", "escore_raw", "delta_low", "delta_high", "dr_grpo")
LABELS = {"base": "base model (random, untrained)", "sft_caption": "SFT on captions (the paper's SFT)",
          "sft_think": "SFT on think + caption",
          "cold_start": "cold start: SFT on think + caption, half the videos",
          "grpo": "GRPO, format + Tscore + Escore (delta 0.28 / 0.35)", "tscore": "GRPO, format + Tscore",
          "tscore_cn": "GRPO, format + Tscore + CNscore", "escore_raw": "GRPO, Escore as raw coverage",
          "delta_low": "GRPO, Escore delta 0.15 / 0.25", "delta_high": "GRPO, Escore delta 0.5 / 0.75",
          "dr_grpo": "GRPO, Dr. GRPO loss"}
FIGURES = (("f1", "event F1 (%)", 100), ("precision", "P (%)", 100), ("recall", "R (%)", 100),
           ("think", "Tscore", 1), ("format", "format (%)", 100), ("named", "subjects named (%)", 100))
TOY = ["sampling.max_new_tokens=24", "eval.max_new_tokens=24", "eval.limit=3", "sampling.group_size=2",
       "train.prompts_per_rank=2", "sft.prompts_per_rank=2", "train.micro_batch_size=4"]

# ----------------------------------------------------------------------------- one arm


def steps(videos, per_step):
    return max(1, videos // per_step)


def arm_config(arm, seed, root, videos, extra, path="paper.yaml"):
    """The arm's Config on seed `seed`: the config file, the budget's steps, the arm's overrides, its
    folders."""
    kind, overrides = ARMS[arm]
    base = config_lib.load_config(path, extra)
    half = videos // 2 if arm == "cold_start" or kind == "grpo" else videos
    folder = os.path.join(root, f"seed{seed}", arm)
    run = [f"seed={seed}", f"model.path={root}/seed{seed}/tiny", "train.warm_start=false",
           "train.eval_every=0", "sft.eval_every=0", "train.checkpoint_every=0", "sft.checkpoint_every=0",
           "train.sample_every=0", f"train.out_dir={folder}", f"sft.out_dir={folder}",
           f"sft.steps={steps(half, base.sft.prompts_per_rank)}",
           f"train.steps={steps(videos - half, base.train.prompts_per_rank)}",
           f"eval.out_dir={folder}/eval", "eval.baseline=", f"eval.model={folder}/export"]
    if kind == "grpo":
        run.append(f"model.path={root}/seed{seed}/cold_start/export")
    if kind == "none":
        run.append(f"eval.model={root}/seed{seed}/tiny")
    return config_lib.load_config(path, extra + run + overrides)


def run_arm(arm, seed, root, videos, extra, path):
    """Train (unless already done) and score one arm -> its figures and, for GRPO, its reward curve."""
    cfg = arm_config(arm, seed, root, videos, extra, path)
    kind = ARMS[arm][0]
    export = os.path.join(cfg.train.out_dir, "export")
    started = time.perf_counter()
    if kind != "none" and not os.path.isfile(os.path.join(export, "config.json")):
        shutil.rmtree(cfg.train.out_dir, ignore_errors=True)
        (sft.train if kind == "sft" else grpo.train)(cfg)
    results = evaluate.evaluate(cfg)
    events, structure = results["metrics"]["events"]["overall"], results.get("structure") or {}
    figures = {"f1": events["f1"], "precision": events["precision"], "recall": events["recall"],
               **{k: structure.get(k) for k in ("think", "format", "named")}}
    curve = []
    if kind == "grpo":
        curve = [m["reward"] for m in logs.read_jsonl(os.path.join(cfg.train.out_dir, "metrics.jsonl"))]
    return {"arm": arm, "seed": seed, "seconds": time.perf_counter() - started, **figures, "curve": curve}


def build_base_model(cfg):
    """The seed's tiny random model, which every arm starts from, built once before any arm as grpo.py
    builds it (its tokenizer learned from the think prompt and the reference outputs): were the first arm
    to build it, an SFT-on-captions arm would teach the tokenizer another prompt, and the seed's model would
    depend on which arms were asked for."""
    with training.process_group("paper.py", 600.0):
        with open(cfg.data.prompt_file) as f:
            instruction = f.read().strip()
        texts = data.tokenizer_texts(data.load_records(cfg.data.train), instruction)
        training.ensure_model(cfg.model, cfg.data, cfg.seed, texts)

# ----------------------------------------------------------------------------- tables and the picture


def mean_std(values):
    """The mean and the sample std (n - 1) of the values that are numbers; std 0 for one, None for none."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return None, None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table(rows, arms, title):
    """A markdown table: one line per arm, each figure as mean ± std over the seeds."""
    head = "| arm | " + " | ".join(name for _, name, _ in FIGURES) + " | seeds | minutes |"
    out = [f"### {title}", "", head, "|---" * (len(FIGURES) + 3) + "|"]
    for arm in arms:
        mine = [r for r in rows if r["arm"] == arm]
        if not mine:
            continue
        cells = []
        for key, _, scale in FIGURES:
            m, s = mean_std([r[key] for r in mine])
            digits = 1 if scale == 100 else 3
            cells.append("n/a" if m is None else f"{scale * m:.{digits}f} ± {scale * s:.{digits}f}")
        minutes = sum(r["seconds"] for r in mine) / 60 / len(mine)
        out.append(f"| {LABELS[arm]} | " + " | ".join(cells) + f" | {len(mine)} | {minutes:.1f} |")
    return out


def svg(rows, path, width=720, height=300):
    """One picture: each GRPO arm's mean reward curve over the seeds (left), its held-out event F1 (right)."""
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
    grpo_arms = [a for a in TABLE3 if any(r["arm"] == a and r["curve"] for r in rows)]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="11" '
             'font-family="sans-serif">', f'<rect width="{width}" height="{height}" fill="white"/>',
             '<text x="10" y="16">mean GRPO reward (0..3) per step, mean over seeds</text>',
             f'<text x="{width // 2 + 20}" y="16">held-out event F1 (%), mean over seeds</text>']
    x0, y0, w, h = 40, 30, width // 2 - 60, height - 60
    parts.append(f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#999"/>')
    for k, arm in enumerate(grpo_arms):
        curves = [r["curve"] for r in rows if r["arm"] == arm and r["curve"]]
        n = min(len(c) for c in curves)
        mean = [sum(c[i] for c in curves) / len(curves) for i in range(n)]
        points = " ".join(f"{x0 + w * i / max(n - 1, 1):.1f},{y0 + h * (1 - v / 3):.1f}"
                          for i, v in enumerate(mean))
        parts.append(f'<polyline points="{points}" fill="none" stroke="{colours[k % 8]}" '
                     'stroke-width="1.5"/>')
        parts.append(f'<text x="{x0 + 4}" y="{y0 + 12 + 12 * k}" fill="{colours[k % 8]}">{arm}</text>')
    bars = [a for a in (*TABLE2, *TABLE3) if any(r["arm"] == a for r in rows)]
    bars = list(dict.fromkeys(bars))
    bx, bw = width // 2 + 20, (width // 2 - 40) / max(len(bars), 1)
    for k, arm in enumerate(bars):
        m, _ = mean_std([r["f1"] for r in rows if r["arm"] == arm])
        v = (m or 0.0) * h
        parts.append(f'<rect x="{bx + k * bw:.1f}" y="{y0 + h - v:.1f}" width="{bw * 0.8:.1f}" '
                     f'height="{v:.1f}" fill="{colours[k % 8]}"/>')
        parts.append(f'<text x="{bx + k * bw:.1f}" y="{y0 + h + 12}" font-size="8" '
                     f'transform="rotate(30 {bx + k * bw:.1f} {y0 + h + 12})">{arm}</text>')
    parts.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(parts) + "\n")

# ----------------------------------------------------------------------------- main


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    p.add_argument("--videos", type=int, default=0,
                   help="training videos per arm (default: the config's sft and train steps)")
    p.add_argument("--out", default="runs/paper")
    p.add_argument("--config", default="paper.yaml", help="the settings every arm starts from")
    p.add_argument("--toy", action="store_true", help="a few videos and tokens: checks the runner only")
    p.add_argument("overrides", nargs="*", help="section.key=value for every arm")
    a = p.parse_args(argv)
    extra = (TOY if a.toy else []) + a.overrides
    base = config_lib.load_config(a.config, extra)
    videos = a.videos or (4 if a.toy else base.sft.steps * base.sft.prompts_per_rank
                          + base.train.steps * base.train.prompts_per_rank)
    grpo_arms = [arm for arm in a.arms if ARMS[arm][0] == "grpo"]
    arms = [arm for arm in a.arms if arm not in grpo_arms and arm != "cold_start"]
    arms += ["cold_start"] * bool(grpo_arms or "cold_start" in a.arms) + grpo_arms  # GRPO starts from it
    rows = []
    for seed in a.seeds:
        build_base_model(arm_config("base", seed, a.out, videos, extra, a.config))
        for arm in arms:
            rows.append(run_arm(arm, seed, a.out, videos, extra, a.config))
            print(f"[seed {seed}] {arm}: event F1 {rows[-1]['f1']}, {rows[-1]['seconds']:.0f} s", flush=True)
    text = "\n".join([f"# The paper in miniature: {videos} training videos per arm, seeds {a.seeds}", "",
                      *table(rows, TABLE2, "Table 2"), "", *table(rows, TABLE3, "Table 3")]) + "\n"
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write(text)
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)
    svg(rows, os.path.join(a.out, "curves.svg"))
    print(text + f"\nwritten: {a.out}/results.md, results.json, curves.svg")
    return 0


if __name__ == "__main__":
    sys.exit(main())
