"""A procedural video world: coloured shapes on a black background, each doing one thing in turn, written
by one program as pixels, captions, subjects and events; its grammar, which the world judge (judge.py)
reads; and its splits.

    python world.py data/world                # the shipped splits (needs PyAV, a test dependency)
    python world.py OUT --train 30 --seed 1   # other sizes or seeds

A clip holds 1-3 subjects (a colour, a shape, a size, where it starts) that act one after the other, one
action each, in 2-second slots: it moves left, right, up or down, grows, shrinks, appears, disappears or
turns another colour. Its ground truth, from the same source as its pixels:
  caption   one of several phrasings ("First, the small red square on the left moves to the right. Then
            ..."), so that content, not one template, is what a reward can pay for;
  subjects  [{"name": "red square", "attributes": ["small", "red", "on the left"], "actions": [...]}]: Tscore;
  events    ["The red square moves to the right.", ...], in time order: Escore and DREAM-1K's metric.
The splits: train (training JSONL), val (for tuning: training JSONL, and the official DREAM-1K layout for
evaluate.py) and test (the official DREAM-1K layout). No (colour, action) pair of HELD_OUT occurs in train
or val, and every test clip has one: the test split asks for combinations never trained on. Everything is
deterministic from the seed.

The clips are 112x112 at 8 fps: at data.max_pixels 12544 a frame is 8x8 patches, 4x4 visual tokens after
Qwen's 2x2 merge, and a shape spans one token or more.
"""
import ast
import json
import os
import random
import re
import sys
from dataclasses import dataclass

import numpy as np

SIZE = 112            # frame side, pixels
FPS = 8
SLOT = 2.0            # seconds of each subject's action
COLOURS = {"red": (230, 30, 30), "green": (30, 200, 30), "blue": (40, 60, 240), "yellow": (240, 220, 30),
           "white": (240, 240, 240)}
SHAPES = ("square", "circle", "triangle")
RADIUS = {"small": 10, "large": 18}
STARTS = {"on the left": (28, 56), "on the right": (84, 56), "at the top": (56, 28),
          "at the bottom": (56, 84), "in the centre": (56, 56)}
MOVES = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
STEP = 40             # pixels a move covers
KINDS = ("left", "right", "up", "down", "grow", "shrink", "appear", "disappear", "turn")
# (colour, kind) pairs that only the test split holds: every colour and every kind is trained, never these
HELD_OUT = {("red", "grow"), ("green", "left"), ("blue", "disappear"), ("yellow", "up"), ("white", "turn")}

# ----------------------------------------------------------------------------- the clip


@dataclass(frozen=True)
class Subject:
    colour: str
    shape: str
    size: str          # small | large
    start: str         # a key of STARTS
    kind: str          # a KINDS entry
    to: str = ""       # the colour it turns to (kind "turn")

    @property
    def name(self):
        return f"{self.colour} {self.shape}"


def allowed(colour, shape, size, start, kind):
    """Whether an action can be drawn from that start and size: no move off the frame, small things grow,
    large things shrink."""
    if kind in MOVES:
        x, y = STARTS[start]
        dx, dy = MOVES[kind]
        return 0 < x + dx * STEP < SIZE and 0 < y + dy * STEP < SIZE
    return {"grow": size == "small", "shrink": size == "large"}.get(kind, True)


def sample_clip(rng, held_out):
    """1-3 subjects with distinct names and starts, each allowed; held_out: "only" (at least one subject's
    (colour, kind) in HELD_OUT), "never" (none)."""
    while True:
        subjects, names, starts = [], set(), set()
        for _ in range(rng.choice((1, 2, 2, 3))):
            colour, shape, size = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(RADIUS))
            start, kind = rng.choice([s for s in STARTS if s not in starts]), rng.choice(KINDS)
            if f"{colour} {shape}" in names or not allowed(colour, shape, size, start, kind):
                continue
            to = rng.choice([c for c in COLOURS if c != colour]) if kind == "turn" else ""
            subjects.append(Subject(colour, shape, size, start, kind, to))
            names.add(f"{colour} {shape}")
            starts.add(start)
        held = [(s.colour, s.kind) in HELD_OUT for s in subjects]
        if subjects and (any(held) if held_out == "only" else not any(held)):
            return subjects

# ----------------------------------------------------------------------------- pixels


def draw(img, shape, colour, cx, cy, r):
    h, w, _ = img.shape
    y, x = np.mgrid[0:h, 0:w]
    if shape == "square":
        inside = (abs(x - cx) <= r) & (abs(y - cy) <= r)
    elif shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    else:  # an upward triangle: apex at (cx, cy - r), base on y = cy + r
        inside = (y <= cy + r) & (abs(x - cx) <= (y - (cy - r)) / 2)
    img[inside] = COLOURS[colour]


def state(s, progress):
    """Where a subject is, how big, what colour and whether it shows, `progress` in [0, 1] through its own
    slot (0 before it, 1 after it)."""
    (x, y), r, colour = STARTS[s.start], RADIUS[s.size], s.colour
    if s.kind in MOVES:
        dx, dy = MOVES[s.kind]
        x, y = x + dx * STEP * progress, y + dy * STEP * progress
    elif s.kind in ("grow", "shrink"):
        r = r + (RADIUS["large"] - RADIUS["small"]) * progress * (1 if s.kind == "grow" else -1)
    elif s.kind == "turn" and progress >= 0.5:
        colour = s.to
    shows = {"appear": progress >= 0.5, "disappear": progress < 0.5}.get(s.kind, True)
    return x, y, r, colour, shows


def render(subjects):
    """The clip's frames: (T, SIZE, SIZE, 3) uint8, T = FPS * SLOT per subject."""
    per_slot = int(FPS * SLOT)
    frames = np.zeros((per_slot * len(subjects), SIZE, SIZE, 3), np.uint8)
    for t in range(len(frames)):
        for k, s in enumerate(subjects):
            progress = min(max((t + 0.5) / per_slot - k, 0.0), 1.0)
            x, y, r, colour, shows = state(s, progress)
            if shows:
                draw(frames[t], s.shape, colour, x, y, r)
    return frames

# ----------------------------------------------------------------------------- words


# every way the world says an action: the first is the canonical one (events, subjects), the others are
# the captions' other phrasings
ACTION_WORDS = {"left": ("moves to the left", "slides to the left"),
                "right": ("moves to the right", "slides to the right"),
                "up": ("moves up", "rises"), "down": ("moves down", "falls"),
                "grow": ("grows", "gets bigger"), "shrink": ("shrinks", "gets smaller"),
                "appear": ("appears", "comes into view"), "disappear": ("disappears", "vanishes"),
                "turn": ("turns {to}", "changes colour to {to}")}


def action_phrase(s, variant=0):
    return ACTION_WORDS[s.kind][variant].format(to=s.to)


def annotate(subjects, rng):
    """The ground truth of a clip: its caption in one of several phrasings, subjects and events."""
    def noun(s, article):
        return f"{article} {s.size} {s.colour} {s.shape} {s.start}"
    v = lambda: rng.randrange(2)  # noqa: E731 - a phrasing of each action
    style = rng.randrange(3)
    if style == 0:
        caption = "On a black background, " + " ".join(
            f"{'a' if k == 0 else 'Then a'} {noun(s, '')[1:]} {action_phrase(s, v())}."
            for k, s in enumerate(subjects))
    elif style == 1:
        parts = [f"There is {noun(s, 'a')}. It {action_phrase(s, v())}." for s in subjects]
        caption = "The video shows shapes on a black background. " + " ".join(parts)
    else:
        links = ["First, the", "Then the", "Finally, the"] if len(subjects) > 1 else ["The"]
        caption = " ".join(f"{link} {noun(s, '')[1:]} {action_phrase(s, v())}."
                           for link, s in zip(links, subjects))
    truth = [{"name": s.name, "attributes": [s.size, s.colour, s.start], "actions": [action_phrase(s)]}
             for s in subjects]
    events = [f"The {s.name} {action_phrase(s)}." for s in subjects]
    return caption, truth, events

# ----------------------------------------------------------------------------- the grammar, the world judge's


@dataclass(frozen=True)
class Fact:
    """What one clause of the world's grammar says: a subject (what it names of colour, shape, size and
    start; "" for what it leaves out) and its action (kind, and the colour of a turn), or no action ("there
    is ...")."""
    colour: str = ""
    shape: str = ""
    size: str = ""
    start: str = ""
    kind: str = ""
    to: str = ""


_COLOUR = "|".join(COLOURS)
# a start as captions may say it, with any of on/at/in before "the": "at the left" is "on the left"
PLACES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
          "centre": "in the centre", "center": "in the centre", "middle": "in the centre"}
_NOUN = (rf"(?:(?:a|an|the|one)\s+)?(?:(?P<size>small|large|big|little)\s+)?(?:(?P<colour>{_COLOUR})\s+)?"
         rf"(?P<shape>{'|'.join(SHAPES)})(?:\s+(?:on|at|in)\s+the\s+(?P<start>{'|'.join(PLACES)}))?")
_ACTIONS = [(kind, re.compile("^" + re.escape(words).replace(r"\{to\}", rf"(?P<to>{_COLOUR})") + "$"))
            for kind, phrasings in ACTION_WORDS.items() for words in phrasings]
_CLAUSE = re.compile(rf"^(?:there is |there's )?{_NOUN}(?:\s+(?P<verb>.+))?$")
_LINKS = re.compile(r"^(?:on a black background|the video shows shapes on a black background|first|then|"
                    r"after that|finally|next|and then|and)\s*,?\s*")
SIZES_SAID = {"big": "large", "little": "small"}


def clauses(text):
    """A caption's clauses in order: split at sentence ends, semicolons and "then" links, lowercased, the
    linking words stripped."""
    out = []
    for part in re.split(r"[.;!?]+|,\s*(?=then\b|after that\b|and then\b)|\s+(?=then\b)", text.lower()):
        part = re.sub(r"\s+and$", "", " ".join(part.replace(",", " , ").split()))
        while (m := _LINKS.match(part)) and m.end():
            part = part[m.end():]
        part = part.replace(" ,", ",").strip(" ,")
        if part:
            out.append(part)
    return out


def parse_clause(clause, last=None):
    """A clause -> Fact, or None outside the grammar. "it ..." continues `last` (the previous Fact)."""
    if clause.startswith("it ") and last is not None:
        verb, noun = clause[3:], last
    else:
        m = _CLAUSE.match(clause)
        if not m:
            return None
        size = SIZES_SAID.get(m["size"], m["size"] or "")
        noun, verb = Fact(m["colour"] or "", m["shape"], size, PLACES.get(m["start"], "")), m["verb"]
        if verb is None:
            return noun if clause.startswith("there") else None
    for kind, pattern in _ACTIONS:
        if am := pattern.match(verb.strip()):
            to = am.groupdict().get("to") or ""
            return Fact(noun.colour, noun.shape, noun.size, noun.start, kind, to)
    return None


def parse(text):
    """A caption or an event -> its Facts in order, None for a clause outside the grammar."""
    facts, last = [], None
    for clause in clauses(text):
        fact = parse_clause(clause, last)
        facts.append(fact)
        last = fact if fact is not None else last
    return facts


def event_text(fact):
    """The canonical event sentence of an action Fact."""
    s = Subject(fact.colour, fact.shape, fact.size or "small", "in the centre", fact.kind, fact.to)
    name = " ".join(w for w in (fact.size, fact.colour, fact.shape) if w)
    return f"The {name} {action_phrase(s)}."

NOUN_PARTS = ("colour", "shape", "size", "start")


def subjects_of(facts):
    """The action Facts of a text with what its earlier clauses said of the same subject (a "there is"
    clause, then "it ..."), in order: [(index, Fact)]."""
    known, out = {}, []
    for k, f in enumerate(facts):
        if f is None:
            continue
        key = (f.colour, f.shape)
        seen = known.get(key, Fact())
        f = Fact(*(getattr(f, a) or getattr(seen, a) for a in NOUN_PARTS), f.kind, f.to)
        known[key] = f
        if f.kind:
            out.append((k, f))
    return out



def _same_subject(event, said):
    """Whether an event's subject names the described one: its colour and shape, where it says them."""
    return all(not getattr(event, a) or getattr(event, a) == getattr(said, a) for a in ("colour", "shape"))


def relation(event, description):
    """The world judge's verdict on one event (text) given a description (text): "entailment" when each of
    its actions is said, of a subject the description describes with every attribute the event names, in
    the event's order; "contradiction" when the description says otherwise of that subject (another action,
    another size or start) or the order is reversed; "neutral" for anything else, a sentence outside the
    grammar included."""
    asked = parse(event)
    if not asked or None in asked or not all(f.kind for f in asked):
        return "neutral"
    said = subjects_of(parse(description))
    places = []
    for e in asked:
        same = [(k, d) for k, d in said if _same_subject(e, d)]
        if len(same) != 1 and not any(d.kind == e.kind for _, d in same):
            return "neutral"  # nothing, or several things, it could be
        k, d = next(((k, d) for k, d in same if d.kind == e.kind), same[0])
        if any(getattr(e, a) and getattr(d, a) and getattr(e, a) != getattr(d, a) for a in NOUN_PARTS) \
                or (e.kind, e.to) != (d.kind, d.to):
            return "contradiction"
        if any(getattr(e, a) and not getattr(d, a) for a in NOUN_PARTS):
            return "neutral"  # an attribute the description does not give
        places.append(k)
    return "entailment" if places == sorted(places) else "contradiction"


def extract_events(caption, limit=10):
    """A caption's events as the world judge lists them: each action in its canonical sentence (with the
    size and colour the caption gives its subject), a clause outside the grammar as written."""
    facts = parse(caption)
    actions = dict(subjects_of(facts))
    events = [event_text(actions[k]) if k in actions else clause
              for k, (clause, f) in enumerate(zip(clauses(caption), facts)) if f is None or f.kind]
    return events[:limit]


def rate(reference, candidate):
    """(completeness, naturalness) in [0, 1]: the share of the reference's events the candidate entails;
    the share of the candidate's clauses inside the grammar, each said once."""
    said = subjects_of(parse(reference))
    events = [event_text(Fact(f.colour, f.shape, "", "", f.kind, f.to)) for _, f in said]
    complete = sum(relation(e, candidate) == "entailment" for e in events) / len(events) if events else 1.0
    said = clauses(candidate)
    natural = sum(f is not None for f in parse(candidate)) / len(said) * len(set(said)) / len(said) \
        if said else 0.0
    return complete, natural


def statements(field):
    """The statements of an entailment task's field, however the prompt lists them: a JSON list, a Python
    list, or numbered lines ("1. ...")."""
    for read in (json.loads, ast.literal_eval):
        try:
            value = read(field)
        except (ValueError, SyntaxError):
            continue
        if isinstance(value, list):
            return [str(v) for v in value]
    return [line.partition(". ")[2] for line in field.splitlines() if line.strip()]


def answer_extract_events(fields):
    return json.dumps({"events": extract_events(fields["caption"])})


def answer_entail(fields):
    events = statements(fields["events"])
    return json.dumps({"events": [{"event": e, "relationship": relation(e, fields["description"]),
                                   "reason": "from the world's facts"} for e in events]})


def answer_rate_cn(fields):
    top = int(fields["max_score"])
    complete, natural = rate(fields["reference"], fields["candidate"])
    return json.dumps({"completeness": round(top * complete), "naturalness": round(top * natural)})


# the judge tasks the world judge answers exactly (judge.WorldJudge); the lexical judge answers the others
ANSWERS = {"extract_events": answer_extract_events, "entail": answer_entail, "rate_cn": answer_rate_cn}


# ----------------------------------------------------------------------------- splits and files


def make_split(n, seed, held_out):
    """n clips as (subjects, caption, truth, events), deterministic from the seed."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        subjects = sample_clip(rng, held_out)
        out.append((subjects, *annotate(subjects, rng)))
    return out


def write_mp4(path, frames):
    """MPEG-4 Part 2, bitexact and without timestamps: the same bytes on every run (PyAV, test-only)."""
    import av  # noqa: PLC0415 - only writing clips needs it
    with av.open(path, "w", format="mp4", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("mpeg4", rate=FPS, options={"qscale": "3", "flags": "+bitexact"})
        stream.width, stream.height, stream.pix_fmt = SIZE, SIZE, "yuv420p"
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def dream1k_record(index, video, caption, truth, events, seconds):
    """One line of DREAM-1K's official JSONL layout (tarsier's): the reference caption in the assistant
    message, the events in extra_info, an integer vid."""
    ask = [{"type": "video", "video": {"video_file": video}},
           {"type": "text", "text": "Describe the video in detail."}]
    answer = [{"type": "text", "text": "", "reference": caption}]
    return {"messages": [{"role": "user", "content": ask}, {"role": "assistant", "content": answer}],
            "dataset": "DREAM/world", "task": "video/caption", "idx": index, "vid": index,
            "extra_info": {"duration": seconds, "events": events, "n_events": len(events), "subjects": truth}}


SPLITS = {"train": "never", "val": "never", "test": "only"}


def write(out, sizes, seed):
    """The splits under out/: <split>/*.mp4, train.jsonl and val.jsonl (training records), val/DREAM-1k.jsonl
    and test/DREAM-1k.jsonl (the official layout: what evaluate.py scores, val for tuning); the split's seed
    is derived from `seed` and its name."""
    for k, (split, held_out) in enumerate(SPLITS.items()):
        folder = os.path.join(out, split)
        os.makedirs(folder, exist_ok=True)
        lines, dream = [], []
        clips = make_split(sizes[split], seed * 10 + k, held_out)
        for i, (subjects, caption, truth, events) in enumerate(clips):
            # DREAM-1K's layout names a clip by its integer vid
            name = f"{split}_{i:04d}.mp4" if split == "train" else f"{i + 1}.mp4"
            write_mp4(os.path.join(folder, name), render(subjects))
            dream.append(dream1k_record(i + 1, name, caption, truth, events, SLOT * len(subjects)))
            lines.append({"id": f"{split}_{i:04d}", "video": f"{split}/{name}", "caption": caption,
                          "subjects": truth, "events": events})
        # every split but test is also training JSONL; val and test are also scored like DREAM-1K
        written = {os.path.join(folder, "DREAM-1k.jsonl"): dream} if split != "train" else {}
        if split != "test":
            written[os.path.join(out, f"{split}.jsonl")] = lines
        for target, rows in written.items():
            with open(target, "w") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)


USAGE = "usage: python world.py OUT_DIR [--seed N] [--train N] [--val N] [--test N]"


def main(argv):
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE + "\n\n" + __doc__)
        return 0
    if not argv or argv[0].startswith("-"):
        sys.exit(f"world.py: the output folder comes first; {USAGE}")
    out, rest, sizes, seed = argv[0], argv[1:], {"train": 300, "val": 40, "test": 60}, 0
    if len(rest) % 2:
        sys.exit(f"world.py: {rest[-1]} needs a value; {USAGE}")
    for flag, value in zip(rest[::2], rest[1::2]):
        key = flag.lstrip("-")
        if key not in ("seed", *sizes) or not value.isdigit():
            sys.exit(f"world.py: {flag} {value}: unknown flag or not a number; {USAGE}")
        if key == "seed":
            seed = int(value)
        else:
            sizes[key] = int(value)
    write(out, sizes, seed)
    print(f"world: {sizes} clips (seed {seed}) in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
