"""A run's logs and what the programs print from them: metrics.jsonl (and wandb / TensorBoard when switched
on), the JSONL files read back, the summary's one-line charts and its side-by-side samples.

    log = make_logger(cfg.train, config_dict, rank)      # log(metrics, step): a line of metrics.jsonl
    lines = read_jsonl(path)                              # the summary's input
    print("\n".join(curves(lines, ("reward", "loss"))))  # mean of the first and last quarter, the curve
"""
import itertools
import json
import os
import textwrap

import torch

from training import StopRun


def make_logger(run, config_dict, rank):
    """log(metrics, step): a line of metrics.jsonl on rank 0, plus wandb / TensorBoard when switched on
    (run.wandb, run.tensorboard) and installed."""
    if rank != 0:
        return lambda metrics, step: None
    out_dir = run.out_dir
    sinks = []
    if run.wandb:
        import wandb  # optional
        wb = wandb.init(project=run.wandb_project, config=config_dict, dir=out_dir)
        sinks.append(lambda m, step: wb.log(m, step=step))
    if run.tensorboard:
        from torch.utils.tensorboard import SummaryWriter  # optional
        writer = SummaryWriter(os.path.join(out_dir, "tb"))
        sinks.append(lambda m, step: [writer.add_scalar(k, v, step) for k, v in m.items()])
    path = os.path.join(out_dir, "metrics.jsonl")

    def log(metrics, step):
        append_jsonl(path, {"step": step, **metrics})
        for sink in sinks:
            sink(metrics, step)
    return log


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


BARS = " ▁▂▃▄▅▆▇█"


def text_chart(values, width=48):
    """A one-line chart of a series: at most `width` bars, each the mean of its stretch of steps, scaled
    between the series' min and max. NaN stretches print as a space."""
    if not values:
        return ""
    n = min(width, len(values))
    means = []
    for k in range(n):
        part = [v for v in values[k * len(values) // n:(k + 1) * len(values) // n] if v == v]
        means.append(sum(part) / len(part) if part else None)
    finite = [m for m in means if m is not None]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 0.0)
    span = hi - lo or 1.0
    return "".join(" " if m is None else BARS[1 + round((m - lo) / span * (len(BARS) - 2))] for m in means)


def append_jsonl(path, obj):
    """One line onto a run's log; a failed write (a full disk) stops the run saying which file, with the
    checkpoints as they were."""
    try:
        with open(path, "a") as f:
            f.write(json.dumps(obj) + "\n")
    except OSError as e:
        raise StopRun(f"cannot write {path} (disk full or not writable?): {e.strerror or e}; the checkpoints "
                      "written so far are intact: make room and rerun the same command to resume") from None


def read_jsonl(path):
    """The objects of a JSONL file written by this run ([] when it does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def curves(lines, keys):
    """Summary rows, one per key: the mean over the first and the last quarter of the logged steps that
    have the key, then its text_chart."""
    rows = []
    for key in keys:
        series = [m[key] for m in lines if key in m and m[key] == m[key]]
        if series:
            k = max(1, len(series) // 4)
            rows.append(f"  {key:<18} {sum(series[:k]) / k:.3f} -> {sum(series[-k:]) / k:.3f}  "
                        f"{text_chart(series)}")
    return rows


def side_by_side(samples, score, width=46):
    """The first and the last sample of one video (the one seen furthest apart) in two columns, each
    headed by its step and `score`; samples: [{"step", "video", "text", score, ...}]."""
    spans = {}
    for s in samples:
        first, _ = spans.get(s.get("video"), (s, s))
        spans[s.get("video")] = (first, s)
    if not spans:
        return ""
    first, last = max(spans.values(), key=lambda fl: fl[1]["step"] - fl[0]["step"])
    left, right = (textwrap.wrap(s["text"][:600].replace("\n", " "), width) or [""] for s in (first, last))
    head = [f"step {s['step']}, {score} {s[score]:.3f}" for s in (first, last)]
    out = [f"video {first.get('video')}: its first and its last sample", f"  {head[0]:<{width}} | {head[1]}"]
    out += [f"  {a:<{width}} | {b}" for a, b in itertools.zip_longest(left, right, fillvalue="")]
    return "\n".join(out)
