"""VideoCap-R1's reward: the output parser and the four scores, two of them asked of the judge (judge.py).

    judge = make_judge(cfg.judge)                  # judge.py: HTTP judge (health-checked) or lexical
    reward, parts, stats = compute_rewards(outputs, records, cfg.reward, judge)   # (N,)
    pending = start_rewards(records, cfg.reward, judge)   # or as the N completions end, one at a time:
    row_ended(pending, i, outputs[i]) ...; reward, parts, stats = collect_rewards(pending)

reward = sum of weight * part over the parts whose weight is not 0 (`reward.*`):
  format  1 if the output is one <think> block then one <answer> block, only whitespace
          around them, and the think block parses (parse_output, format_score)
  think   Tscore: F1 of attributes and actions against ground-truth subjects, no LLM
  event   Escore: judged coverage of the ground-truth events by the <answer>, mapped by
          the paper's step function (0 below delta1, 0.5 below delta2, else 1)
  cn      CNscore: judged completeness and naturalness (the paper's ablation)

This file holds the output parser (parse_output, parse_think, reference_output), the scores
(format_score, think_score, coverage, event_score, cn_score), compute_rewards and required_fields, and
the same rewards as completions end (start_rewards, row_ended, collect_rewards: grpo.py's step sends a
completion's judge questions while the other rows still decode).
The judge tasks and their prompts are judge_tasks.py's, the judges themselves judge.py's.

Decisions where the paper is silent (docs/design.md, section 2):
- The parts are independent: a layout error zeroes only the format score. Tscore still
  scores the first think block if it parses; the caption parts score the first <answer>
  block. No (or an empty) <answer> block scores 0 for the caption parts, unjudged.
- A judge task that still fails after its retries gives that sample NaN for its part and
  its total, counted in stats; never a silent 0.
- An empty list of events has coverage (and precision) 1.0, DREAM-1K's convention.
"""
import json
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from judge_tasks import MAX_JSON, decode_json, entail_task, extract_events_task, rate_cn_task, tokens, unfence

# ---------------------------------------------------------------- parsing (never raises)


@dataclass
class Parsed:
    think: str | None            # text of the first <think> block
    answer: str | None           # text of the first <answer> block: the caption
    subjects: list[dict] | None  # the think block's subjects; None when it does not parse
    error: str | None            # why the format score is 0; None when it is 1


def _between(text, open_tag, close_tag):
    a = text.find(open_tag)
    b = text.find(close_tag, a + len(open_tag)) if a >= 0 else -1
    return None if b < 0 else text[a + len(open_tag):b].strip()


def _layout_error(text):
    for tag in ("<think>", "</think>", "<answer>", "</answer>"):
        if (n := text.count(tag)) != 1:
            return f"{n} {tag} tags, expected exactly 1"
    s = text.strip()
    i, j, k = s.find("</think>"), s.find("<answer>"), s.find("</answer>")
    if not s.find("<think>") < i < j < k:
        return "tags out of order, expected <think></think><answer></answer>"
    if not s.startswith("<think>"):
        return "text before <think>"
    if s[i + len("</think>"):j].strip():
        return "text between </think> and <answer>"
    return None if s.endswith("</answer>") else "text after </answer>"


def reference_output(record) -> str:
    """The output a perfect policy writes for `record` (.subjects, .caption): the
    ground-truth subjects as the think block's JSON, the caption as the answer. It scores
    1 on format and on Tscore; the demo's warm start teaches it to the tiny model."""
    think = json.dumps({"subjects": record.subjects or []}, ensure_ascii=False)
    return f"<think>{think}</think><answer>{record.caption}</answer>"


def parse_output(text: str) -> Parsed:
    """Split a completion into think, answer and subjects; `error` says why the format
    fails. Never raises; linear in len(text) (str.find/count, capped JSON decoding).

    >>> p = parse_output('<think>Subject: man | Actions: waves</think> <answer>A man waves.</answer>')
    >>> p.answer, p.subjects, p.error
    ('A man waves.', [{'name': 'man', 'attributes': [], 'actions': ['waves']}], None)
    >>> parse_output('<answer>A man waves.</answer>').error
    '0 <think> tags, expected exactly 1'
    """
    if not isinstance(text, str):
        return Parsed(None, None, None, f"output is a {type(text).__name__}, not text")
    think = _between(text, "<think>", "</think>")
    answer = _between(text, "<answer>", "</answer>")
    subjects, think_error = parse_think(think) if think is not None else (None, None)
    error = _layout_error(text) or think_error or (None if answer else "empty <answer> block")
    return Parsed(think, answer, subjects, error)


def parse_think(think: str) -> tuple[list[dict] | None, str | None]:
    """The think block -> (subjects, None) or (None, why). Accepts JSON {"subjects": [...]}
    (bare or in a ``` fence, trailing commas allowed) or one line per subject:
    `Subject: man | Attributes: bald, red jacket | Actions: picks up a cup`."""
    if len(think) > MAX_JSON:
        return None, f"think block longer than {MAX_JSON} characters"
    body = unfence(think).strip()
    if not body:
        return None, "empty think block"
    if not body.startswith("{"):
        return _parse_lines(body)
    try:
        obj = decode_json(body, python=False)
    except ValueError as e:
        return None, f"think block: {e}"
    if not isinstance(obj, dict) or not isinstance(obj.get("subjects"), list):
        return None, 'think JSON must be {"subjects": [...]}'
    subjects = []
    for k, s in enumerate(obj["subjects"]):
        if not isinstance(s, dict) or not isinstance(s.get("name"), str) or not s["name"].strip():
            return None, f"subject {k} needs a non-empty string 'name'"
        item = {"name": s["name"].strip()}
        for key in ("attributes", "actions"):  # a missing list means none
            v = s.get(key, [])
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                return None, f"subject {k}: '{key}' must be a list of strings"
            item[key] = [x.strip() for x in v if x.strip()]
        subjects.append(item)
    return subjects, None


def _parse_lines(body):
    subjects = []
    for n, line in enumerate(body.splitlines(), 1):
        if not line.strip():
            continue
        head, *rest = line.split("|")
        key, _, name = head.strip().lstrip("-* ").partition(":")
        if key.strip().lower() != "subject" or not name.strip():
            return None, f"think line {n}: expected 'Subject: name | Attributes: ... | Actions: ...'"
        item = {"name": name.strip(), "attributes": [], "actions": []}
        for part in rest:
            key, sep, value = part.partition(":")
            if not sep or key.strip().lower() not in ("attributes", "actions"):
                return None, f"think line {n}: unknown field {key.strip()[:40]!r}"
            item[key.strip().lower()] = [x.strip() for x in value.split(",") if x.strip()]
        subjects.append(item)
    return subjects, None

# ---------------------------------------------------------------- scores (pure)


def format_score(parsed: Parsed) -> float:
    """1.0 for one <think> then one <answer> block whose think block parses, else 0.0."""
    return 1.0 if parsed.error is None else 0.0


def similarity(a: list[str], b: list[str]) -> float:
    """Token-overlap F1 of two token lists (multiset overlap)."""
    common = sum((Counter(a) & Counter(b)).values())
    return 0.0 if common == 0 else 2 * common / (len(a) + len(b))


def _match(pred, truth, threshold):
    """One-to-one greedy matching of phrases, most similar pair first: [(i, j)]."""
    pt, tt = [tokens(p) for p in pred], [tokens(t) for t in truth]
    pairs = sorted((-similarity(a, b), i, j) for i, a in enumerate(pt) for j, b in enumerate(tt))
    used_p, used_t, matched = set(), set(), []
    for neg_sim, i, j in pairs:
        if -neg_sim < threshold:
            break
        if i not in used_p and j not in used_t:
            used_p.add(i), used_t.add(j), matched.append((i, j))
    return matched


def _prf(matched, predicted, truth):
    # nothing claimed is vacuously precise and nothing to find vacuously recalled, so a
    # kind empty on both sides scores F1 = 1 and one empty on one side scores 0
    p = matched / predicted if predicted else 1.0
    r = matched / truth if truth else 1.0
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    return {"matched": matched, "predicted": predicted, "truth": truth,
            "precision": p, "recall": r, "f1": f1}


def think_score(parsed: Parsed, subjects_gt: list[dict], cfg) -> tuple[float, dict]:
    """Tscore = attribute_weight * F1_attr + action_weight * F1_act (cfg: ThinkConfig).

    Subjects are matched one-to-one by name (token F1 >= subject_threshold); attributes
    and actions only within matched subjects (>= match_threshold). Counts run over all
    subjects: an unmatched predicted subject's items are wrong claims, an unmatched
    ground-truth subject's items are misses. A think block that does not parse scores 0.

    Worked example: GT man [bald, red jacket] [picks up a cup, walks to the door] and
    dog [small brown] [barks]; predicted "the man" [bald, wearing red jacket, tall]
    [picks up cup] and cat [black] [sleeps]. "the man" = man (1.0); cat matches nothing.
    Attributes: bald = bald (1.0), wearing red jacket ~ red jacket (2*2/(3+2) = 0.8);
    matched 2, predicted 4, truth 3: P = 1/2, R = 2/3, F1 = 4/7. Actions: picks up cup =
    picks up a cup (1.0); matched 1, predicted 2, truth 3: P = 1/2, R = 1/3, F1 = 2/5.
    Tscore = 0.5 * 4/7 + 0.5 * 2/5 = 0.4857.

    >>> from config import ThinkConfig
    >>> gt = [{"name": "man", "attributes": ["bald", "red jacket"],
    ...        "actions": ["picks up a cup", "walks to the door"]},
    ...       {"name": "dog", "attributes": ["small brown"], "actions": ["barks"]}]
    >>> think = ('Subject: the man | Attributes: bald, wearing red jacket, tall | Actions: picks up cup'
    ...          '\\nSubject: cat | Attributes: black | Actions: sleeps')
    >>> parsed = parse_output(f"<think>{think}</think><answer>x</answer>")
    >>> score, parts = think_score(parsed, gt, ThinkConfig())
    >>> round(score, 4), round(parts["attributes"]["f1"], 4), parts["actions"]["matched"]
    (0.4857, 0.5714, 1)
    """
    if subjects_gt is None:
        raise ValueError("record has no ground-truth subjects: derive them in data "
                         "preparation or set reward.think_weight=0")
    pred = parsed.subjects or []
    pairs = _match([s["name"] for s in pred], [s["name"] for s in subjects_gt], cfg.subject_threshold)
    parts = {"subjects_matched": len(pairs)}
    for kind in ("attributes", "actions"):
        matched = sum(len(_match(pred[i].get(kind, []), subjects_gt[j].get(kind, []), cfg.match_threshold))
                      for i, j in pairs)
        parts[kind] = _prf(matched, sum(len(s.get(kind, [])) for s in pred),
                           sum(len(s.get(kind, [])) for s in subjects_gt))
    if parsed.subjects is None:
        return 0.0, parts
    score = cfg.attribute_weight * parts["attributes"]["f1"] + cfg.action_weight * parts["actions"]["f1"]
    return score, parts


def subjects_named(parsed: Parsed, subjects_gt: list[dict]) -> int:
    """How many ground-truth subjects the think block names: one of its subjects carries every word of the
    subject's name in its own name and attributes ("red square": red and square). Evaluation's measure of
    whether the model saw what is there, beside Tscore; 0 when the think block does not parse.

    >>> p = parse_output('<think>{"subjects": [{"name": "square", "attributes": ["red", "small"], '
    ...                  '"actions": []}]}</think><answer>x</answer>')
    >>> subjects_named(p, [{"name": "red square"}, {"name": "blue circle"}])
    1
    """
    said = [set(tokens(" ".join([s["name"], *s["attributes"]]))) for s in parsed.subjects or []]
    return sum(any(set(tokens(t["name"])) <= words for words in said) for t in subjects_gt)


def coverage(labels: list[str] | None) -> float:
    """Share of events judged "entailment"; 1.0 for no events; NaN when the judge failed."""
    if labels is None:
        return float("nan")
    return sum(label == "entailment" for label in labels) / len(labels) if labels else 1.0


def event_score(coverage_or_f1: float, cfg) -> float:
    """The paper's step function (cfg: EventConfig); cfg.step=False passes x through.

    >>> from config import EventConfig
    >>> [event_score(x, EventConfig()) for x in (0.27, 0.28, 0.34, 0.35, 1.0)]
    [0.0, 0.5, 0.5, 1.0, 1.0]
    """
    x = coverage_or_f1
    if not cfg.step or x != x:  # NaN (a failed judgement) stays NaN
        return x
    return 0.0 if x < cfg.delta1 else 0.5 if x < cfg.delta2 else 1.0


def cn_score(rating: dict | None, cfg) -> float:
    """Weighted mean of completeness and naturalness over max_score (cfg: CNConfig).

    >>> from config import CNConfig
    >>> cn_score({"completeness": 6, "naturalness": 9}, CNConfig())
    0.75
    """
    if rating is None:
        return float("nan")
    total = cfg.completeness_weight * rating["completeness"] + cfg.naturalness_weight * rating["naturalness"]
    return total / ((cfg.completeness_weight + cfg.naturalness_weight) * cfg.max_score)


def compute_rewards(outputs, records, cfg, judge):
    """Score a batch: outputs[i] against records[i] (.caption, .subjects, .events).
    Returns reward (N,) float32, {part: (N,)} for the enabled parts, and stats.
    Judge work goes out in two concurrent waves: the events to extract (references
    without .events; predictions too for the F1 variant), then every entailment and
    CN rating of the batch. (start_rewards scores the same batch as its completions end.)"""
    if len(outputs) != len(records):
        raise ValueError(f"{len(outputs)} outputs but {len(records)} records")
    parsed = [parse_output(o) for o in outputs]
    weights = _weights(cfg)
    parts, stats = _local_parts(parsed, records, cfg, weights), {}
    if weights["event"] or weights["cn"]:
        judged, stats = _judged_parts([p.answer or None for p in parsed], records, cfg, judge, weights)
        parts.update(judged)
    return _total(parts, parsed, weights, stats)


def _weights(cfg):
    return {"format": cfg.format_weight, "think": cfg.think_weight, "event": cfg.event_weight,
            "cn": cfg.cn_weight}


def _local_parts(parsed, records, cfg, weights):
    """The parts scored without the judge: format and Tscore, {part: [score per output]}."""
    parts = {}
    if weights["format"]:
        parts["format"] = [format_score(p) for p in parsed]
    if weights["think"]:
        parts["think"] = [think_score(p, r.subjects, cfg.think)[0] for p, r in zip(parsed, records)]
    return parts


def _total(parts, parsed, weights, judged_stats):
    """{part: [score per output]} -> reward (N,), {part: (N,)}, stats (judged_stats among them)."""
    stats = {"format_ok": sum(p.error is None for p in parsed),
             "no_answer": sum(not p.answer for p in parsed), "judge_failed": 0, **judged_stats}
    breakdown = {k: torch.tensor(v, dtype=torch.float32) for k, v in parts.items()}  # (N,)
    reward = torch.zeros(len(parsed))                                                  # (N,)
    for k, v in breakdown.items():
        reward += weights[k] * v
    stats["judge_failed"] = int(reward.isnan().sum())
    return reward, breakdown, stats


def required_fields(cfg) -> dict[str, str]:
    """The record fields compute_rewards cannot do without under cfg (RewardConfig) -> the setting
    that needs each, for data.load_records(require=...): Tscore needs ground-truth subjects; missing
    events the judge extracts from the caption."""
    return {"subjects": f"reward.think_weight={cfg.think_weight} (Tscore)"} if cfg.think_weight else {}


def _f1(p, r):
    return 2 * p * r / (p + r) if p + r else 0.0  # NaN in, NaN out


def _judged_parts(answers, records, cfg, judge, weights):
    events_on, f1 = weights["event"] != 0, cfg.event.f1
    # wave 1: extract events, deduplicated (the G outputs of a video share a caption)
    need = [r.caption for r in records if _extracts_reference(r, weights)]
    need += [a for a in answers if a] if events_on and f1 else []
    need = list(dict.fromkeys(need))
    extracted = dict(zip(need, judge.extract_events(need)))
    # wave 2: every entailment and rating of the batch, asked together
    asks, results = {}, [{} for _ in answers]  # (i, question) -> question key; per row, question -> result
    for i, (answer, r) in enumerate(zip(answers, records)):
        if answer is not None:
            row_asks, results[i] = _questions(answer, r, extracted, cfg, weights)
            asks.update({(i, q): key for q, key in row_asks.items()})
    for (i, q), result in zip(asks, judge.ask([_task(key, cfg) for key in asks.values()])):
        results[i][q] = result
    rows = [_row_scores(a, x, cfg, weights) for a, x in zip(answers, results)]
    return _judged_columns(rows, len(extracted), weights)


def _questions(answer, record, extracted, cfg, weights):
    """The judge questions about one answer -> ({question: key}, {question: result known without asking});
    a key ("entail", description, events) or ("cn", reference, candidate) names the Task (_task), so that
    equal questions of a batch are asked once. extracted: caption or answer -> its events (None: failed)."""
    asks, known = {}, {}
    if weights["event"]:
        reference = record.events if record.events is not None else extracted[record.caption]
        checks = {"recall": (answer, reference)}
        if cfg.event.f1:  # precision: the prediction's events entailed by the reference
            checks["precision"] = (record.caption, extracted[answer])
        for question, (description, events) in checks.items():
            if events:
                asks[question] = ("entail", description, tuple(events))
            else:  # [] covers 1.0; None (a failed extraction) gives NaN
                known[question] = events
    if weights["cn"]:
        asks["cn"] = ("cn", record.caption, answer)
    return asks, known


def _task(key, cfg):
    """A question key (_questions; ("extract", text) for extraction) -> its judge Task."""
    kind, *args = key
    if kind == "extract":
        return extract_events_task(*args)
    if kind == "entail":
        return entail_task(args[0], list(args[1]))
    return rate_cn_task(*args, cfg.cn.max_score)


def _row_scores(answer, results, cfg, weights):
    """One answer's judged scores from its {question: result} -> {"raw": coverage or F1 before the step
    function, "event", "cn"} for the enabled parts; no answer scores 0, unjudged."""
    out = {}
    if weights["event"]:
        x = 0.0 if answer is None else coverage(results["recall"])
        out["raw"] = _f1(coverage(results["precision"]), x) if answer is not None and cfg.event.f1 else x
        out["event"] = event_score(out["raw"], cfg.event)
    if weights["cn"]:
        out["cn"] = 0.0 if answer is None else cn_score(results["cn"], cfg.cn)
    return out


def _judged_columns(rows, extracted, weights):
    """Per-row judged scores -> ({part: [score per row]}, their stats); extracted: how many texts' events
    the judge was asked for."""
    out, stats = {}, {"events_extracted": extracted}
    if weights["event"]:
        raw = [row["raw"] for row in rows]
        out["event"] = [row["event"] for row in rows]
        stats["event_raw_mean"] = float(torch.tensor(raw).nanmean()) if raw else float("nan")
    if weights["cn"]:
        out["cn"] = [row["cn"] for row in rows]
    return out, stats

# ---------------------------------------------------------------- rewards as completions end


@dataclass
class PendingRewards:
    """A batch's rewards while its completions are still being written (start_rewards). Each row that ended
    has its format score and Tscore, and the future of its judged scores, asked on `pool`. Each judge
    question is asked once per batch, by the first row that needs it (`asked`, guarded by `lock`)."""
    records: list
    cfg: object
    judge: object
    pool: ThreadPoolExecutor
    parsed: dict = field(default_factory=dict)   # row -> Parsed
    local: dict = field(default_factory=dict)    # row -> {part: score} of the parts scored without the judge
    judged: dict = field(default_factory=dict)   # row -> Future of its judged scores (_row_scores)
    asked: dict = field(default_factory=dict)    # question key -> Future of the judge's result
    lock: threading.Lock = field(default_factory=threading.Lock)
    last_reply: float | None = None              # time.perf_counter() of the batch's last judge reply


def start_rewards(records, cfg, judge):
    """The rewards of a batch whose len(records) completions end one at a time: hand each to row_ended as
    it ends, then collect_rewards gives what compute_rewards gives for the same outputs, bit for bit: the
    same questions (equal ones asked once), retries and re-asks (the judge's own), failures as NaN. A
    completion's questions go out when it ends, on threads of this batch, while the others decode. The
    references' events to extract (every row asks for its reference's) go out now, before any row ends: they
    do not depend on the completions, and the first rows to end would otherwise wait a judge latency for
    them before asking their own questions."""
    weights = _weights(cfg)
    references = list(dict.fromkeys(r.caption for r in records if _extracts_reference(r, weights)))
    pool = ThreadPoolExecutor(max(len(records) + len(references), 1), thread_name_prefix="reward")
    pending = PendingRewards(records, cfg, judge, pool)
    if references:  # the rows that need them wait on these questions' futures (_ask_once)
        pool.submit(_ask_once, pending, [("extract", text) for text in references])
    return pending


def row_ended(pending, i, text):
    """Row i's completion `text` is final: its format score and Tscore now, its judge questions sent."""
    weights = _weights(pending.cfg)
    parsed = parse_output(text)
    pending.parsed[i] = parsed
    pending.local[i] = {k: v[0] for k, v in _local_parts([parsed], [pending.records[i]], pending.cfg,
                                                          weights).items()}
    if weights["event"] or weights["cn"]:
        pending.judged[i] = pending.pool.submit(_judge_row, pending, i, parsed.answer or None)


def collect_rewards(pending):
    """Wait for the judge's replies -> reward (N,), {part: (N,)}, stats, as compute_rewards; stats also
    holds "last_reply", the time.perf_counter() of the last judge reply (None without one)."""
    n = len(pending.records)
    try:
        if len(pending.parsed) != n:
            raise ValueError(f"{n - len(pending.parsed)} of {n} completions never ended")
        judged = [pending.judged[i].result() for i in range(n)] if pending.judged else None
    finally:
        pending.pool.shutdown()
    weights, parsed = _weights(pending.cfg), [pending.parsed[i] for i in range(n)]
    parts = {k: [pending.local[i][k] for i in range(n)]
             for k in _local_parts([], [], pending.cfg, weights)}
    stats = {}
    if judged is not None:
        extracted = sum(key[0] == "extract" for key in pending.asked)
        columns, stats = _judged_columns(judged, extracted, weights)
        parts.update(columns)
    reward, breakdown, stats = _total(parts, parsed, weights, stats)
    return reward, breakdown, {**stats, "last_reply": pending.last_reply}


def _judge_row(pending, i, answer):
    """Row i's judged scores (_row_scores), on a thread of the batch: the events to extract (its
    reference's, its answer's for the F1 variant), then its entailments and rating, as _judged_parts."""
    record, cfg, weights = pending.records[i], pending.cfg, _weights(pending.cfg)
    texts = [record.caption] if _extracts_reference(record, weights) else []
    texts += [answer] if weights["event"] and cfg.event.f1 and answer else []
    extracted = dict(zip(texts, _ask_once(pending, [("extract", t) for t in texts])))
    if answer is None:
        return _row_scores(None, {}, cfg, weights)
    asks, results = _questions(answer, record, extracted, cfg, weights)
    results.update(zip(asks, _ask_once(pending, list(asks.values()))))
    return _row_scores(answer, results, cfg, weights)


def _extracts_reference(record, weights):
    """Whether the Escore asks the judge for the events of `record`'s reference (none annotated)."""
    return bool(weights["event"]) and record.events is None


def _ask_once(pending, keys):
    """The results of the questions `keys`: those no row asked yet are asked here, together, the others'
    replies awaited. A thread waits only for questions another thread claimed and is already asking, so
    no number of threads can deadlock; a judge that raises passes its error to every waiting row."""
    with pending.lock:
        mine = [k for k in dict.fromkeys(keys) if k not in pending.asked]
        for k in mine:
            pending.asked[k] = Future()
    try:
        replies = pending.judge.ask([_task(k, pending.cfg) for k in mine]) if mine else []
    except BaseException as e:
        for k in mine:
            pending.asked[k].set_exception(e)
        raise
    with pending.lock:
        if mine:
            pending.last_reply = time.perf_counter()
    for k, reply in zip(mine, replies):
        pending.asked[k].set_result(reply)
    return [pending.asked[k].result() for k in keys]
