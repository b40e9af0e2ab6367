"""Benchmarks: caption DREAM-1K, VDC or CAREBENCH videos with a model, then score the captions with
each benchmark's official metric (scoring.py names the official scripts) through rewards.py's judge.

    python evaluate.py config.yaml eval.benchmark=dream1k eval.annotations=DREAM-1k.jsonl \
        eval.video_dir=videos eval.model=runs/videocap-r1/export
    torchrun --nproc_per_node 8 evaluate.py config.yaml eval.benchmark=vdc eval.annotations=VDCScore_qa ...
    python evaluate.py config.yaml eval.benchmark=carebench eval.annotations=json/metadata.json \
        eval.score_only=true eval.predictions=baseline.jsonl          # score captions made elsewhere
    python evaluate.py config.yaml --export tarsier eval.annotations=DREAM-1k.jsonl   # for tarsier's scorer

eval.out_dir gets predictions.jsonl (one line per caption: id, section, prompt, output, answer,
failed, tokens, truncated, settings), results.json and results.md (every figure, videos scored and
failed, the judge, the published numbers beside ours) and the resolved config.yaml; run.lock
(runfolder.py) keeps a second evaluation out of it while one runs. A predictions
file made elsewhere needs only `id` (the video id; plus `section` for VDC) and `answer` per line.

The official scripts' prediction formats are read as eval.predictions and written by --export into
eval.out_dir (failed and missing captions left out, counted, so that those scripts leave them out too);
benchmarks.py describes them, the annotation files and the video ids, and scoring.py the metrics.

Captioning: each rank holds a full model copy (nothing is sharded, so ranks never wait on each other
while captioning) and captions every world-th pending item in batches of eval.batch_size, appending
to predictions.jsonl.rank<r>; rank 0 merges those (and the leftovers of an interrupted run) into
predictions.jsonl, one line per item, then scores. A rerun skips what is captioned; unreadable videos
are recorded as failed (retried by the next run) and never stop the run.
Beyond the official scripts: VDC with eval.think: the section's prompt replaces the instruction file's
first line when that line is "Describe the video in detail." (so the detailed section gets exactly the
training prompt).
"""
import dataclasses
import errno
import glob
import json
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import benchmarks
import config as config_lib
import data
import judge as judge_lib
import judge_tasks
import rewards
import runfolder
import scoring
from benchmarks import EvalError
from config import snippet

# A write the disk refused (full, read-only, not a folder): one line, not a traceback
WRITE_ERRORS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                errno.ENOTDIR)

PUBLISHED = {  # the papers' figures with their judges, in percent (VDC score on 0..5)
    "dream1k": {"columns": ["F1", "P", "R"], "judge": "gpt-3.5-turbo-0125", "rows": {
        "GPT-4o": [39.2, 43.4, 35.7], "Gemini-1.5-Pro": [36.2, 37.6, 34.8], "Tarsier-7B": [34.6, 40.3, 30.2],
        "Tarsier2-7B": [42.0, 42.8, 41.1], "Qwen2-VL-7B": [29.6, 33.9, 26.3],
        "VideoCap-R1": [34.2, None, None]}},
    "vdc": {"columns": ["acc", "score"], "judge": "Llama-3.1-8B-Instruct", "rows": {
        "Gemini-1.5-Pro": [41.73, 2.15], "AuroraCap-7B": [38.21, 1.98], "VideoCap-R1": [43.8, None]}},
    "carebench": {"columns": [], "judge": "DeepSeek-V3", "rows": {}, "note": "No absolute numbers here yet; "
                  "the VideoCap-R1 paper reports +3.1 action F1 and +6.9 object F1 over Qwen2-VL-7B."},
}


# ----------------------------------------------------------------------------- predictions


def settings(cfg):
    """What a caption depends on besides its video and prompt; a resumed run must match it."""
    e, d = cfg.eval, cfg.data
    return {"model": e.model or cfg.model.path, "max_new_tokens": e.max_new_tokens,
            "temperature": e.temperature, "think": e.think, "max_frames": e.max_frames, "fps": d.fps,
            "max_pixels": d.max_pixels}


def merge(pred_path):
    """Fold predictions.jsonl.rank* into pred_path, one line per (id, section) sorted by it; returns how
    many records came from the rank files. A crash may have cut a rank file's last line: it is dropped."""
    parts = sorted(glob.glob(glob.escape(pred_path) + ".rank*"))
    if not parts:
        return 0
    records = benchmarks.read_predictions(pred_path) if os.path.exists(pred_path) else {}
    folded = 0
    for part in parts:
        new = benchmarks.read_predictions(part, torn_tail_ok=True)
        records.update(new)
        folded += len(new)
    with open(pred_path + ".tmp", "w") as f:
        f.writelines(json.dumps(records[key][1], ensure_ascii=False) + "\n" for key in sorted(records))
    os.replace(pred_path + ".tmp", pred_path)
    for part in parts:
        os.remove(part)
    return folded

# ----------------------------------------------------------------------------- captioning


def instruction_for(prompt, think):
    """The caption request: the prompt, then (eval.think) the think/answer instruction, whose own
    first line replaces it when that line is the detailed prompt."""
    if not think:
        return prompt
    detailed = benchmarks.DETAILED
    instruction = think[len(detailed):].lstrip() if think.startswith(detailed) else think
    return f"{prompt}\n{instruction}"


def caption_batch(items, hf, kind, tokenizer, cfg, think, device, generator):
    """Caption a batch greedily (eval.temperature 0) or by sampling -> prediction records; a video that
    cannot be read gives a failed record."""
    import model as model_lib  # transformers loads only when captioning
    e = cfg.eval
    data_cfg = dataclasses.replace(cfg.data, max_frames=e.max_frames)
    tokens = model_lib.Tokens.of(tokenizer)
    prompts, ok, records = [], [], []
    for it in items:
        base = {"id": it.id, "section": it.section, "video": it.video,
                "prompt": instruction_for(it.prompt, think)}
        try:
            prompts.append(data.encode(it.video, base["prompt"], tokenizer, data_cfg, kind,
                                       hf.config.vision_config))
            ok.append(base)
        except data.VideoError as err:
            print(f"caption failed: {err}", file=sys.stderr)
            records.append({**base, "output": None, "answer": None, "failed": str(err),
                            "settings": settings(cfg)})
        except data.DataError as err:
            # a prompt over data.max_prompt_tokens: a setting to change, not a video
            raise EvalError(str(err)) from None
    if ok:
        collated = data.collate(prompts, tokens.pad_id)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collated.items()}
        roll = model_lib.generate(hf, batch, 1, e.max_new_tokens, e.temperature, 1.0, tokens.eos_ids,
                                  tokens.pad_id, generator=generator)
        for base, text, n, ended in zip(ok, tokens.decode(roll), roll.lengths.tolist(), roll.ended.tolist()):
            records.append({**base, "output": text, "answer": benchmarks.answer_text(text), "failed": None,
                            "tokens": n, "truncated": not ended, "settings": settings(cfg)})
    return records


def caption(cfg, items, pred_path, rank, world, device):
    """Caption this rank's share (every world-th) of the items not yet captioned, appending to
    pred_path.rank<rank> batch by batch; returns how many it captioned."""
    import model as model_lib
    done = benchmarks.read_predictions(pred_path) if os.path.exists(pred_path) else {}
    for where, r in done.values():
        if r.get("settings") not in (None, settings(cfg)):
            raise EvalError(f"{where}: captioned with settings {snippet(r['settings'], 300)}, not "
                            f"{settings(cfg)}: set another eval.out_dir or eval.predictions")
    mine = [it for it in items if it.key not in done or done[it.key][1].get("failed")][rank::world]
    if not mine:
        return 0
    path = cfg.eval.model or cfg.model.path
    try:
        hf, kind = model_lib.load_model(path, cfg.model, device, train=False)
    except model_lib.ModelError as err:
        raise EvalError(f"eval.model (or model.path): {err}") from None
    tokenizer = model_lib.load_tokenizer(path)
    think = Path(cfg.data.prompt_file).read_text().strip() if cfg.eval.think else ""
    generator = torch.Generator(device).manual_seed(cfg.seed + rank) if cfg.eval.temperature > 0 else None
    bs = cfg.eval.batch_size
    desc = f"captioning {cfg.eval.benchmark} (rank 0 of {world})"
    rank_file = f"{pred_path}.rank{rank}"
    with open(rank_file, "a") as out, tqdm(total=len(mine), desc=desc, disable=rank != 0) as bar:
        for lo in range(0, len(mine), bs):
            records = caption_batch(mine[lo:lo + bs], hf, kind, tokenizer, cfg, think, device, generator)
            out.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            out.flush()  # a crash loses at most the batch in flight
            bar.update(len(records))
    return len(mine)

# ----------------------------------------------------------------------------- scoring and outputs


def first_videos(items, limit):
    """The items of the first `limit` videos (all when 0)."""
    if not limit:
        return items
    keep = set(list(dict.fromkeys(it.id for it in items))[:limit])
    return [it for it in items if it.id in keep]


def read_answers(items, everything, pred_path, annotations):
    """The scored text of each item from a predictions file (None: captioning failed or no prediction),
    and the models named in its settings. A prediction for a video not in the benchmark is an error."""
    preds = benchmarks.read_predictions(pred_path, items=everything)
    known = {it.key for it in everything}
    for key, (where, _) in preds.items():
        if key not in known:
            raise EvalError(f"{where}: {benchmarks.key_name(key)} is not in {annotations}")
    if missing := sum(it.key not in preds for it in items):
        print(f"score: {missing} of {len(items)} items have no prediction in {pred_path}: counted as failed",
              file=sys.stderr)
    ok = [it.key in preds and not preds[it.key][1].get("failed") for it in items]
    answers = [preds[it.key][1]["answer"] if good else None for it, good in zip(items, ok)]
    outputs = [preds[it.key][1].get("output") if good else None for it, good in zip(items, ok)]
    models = sorted({str(r["settings"].get("model")) for _, r in preds.values()
                     if isinstance(r.get("settings"), dict)})
    return answers, outputs, models, missing


def score_structure(items, outputs, think_cfg):
    """The structured thinking of the raw outputs (eval.think): the share in the format the reward asks for
    (rewards.format_score) and the mean Tscore where the annotations carry subjects (the demo's held-out
    clips do, in extra_info.subjects; the official benchmarks do not). Figures are None without outputs."""
    parsed = [(it, rewards.parse_output(o)) for it, o in zip(items, outputs) if o is not None]
    annotated = [(it, p) for it, p in parsed if it.subjects is not None]
    think = [rewards.think_score(p, it.subjects, think_cfg)[0] for it, p in annotated]
    named = sum(rewards.subjects_named(p, it.subjects) for it, p in annotated)
    subjects = sum(len(it.subjects) for it, _ in annotated)
    return {"outputs": len(parsed), "format": scoring.mean([rewards.format_score(p) for _, p in parsed]),
            "think": scoring.mean(think), "think_outputs": len(think),
            "named": named / subjects if subjects else None, "subjects": subjects}


def score(cfg, items, everything, pred_path):
    """Score the predictions of `items` (rank 0) and write results.json and results.md."""
    e = cfg.eval
    answers, outputs, models, missing = read_answers(items, everything, pred_path, e.annotations)
    try:
        judge = scoring.make_judge(cfg)
    except judge_tasks.JudgeError as err:
        raise EvalError(f"{err}\nThe captions are kept in {pred_path}; score them later with "
                        f"eval.score_only=true eval.predictions={pred_path}") from None
    chunk = 4 * max(1, cfg.judge.concurrency)  # enough tasks per wave to keep the judge busy, yet a live bar
    scores = []
    with tqdm(total=len(items), desc=f"scoring {e.benchmark}") as bar:
        for lo in range(0, len(items), chunk):
            scores += scoring.score_chunk(e.benchmark, items[lo:lo + chunk], answers[lo:lo + chunk], judge,
                                          official=e.reply_parsing == "official")
            bar.update(len(items[lo:lo + chunk]))
    videos = len({it.id for it in items})
    results = {
        "benchmark": e.benchmark, "annotations": e.annotations, "predictions": pred_path,
        "model": ", ".join(models) or "unknown (predictions made elsewhere)",
        "sections": e.vdc_sections if e.benchmark == "vdc" else None,
        "judge": {"model": judge.describe() if cfg.judge.url in ("lexical", "world") else cfg.judge.model,
                  "url": judge_lib.redact_url(cfg.judge.url), "malformed_retries": e.malformed_retries,
                  "reply_parsing": e.reply_parsing, "temperature": e.judge_temperature,
                  "max_tokens": e.judge_max_tokens,
                  "tasks_per_video": judge.stats["tasks"] / max(videos, 1), "stats": judge.stats},
        "videos": {"total": videos, "items": len(items), "caption_failed": sum(a is None for a in answers),
                   "missing": missing},
        "metrics": scoring.aggregate(e.benchmark, items, answers, scores),
        "structure": score_structure(items, outputs, cfg.reward.think) if e.think else None,
        "published": PUBLISHED[e.benchmark],
        "per_item": [{"id": it.id, "section": it.section, **s} for it, s in zip(items, scores)],
    }
    os.makedirs(e.out_dir, exist_ok=True)
    Path(e.out_dir, "results.json").write_text(json.dumps(results, indent=1))
    Path(e.out_dir, "results.md").write_text(markdown(results))
    return results


def _setting(value):
    return "not sent (the server's default)" if value is None else value


def _pct(x, scale=100.0, digits=1):
    return "n/a" if x is None else f"{scale * x:.{digits}f}"


def _pr_table(name, table):
    rows = [f"| {name} | F1 | P | R | videos scored | caption failed | judge failed |", "|---" * 7 + "|"]
    groups = list(table["groups"].items()) if len(table["groups"]) > 1 else []  # CaReBench has one
    for group, t in [*groups, ("**overall** (macro over groups)", table["overall"])]:
        other = f" ({t['judge_failed_other']} for the other score)" if t["judge_failed_other"] else ""
        rows.append(f"| {group} | {_pct(t['f1'])} | {_pct(t['precision'])} | {_pct(t['recall'])} "
                    f"| {t['videos']} | {t['caption_failed']} | {t['judge_failed']}{other} |")
    return rows


def _vdc_table(metrics):
    rows = ["| section | acc | score (0-5) | videos | failed (as 0) | caption failed | QA | QA failed |",
            "|---" * 8 + "|"]
    for section, t in metrics["sections"].items():
        rows.append(f"| {section} | {_pct(t['acc'])} | {_pct(t['score'], 1, 2)} | {t['videos']} "
                    f"| {t['failed']} | {t['caption_failed']} | {t['qa']} | {t['qa_failed']} |")
    mean = metrics["mean"]
    rows.append(f"| **mean** | {_pct(mean['acc'])} | {_pct(mean['score'], 1, 2)} | | | | | |")
    return rows


def markdown(results):
    """results.md: our figures (percent; VDC score 0-5), counts, the judge, and the published numbers."""
    b, judge, pub = results["benchmark"], results["judge"], results["published"]
    lines = [f"# {b}: {results['model']}", "",
             f"- judge: {judge['model']}, judge.url={judge['url']} "
             f"({judge['tasks_per_video']:.1f} tasks per video, {judge['stats']['failures']} failed); "
             f"replies read by the {judge['reply_parsing']} rules, temperature "
             f"{_setting(judge['temperature'])}, max_tokens {_setting(judge['max_tokens'])}",
             f"- videos: {results['videos']['total']} ({results['videos']['items']} captions), "
             f"{results['videos']['caption_failed']} captions failed or missing",
             f"- predictions: {results['predictions']}; annotations: {results['annotations']}"]
    if (s := results.get("structure")) and not s["outputs"]:
        lines.append("- structured thinking: not measured (the predictions hold answers only, no raw "
                     "outputs)")
    elif s:
        lines.append(f"- structured thinking: {_pct(s['format'])}% of {s['outputs']} outputs in the "
                     f"<think>/<answer> format; Tscore {_pct(s['think'], 1, 3)} over the "
                     f"{s['think_outputs']} with annotated subjects, which name {_pct(s.get('named'))}% of "
                     f"their {s.get('subjects', 0)} subjects (every word of the subject's name)")
    lines.append("")
    if b == "vdc":
        lines += [f"Sections run: {', '.join(results['sections'])}", "", *_vdc_table(results["metrics"])]
        ours = [results["metrics"]["mean"]["acc"] * 100, results["metrics"]["mean"]["score"]]
    else:
        for name, table in results["metrics"].items():
            lines += _pr_table(name, table) + [""]
        o = results["metrics"]["events"]["overall"] if b == "dream1k" else None
        ours = [None if o is None or o[k] is None else 100 * o[k] for k in ("f1", "precision", "recall")]
    lines += ["", f"Published (judge {pub['judge']}; scores depend strongly on the judge):", ""]
    if pub["rows"]:
        lines += ["| model | " + " | ".join(pub["columns"]) + " | judge |",
                  "|---" * (len(pub["columns"]) + 2) + "|"]
        for model, row in [("**ours**", ours), *pub["rows"].items()]:
            cells = " | ".join("n/a" if x is None else f"{x:.2f}".rstrip("0").rstrip(".") for x in row)
            lines.append(f"| {model} | {cells} | {judge['model'] if model == '**ours**' else pub['judge']} |")
    lines.append(pub.get("note", ""))
    return "\n".join(lines).rstrip() + "\n"

def headline(results):
    """The figures a before/after table compares: {name: (value, scale)}, scale 100 for shares."""
    b, m = results["benchmark"], results["metrics"]
    if b == "vdc":
        out = {"VDC acc (%)": (m["mean"]["acc"], 100), "VDC score (0-5)": (m["mean"]["score"], 1)}
    else:
        out = {f"{name} {k} (%)": (table["overall"][k], 100) for name, table in m.items()
               for k in ("f1", "precision", "recall")}
    if s := results.get("structure"):
        out.update({"<think>/<answer> format (%)": (s["format"], 100), "Tscore (0-1)": (s["think"], 1),
                    "subjects named (%)": (s.get("named"), 100)})
    return out


def before_after(before, after, before_name, after_name):
    """A markdown table of headline(before) and headline(after) with the change."""
    rows = [f"## Before and after: {before_name} -> {after_name}", "", "| figure | before | after | change |",
            "|---|---|---|---|"]
    old = headline(before)
    for name, (value, scale) in headline(after).items():
        was = old.get(name, (None, scale))[0]
        change = ("n/a" if value is None or was is None
                  else f"{scale * (value - was):+.{1 if scale == 100 else 3}f}")
        rows.append(f"| {name} | {_pct(was, scale, 1 if scale == 100 else 3)} | "
                    f"{_pct(value, scale, 1 if scale == 100 else 3)} | {change} |")
    return "\n".join(rows) + "\n"

# ----------------------------------------------------------------------------- main


def evaluate(cfg):
    """Caption (unless eval.score_only) on every rank, then score on rank 0: returns the results there,
    None on the other ranks. With eval.baseline, that model is captioned and scored first, the same way, in
    eval.out_dir/baseline, and results.md ends with the two side by side."""
    e = cfg.eval
    if e.baseline:
        before = evaluate(dataclasses.replace(cfg, eval=dataclasses.replace(
            e, model=e.baseline, baseline="", predictions="", out_dir=os.path.join(e.out_dir, "baseline"))))
        after = evaluate(dataclasses.replace(cfg, eval=dataclasses.replace(e, baseline="")))
        if after is not None:
            with open(Path(e.out_dir, "results.md"), "a") as f:
                f.write("\n" + before_after(before, after, e.baseline, e.model or cfg.model.path))
        return after
    everything = benchmarks.load_items(cfg)
    items = first_videos(everything, e.limit)
    scoring.check_eval(e)
    pred_path = predictions_file(e)
    if e.score_only:
        if int(os.environ.get("RANK", 0)):  # started by torchrun anyway: one scorer is enough
            return None
        return score(cfg, items, everything, predictions_file(e, "eval.score_only"))
    if os.path.isfile(pred_path) and (fmt := benchmarks.official_format(pred_path)):
        raise EvalError(f"{pred_path} holds {fmt}'s captions: score them with eval.score_only=true, or "
                        "caption into another eval.predictions")
    import training  # transformers loads only when captioning
    # ranks caption independently; the only collectives are barriers that wait for the slowest rank's whole
    # share of the benchmark, hence a timeout far above the 30-minute default
    with training.process_group("evaluate.py", timeout=48 * 3600) as (rank, world, device, _):
        if rank == 0:
            os.makedirs(os.path.dirname(os.path.abspath(pred_path)), exist_ok=True)
            os.makedirs(e.out_dir, exist_ok=True)
            config_lib.save_config(judge_lib.redacted_config(cfg), os.path.join(e.out_dir, "config.yaml"))
            if not e.model and cfg.model.build_tiny and not os.path.exists(cfg.model.path):
                import model as model_lib  # the demo's tiny random model, as grpo.py builds it
                texts = data.tokenizer_texts(data.load_records(cfg.data.train), Path(cfg.data.prompt_file)
                                             .read_text().strip()) if cfg.model.tiny_vocab else ()
                model_lib.build_configured(cfg.model, cfg.data, cfg.seed, texts)
            merge(pred_path)  # leftovers of an interrupted run
        dist.barrier()
        start = time.perf_counter()
        caption(cfg, items, pred_path, rank, world, device)
        dist.barrier()
        if rank != 0:
            return None
        n = merge(pred_path)
        seconds = time.perf_counter() - start
        print(f"captioned {n} items in {seconds:.1f} s ({n / seconds:.3f} items/s over {world} ranks) "
              f"-> {pred_path}")
    return score(cfg, items, everything, pred_path)


def predictions_file(e, needed_by=""):
    """eval.predictions, else eval.out_dir/predictions.jsonl; with `needed_by`, it must exist."""
    path = e.predictions or os.path.join(e.out_dir, "predictions.jsonl")
    if needed_by and not os.path.isfile(path):
        raise EvalError(f"{needed_by}: no predictions file {path}; set eval.predictions")
    return path


def export(cfg, fmt):
    """Write the predictions (eval.predictions, else eval.out_dir's) as the input of fmt's official scorer
    into eval.out_dir -> its path. Failed and missing captions are left out (counted), as we score them."""
    e = cfg.eval
    benchmark, name = benchmarks.EXPORTS[fmt]
    if e.benchmark != benchmark:
        raise EvalError(f"--export {fmt} writes {benchmark} captions, but eval.benchmark={e.benchmark}")
    everything = benchmarks.load_items(cfg)
    items = first_videos(everything, e.limit)
    answers, _, _, _ = read_answers(items, everything, predictions_file(e, f"--export {fmt}"), e.annotations)
    index = {it.key: k for k, it in enumerate(everything)}
    done = [(index[it.key], it, a) for it, a in zip(items, answers) if a is not None]
    if fmt == "tarsier":
        text = "".join(json.dumps(benchmarks.tarsier_record(it, k, a), ensure_ascii=False) + "\n"
                       for k, it, a in done)
    else:  # CaReBench's tasks/captioning.py reads <save_dir>/description.json instead of captioning
        text = json.dumps({str(k): {"pred": a, "gt": it.reference, "events": it.events, "objects": it.objects}
                           for k, it, a in done}, ensure_ascii=False)
    os.makedirs(e.out_dir, exist_ok=True)
    path = os.path.join(e.out_dir, name)
    Path(path).write_text(text)
    print(f"--export {fmt}: {len(done)} captions written, {len(items) - len(done)} failed or missing "
          "left out")
    return path


USAGE = """usage: python evaluate.py [CONFIG.yaml] [--export tarsier|carebench] [section.key=value ...]

Caption and score eval.benchmark (this file's docstring says how), or with --export write the
predictions as an official scorer's input into eval.out_dir: tarsier (DREAM-1K; tarsier's
evaluation/evaluate.py --pred_file) or carebench (description.json, read by CaReBench's
tasks/captioning.py from its --save_dir)."""


def _usage_error(message):
    print(f"evaluate: {message} (see --help)", file=sys.stderr)
    sys.exit(2)


def parse_args(argv):
    """(config path or None, --export format or None, key=value overrides). --help prints the usage and
    exits 0; an unknown flag exits 2 with one line."""
    path, fmt, overrides, args = None, None, [], iter(argv)
    for arg in args:
        if arg in ("-h", "--help"):
            print(USAGE)
            sys.exit(0)
        if arg == "--export" or arg.startswith("--export="):
            fmt = arg.partition("=")[2] or next(args, "")
            if fmt not in benchmarks.EXPORTS:
                _usage_error(f"--export takes {' or '.join(benchmarks.EXPORTS)}, got {fmt!r}")
        elif arg.startswith("-"):
            _usage_error(f"unknown flag {arg}; the flags are --export {'|'.join(benchmarks.EXPORTS)} "
                         "and --help")
        elif path is None and not overrides and "=" not in arg:
            path = arg
        else:
            overrides.append(arg)
    return path, fmt, overrides


def main(argv):
    """The command line (USAGE). Rank 0 holds the lock on eval.out_dir for the whole command (runfolder), so
    that two evaluations never write one folder; a bad setting or file, a folder in use or not writable, and
    Ctrl-C or SIGTERM end in one line."""
    path, fmt, overrides = parse_args(argv)
    try:
        cfg = config_lib.load_config(path, overrides)
        rank0 = int(os.environ.get("RANK", 0)) == 0
        with runfolder.hold(cfg.eval.out_dir, "eval.out_dir", "evaluate.py") if rank0 else nullcontext():
            if fmt:
                print(export(cfg, fmt))
                return
            results = evaluate(cfg)
    except (config_lib.ConfigError, EvalError, runfolder.LockError) as err:
        sys.exit(f"evaluate: {err}")
    except KeyboardInterrupt as err:  # Ctrl-C; training.Terminated for SIGTERM (exit 0)
        print(f"\nevaluate: {getattr(err, 'what', 'Ctrl-C')}: stopped at once; the captions written so far "
              "are kept: rerun the same command to continue", file=sys.stderr)
        sys.exit(getattr(err, "exit_code", 130))
    except OSError as err:
        if err.errno not in WRITE_ERRORS:
            raise
        sys.exit(f"evaluate: {runfolder.write_error(err, err.filename or 'a file')}")
    if results is not None:
        print(Path(cfg.eval.out_dir, "results.md").read_text())


if __name__ == "__main__":
    main(sys.argv[1:])
