"""The three captioning benchmarks as published: their annotation files read as the official repositories
ship them (DREAM-1K's tarsier JSONL or HF layout, VDC's VDCScore_qa folder, CaReBench's metadata.json), the
items to caption, and the official scripts' prediction files, read and written. evaluate.py captions the
items and scoring.py scores them.

Video ids: every id (annotations, predictions, results, resume) becomes one string when read
(video_id): 1, 1.0 and "1" are the same video. A boolean, null, list or object as an id is an error.

Prediction files: ours (JSONL; `id`, plus `section` for VDC, and `answer` or `output` per line) and the
official scripts' formats, told apart by official_format (one JSON object with neither `id` nor `messages`
is CaReBench's; else the file is JSONL, tarsier's when its first line has `messages`, else ours):
- tarsier (bytedance/tarsier tasks/inference_benchmark.py): the annotation JSONL with the caption as the
  `text` beside the assistant's `reference` (where evaluation/evaluate.py reads it); written as
  tarsier_predictions.jsonl (tarsier_record), built from the fields of the HF layout when that is the
  annotation file. Read: lines of other benchmarks (dataset not DREAM/...) are skipped and counted;
  "<error>", its inference's mark for a video it could not caption, is a failed caption.
- carebench (MCG-NJU/CaReBench tasks/captioning.py): description.json, one JSON object
  {"<index in metadata.json>": {"pred", "gt", "events", "objects"}}; `gt` is checked against the caption.
Beyond the official scripts: the scored text is the <answer> block; the whole output when it has no
<think>/<answer> tag; "" when it has tags but no complete answer block (a think cut at max_new_tokens).
"""
import copy
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import data
import rewards
from config import snippet

DETAILED = data.CAPTION_PROMPT  # "Describe the video in detail."
VDC_PROMPTS = {  # our wording of each VDC section's caption request (lmms-eval draws from lists like these)
    "detailed": DETAILED,
    "short": "Write a one-sentence summary of the video.",
    "camera": "Describe the camera work in the video: the shot types, the camera movements and the "
              "changes of shooting angle.",
    "background": "Describe the background of the video: the objects, the location, the weather and "
                  "the time.",
    "main_object": "Describe the main subject of the video: its attributes, its actions, its position and "
                   "how it moves during the video.",
}
VIDEO_EXTS = (".mp4", ".MP4", ".mkv")  # lmms-eval's VDC loader tries these in order


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
    subjects: list | None = None  # ground-truth subjects for Tscore (rewards.think_score; not in the
                                  # official files, ours have them)
    where: str = ""              # FILE:LINE (or FILE:index) of its annotation
    source: dict | None = field(default=None, repr=False)  # its annotation record, for --export

    @property
    def key(self):
        return self.id, self.section


def key_name(key):
    return f"video {snippet(key[0])}" + (f" section {snippet(key[1])}" if key[1] else "")


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
        raise EvalError(f"{where}: '{path}' must be {getattr(kind, '__name__', kind)}, got {snippet(node)}")
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
        return [_dream1k_hf_item(r, w, video_dir) for w, r in _read_array(path)]
    items = []
    # tarsier: vid (an integer there), dataset "DREAM/<subset>", messages, extra_info
    for w, r in _read_jsonl(path):
        vid, dataset = _id(r, "vid", w), _get(r, "dataset", w)
        if not dataset.startswith("DREAM/"):
            raise EvalError(f"{w}: 'dataset' must look like DREAM/<subset>, got {snippet(dataset)}")
        items.append(Item(vid, os.path.join(video_dir, vid + ".mp4"), dataset[len("DREAM/"):], DETAILED,
                          reference=_get(r, "messages.1.content.0.reference", w),
                          events=_statements(r, "extra_info.events", w), where=w, source=r,
                          subjects=_get(r, "extra_info.subjects", w, (list, type(None)), default=None)))
    return items


def _dream1k_hf_item(r, w, video_dir):
    """The Item of one record `r` (at `w`) of DREAM-1K's HF metadata.json."""
    video = _get(r, "video_file", w)
    return Item(Path(video).stem, os.path.join(video_dir, video), _get(r, "source", w).removeprefix("DREAM/"),
                DETAILED, reference=_get(r, "description", w), events=_statements(r, "events", w), where=w,
                source=r)


def load_carebench(path, video_dir, sections=()):
    """CaReBench's json/metadata.json: video, caption, [events], [objects], ...; item k is record k (the
    index CaReBench's description.json is keyed by)."""
    return [_carebench_item(r, w, video_dir) for w, r in _read_array(path)]


def _carebench_item(r, w, video_dir):
    """The Item of one record `r` (at `w`) of CaReBench's metadata.json."""
    video = _get(r, "video", w)
    return Item(Path(video).stem, os.path.join(video_dir, video), "overall", DETAILED,
                reference=_get(r, "caption", w), events=_statements(r, "events", w),
                objects=_statements(r, "objects", w), where=w, source=r)


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
    for index in (os.path.join(folder, "VDC_1k.jsonl"),
                  os.path.join(os.path.dirname(folder), "VDC_1k.jsonl")):
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
                    raise EvalError(f"{w}: video {snippet(vid)}: expected a non-empty list of QA pairs")
                at = f"{w} ({snippet(vid, bare=True)} QA"
                pairs = [{"question": _get(q, "question", f"{at} {k})"),
                          "answer": str(_get(q, "answer", f"{at} {k})", (str, int, float)))}
                         for k, q in enumerate(qa)]
                video = _vdc_video(video_dir, names.get(vid, vid))
                items.append(Item(vid, video, section, VDC_PROMPTS[section], section=section, qa=pairs,
                                  where=w))
    return items


LOADERS = {"dream1k": load_dream1k, "vdc": load_vdc, "carebench": load_carebench}


def load_items(cfg):
    """All the benchmark's items, in annotation order; a video (or VDC video and section) twice is an
    error."""
    e = cfg.eval
    if e.benchmark not in LOADERS:
        raise EvalError(f"eval.benchmark={snippet(e.benchmark)}: expected one of {list(LOADERS)}")
    if not e.annotations or not os.path.exists(e.annotations):
        raise EvalError(f"eval.annotations={snippet(e.annotations, 300)} does not exist: point it at the "
                        "benchmark's annotations (the load_<benchmark> functions list the layouts)")
    items = LOADERS[e.benchmark](e.annotations, e.video_dir, e.vdc_sections)
    seen = {}
    for it in items:
        if it.key in seen:
            raise EvalError(f"{it.where}: {key_name(it.key)} again (first at {seen[it.key]})")
        seen[it.key] = it.where
    return items

# ----------------------------------------------------------------------------- prediction files


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
        w, k = f"{path}:key {snippet(key, bare=True)}", int(key) if key.isdecimal() and len(key) < 12 else -1
        if not 0 <= k < len(items):
            raise EvalError(f"{w}: expected the index of a record of the annotations (0 to {len(items) - 1})")
        if _get(rec, "gt", w) != items[k].reference:
            raise EvalError(f"{w}: 'gt' is not the caption of {items[k].where}: are these captions of other "
                            "annotations?")
        output = _get(rec, "pred", w)
        records[items[k].key] = w, {"id": items[k].id, "section": "", "output": output,
                                    "answer": answer_text(output), "failed": None}
    return records


# --export FORMAT (evaluate.py): FORMAT -> (the benchmark it is for, the file it writes)
EXPORTS = {"tarsier": ("dream1k", "tarsier_predictions.jsonl"),
           "carebench": ("carebench", "description.json")}


def tarsier_record(it, index, answer):
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
            "dataset": f"DREAM/{it.group}", "task": "video/caption", "idx": src.get("idx", index),
            "vid": it.id, "extra_info": {"events": it.events, **extra}}
