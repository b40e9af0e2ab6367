"""Benchmarks: caption DREAM-1K, VDC or CAREBENCH videos with a model, then score the captions with
each benchmark's official metric (the official scripts are named below) through rewards.py's judge.

    python evaluate.py config.yaml eval.benchmark=dream1k eval.annotations=DREAM-1k.jsonl \
        eval.video_dir=videos eval.model=runs/videocap-r1/export
    torchrun --nproc_per_node 8 evaluate.py config.yaml eval.benchmark=vdc eval.annotations=VDCScore_qa ...
    python evaluate.py config.yaml eval.benchmark=carebench eval.annotations=json/metadata.json \
        eval.score_only=true eval.predictions=baseline.jsonl          # score captions made elsewhere
    python evaluate.py config.yaml --export tarsier eval.annotations=DREAM-1k.jsonl   # for tarsier's scorer

eval.out_dir gets predictions.jsonl (one line per caption: id, section, prompt, output, answer,
failed, tokens, truncated, settings), results.json and results.md (every figure, videos scored and
failed, the judge, the published numbers beside ours) and the resolved config.yaml. A predictions
file made elsewhere needs only `id` (the video id; plus `section` for VDC) and `answer` per line.

The official scripts' prediction formats are read as eval.predictions and written by --export into
eval.out_dir (failed and missing captions left out, counted, so that those scripts leave them out too):
- tarsier (bytedance/tarsier tasks/inference_benchmark.py): the annotation JSONL with the caption as the
  `text` beside the assistant's `reference` (where evaluation/evaluate.py reads it); written as
  tarsier_predictions.jsonl, built from the fields of the HF layout when that is the annotation file.
  Read: lines of other benchmarks (dataset not DREAM/...) are skipped and counted; "<error>", its
  inference's mark for a video it could not caption, is a failed caption.
- carebench (MCG-NJU/CaReBench tasks/captioning.py): description.json, one JSON object
  {"<index in metadata.json>": {"pred", "gt", "events", "objects"}}; `gt` is checked against the caption.
Told apart by official_format: one JSON object with neither `id` nor `messages` is CaReBench's; else the
file is JSONL, tarsier's when its first line has `messages`, else ours.

Video ids: every id (annotations, predictions, results, resume) becomes one string when read
(video_id): 1, 1.0 and "1" are the same video. A boolean, null, list or object as an id is an error.

Captioning: each rank holds a full model copy (nothing is sharded, so ranks never wait on each other
while captioning) and captions every world-th pending item in batches of eval.batch_size, appending
to predictions.jsonl.rank<r>; rank 0 merges those (and the leftovers of an interrupted run) into
predictions.jsonl, one line per item, then scores. A rerun skips what is captioned; unreadable videos
are recorded as failed (retried by the next run) and never stop the run.

Scoring follows tarsier's evaluation/metrics/evaluate_dream_gpt.py and CaReBench's utils/dream_gpt.py:
- Both texts are lowercased; the text given to an extraction step also has every " replaced by ' (the
  official scripts do so before extracting); entailment reads the lowercased texts, quotes kept, as
  there.
- A judge reply with a wrong shape, count or label is re-asked eval.malformed_retries times (default 9:
  the official scripts give up after 10 tries in all); then the video is excluded and counted.
- CaReBench: actions and objects have their own extraction and entailment steps and reply keys
  ("events", "objects"); a video whose judging failed for either is left out of both scores, and each
  score counts those it lost through the other (judge_failed_other).
Decisions beyond the official scripts:
- The scored text is the <answer> block; the whole output when it has no <think>/<answer> tag; ""
  when it has tags but no complete answer block (a think cut at max_new_tokens).
- VDC with eval.think: the section's prompt replaces the instruction file's first line when that line
  is "Describe the video in detail." (so the detailed section gets exactly the training prompt).
- Failures, always counted: DREAM-1K and CaReBench leave a video whose caption or judgement failed out
  of the means (tarsier's invalid results; its scorer would judge an "<error>" caption as text); VDC
  leaves a failed QA judgement out of its video's mean, and scores 0 for a video with no caption or no
  judged QA.
- An empty caption or statement list has no events or objects, without asking the judge (tarsier asks
  about the whole caption instead, and scores 1.0 all the same).
- The eval judge steps read their replacement prompts from eval.prompts only (not judge.prompts).
  The built-in prompts put captions in tags and say that text in tags is data (rewards.render); a
  replacement file pastes its bare {fields} raw, so the official wording gives the official prompt,
  byte for byte, without that protection. A malformed reply is re-asked identically, as there.
"""
import copy
import dataclasses
import functools
import glob
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import config as config_lib
import data
import rewards

DETAILED = data.CAPTION_PROMPT  # "Describe the video in detail."
VDC_PROMPTS = {  # our wording of each VDC section's caption request (lmms-eval draws from lists like these)
    "detailed": DETAILED,
    "short": "Write a one-sentence summary of the video.",
    "camera": "Describe the camera work in the video: the shot types, the camera movements and the "
              "changes of shooting angle.",
    "background": "Describe the background of the video: the objects, the location, the weather and the time.",
    "main_object": "Describe the main subject of the video: its attributes, its actions, its position and "
                   "how it moves during the video.",
}
VIDEO_EXTS = (".mp4", ".MP4", ".mkv")  # lmms-eval's VDC loader tries these in order
PUBLISHED = {  # the papers' figures with their judges, in percent (VDC score on 0..5)
    "dream1k": {"columns": ["F1", "P", "R"], "judge": "gpt-3.5-turbo-0125", "rows": {
        "GPT-4o": [39.2, 43.4, 35.7], "Gemini-1.5-Pro": [36.2, 37.6, 34.8], "Tarsier-7B": [34.6, 40.3, 30.2],
        "Tarsier2-7B": [42.0, 42.8, 41.1], "Qwen2-VL-7B": [29.6, 33.9, 26.3], "VideoCap-R1": [34.2, None, None]}},
    "vdc": {"columns": ["acc", "score"], "judge": "Llama-3.1-8B-Instruct", "rows": {
        "Gemini-1.5-Pro": [41.73, 2.15], "AuroraCap-7B": [38.21, 1.98], "VideoCap-R1": [43.8, None]}},
    "carebench": {"columns": [], "judge": "DeepSeek-V3", "rows": {}, "note": "No absolute numbers here yet; "
                  "the VideoCap-R1 paper reports +3.1 action F1 and +6.9 object F1 over Qwen2-VL-7B."},
}


class EvalError(ValueError):
    pass


@dataclass
class Item:
    """One caption to make and score: a video, or for VDC a (video, section) pair."""
    id: str                      # the benchmark's video id, as video_id makes it
    video: str                   # video file
    group: str                   # what the metric averages within: DREAM subset, VDC section, "overall"
    prompt: str                  # the caption request, before the think instruction
    section: str = ""            # VDC section ("" elsewhere): (id, section) is the item's key
    reference: str = ""          # reference caption (DREAM-1K, CaReBench)
    events: list | None = None   # reference events; None: extracted from `reference` by the judge
    objects: list | None = None  # reference objects (CaReBench); None: extracted likewise
    qa: list = field(default_factory=list)  # VDC: [{"question", "answer"}]
    subjects: list | None = None  # ground-truth subjects for Tscore (not in the official files; ours have them)
    where: str = ""              # FILE:LINE (or FILE:index) of its annotation
    source: dict | None = field(default=None, repr=False)  # its annotation record, for --export

    @property
    def key(self):
        return self.id, self.section


def _name(key):
    return f"video {key[0]!r}" + (f" section {key[1]}" if key[1] else "")


def video_id(value, where):
    """The one string a video id becomes wherever it is read, so that 1, 1.0 and "1" are the same video
    (tarsier's DREAM-1k.jsonl has integer vids, other files strings): a string as it is, an integral
    number in decimal, any other number as Python writes it."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return str(int(value)) if value.is_integer() else repr(value)
    raise EvalError(f"{where}: a video id must be a string or a number, got {json.dumps(value)[:80]}")

# ----------------------------------------------------------------------------- annotation loaders


def _read_jsonl(path, torn_tail_ok=False):
    """(FILE:LINE, object) per non-blank line. torn_tail_ok: a last line cut by a crash is dropped."""
    with open(path) as f:
        lines = f.read().split("\n")
    last = max((n for n, line in enumerate(lines) if line.strip()), default=-1)
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            yield f"{path}:{n + 1}", json.loads(line)
        except json.JSONDecodeError as e:
            if torn_tail_ok and n == last:
                print(f"{path}:{n + 1}: dropping a line cut short by an interrupted run", file=sys.stderr)
                return
            raise EvalError(f"{path}:{n + 1}: not valid JSON ({e.msg} at column {e.colno})") from None


def _read_array(path):
    """(FILE:index N, object) per element of a JSON array file."""
    with open(path) as f:
        try:
            rows = json.load(f)
        except json.JSONDecodeError as e:
            raise EvalError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(rows, list):
        raise EvalError(f"{path}: expected a JSON array of records, got a {type(rows).__name__}")
    return [(f"{path}:index {i}", row) for i, row in enumerate(rows)]


_REQUIRED = object()


def _get(rec, path, where, kind=str, default=_REQUIRED):
    """rec at a dotted path ("messages.1.content.0.reference"), checked to be `kind`."""
    node = rec
    for step in path.split("."):
        try:
            node = node[int(step)] if step.isdigit() else node[step]
        except (KeyError, IndexError, TypeError):
            if default is not _REQUIRED:
                return default
            raise EvalError(f"{where}: the record has no '{path}'") from None
    if not isinstance(node, kind):
        raise EvalError(f"{where}: '{path}' must be {getattr(kind, '__name__', kind)}, got {node!r:.80}")
    return node


def _id(rec, path, where):
    return video_id(_get(rec, path, where, object), f"{where}: '{path}'")


def _statements(rec, path, where):
    """An optional list of reference sentences (events or objects): None when absent."""
    value = _get(rec, path, where, (list, type(None)), default=None)
    if value is not None and not all(isinstance(s, str) for s in value):
        raise EvalError(f"{where}: '{path}' must be a list of strings")
    return value


def load_dream1k(path, video_dir, sections=()):
    """DREAM-1K as tarsier's JSONL or as the HF metadata.json array (told apart by the first character)."""
    with open(path) as f:
        array = f.read(1024).lstrip().startswith("[")
    if array:  # HF: idx, video_file, source, description, events, ...
        return [Item(Path(_get(r, "video_file", w)).stem, os.path.join(video_dir, _get(r, "video_file", w)),
                     _get(r, "source", w).removeprefix("DREAM/"), DETAILED, reference=_get(r, "description", w),
                     events=_statements(r, "events", w), where=w, source=r) for w, r in _read_array(path)]
    items = []
    for w, r in _read_jsonl(path):  # tarsier: vid (an integer there), dataset "DREAM/<subset>", messages, extra_info
        vid, dataset = _id(r, "vid", w), _get(r, "dataset", w)
        if not dataset.startswith("DREAM/"):
            raise EvalError(f"{w}: 'dataset' must look like DREAM/<subset>, got {dataset!r:.80}")
        items.append(Item(vid, os.path.join(video_dir, vid + ".mp4"), dataset[len("DREAM/"):], DETAILED,
                          reference=_get(r, "messages.1.content.0.reference", w),
                          events=_statements(r, "extra_info.events", w), where=w, source=r,
                          subjects=_get(r, "extra_info.subjects", w, (list, type(None)), default=None)))
    return items


def load_carebench(path, video_dir, sections=()):
    """CaReBench's json/metadata.json: video, caption, [events], [objects], ...; item k is record k (the
    index CaReBench's description.json is keyed by)."""
    return [Item(Path(_get(r, "video", w)).stem, os.path.join(video_dir, _get(r, "video", w)), "overall", DETAILED,
                 reference=_get(r, "caption", w), events=_statements(r, "events", w),
                 objects=_statements(r, "objects", w), where=w, source=r) for w, r in _read_array(path)]


def _vdc_video(video_dir, name):
    names = [name] if name.endswith(VIDEO_EXTS) else [name + ext for ext in VIDEO_EXTS]
    found = [p for p in (os.path.join(video_dir, n) for n in names) if os.path.exists(p)]
    return found[0] if found else os.path.join(video_dir, names[0])


def load_vdc(folder, video_dir, sections):
    """VDC's VDCScore_qa/<section>.jsonl, each line {video_id: [{question, answer, category}, ...]}; video
    names from VDC_1k.jsonl (video_id, video_name) in the folder or beside it, when present."""
    if unknown := [s for s in sections if s not in VDC_PROMPTS]:
        raise EvalError(f"eval.vdc_sections: unknown {unknown}; valid: {list(VDC_PROMPTS)}")
    names, folder = {}, os.path.normpath(folder)
    for index in (os.path.join(folder, "VDC_1k.jsonl"), os.path.join(os.path.dirname(folder), "VDC_1k.jsonl")):
        if os.path.isfile(index):
            names = {_id(r, "video_id", w): _get(r, "video_name", w, default=None) or _id(r, "video_id", w)
                     for w, r in _read_jsonl(index)}
            break
    items = []
    for section in sections:
        path = os.path.join(folder, f"{section}.jsonl")
        if not os.path.isfile(path):
            raise EvalError(f"{path} not found: eval.annotations must be the VDCScore_qa folder, holding "
                            f"<section>.jsonl for every section in eval.vdc_sections")
        for w, r in _read_jsonl(path):
            if not isinstance(r, dict) or not r:
                raise EvalError(f"{w}: expected {{video_id: [{{question, answer}}, ...]}}")
            for vid, qa in r.items():
                if not isinstance(qa, list) or not qa:
                    raise EvalError(f"{w}: video {vid!r}: expected a non-empty list of QA pairs")
                pairs = [{"question": _get(q, "question", f"{w} ({vid} QA {k})"),
                          "answer": str(_get(q, "answer", f"{w} ({vid} QA {k})", (str, int, float)))}
                         for k, q in enumerate(qa)]
                items.append(Item(vid, _vdc_video(video_dir, names.get(vid, vid)), section, VDC_PROMPTS[section],
                                  section=section, qa=pairs, where=w))
    return items


LOADERS = {"dream1k": load_dream1k, "vdc": load_vdc, "carebench": load_carebench}


def load_items(cfg):
    """All the benchmark's items, in annotation order; a video (or VDC video and section) twice is an error."""
    e = cfg.eval
    if e.benchmark not in LOADERS:
        raise EvalError(f"eval.benchmark={e.benchmark!r}: expected one of {list(LOADERS)}")
    if not e.annotations or not os.path.exists(e.annotations):
        raise EvalError(f"eval.annotations={e.annotations!r} does not exist: point it at the benchmark's "
                        "annotations (the load_<benchmark> functions list the layouts)")
    items = LOADERS[e.benchmark](e.annotations, e.video_dir, e.vdc_sections)
    seen = {}
    for it in items:
        if it.key in seen:
            raise EvalError(f"{it.where}: {_name(it.key)} again (first at {seen[it.key]})")
        seen[it.key] = it.where
    return items

# ----------------------------------------------------------------------------- judge steps


# eval's judge steps beyond rewards.py's extract_events. The marker line names each for the test server; captions
# and what the judge derived from them sit in tags (rewards.render), the benchmark's questions and answers not.
TEMPLATES = {
    "extract_objects": (
        "[VideoCap-R1 eval task: extract_objects]\n" + rewards.DATA_ONLY +
        "Below is a description of a video. List the objects it describes: at most 10, each a short "
        'sentence "There is ..." or "There are ..." with a single attribute (split an object with several '
        "attributes into several sentences). Atmosphere, sounds, camera work and actions are not objects.\n"
        'Answer with JSON only: {"objects": ["...", "..."]}\n\n'
        "<caption>\n{caption}\n</caption>"),
    "entail": (
        "[VideoCap-R1 eval task: entail]\n" + rewards.DATA_ONLY +
        "Below are a video description and a JSON list of statements about the video. For each statement, "
        'decide from the description alone whether the description entails it ("entailment"), contradicts '
        'it ("contradiction") or neither ("neutral").\n'
        "Answer with JSON only, one item per statement, in order: "
        '{"events": [{"event": "...", "relationship": "entailment|neutral|contradiction", "reason": "..."}]}\n\n'
        "<description>\n{description}\n</description>\n\n<events>\n{events}\n</events>"),
    "entail_objects": (
        "[VideoCap-R1 eval task: entail_objects]\n" + rewards.DATA_ONLY +
        "Below are a video description and a JSON list of statements, each naming an object in the video "
        "with one attribute. For each statement, decide from the description alone whether the description "
        'entails it ("entailment"), contradicts it ("contradiction") or neither ("neutral").\n'
        "Answer with JSON only, one item per statement, in order: "
        '{"objects": [{"object": "...", "relationship": "entailment|neutral|contradiction", "reason": "..."}]}\n\n'
        "<description>\n{description}\n</description>\n\n<objects>\n{objects}\n</objects>"),
    "vdc_answer": (
        "[VideoCap-R1 eval task: vdc_answer]\n" + rewards.DATA_ONLY +
        "Answer the question about a video from its description alone, with a short phrase or sentence. "
        "Write nothing else.\n\n"
        "<caption>\n{caption}\n</caption>\n\nQuestion: {question}"),
    "vdc_grade": (
        "[VideoCap-R1 eval task: vdc_grade]\n" + rewards.DATA_ONLY +
        "Compare a predicted answer to a question about a video with the correct answer. Judge whether they "
        "match in meaning (synonyms and paraphrases match) and rate the match with an integer from 0 to 5.\n"
        "Answer with a Python dictionary only, for example {'pred': 'yes', 'score': 4}.\n\n"
        "Question: {question}\nCorrect answer: {answer}\nPredicted answer:\n<prediction>\n{prediction}\n</prediction>"),
}
STEPS = {"extract_events": rewards.TEMPLATES["extract_events"], **TEMPLATES}


def _sentences(text):
    return [s.strip() for s in text.replace("!", ".").replace("?", ".").replace(";", ".").split(".") if s.strip()]


def _lexical_objects(fields):
    return json.dumps({"objects": [f"there is {s}" for s in _sentences(fields["caption"])][:10]})


def _lexical_entail(fields, kind="events", one="event"):
    statements = json.loads(fields[kind])
    numbered = "\n".join(f"{k}. {' '.join(s.split())}" for k, s in enumerate(statements, 1))
    judged = json.loads(rewards.LEXICAL["entail"]({"description": fields["description"], "events": numbered}))
    return json.dumps({kind: [{one: s, "relationship": j["relationship"], "reason": j["reason"]}
                              for s, j in zip(statements, judged["events"])]})


def _lexical_answer(fields):
    asked = rewards._content_words(fields["question"])
    best = max(_sentences(fields["caption"]), key=lambda s: len(asked & rewards._content_words(s)), default="")
    return best or "not described"


def _lexical_grade(fields):
    truth, said = rewards._content_words(fields["answer"]), rewards._content_words(fields["prediction"])
    share = len(truth & said) / len(truth) if truth else 0.0
    return repr({"pred": "yes" if share >= rewards.LEXICAL_ENTAILS else "no", "score": round(5 * share)})


LEXICAL = {"extract_objects": _lexical_objects, "entail": _lexical_entail,
           "entail_objects": functools.partial(_lexical_entail, kind="objects", one="object"),
           "vdc_answer": _lexical_answer, "vdc_grade": _lexical_grade}
ENTAIL = {"events": "entail", "objects": "entail_objects"}  # kind of statement -> its entailment step


def _parse_objects(reply):
    obj = rewards.decode_reply(reply)
    objects = obj.get("objects") if isinstance(obj, dict) else obj
    if not isinstance(objects, list) or not all(isinstance(o, str) for o in objects):
        raise ValueError('expected {"objects": [str, ...]}')
    return [o.strip() for o in objects if o.strip()]


def _parse_judged(reply, n, kind):
    """The n labels of a reply {kind: [{..., "relationship": label}, ...]} (or a bare list): the official
    scripts read the key "events" for events and "objects" for objects."""
    obj = rewards.decode_reply(reply)
    judged = obj.get(kind) if isinstance(obj, dict) else obj
    if not isinstance(judged, list) or len(judged) != n:
        raise ValueError(f'expected {{"{kind}": [{n} judged statements]}}')
    return rewards._parse_labels(json.dumps(judged, default=str, skipkeys=True), n)


def _parse_answer(reply):
    if not reply.strip():
        raise ValueError("empty answer")
    return reply.strip()


def _parse_grade(reply):
    """{'pred': 'yes'|'no', 'score': 0..5} (JSON or a Python-dict string, never eval) -> (yes, score)."""
    obj = rewards.decode_reply(reply)
    pred, score = (obj.get("pred"), obj.get("score")) if isinstance(obj, dict) else (None, None)
    if not isinstance(pred, str) or pred.strip().lower() not in ("yes", "no"):
        raise ValueError(f"'pred' must be 'yes' or 'no', got {pred!r:.40}")
    try:  # the official prompt's own example has 4.8, and some judges quote the number
        score = float(score) if not isinstance(score, bool) else math.nan
    except (TypeError, ValueError):
        score = math.nan
    if not 0 <= score <= 5:
        raise ValueError("'score' must be a number from 0 to 5")
    return pred.strip().lower() == "yes", score


def extract_task(kind, caption):
    if kind == "events":
        return rewards.extract_events_task(caption)
    return rewards.Task("extract_objects", TEMPLATES["extract_objects"], {"caption": caption.strip()},
                        _parse_objects, _lexical_objects)


def entail_task(kind, description, statements):
    step, fields = ENTAIL[kind], {"description": description.strip(), kind: json.dumps(statements, ensure_ascii=False)}
    return rewards.Task(step, TEMPLATES[step], fields, functools.partial(_parse_judged, n=len(statements), kind=kind),
                        LEXICAL[step])


def vdc_answer_task(caption, question):
    return rewards.Task("vdc_answer", TEMPLATES["vdc_answer"], {"caption": caption.strip(), "question": question},
                        _parse_answer, _lexical_answer)


def vdc_grade_task(question, answer, prediction):
    fields = {"question": question, "answer": answer, "prediction": prediction}
    return rewards.Task("vdc_grade", TEMPLATES["vdc_grade"], fields, _parse_grade, _lexical_grade)


def check_prompts(prompts):
    """eval.prompts: each a known step whose file uses exactly that step's {fields}; stops before any work."""
    for step, path in prompts.items():
        if step not in STEPS:
            raise EvalError(f"eval.prompts.{step}: unknown judge step; valid: {list(STEPS)}")
        try:
            rewards.read_prompt(f"eval.prompts.{step}", path, STEPS[step])
        except rewards.JudgeError as e:
            raise EvalError(str(e)) from None


def make_judge(cfg):
    """rewards.py's judge (HTTP or lexical) with eval.prompts as its replacement prompts and
    eval.malformed_retries (not judge.malformed_retries, training's) as its re-asks, each the
    identical question as in the official scripts (training's re-asks carry the parse error)."""
    check_prompts(cfg.eval.prompts)
    return rewards.make_judge(dataclasses.replace(cfg.judge, prompts=dict(cfg.eval.prompts),
                                                  malformed_retries=cfg.eval.malformed_retries), feedback=False)

# ----------------------------------------------------------------------------- metrics


def f1(p, r):
    """F1 = 2PR / (P + R), applied to averaged P and R (tarsier's count_f1), never averaged itself."""
    return None if p is None or r is None else 2 * p * r / (p + r) if p + r else 0.0


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def score_pr(items, answers, kind, judge):
    """Per item {precision, recall} of `kind` (events/objects), None when captioning or judging failed.

    Recall = share of reference statements the judge labels "entailment" given the prediction; precision
    = share of the prediction's extracted statements entailed by the reference; empty lists score 1.0
    (rewards.coverage). Both texts are lowercased first, and an extraction step reads its text with every "
    replaced by ' (the official scripts' step). Two waves: extraction, then entailment."""
    preds = [a.lower() if a is not None else None for a in answers]
    refs = [it.reference.lower() for it in items]
    truth = [getattr(it, kind) for it in items]
    need = [r for r, t in zip(refs, truth) if t is None] + [p for p in preds if p]
    need = list(dict.fromkeys(need))
    extracted = dict(zip(need, judge.ask([extract_task(kind, c.replace('"', "'")) for c in need])))
    extracted[""] = []  # an empty caption states nothing
    truth = [extracted[r] if t is None else t for r, t in zip(refs, truth)]
    asks = [(p, t) for p, t in zip(preds, truth)] + [(r, extracted.get(p)) for r, p in zip(refs, preds)]
    todo = [k for k, (p, s) in enumerate(asks) if p is not None and s]
    labels = [[] if s == [] else None for _, s in asks]  # [] covers 1.0; None: failed
    for k, result in zip(todo, judge.ask([entail_task(kind, *asks[k]) for k in todo])):
        labels[k] = result
    out, n = [], len(items)
    for k, p in enumerate(preds):
        recall, precision = rewards.coverage(labels[k]), rewards.coverage(labels[n + k])
        ok = p is not None and not math.isnan(recall) and not math.isnan(precision)
        out.append({"precision": precision, "recall": recall} if ok else None)
    return out


PR_COUNTS = ("caption_failed", "judge_failed", "judge_failed_other")


def aggregate_pr(items, answers, scores, dropped=()):
    """Mean P and R per group, F1 from those means; overall P, R = mean of the group means (macro).
    dropped[k]: item k's judging failed for another score, which leaves it out of this one too (counted
    in judge_failed, and in judge_failed_other)."""
    groups = {}
    for it, a, s, other in zip(items, answers, scores, dropped or [False] * len(items)):
        g = groups.setdefault(it.group, {"scores": [], **dict.fromkeys(PR_COUNTS, 0)})
        if a is None:
            g["caption_failed"] += 1
        elif s is None or other:
            g["judge_failed"] += 1
            g["judge_failed_other"] += s is not None
        else:
            g["scores"].append(s)
    table = {}
    for name in sorted(groups):
        g = groups[name]
        p, r = _mean([s["precision"] for s in g["scores"]]), _mean([s["recall"] for s in g["scores"]])
        table[name] = {"precision": p, "recall": r, "f1": f1(p, r), "videos": len(g["scores"]),
                       **{k: g[k] for k in PR_COUNTS}}
    scored = [t for t in table.values() if t["videos"]]
    p, r = _mean([t["precision"] for t in scored]), _mean([t["recall"] for t in scored])
    overall = {"precision": p, "recall": r, "f1": f1(p, r)}
    overall.update({k: sum(t[k] for t in table.values()) for k in ("videos", *PR_COUNTS)})
    return {"groups": table, "overall": overall}


def score_vdc(items, answers, judge):
    """Per item {acc, score, qa, qa_failed}: the judge answers each question from the caption, then grades
    that answer against the correct one. acc = share of 'yes', score = mean 0..5 over the judged QA pairs;
    0 and 0 (failed: True) when the caption failed or no QA pair could be judged."""
    qa = [(k, q) for k, a in enumerate(answers) if a is not None for q in items[k].qa]
    replies = judge.ask([vdc_answer_task(answers[k], q["question"]) for k, q in qa])
    graded = [(k, q, r) for (k, q), r in zip(qa, replies) if r is not None]
    grades = judge.ask([vdc_grade_task(q["question"], q["answer"], r) for _, q, r in graded])
    judged = [[] for _ in items]
    for (k, _, _), g in zip(graded, grades):
        if g is not None:
            judged[k].append(g)
    out = []
    for it, a, js in zip(items, answers, judged):
        n = len(it.qa) if a is not None else 0
        out.append({"acc": _mean([float(yes) for yes, _ in js]) or 0.0, "score": _mean([s for _, s in js]) or 0.0,
                    "qa": n, "qa_failed": n - len(js), "failed": not js, "caption_failed": a is None})
    return out


def aggregate_vdc(items, scores):
    """Per section: mean acc and score over all its videos (failed ones as 0); then the sections' mean."""
    table = {}
    for it, s in zip(items, scores):
        table.setdefault(it.section, []).append(s)
    out = {}
    for section, ss in table.items():
        out[section] = {"acc": _mean([s["acc"] for s in ss]), "score": _mean([s["score"] for s in ss]),
                        "videos": len(ss), "failed": sum(s["failed"] for s in ss),
                        "caption_failed": sum(s["caption_failed"] for s in ss),
                        "qa": sum(s["qa"] for s in ss), "qa_failed": sum(s["qa_failed"] for s in ss)}
    mean = {"acc": _mean([t["acc"] for t in out.values()]), "score": _mean([t["score"] for t in out.values()])}
    return {"sections": out, "mean": mean}


KINDS = {"dream1k": {"events": "events"}, "carebench": {"action": "events", "object": "objects"}}


def score_chunk(benchmark, items, answers, judge):
    """Per-item scores: VDC's, or for each reported kind (DREAM-1K events; CaReBench action, object) P and R."""
    if benchmark == "vdc":
        return score_vdc(items, answers, judge)
    per = {name: score_pr(items, answers, kind, judge) for name, kind in KINDS[benchmark].items()}
    return [{name: per[name][k] for name in per} for k in range(len(items))]


def aggregate(benchmark, items, answers, scores):
    if benchmark == "vdc":
        return aggregate_vdc(items, scores)
    # CaReBench (utils/dream_gpt.py, process_one_sample) keeps a video only when all its judgements
    # succeeded: a failure for actions or for objects leaves it out of both scores
    dropped = [None in s.values() for s in scores]
    return {name: aggregate_pr(items, answers, [s[name] for s in scores], dropped) for name in KINDS[benchmark]}

# ----------------------------------------------------------------------------- predictions


def settings(cfg):
    """What a caption depends on besides its video and prompt; a resumed run must match it."""
    e, d = cfg.eval, cfg.data
    return {"model": e.model or cfg.model.path, "max_new_tokens": e.max_new_tokens, "temperature": e.temperature,
            "think": e.think, "max_frames": e.max_frames, "fps": d.fps, "max_pixels": d.max_pixels}


def answer_text(output):
    """The scored text: the <answer> block; the whole output without tags; "" with tags but no answer."""
    answer = rewards.parse_output(output).answer
    if answer is not None:
        return answer
    return "" if "<answer>" in output or "<think>" in output else output.strip()


def read_predictions(path, torn_tail_ok=False, items=()):
    """(id, section) -> (FILE:LINE, record); a later line replaces an earlier one. A record is failed
    (`failed`: why) or has `answer` (else derived from `output`). Reads ours and the official formats
    (official_format); CaReBench's keys are positions in `items`, the benchmark's annotations."""
    fmt = official_format(path)
    if fmt == "carebench":
        return _from_carebench(path, items)
    records, skipped = {}, 0
    for w, r in _read_jsonl(path, torn_tail_ok):
        if not isinstance(r, dict):
            raise EvalError(f"{w}: expected a JSON object with 'id' and 'answer'")
        if fmt == "tarsier" and (r := _from_tarsier(r, w)) is None:
            skipped += 1
            continue
        key = _id(r, "id", w), _get(r, "section", w, default="")
        r["id"] = key[0]  # merge writes the one form
        if _get(r, "failed", w, (str, type(None)), default=None) is None and "answer" not in r:
            r["answer"] = answer_text(_get(r, "output", w))
        _get(r, "answer", w, (str, type(None)), default=None)
        records[key] = w, r
    if skipped:
        print(f"{path}: skipped {skipped} lines of other benchmarks than DREAM", file=sys.stderr)
    return records


def official_format(path):
    """"carebench" for a file that is one JSON object with neither `id` nor `messages` (CaReBench's
    description.json), "tarsier" for JSONL whose first record has `messages`, else None (ours)."""
    text = Path(path).read_text()
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, dict) and not {"id", "messages"} & whole.keys():
        return "carebench"
    try:
        first = json.loads(next((line for line in text.split("\n") if line.strip()), "null"))
    except json.JSONDecodeError:
        return None
    return "tarsier" if isinstance(first, dict) and "messages" in first else None


TARSIER_FAILED = "<error>"  # what tarsier's inference writes for a video it could not caption


def _from_tarsier(rec, where):
    """Our record from a line of tarsier's inference output (None for another benchmark's line): the
    caption is the `text` of the assistant contents that hold a `reference`, where its evaluation reads it."""
    if not _get(rec, "dataset", where).startswith("DREAM/"):
        return None
    texts = [_get(c, "text", where) for m in _get(rec, "messages", where, list)
             if isinstance(m, dict) and m.get("role") == "assistant"
             for c in _get(m, "content", where, list) if isinstance(c, dict) and c.get("reference")]
    if not texts:
        raise EvalError(f"{where}: no assistant content with a 'reference' (tarsier's caption is its 'text')")
    output = "".join(texts)
    failed = f"tarsier's inference wrote {TARSIER_FAILED}" if output == TARSIER_FAILED else None
    return {"id": _id(rec, "vid", where), "output": None if failed else output, "failed": failed}


def _from_carebench(path, items):
    """Our records from CaReBench's description.json {"<k>": {"pred", "gt", ...}}: k is the position of
    the video in metadata.json, `gt` its caption (a mismatch means captions of other annotations)."""
    records = {}
    for key, rec in json.loads(Path(path).read_text()).items():
        w, k = f"{path}:key {key}", int(key) if key.isdecimal() else -1
        if not 0 <= k < len(items):
            raise EvalError(f"{w}: expected the index of a record of the annotations (0 to {len(items) - 1})")
        if _get(rec, "gt", w) != items[k].reference:
            raise EvalError(f"{w}: 'gt' is not the caption of {items[k].where}: are these captions of other "
                            "annotations?")
        output = _get(rec, "pred", w)
        records[items[k].key] = w, {"id": items[k].id, "section": "", "output": output,
                                    "answer": answer_text(output), "failed": None}
    return records


def merge(pred_path):
    """Fold predictions.jsonl.rank* into pred_path, one line per (id, section) sorted by it; returns how
    many records came from the rank files. A crash may have cut a rank file's last line: it is dropped."""
    parts = sorted(glob.glob(glob.escape(pred_path) + ".rank*"))
    if not parts:
        return 0
    records = read_predictions(pred_path) if os.path.exists(pred_path) else {}
    folded = 0
    for part in parts:
        new = read_predictions(part, torn_tail_ok=True)
        records.update(new)
        folded += len(new)
    with open(pred_path + ".tmp", "w") as f:
        f.writelines(json.dumps(records[key][1], ensure_ascii=False) + "\n" for key in sorted(records))
    os.replace(pred_path + ".tmp", pred_path)
    for part in parts:
        os.remove(part)
    return folded

# ----------------------------------------------------------------------------- captioning


def init_distributed():
    """torchrun's process group (nccl on GPU, gloo on CPU), or a world of one without one."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    # ranks caption independently; the only collectives are barriers that wait for the slowest rank's
    # whole share of the benchmark, hence a timeout far above the 30-minute default
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=48),
                            **({"device_id": device} if cuda else {}))
    return dist.get_rank(), dist.get_world_size(), device


def barrier():
    if dist.is_initialized():
        dist.barrier()


def instruction_for(prompt, think):
    """The caption request: the prompt, then (eval.think) the think/answer instruction, whose own
    first line replaces it when that line is the detailed prompt."""
    if not think:
        return prompt
    return f"{prompt}\n{think[len(DETAILED):].lstrip() if think.startswith(DETAILED) else think}"


def caption_batch(items, hf, kind, tokenizer, cfg, think, device, generator):
    """Caption a batch greedily (eval.temperature 0) or by sampling -> prediction records; a video that
    cannot be read gives a failed record."""
    import model as model_lib  # transformers loads only when captioning
    e = cfg.eval
    data_cfg = dataclasses.replace(cfg.data, max_frames=e.max_frames)
    end_ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_ids[1]
    prompts, ok, records = [], [], []
    for it in items:
        base = {"id": it.id, "section": it.section, "video": it.video, "prompt": instruction_for(it.prompt, think)}
        try:
            prompts.append(data.encode(it.video, base["prompt"], tokenizer, data_cfg, kind, hf.config.vision_config))
            ok.append(base)
        except data.VideoError as err:
            print(f"caption failed: {err}", file=sys.stderr)
            records.append({**base, "output": None, "answer": None, "failed": str(err), "settings": settings(cfg)})
        except data.DataError as err:  # a prompt over data.max_prompt_tokens: a setting to change, not a video
            raise EvalError(str(err)) from None
    if ok:
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in data.collate(prompts, pad_id).items()}
        roll = model_lib.generate(hf, batch, 1, e.max_new_tokens, e.temperature, 1.0, end_ids, pad_id,
                                  generator=generator)
        lengths = roll.lengths.tolist()
        texts = tokenizer.batch_decode([ids[:n] for ids, n in zip(roll.ids.tolist(), lengths)],
                                       skip_special_tokens=True)
        for base, text, n, ended in zip(ok, texts, lengths, roll.ended.tolist()):
            records.append({**base, "output": text, "answer": answer_text(text), "failed": None, "tokens": n,
                            "truncated": not ended, "settings": settings(cfg)})
    return records


def caption(cfg, items, pred_path, rank, world, device):
    """Caption this rank's share (every world-th) of the items not yet captioned, appending to
    pred_path.rank<rank> batch by batch; returns how many it captioned."""
    import model as model_lib
    done = read_predictions(pred_path) if os.path.exists(pred_path) else {}
    for where, r in done.values():
        if r.get("settings") not in (None, settings(cfg)):
            raise EvalError(f"{where}: captioned with settings {r['settings']}, not {settings(cfg)}: set another "
                            "eval.out_dir or eval.predictions")
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
    with open(f"{pred_path}.rank{rank}", "a") as out, tqdm(total=len(mine), desc=desc, disable=rank != 0) as bar:
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
    preds = read_predictions(pred_path, items=everything)
    known = {it.key for it in everything}
    for key, (where, _) in preds.items():
        if key not in known:
            raise EvalError(f"{where}: {_name(key)} is not in {annotations}")
    if missing := sum(it.key not in preds for it in items):
        print(f"score: {missing} of {len(items)} items have no prediction in {pred_path}: counted as failed",
              file=sys.stderr)
    ok = [it.key in preds and not preds[it.key][1].get("failed") for it in items]
    answers = [preds[it.key][1]["answer"] if good else None for it, good in zip(items, ok)]
    outputs = [preds[it.key][1].get("output") if good else None for it, good in zip(items, ok)]
    models = sorted({str(r["settings"].get("model")) for _, r in preds.values() if isinstance(r.get("settings"), dict)})
    return answers, outputs, models, missing


def score_structure(items, outputs, think_cfg):
    """The structured thinking of the raw outputs (eval.think): the share in the format the reward asks for
    (rewards.format_score) and the mean Tscore where the annotations carry subjects (the demo's held-out
    clips do, in extra_info.subjects; the official benchmarks do not). Figures are None without outputs."""
    parsed = [(it, rewards.parse_output(o)) for it, o in zip(items, outputs) if o is not None]
    think = [rewards.think_score(p, it.subjects, think_cfg)[0] for it, p in parsed if it.subjects is not None]
    return {"outputs": len(parsed), "format": _mean([rewards.format_score(p) for _, p in parsed]),
            "think": _mean(think), "think_outputs": len(think)}


def score(cfg, items, everything, pred_path):
    """Score the predictions of `items` (rank 0) and write results.json and results.md."""
    e = cfg.eval
    answers, outputs, models, missing = read_answers(items, everything, pred_path, e.annotations)
    try:
        judge = make_judge(cfg)
    except rewards.JudgeError as err:
        raise EvalError(f"{err}\nThe captions are kept in {pred_path}; score them later with eval.score_only=true "
                        f"eval.predictions={pred_path}") from None
    chunk = 4 * max(1, cfg.judge.concurrency)  # enough tasks per wave to keep the judge busy, yet a live bar
    scores = []
    with tqdm(total=len(items), desc=f"scoring {e.benchmark}") as bar:
        for lo in range(0, len(items), chunk):
            scores += score_chunk(e.benchmark, items[lo:lo + chunk], answers[lo:lo + chunk], judge)
            bar.update(len(items[lo:lo + chunk]))
    videos = len({it.id for it in items})
    results = {
        "benchmark": e.benchmark, "annotations": e.annotations, "predictions": pred_path,
        "model": ", ".join(models) or "unknown (predictions made elsewhere)",
        "sections": e.vdc_sections if e.benchmark == "vdc" else None,
        "judge": {"model": judge.describe() if cfg.judge.url == "lexical" else cfg.judge.model, "url": cfg.judge.url,
                  "malformed_retries": e.malformed_retries, "tasks_per_video": judge.stats["tasks"] / max(videos, 1),
                  "stats": judge.stats},
        "videos": {"total": videos, "items": len(items), "caption_failed": sum(a is None for a in answers),
                   "missing": missing},
        "metrics": aggregate(e.benchmark, items, answers, scores),
        "structure": score_structure(items, outputs, cfg.reward.think) if e.think else None,
        "published": PUBLISHED[e.benchmark],
        "per_item": [{"id": it.id, "section": it.section, **s} for it, s in zip(items, scores)],
    }
    os.makedirs(e.out_dir, exist_ok=True)
    Path(e.out_dir, "results.json").write_text(json.dumps(results, indent=1))
    Path(e.out_dir, "results.md").write_text(markdown(results))
    return results


def _pct(x, scale=100.0, digits=1):
    return "n/a" if x is None else f"{scale * x:.{digits}f}"


def _pr_table(name, table):
    rows = [f"| {name} | F1 | P | R | videos scored | caption failed | judge failed |", "|---" * 7 + "|"]
    groups = list(table["groups"].items()) if len(table["groups"]) > 1 else []  # CaReBench has one
    for group, t in [*groups, ("**overall** (macro over groups)", table["overall"])]:
        other = f" ({t['judge_failed_other']} for the other score)" if t["judge_failed_other"] else ""
        rows.append(f"| {group} | {_pct(t['f1'])} | {_pct(t['precision'])} | {_pct(t['recall'])} | {t['videos']} "
                    f"| {t['caption_failed']} | {t['judge_failed']}{other} |")
    return rows


def _vdc_table(metrics):
    rows = ["| section | acc | score (0-5) | videos | failed (as 0) | caption failed | QA | QA failed |",
            "|---" * 8 + "|"]
    for section, t in metrics["sections"].items():
        rows.append(f"| {section} | {_pct(t['acc'])} | {_pct(t['score'], 1, 2)} | {t['videos']} | {t['failed']} "
                    f"| {t['caption_failed']} | {t['qa']} | {t['qa_failed']} |")
    mean = metrics["mean"]
    rows.append(f"| **mean** | {_pct(mean['acc'])} | {_pct(mean['score'], 1, 2)} | | | | | |")
    return rows


def markdown(results):
    """results.md: our figures (percent; VDC score 0-5), counts, the judge, and the published numbers."""
    b, judge, pub = results["benchmark"], results["judge"], results["published"]
    lines = [f"# {b}: {results['model']}", "",
             f"- judge: {judge['model']}, judge.url={judge['url']} ({judge['tasks_per_video']:.1f} tasks per video, "
             f"{judge['stats']['failures']} failed)",
             f"- videos: {results['videos']['total']} ({results['videos']['items']} captions), "
             f"{results['videos']['caption_failed']} captions failed or missing",
             f"- predictions: {results['predictions']}; annotations: {results['annotations']}"]
    if s := results.get("structure"):
        lines.append(f"- structured thinking: {_pct(s['format'])}% of {s['outputs']} outputs in the <think>/<answer> "
                     f"format; Tscore {_pct(s['think'], 1, 3)} over the {s['think_outputs']} with annotated subjects")
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
        lines += ["| model | " + " | ".join(pub["columns"]) + " | judge |", "|---" * (len(pub["columns"]) + 2) + "|"]
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
        out.update({"<think>/<answer> format (%)": (s["format"], 100), "Tscore (0-1)": (s["think"], 1)})
    return out


def before_after(before, after, before_name, after_name):
    """A markdown table of headline(before) and headline(after) with the change."""
    rows = [f"## Before and after: {before_name} -> {after_name}", "", "| figure | before | after | change |",
            "|---|---|---|---|"]
    old = headline(before)
    for name, (value, scale) in headline(after).items():
        was = old.get(name, (None, scale))[0]
        change = "n/a" if value is None or was is None else f"{scale * (value - was):+.{1 if scale == 100 else 3}f}"
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
    everything = load_items(cfg)
    items = first_videos(everything, e.limit)
    check_prompts(e.prompts)
    pred_path = predictions_file(e)
    if e.score_only:
        if int(os.environ.get("RANK", 0)):  # started by torchrun anyway: one scorer is enough
            return None
        return score(cfg, items, everything, predictions_file(e, "eval.score_only"))
    if os.path.isfile(pred_path) and (fmt := official_format(pred_path)):
        raise EvalError(f"{pred_path} holds {fmt}'s captions: score them with eval.score_only=true, or caption "
                        "into another eval.predictions")
    rank, world, device = init_distributed()
    try:
        if rank == 0:
            os.makedirs(os.path.dirname(os.path.abspath(pred_path)), exist_ok=True)
            os.makedirs(e.out_dir, exist_ok=True)
            config_lib.save_config(cfg, os.path.join(e.out_dir, "config.yaml"))
            if not e.model and cfg.model.build_tiny and not os.path.exists(cfg.model.path):
                import model as model_lib  # the demo's tiny random model, as grpo.py builds it
                texts = data.tokenizer_texts(data.load_records(cfg.data.train), Path(cfg.data.prompt_file)
                                             .read_text().strip()) if cfg.model.tiny_vocab else ()
                model_lib.build_configured(cfg.model, cfg.seed, texts)
            merge(pred_path)  # leftovers of an interrupted run
        barrier()
        start = time.perf_counter()
        caption(cfg, items, pred_path, rank, world, device)
        barrier()
        if rank != 0:
            return None
        n = merge(pred_path)
        seconds = time.perf_counter() - start
        print(f"captioned {n} items in {seconds:.1f} s ({n / seconds:.3f} items/s over {world} ranks) -> {pred_path}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return score(cfg, items, everything, pred_path)


def predictions_file(e, needed_by=""):
    """eval.predictions, else eval.out_dir/predictions.jsonl; with `needed_by`, it must exist."""
    path = e.predictions or os.path.join(e.out_dir, "predictions.jsonl")
    if needed_by and not os.path.isfile(path):
        raise EvalError(f"{needed_by}: no predictions file {path}; set eval.predictions")
    return path


EXPORTS = {"tarsier": ("dream1k", "tarsier_predictions.jsonl"), "carebench": ("carebench", "description.json")}


def _tarsier_record(it, index, answer):
    """A line of tarsier's inference output: the tarsier annotation with `answer` beside its reference, or
    one built from the HF layout's fields; idx (tarsier's key) = the position when the record has none."""
    src = it.source
    if "messages" in src:
        rec = copy.deepcopy(src)
        rec["messages"][1]["content"][0]["text"] = answer  # beside the reference load_dream1k read
        return {"idx": index, **rec}
    extra = {k: src[k] for k in ("duration", "n_subjects", "n_shots", "n_events") if k in src}
    reply = {"type": "text", "text": answer, "reference": it.reference}
    return {"messages": [{"role": "user", "content": [{"type": "video", "video": {"video_file": it.video}},
                                                      {"type": "text", "text": it.prompt}]},
                         {"role": "assistant", "content": [reply]}],
            "dataset": f"DREAM/{it.group}", "task": "video/caption", "idx": src.get("idx", index), "vid": it.id,
            "extra_info": {"events": it.events, **extra}}


def export(cfg, fmt):
    """Write the predictions (eval.predictions, else eval.out_dir's) as the input of fmt's official scorer
    into eval.out_dir -> its path. Failed and missing captions are left out (counted), as we score them."""
    e = cfg.eval
    benchmark, name = EXPORTS[fmt]
    if e.benchmark != benchmark:
        raise EvalError(f"--export {fmt} writes {benchmark} captions, but eval.benchmark={e.benchmark}")
    everything = load_items(cfg)
    items = first_videos(everything, e.limit)
    answers, _, _, _ = read_answers(items, everything, predictions_file(e, f"--export {fmt}"), e.annotations)
    index = {it.key: k for k, it in enumerate(everything)}
    done = [(index[it.key], it, a) for it, a in zip(items, answers) if a is not None]
    if fmt == "tarsier":
        text = "".join(json.dumps(_tarsier_record(it, k, a), ensure_ascii=False) + "\n" for k, it, a in done)
    else:  # CaReBench's tasks/captioning.py reads <save_dir>/description.json instead of captioning
        text = json.dumps({str(k): {"pred": a, "gt": it.reference, "events": it.events, "objects": it.objects}
                           for k, it, a in done}, ensure_ascii=False)
    os.makedirs(e.out_dir, exist_ok=True)
    path = os.path.join(e.out_dir, name)
    Path(path).write_text(text)
    print(f"--export {fmt}: {len(done)} captions written, {len(items) - len(done)} failed or missing left out")
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
            if fmt not in EXPORTS:
                _usage_error(f"--export takes {' or '.join(EXPORTS)}, got {fmt!r}")
        elif arg.startswith("-"):
            _usage_error(f"unknown flag {arg}; the flags are --export {'|'.join(EXPORTS)} and --help")
        elif path is None and not overrides and "=" not in arg:
            path = arg
        else:
            overrides.append(arg)
    return path, fmt, overrides


def main(argv):
    path, fmt, overrides = parse_args(argv)
    try:
        cfg = config_lib.load_config(path, overrides)
        if fmt:
            print(export(cfg, fmt))
            return
        results = evaluate(cfg)
    except (config_lib.ConfigError, EvalError) as err:
        sys.exit(f"evaluate: {err}")
    if results is not None:
        print(Path(cfg.eval.out_dir, "results.md").read_text())


if __name__ == "__main__":
    main(sys.argv[1:])
