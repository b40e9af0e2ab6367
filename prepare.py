"""Making and vetting a training JSONL before a run: the data preparation commands.

    python prepare.py IN.jsonl OUT.jsonl config.yaml [key=value ...]      # add subjects and events
    python prepare.py --check DATA.jsonl config.yaml [key=value ...]      # will every record train?

The paper annotated its 1.5K videos and did not publish them. `prepare` derives the missing `subjects`
and `events` of each record from its caption with one judge task ("subjects", replaceable by a file in
judge.prompts.subjects), validated strictly; `--check` encodes every record as training will and fails
(exit 1) on any unreadable video, any prompt over data.max_prompt_tokens, any target over
data.max_target_tokens, and missing subjects while reward.think_weight is on. A bad input or setting ends
in one line on stderr (exit 1), a bad command line in the usage (exit 2), Ctrl-C in one line (exit 130).

This file holds the "subjects" task (its prompt, its strict reply parser and the lexical judge's
word-list answer to it, lexical_subjects: a stand-in, not an LLM), prepare, check and the command line.
The records, video reading and encoding they use are data.py's; the judge is judge.py's.
"""
import dataclasses
import itertools
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

from tqdm import tqdm

import config as config_lib
import data
import judge as judge_lib
import judge_tasks
from config import snippet
from data import DataError

# ----------------------------------------------------------------------------- the lexical judge's subjects

# The lexical judge's answer to the "subjects" task: a word-list stand-in for an LLM, good enough for the demo
# and the tests. Each clause (split at punctuation and conjunctions) is read as
# [determiner] adjective* noun+ (preposition ...)* verb ...: the nouns name a subject, the adjectives and
# prepositional phrases are its attributes, the verb phrase its action ("is/are ..." an attribute). A clause
# that opens with a pronoun or a verb continues the last subject. Verbs are recognised from a list of ~100
# common ones and their inflections only.
DETERMINERS = {"a", "an", "the", "this", "that", "these", "those", "some", "another", "each", "every", "his",
               "her", "its", "their", "one", "two", "three", "four", "five", "several", "many"}
PRONOUNS = {"it", "he", "she", "they", "him", "them"}
PREPOSITIONS = {"in", "on", "at", "from", "to", "with", "near", "under", "over", "above", "below", "behind",
                "beside", "along", "across", "into", "onto", "toward", "towards", "through", "around", "by",
                "of", "inside", "outside", "between", "against", "past", "up", "down", "off", "out",
                "halfway"}
ADJECTIVES = {"red", "orange", "yellow", "green", "blue", "purple", "violet", "pink", "magenta", "cyan",
              "white", "black", "grey", "gray", "brown", "golden", "silver", "dark", "light", "bright",
              "pale", "small", "large", "big", "tiny", "little", "huge", "tall", "short", "long", "wide",
              "narrow", "thin", "fat", "young", "old", "elderly", "bald", "round", "striped", "wooden",
              "metal", "empty", "wet", "new"}
VERBS = {"be", "is", "are", "was", "were", "has", "have", "move", "go", "come", "walk", "run", "jump", "sit",
         "stand", "stay", "fall", "drop", "rise", "grow", "shrink", "turn", "appear", "disappear", "vanish",
         "bounce", "roll", "slide", "fly", "swim", "meet", "pass", "cross", "hold", "pick", "put", "take",
         "give", "open", "close", "look", "watch", "talk", "speak", "say", "smile", "laugh", "wave", "point",
         "push", "pull", "throw", "catch", "hit", "kick", "eat", "drink", "play", "ride", "drive", "enter",
         "leave", "climb", "dance", "sing", "write", "read", "cut", "pour", "shake", "spin", "rotate",
         "change", "become", "fill", "reach", "follow", "chase", "approach", "stop", "start", "begin",
         "continue", "remain", "lie", "wear", "carry", "use", "show", "float", "shine", "flash", "fade",
         "hang", "lean", "bend", "lift", "raise", "lower", "place", "touch", "grab", "bark", "swing", "fit",
         "hop", "wag", "cook"}
STATIVE = {"is", "are", "was", "were", "be", "remains", "remain", "seems", "seem"}
CLAUSE_BREAK = re.compile(
    r"[,;:]|\b(?:and then|then|and|while|until|but|as|before|after|when|where|which|who)\b")


def _is_verb(word):
    stems = [word] + [word[:-len(s)] + e for s in ("s", "es", "d", "ed", "ing") if word.endswith(s)
                      for e in ("", "e")]
    return (any(stem in VERBS for stem in stems)
            or (len(word) > 3 and word[-3:] == word[-4] + "ing"))  # "running"


def _clause(words):
    """One clause's words -> (noun phrase, its adjectives, attributes, actions). The noun phrase is None when
    the clause opens with a pronoun or a verb (it continues the last subject), "" when it has none ("in a
    room")."""
    i = 0
    if words and (words[0] in PRONOUNS or _is_verb(words[0])):
        name, adjectives, rest = None, [], words[words[0] in PRONOUNS:]
    else:
        while i < len(words) and words[i] in DETERMINERS:
            i += 1
        adjectives = []
        while i + 1 < len(words) and words[i] in ADJECTIVES:
            adjectives.append(words[i])
            i += 1
        j = i
        while j < len(words) and not (words[j] in PREPOSITIONS or _is_verb(words[j])
                                      or words[j].endswith("ly")):
            j += 1
        name, rest = " ".join(words[i:j]), words[j:]
    k = next((k for k, w in enumerate(rest) if _is_verb(w)), len(rest))
    k -= k > 0 and rest[k - 1].endswith("ly")                           # "suddenly appears": the adverb acts
    attributes, actions = [" ".join(rest[:k])] if k else [], []
    if k < len(rest):
        stative = rest[k] in STATIVE and not (k + 1 < len(rest) and rest[k + 1].endswith("ing"))
        (attributes if stative else actions).append(" ".join(rest[k + stative:]))
    return name, adjectives, adjectives + attributes, actions


def _subject(subjects, name, adjectives):
    """The subject a noun phrase names: the latest with its head noun whose adjectives do not differ, else a
    new one (named "green circle" when a "circle" is already there)."""
    head = name.split()[-1]
    for s in reversed(subjects):
        if s["name"].split()[-1] == head and (not adjectives or set(adjectives) & set(s["attributes"])):
            return s
    taken = any(s["name"].split()[-1] == head for s in subjects)
    subjects.append({"name": f"{adjectives[0]} {name}" if taken else name, "attributes": [], "actions": []})
    return subjects[-1]


def lexical_subjects(fields):
    """The lexical judge's reply: subjects read clause by clause (`_clause`; a new subject needs an adjective
    or an action), events as judge_tasks.py's lexical extract_events gives them (one per sentence)."""
    subjects, last = [], None
    for sentence in re.split(r"[.!?]", fields["caption"]):
        for part in CLAUSE_BREAK.split(sentence):
            name, adjectives, attributes, actions = _clause(re.findall(r"[a-z0-9'-]+", part.lower()))
            if name and (adjectives or actions):
                last = _subject(subjects, name, adjectives)
            elif name is not None or last is None:  # no subject, or a pronoun with nothing before it
                continue
            for key, items in (("attributes", attributes), ("actions", actions)):
                last[key] += [x for x in items if x and x not in last[key]]
    events = json.loads(judge_tasks.LEXICAL["extract_events"](fields))["events"]
    return json.dumps({"subjects": subjects, "events": events})

# ----------------------------------------------------------------------------- the "subjects" task


# One judge task per record returns both. The marker line names the task for the test server; {caption} is
# the only field, in tags as untrusted text (judge_tasks.render), every other brace is plain text. The events
# follow judge_tasks.py's extract_events wording, so that prepared events are what the reward would otherwise
# extract during training.
TEMPLATES = {
    "subjects": (
        "[VideoCap-R1 data task: subjects]\n" + judge_tasks.DATA_ONLY +
        "Below is a caption of a video. Write its ground truth, using only what the caption says:\n"
        "- subjects: each person, animal or object the caption describes, with its name (a short noun "
        'phrase, e.g. "man"), its attributes (short phrases for appearance, colour, size, clothing or '
        'position, e.g. "bald", "red jacket") and its actions (short verb phrases in the order they '
        'happen, e.g. "picks up a cup"); use [] when the caption gives none;\n'
        "- events: at most 10 atomic events, each one action or motion written as a short "
        "subject-verb(-object) sentence, with pronouns replaced by the nouns they refer to; leave out "
        "scene cuts, camera motion and static appearance.\n"
        'Answer with JSON only: {"subjects": [{"name": "...", "attributes": ["..."], "actions": ["..."]}], '
        '"events": ["...", "..."]}\n\n'
        "<caption>\n{caption}\n</caption>"),
}
LEXICAL = {"subjects": lexical_subjects}  # the lexical judge's reply to each task of TEMPLATES


def parse_subjects_reply(reply: str) -> dict:
    """A judge's reply -> {"subjects": [...], "events": [...]}, exactly the training schema with at least
    one subject and one event (no events would make every caption's coverage 1). The JSON may sit in prose
    or a fence (judge_tasks.decode_reply); anything else raises ValueError, so the judge re-asks."""
    obj = judge_tasks.decode_reply(reply)
    if not isinstance(obj, dict):
        raise DataError(f'judge reply: expected {{"subjects": [...], "events": [...]}}, got {reply[:80]!r}')
    data.refuse_unknown(obj, ("subjects", "events"), "judge reply")
    subjects = data.valid_subjects(obj.get("subjects"), "judge reply")
    events = data.valid_texts(obj.get("events"), "'events'", "judge reply")
    if not subjects or not events:
        raise DataError(f"judge reply: {'no subjects' if not subjects else 'no events'}")
    return {"subjects": [{k: _strip(v) for k, v in s.items()} for s in subjects], "events": _strip(events)}


def _strip(value):
    return value.strip() if isinstance(value, str) else [v.strip() for v in value]


def subjects_task(caption, on_malformed=None) -> judge_tasks.Task:
    """The judge task for one caption; on_malformed(why) hears each reply that fails to parse."""
    def parse(reply):
        try:
            return parse_subjects_reply(reply)
        except ValueError as e:
            if on_malformed:
                on_malformed(str(e))
            raise
    return judge_tasks.Task("subjects", TEMPLATES["subjects"], {"caption": caption.strip()}, parse,
                          lexical_subjects)


def check_prompts(prompts):
    """judge.prompts: every name a known template, and a "subjects" file using exactly {caption} (judge.py
    checks the files of its own templates when it reads them)."""
    known = [*judge_tasks.TEMPLATES, *TEMPLATES]
    for name, path in prompts.items():
        data.refuse_unknown([name], known, "judge.prompts")
        if name in TEMPLATES:
            try:
                judge_tasks.read_prompt(f"judge.prompts.{name}", path, TEMPLATES[name])
            except judge_tasks.JudgeError as e:
                raise DataError(str(e)) from None

# ----------------------------------------------------------------------------- prepare: subjects and events


def _extract(judge, caption, malformed_retries):
    """Ask for one caption's subjects and events -> (result, None), or (None, why) when every reply was
    malformed. A judge that cannot answer at all (server down, HTTP error) raises JudgeError: the record
    is fine, so it must not be rejected."""
    malformed = []
    try:
        result = judge.ask([subjects_task(caption, malformed.append)])[0]
    except ValueError as e:  # the lexical judge parses in-process and does not retry
        return None, f"malformed reply: {e}"
    if result is not None:
        return result, None
    if len(malformed) > malformed_retries:  # the HTTP judge asked 1 + malformed_retries times
        return None, f"{len(malformed)} malformed replies, the last: {malformed[-1]}"
    raise judge_tasks.JudgeError(f"the judge failed ({judge.error_here}); what is written is kept: rerun the "
                               "same command to continue")


def _done_ids(path, ids):
    """Ids already in an output file of an earlier run; a last line cut short by a crash is cut off the
    file."""
    if not os.path.exists(path):
        return set()
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    if lines and not lines[-1].endswith("\n"):
        print(f"{path}:{len(lines)}: dropping a line cut short by an interrupted run", file=sys.stderr)
        lines.pop()
        with open(path, "r+", encoding="utf-8") as f:
            f.truncate(len("".join(lines).encode("utf-8")))
    done = set()
    for n, line in enumerate(lines, 1):
        try:
            rid = json.loads(line)["id"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f"{path}:{n}: not a line written by prepare.py; move the file away") from None
        if rid not in ids:
            raise DataError(f"{path}:{n}: id {snippet(rid)} is not in the input: the file belongs to another "
                            "data set; choose another OUT")
        done.add(rid)
    return done


def _write(f, obj):
    f.write(json.dumps(obj, ensure_ascii=False) + "\n")
    f.flush()  # a crash loses at most the line being written


def _ask_all(ask, judge, workers, malformed_retries, answered):
    """_extract each (record, obj) of `ask`, answered(record, obj, result, why) as each comes back. At most
    `workers` records in flight, the next one sent as one comes back: after an error or Ctrl-C nothing new
    is sent, and what is in flight finishes (and is cached) before the run stops."""
    waiting, in_flight = iter(ask), {}
    with ThreadPoolExecutor(workers, thread_name_prefix="prepare") as pool:
        while True:
            for record, obj in itertools.islice(waiting, workers - len(in_flight)):
                future = pool.submit(_extract, judge, record.caption, malformed_retries)
                in_flight[future] = record, obj
            if not in_flight:
                break
            for future in wait(in_flight, return_when=FIRST_COMPLETED).done:
                (record, obj), (result, why) = in_flight.pop(future), future.result()
                answered(record, obj, result, why)


def prepare(in_path, out_path, cfg) -> dict:
    """Write IN's records to OUT with `subjects` and `events` filled in where missing, one judge task per
    record, asked judge.concurrency at a time; records the judge cannot answer validly go to
    OUT.rejects.jsonl ({"id", "reason", "record"}). A record already in OUT or in the rejects is not asked
    again (delete the rejects file to retry them). Fields already present are kept; an absent id is
    written as load_records named it ("<stem>:<line>"); relative video paths are rewritten for OUT's folder.
    When every record is done, OUT is put back in IN's order. Returns the counts and the judge's stats."""
    if os.path.abspath(in_path) == os.path.abspath(out_path):
        raise DataError(f"{out_path}: OUT must differ from IN")
    records = data.load_records(in_path)
    with open(in_path, encoding="utf-8") as f:  # the objects as written, in load_records' order
        objects = [json.loads(line) for line in f if line.strip()]
    rejects_path = os.path.splitext(out_path)[0] + ".rejects.jsonl"
    ids = {r.id for r in records}
    done = _done_ids(out_path, ids) | _done_ids(rejects_path, ids)
    todo = [(r, obj) for r, obj in zip(records, objects) if r.id not in done]
    ask = [(r, obj) for r, obj in todo if r.subjects is None or r.events is None]
    check_prompts(cfg.judge.prompts)
    judge = judge_lib.make_judge(cfg.judge) if ask else None
    # the lexical judge answers in-process: threads would only take turns on the GIL
    workers = 1 if isinstance(judge, judge_lib.LexicalJudge) else cfg.judge.concurrency
    out_dir, in_dir = os.path.dirname(os.path.abspath(out_path)), os.path.dirname(os.path.abspath(in_path))

    def output(record, obj, result):
        obj = {**obj, "id": record.id}
        if in_dir != out_dir and not os.path.isabs(obj["video"]):
            obj["video"] = os.path.relpath(record.video, out_dir)
        for key in ("subjects", "events"):
            if obj.get(key) is None:
                obj[key] = result[key]
        return obj

    counts = {"written": 0, "copied": 0, "rejected": 0, "skipped": len(records) - len(todo)}
    start = time.perf_counter()
    with open(out_path, "a", encoding="utf-8") as out, open(rejects_path, "a", encoding="utf-8") as rejects, \
            tqdm(total=len(todo), desc="prepare", unit="record") as bar:
        for record, obj in todo:
            if record.subjects is not None and record.events is not None:
                _write(out, output(record, obj, None))
                counts["copied"] += 1
                bar.update()

        def answered(record, obj, result, why):
            if why:
                _write(rejects, {"id": record.id, "reason": why, "record": obj})
                counts["rejected"] += 1
            else:
                _write(out, output(record, obj, result))
                counts["written"] += 1
            bar.update()
            bar.set_postfix(rejected=counts["rejected"])
        _ask_all(ask, judge, workers, cfg.judge.malformed_retries, answered)
    seconds = time.perf_counter() - start
    _restore_order(out_path, [r.id for r in records])
    return {**counts, "seconds": seconds, "judge": judge.describe() if judge else "not needed",
            "judge_stats": judge.stats if judge else {}, "rejects": rejects_path}


def _restore_order(path, order):
    """Rewrite a finished OUT in the input's order (write, then rename: never half a file)."""
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    rank = {rid: k for k, rid in enumerate(order)}
    lines.sort(key=lambda line: rank[json.loads(line)["id"]])
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.writelines(lines)
    os.replace(tmp, path)

# ----------------------------------------------------------------------------- check: will every record train


def _measuring_kit(model_path, tmp_dir):
    """(tokenizer, vision config, model type, exact) to measure prompts with: the model's own when model.path
    holds one. Else the byte-level tokenizer of model.build_tokenizer (Qwen's special tokens and chat
    template) and Qwen's vision layout: visual tokens stay exact, text tokens become an upper bound (every
    token of a byte-level BPE tokenizer holds at least one byte), so a prompt that fits here fits the real
    model."""
    import model as model_lib
    if not os.path.isfile(os.path.join(model_path, "config.json")):
        return model_lib.build_tokenizer(tmp_dir), None, "qwen2_vl", False
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(model_path)
    if config.model_type not in model_lib.KINDS:
        raise DataError(f"model.path {model_path} is a {config.model_type}; expected one of "
                        f"{model_lib.KINDS}")
    return model_lib.load_tokenizer(model_path), config.vision_config, config.model_type, True


def _spread(values):
    return f"min {min(values):g}  median {statistics.median(values):g}  max {max(values):g}"


def _measure(records, instruction, cfg, path):
    """Encode every record as training will -> (rows of what each prompt measures, the unreadable videos'
    errors, exact, seconds the encoding took, {index: tokens} of the targets over data.max_target_tokens),
    with the first line of the report printed."""
    measure = dataclasses.replace(cfg.data, max_prompt_tokens=sys.maxsize)  # measure all; compared later
    unreadable, rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer, vision, kind, exact = _measuring_kit(cfg.model.path, tmp)
        print(f"check {path}: {len(records)} records; prompt lengths with "
              + (f"the tokenizer of {cfg.model.path}" if exact else f"a byte-level stand-in tokenizer, as "
                 f"{cfg.model.path} has no model: text tokens are an upper bound, visual tokens exact"))
        patch, tps, _ = data.vision_layout(vision)
        start = time.perf_counter()
        for record in tqdm(records, desc="check", unit="video"):
            try:
                prompt = data.encode(record.video, instruction, tokenizer, measure, kind, vision)
            except data.VideoError as e:
                unreadable.append(str(e))
                continue
            t, h, w = prompt["video_grid_thw"][0].tolist()
            rows.append({"record": record, "frames": t * tps, "size": f"{h * patch}x{w * patch}",
                         "seconds": t * float(prompt["second_per_grid_ts"][0]),  # t steps of this: the clip
                         "visual": int((prompt["mm_token_type_ids"] == data.VIDEO_TYPE).sum()),
                         "prompt": len(prompt["input_ids"])})
        seconds = time.perf_counter() - start
        long_targets = data.target_lengths(records, tokenizer, "think", cfg.data.max_target_tokens)
    return rows, unreadable, exact, seconds, long_targets


def check(path, cfg) -> int:
    """Encode every record of `path` as training will (data.*, data.prompt_file, model.path) and print what
    would break. Returns the exit status: 1 when a video is unreadable (training would skip it, losing its
    caption, and stop past data.max_bad_fraction), a prompt is over data.max_prompt_tokens (training would
    stop there), a target (<think>subjects</think><answer>caption</answer>) is over data.max_target_tokens
    (training refuses the record at start) or a record lacks subjects while reward.think_weight is on (Tscore
    needs them); else 0."""
    records = data.load_records(path)
    with open(cfg.data.prompt_file, encoding="utf-8") as f:
        instruction = f.read().strip()  # as grpo.py reads it
    limit = cfg.data.max_prompt_tokens
    rows, unreadable, exact, seconds, long_targets = _measure(records, instruction, cfg, path)
    print(f"{len(rows)} of {len(records)} videos read, {len(unreadable)} unreadable, in {seconds:.1f} s "
          f"({len(records) / seconds:.1f} videos/s)")
    if rows:
        for label, key in (("clip length (s)", "seconds"), ("sampled frames", "frames"),
                           ("visual tokens", "visual"), ("prompt tokens", "prompt")):
            print(f"  {label:<16} {_spread([row[key] for row in rows])}")
        sizes = Counter(row["size"] for row in rows).most_common()
        print(f"  {'frame size':<16} " + ", ".join(f"{size} ({n} videos)" for size, n in sizes))
        print(f"  {'text tokens':<16} {rows[0]['prompt'] - rows[0]['visual']} in every prompt"
              + ("" if exact else " (upper bound)"))
    if unreadable:
        print("unreadable videos:\n" + "\n".join(f"  {why}" for why in unreadable))
    over = [row for row in rows if row["prompt"] > limit]
    if over:
        listed = "\n".join(f"  {row['record'].id} ({row['record'].video}): {row['prompt']} tokens "
                           f"({row['visual']} visual)" for row in over)
        print(f"prompts over data.max_prompt_tokens={limit}"
              + ("" if exact else " (text tokens an upper bound)") + ":\n" + listed)
    target_limit = cfg.data.max_target_tokens
    if long_targets:
        print(f"targets over data.max_target_tokens={target_limit}" + ("" if exact else " (an upper bound)")
              + ":\n" + "\n".join(f"  {records[k].where}: {snippet(records[k].id)}, {n} tokens (a caption "
                                   f"of {len(records[k].caption):,} characters)"
                                   for k, n in long_targets.items()))
    no_subjects = sum(r.subjects is None for r in records)
    no_events = sum(r.events is None for r in records)
    print(f"records without subjects: {no_subjects}; without events: {no_events} "
          "(the judge extracts those from the caption during training)")
    problems = [f"{len(unreadable)} unreadable video(s): fix or remove them"] if unreadable else []
    if over:
        problems.append(f"{len(over)} prompt(s) over data.max_prompt_tokens={limit}, where training would "
                        "stop: lower data.max_pixels or data.max_frames, or raise the limit")
    if long_targets:
        problems.append(f"{len(long_targets)} target(s) over data.max_target_tokens={target_limit}, which "
                        "training refuses: shorten their captions or raise the limit")
    if no_subjects and cfg.reward.think_weight:
        problems.append(f"{no_subjects} record(s) without subjects while reward.think_weight="
                        f"{cfg.reward.think_weight}: run python prepare.py")
    print(f"FAIL: {'; '.join(problems)}" if problems else
          f"OK: every video reads, every prompt fits data.max_prompt_tokens={limit} and every target "
          f"data.max_target_tokens={target_limit}")
    return 1 if problems else 0

# ----------------------------------------------------------------------------- command line


USAGE = """usage: python prepare.py IN.jsonl OUT.jsonl config.yaml [key=value ...]
       python prepare.py --check DATA.jsonl config.yaml [key=value ...]"""


def main(argv) -> int:
    """The command line (USAGE) -> exit status. A bad input or setting ends in one line on stderr."""
    if any(a in ("-h", "--help") for a in argv):
        print(f"{USAGE}\n\n{__doc__}")
        return 0
    checking = "--check" in argv
    args = [a for a in argv if a != "--check"]
    if bad := [a for a in args if a.startswith("-")]:
        print(f"prepare.py: unknown option {bad[0]} (--help for the usage)", file=sys.stderr)
        return 2
    n_files = 2 if checking else 3
    if len(args) < n_files or any("=" in a for a in args[:n_files]):
        print(USAGE, file=sys.stderr)
        return 2
    command = "prepare.py --check" if checking else "prepare.py"
    files, overrides = args[:n_files], args[n_files:]
    try:
        cfg = config_lib.load_config(files[-1], overrides)
        if checking:
            return check(files[0], cfg)
        counts = prepare(files[0], files[1], cfg)
    except (config_lib.ConfigError, DataError, judge_tasks.JudgeError, OSError) as e:
        print(f"{command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{command}: interrupted" + ("" if checking else "; what is written is kept: rerun the same "
                                           "command to continue"), file=sys.stderr)
        return 130
    asked = counts["written"] + counts["rejected"]
    print(f"prepare: {counts['written']} written, {counts['copied']} copied, {counts['rejected']} rejected "
          f"(-> {counts['rejects']}), {counts['skipped']} skipped as done by an earlier run; {asked} asked "
          f"in {counts['seconds']:.1f} s ({asked / max(counts['seconds'], 1e-9):.1f} records/s)")
    print(f"judge: {counts['judge']}; " + ", ".join(f"{k} {v}" for k, v in counts["judge_stats"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
