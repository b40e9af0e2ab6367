"""Scoring captions with each benchmark's official metric through judge.py's judge: the judge steps
(prompts, reply parsers, the lexical judge's stand-ins) and the metrics. evaluate.py runs them.

Scoring follows tarsier's evaluation/metrics/evaluate_dream_gpt.py and CaReBench's utils/dream_gpt.py:
- Both texts are lowercased, never stripped; the text given to an extraction step also has every "
  replaced by ' (the official scripts do so before extracting); entailment reads the lowercased texts,
  quotes kept, and the statements as Python writes a list (['a', "the man's hat"]), as there.
- Replies are read by the official rules (eval.reply_parsing: official): an extraction reply is a Python
  literal (a leading ```json fence dropped), its statements kept as given, empty ones too; an entailment
  reply goes through their fixed repairs (official_json) and must then load with json.loads. The judge
  requests carry no temperature or max_tokens unless eval.judge_temperature / judge_max_tokens are set.
  eval.reply_parsing: tolerant reads replies as training does (judge.decode_reply).
- A judge reply with a wrong shape, count or label is re-asked eval.malformed_retries times (default 9:
  the official scripts give up after 10 tries in all); then the video is excluded and counted.
- CaReBench: actions and objects have their own extraction and entailment steps and reply keys
  ("events", "objects"); a video whose judging failed for either is left out of both scores, and each
  score counts those it lost through the other (judge_failed_other).
- VDC (aurora's VDCScore): each QA pair's question is answered from the caption, and that answer graded
  against the correct one (yes/no and a 0-5 score); accuracy and score are means over a video's judged
  pairs, then over a section's videos, then over the sections.
Decisions beyond the official scripts:
- Failures, always counted: DREAM-1K and CaReBench leave a video whose caption or judgement failed out
  of the means (tarsier's invalid results; its scorer would judge an "<error>" caption as text); VDC
  leaves a failed QA judgement out of its video's mean, and scores 0 for a video with no caption or no
  judged QA.
- An empty caption or statement list has no events or objects, without asking the judge (tarsier asks
  about the whole caption instead, and scores 1.0 all the same).
- A group whose P and R are both 0 has F1 0.0 (the official count_f1 divides 0 by 0: nan).
- The eval judge steps read their replacement prompts from eval.prompts only (not judge.prompts).
  The built-in prompts put captions in tags and say that text in tags is data (judge.render); a
  replacement file pastes its bare {fields} raw, so the official wording gives the official prompt,
  byte for byte, without that protection. A malformed reply is re-asked identically, as there.
"""
import ast
import dataclasses
import functools
import json
import math
import re

import config as config_lib
import judge as judge_lib
import rewards
from benchmarks import EvalError

# ----------------------------------------------------------------------------- judge steps


# eval's judge steps beyond judge.py's extract_events. The marker line names each for the test server;
# captions and what the judge derived from them sit in tags (judge.render), the benchmark's questions and
# answers not.
TEMPLATES = {
    "extract_objects": (
        "[VideoCap-R1 eval task: extract_objects]\n" + judge_lib.DATA_ONLY +
        "Below is a description of a video. List the objects it describes: at most 10, each a short "
        'sentence "There is ..." or "There are ..." with a single attribute (split an object with several '
        "attributes into several sentences). Atmosphere, sounds, camera work and actions are not objects.\n"
        'Answer with JSON only: {"objects": ["...", "..."]}\n\n'
        "<caption>\n{caption}\n</caption>"),
    "entail": (
        "[VideoCap-R1 eval task: entail]\n" + judge_lib.DATA_ONLY +
        "Below are a video description and a list of statements about the video. For each statement, "
        'decide from the description alone whether the description entails it ("entailment"), contradicts '
        'it ("contradiction") or neither ("neutral").\n'
        "Answer with JSON only, one item per statement, in order: "
        '{"events": [{"event": "...", "relationship": "entailment|neutral|contradiction", '
        '"reason": "..."}]}\n\n'
        "<description>\n{description}\n</description>\n\n<events>\n{events}\n</events>"),
    "entail_objects": (
        "[VideoCap-R1 eval task: entail_objects]\n" + judge_lib.DATA_ONLY +
        "Below are a video description and a list of statements, each naming an object in the video "
        "with one attribute. For each statement, decide from the description alone whether the description "
        'entails it ("entailment"), contradicts it ("contradiction") or neither ("neutral").\n'
        "Answer with JSON only, one item per statement, in order: "
        '{"objects": [{"object": "...", "relationship": "entailment|neutral|contradiction", '
        '"reason": "..."}]}\n\n'
        "<description>\n{description}\n</description>\n\n<objects>\n{objects}\n</objects>"),
    "vdc_answer": (
        "[VideoCap-R1 eval task: vdc_answer]\n" + judge_lib.DATA_ONLY +
        "Answer the question about a video from its description alone, with a short phrase or sentence. "
        "Write nothing else.\n\n"
        "<caption>\n{caption}\n</caption>\n\nQuestion: {question}"),
    "vdc_grade": (
        "[VideoCap-R1 eval task: vdc_grade]\n" + judge_lib.DATA_ONLY +
        "Compare a predicted answer to a question about a video with the correct answer. Judge whether they "
        "match in meaning (synonyms and paraphrases match) and rate the match with an integer from 0 to 5.\n"
        "Answer with a Python dictionary only, for example {'pred': 'yes', 'score': 4}.\n\n"
        "Question: {question}\nCorrect answer: {answer}\nPredicted answer:\n"
        "<prediction>\n{prediction}\n</prediction>"),
}


STEPS = {"extract_events": judge_lib.TEMPLATES["extract_events"], **TEMPLATES}


def _sentences(text):
    text = text.replace("!", ".").replace("?", ".").replace(";", ".")
    return [s.strip() for s in text.split(".") if s.strip()]


def _lexical_objects(fields):
    return json.dumps({"objects": [f"there is {s}" for s in _sentences(fields["caption"])][:10]})


def _lexical_entail(fields, kind="events", one="event"):
    statements = [str(s) for s in ast.literal_eval(fields[kind])]  # as Python writes a list (entail_task)
    numbered = "\n".join(f"{k}. {' '.join(s.split())}" for k, s in enumerate(statements, 1))
    judged = json.loads(judge_lib.LEXICAL["entail"]({"description": fields["description"],
                                                     "events": numbered}))
    return json.dumps({kind: [{one: s, "relationship": j["relationship"], "reason": j["reason"]}
                              for s, j in zip(statements, judged["events"])]})


def _lexical_answer(fields):
    asked = judge_lib.content_words(fields["question"])
    best = max(_sentences(fields["caption"]), key=lambda s: len(asked & judge_lib.content_words(s)),
               default="")
    return best or "not described"


def _lexical_grade(fields):
    truth, said = judge_lib.content_words(fields["answer"]), judge_lib.content_words(fields["prediction"])
    share = len(truth & said) / len(truth) if truth else 0.0
    return repr({"pred": "yes" if share >= judge_lib.LEXICAL_ENTAILS else "no", "score": round(5 * share)})


LEXICAL = {"extract_objects": _lexical_objects, "entail": _lexical_entail,
           "entail_objects": functools.partial(_lexical_entail, kind="objects", one="object"),
           "vdc_answer": _lexical_answer, "vdc_grade": _lexical_grade}


ENTAIL = {"events": "entail", "objects": "entail_objects"}  # kind of statement -> its entailment step


def _parse_objects(reply):
    obj = judge_lib.decode_reply(reply)
    objects = obj.get("objects") if isinstance(obj, dict) else obj
    if not isinstance(objects, list) or not all(isinstance(o, str) for o in objects):
        raise ValueError('expected {"objects": [str, ...]}')
    return [o.strip() for o in objects if o.strip()]


def _parse_judged(reply, n, kind):
    """The n labels of a reply {kind: [{..., "relationship": label}, ...]} (or a bare list): the official
    scripts read the key "events" for events and "objects" for objects."""
    obj = judge_lib.decode_reply(reply)
    judged = obj.get(kind) if isinstance(obj, dict) else obj
    if not isinstance(judged, list) or len(judged) != n:
        raise ValueError(f'expected {{"{kind}": [{n} judged statements]}}')
    return judge_lib.parse_labels(json.dumps(judged, default=str, skipkeys=True), n)

# The official scorers' reply rules (eval.reply_parsing: official), the same in tarsier's
# evaluate_dream_gpt.py and CaReBench's utils/dream_gpt.py. A reply that fails them is asked again.


def official_unfenced(reply):
    """A reply that begins with a ```json (or ```python) fence, with that tag and every ``` removed and
    stripped; any other reply as it is."""
    for tag in ("```json", "```python"):
        if reply.startswith(tag):
            return reply.replace(tag, "").replace("```", "").strip()
    return reply


def official_statements(reply, kind):
    """An extraction reply -> its list of statements, read as officially: the unfenced reply is a Python
    literal (ast.literal_eval, never eval) holding {kind: [...]}, whose first item, if any, is a string.
    Every item is kept as given, empty ones too (they are asked about and counted). Raises ValueError."""
    try:
        statements = ast.literal_eval(official_unfenced(reply))[kind]
    except (ValueError, TypeError, SyntaxError, KeyError, IndexError, MemoryError, RecursionError) as e:
        raise ValueError(f"not a Python dict with {kind!r} ({type(e).__name__}): {reply[:80]!r}") from None
    if not isinstance(statements, list) or (statements and not isinstance(statements[0], str)):
        raise ValueError(f"{kind!r} is not a list of strings: {reply[:80]!r}")
    return statements


# Applied in order after the fence: an official entailment reply's repairs (their ',\n}' forms never match
# once whitespace is collapsed, so they are left out); then the leading {Events: or {Objects: is dropped.
OFFICIAL_REPAIRS = (("True", "true"), ("False", "false"), ("} {", "}, {"), ("}{", "}, {"), (", }", "}"),
                    (",}", "}"), (", ]", "]"), (",]", "]"), ("[Placeholder]", "null"))


def official_json(reply, kind):
    r"""The text that the official scorers give json.loads for an entailment reply about `kind`: stripped,
    each run of whitespace one space, unfenced, a { added in front and a } at the end where missing, the
    OFFICIAL_REPAIRS, '{Events:' ('{Objects:') removed, stripped again.

    >>> official_json('```json\n{"events": [{"relationship": "Neutral"},]\n```', "events")
    '{"events": [{"relationship": "Neutral"}]}'
    """
    text = official_unfenced(re.sub(r"\s+", " ", reply.strip()))
    text = ("" if text.startswith("{") else "{") + text + ("" if text.endswith("}") else "}")
    for old, new in OFFICIAL_REPAIRS:
        text = text.replace(old, new)
    return text.replace("{" + kind.capitalize() + ":", "").strip()


def official_labels(reply, n, kind):
    """An entailment reply -> its n labels, read as officially: json.loads of official_json must give
    {kind: [n items]}, each with a string "relationship" that is, stripped and lowercased, one of
    judge.LABELS. Raises ValueError."""
    text = official_json(reply, kind)
    try:
        judged = json.loads(text)[kind]
        labels = [item["relationship"].strip().lower() for item in judged]
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"not JSON with {kind!r} and their relationships ({type(e).__name__}): "
                         f"{text[:80]!r}") from None
    if len(labels) != n:
        raise ValueError(f"expected {n} judged {kind}, got {len(labels)}")
    if bad := [x for x in labels if x not in judge_lib.LABELS]:
        raise ValueError(f"unknown labels {bad[:3]}")
    return labels


def _parse_answer(reply):
    if not reply.strip():
        raise ValueError("empty answer")
    return reply.strip()


def _parse_grade(reply):
    """{'pred': 'yes'|'no', 'score': 0..5} (JSON or a Python-dict string, never eval) -> (yes, score)."""
    obj = judge_lib.decode_reply(reply)
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


def extract_task(kind, caption, official=True):
    """The extraction of `kind` (events, objects) from `caption`, given as it is (the official scorers
    neither strip nor otherwise touch it beyond score_pr's lowercasing), read by the official rules or,
    official=False, tolerantly (judge.decode_reply, empty statements dropped)."""
    if kind == "events":
        task = dataclasses.replace(judge_lib.extract_events_task(caption), fields={"caption": caption})
    else:
        task = judge_lib.Task("extract_objects", TEMPLATES["extract_objects"], {"caption": caption},
                              _parse_objects, _lexical_objects)
    return dataclasses.replace(task, parse=functools.partial(official_statements, kind=kind)) if official \
        else task


def entail_task(kind, description, statements, official=True):
    """The entailment of `statements` by `description`. The statements fill their field as the official
    scripts' f-string does, as Python writes the list (['a', "the man's hat"]), so that the official
    wording in a prompt file gives their prompt byte for byte; the description is given as it is."""
    step = ENTAIL[kind]
    parse = official_labels if official else _parse_judged
    return judge_lib.Task(step, TEMPLATES[step], {"description": description, kind: str(list(statements))},
                          functools.partial(parse, n=len(statements), kind=kind), LEXICAL[step])


def vdc_answer_task(caption, question):
    fields = {"caption": caption.strip(), "question": question}
    return judge_lib.Task("vdc_answer", TEMPLATES["vdc_answer"], fields, _parse_answer, _lexical_answer)


def vdc_grade_task(question, answer, prediction):
    fields = {"question": question, "answer": answer, "prediction": prediction}
    return judge_lib.Task("vdc_grade", TEMPLATES["vdc_grade"], fields, _parse_grade, _lexical_grade)


def check_prompts(prompts):
    """eval.prompts: each a known step whose file uses exactly that step's {fields}; stops before any work."""
    for step, path in prompts.items():
        if step not in STEPS:
            raise EvalError(f"eval.prompts.{step}: unknown judge step; valid: {list(STEPS)}")
        try:
            judge_lib.read_prompt(f"eval.prompts.{step}", path, STEPS[step])
        except judge_lib.JudgeError as e:
            raise EvalError(str(e)) from None


def check_eval(e):
    """The eval: settings of the judge steps (eval.reply_parsing, eval.prompts), before any work."""
    if e.reply_parsing not in config_lib.REPLY_PARSING:
        raise EvalError(f"eval.reply_parsing must be {' or '.join(config_lib.REPLY_PARSING)}, "
                        f"got {e.reply_parsing!r}")
    check_prompts(e.prompts)


def make_judge(cfg):
    """judge.py's judge (HTTP or lexical) with eval.prompts as its replacement prompts,
    eval.malformed_retries (not judge.malformed_retries, training's) as its re-asks, each the
    identical question as in the official scripts (training's re-asks carry the parse error), and
    eval.judge_temperature / eval.judge_max_tokens (not judge.*) as its request settings: null, the
    default, sends neither, as the official scripts do, so the server's defaults apply."""
    e = cfg.eval
    check_eval(e)
    judge_cfg = dataclasses.replace(cfg.judge, prompts=dict(e.prompts), malformed_retries=e.malformed_retries,
                                    temperature=e.judge_temperature, max_tokens=e.judge_max_tokens)
    return judge_lib.make_judge(judge_cfg, feedback=False)

# ----------------------------------------------------------------------------- metrics


def f1(p, r):
    """F1 = 2PR / (P + R), applied to averaged P and R (tarsier's count_f1), never averaged itself."""
    return None if p is None or r is None else 2 * p * r / (p + r) if p + r else 0.0


def mean(xs):
    return sum(xs) / len(xs) if xs else None


def score_pr(items, answers, kind, judge, official=True):
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
    extracted = dict(zip(need, judge.ask([extract_task(kind, c.replace('"', "'"), official) for c in need])))
    extracted[""] = []  # an empty caption states nothing
    truth = [extracted[r] if t is None else t for r, t in zip(refs, truth)]
    asks = [(p, t) for p, t in zip(preds, truth)] + [(r, extracted.get(p)) for r, p in zip(refs, preds)]
    todo = [k for k, (p, s) in enumerate(asks) if p is not None and s]
    labels = [[] if s == [] else None for _, s in asks]  # [] covers 1.0; None: failed
    for k, result in zip(todo, judge.ask([entail_task(kind, *asks[k], official) for k in todo])):
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
        p, r = mean([s["precision"] for s in g["scores"]]), mean([s["recall"] for s in g["scores"]])
        table[name] = {"precision": p, "recall": r, "f1": f1(p, r), "videos": len(g["scores"]),
                       **{k: g[k] for k in PR_COUNTS}}
    scored = [t for t in table.values() if t["videos"]]
    p, r = mean([t["precision"] for t in scored]), mean([t["recall"] for t in scored])
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
        out.append({"acc": mean([float(yes) for yes, _ in js]) or 0.0,
                    "score": mean([s for _, s in js]) or 0.0,
                    "qa": n, "qa_failed": n - len(js), "failed": not js, "caption_failed": a is None})
    return out


def aggregate_vdc(items, scores):
    """Per section: mean acc and score over all its videos (failed ones as 0); then the sections' mean."""
    table = {}
    for it, s in zip(items, scores):
        table.setdefault(it.section, []).append(s)
    out = {}
    for section, ss in table.items():
        out[section] = {"acc": mean([s["acc"] for s in ss]), "score": mean([s["score"] for s in ss]),
                        "videos": len(ss), "failed": sum(s["failed"] for s in ss),
                        "caption_failed": sum(s["caption_failed"] for s in ss),
                        "qa": sum(s["qa"] for s in ss), "qa_failed": sum(s["qa_failed"] for s in ss)}
    overall = {"acc": mean([t["acc"] for t in out.values()]),
               "score": mean([t["score"] for t in out.values()])}
    return {"sections": out, "mean": overall}


KINDS = {"dream1k": {"events": "events"}, "carebench": {"action": "events", "object": "objects"}}


def score_chunk(benchmark, items, answers, judge, official=True):
    """Per-item scores: VDC's, or for each reported kind (DREAM-1K events; CaReBench action, object) P and
    R, the judge's replies read by the official rules (official=False: tolerantly)."""
    if benchmark == "vdc":
        return score_vdc(items, answers, judge)
    per = {name: score_pr(items, answers, kind, judge, official) for name, kind in KINDS[benchmark].items()}
    return [{name: per[name][k] for name in per} for k in range(len(items))]


def aggregate(benchmark, items, answers, scores):
    if benchmark == "vdc":
        return aggregate_vdc(items, scores)
    # CaReBench (utils/dream_gpt.py, process_one_sample) keeps a video only when all its judgements
    # succeeded: a failure for actions or for objects leaves it out of both scores
    dropped = [None in s.values() for s in scores]
    return {name: aggregate_pr(items, answers, [s[name] for s in scores], dropped)
            for name in KINDS[benchmark]}
