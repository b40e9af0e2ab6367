"""world.py: the procedural world's clips, ground truth and splits, and the world judge's verdicts on worked
examples of its grammar."""
import json
import os
import random

import pytest

import config
import data
import judge
import rewards
import world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "data", "world")
SIZES = {"train": 4, "val": 2, "test": 3}


def files(folder):
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, names in os.walk(folder) for f in names}


def test_the_same_seed_gives_the_same_bytes(tmp_path):
    world.write(str(tmp_path / "a"), SIZES, seed=3)
    world.write(str(tmp_path / "b"), SIZES, seed=3)
    world.write(str(tmp_path / "c"), SIZES, seed=4)
    a, b, c = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    # clips, train.jsonl, val.jsonl, val/DREAM-1k.jsonl, test/DREAM-1k.jsonl
    assert len(a) == 4 + 2 + 3 + 4 and a == b
    assert a["train.jsonl"] != c["train.jsonl"]


def kinds(truth):
    """(colour, kind) of each annotated subject, read back through the grammar from its name and action."""
    out = []
    for s in truth:
        fact = world.parse(f"the {s['name']} {s['actions'][0]}")[0]
        out.append((fact.colour, fact.kind))
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_train_and_val_never_hold_a_test_combination(seed):
    splits = {name: world.make_split(50, seed * 10 + k, held)
              for k, (name, held) in enumerate(world.SPLITS.items())}
    seen = {pair for name in ("train", "val") for _, _, truth, _ in splits[name] for pair in kinds(truth)}
    assert not seen & world.HELD_OUT
    assert {c for c, _ in seen} == set(world.COLOURS) and {k for _, k in seen} == set(world.KINDS)
    assert all(set(kinds(truth)) & world.HELD_OUT for _, _, truth, _ in splits["test"])


def test_the_shipped_splits_keep_the_rule_and_read_as_videos():
    train = data.load_records(os.path.join(SHIPPED, "train.jsonl"), {"subjects": "test"})
    val = data.load_records(os.path.join(SHIPPED, "val.jsonl"), {"subjects": "test"})
    assert len(train) >= 200 and len(val) >= 20
    assert not {pair for r in train + val for pair in kinds(r.subjects)} & world.HELD_OUT
    with open(os.path.join(SHIPPED, "test", "DREAM-1k.jsonl")) as f:
        test = [json.loads(line) for line in f]
    assert len(test) >= 40 and all(isinstance(t["vid"], int) for t in test)
    assert all(set(kinds(t["extra_info"]["subjects"])) & world.HELD_OUT for t in test)
    # val is also in the official layout, for tuning through evaluate.py: the same clips and captions
    with open(os.path.join(SHIPPED, "val", "DREAM-1k.jsonl")) as f:
        val_dream = [json.loads(line) for line in f]
    assert [(os.path.join(SHIPPED, "val", f"{t['vid']}.mp4"), t["messages"][1]["content"][0]["reference"],
             t["extra_info"]["events"]) for t in val_dream] == [(r.video, r.caption, r.events) for r in val]
    frames, fps = data.read_video(train[0].video, config.DataConfig(max_pixels=12544))
    # 2 s a subject sampled at data.fps = 2, frames kept at 112 x 112 (8 x 8 patches of 14)
    assert frames.shape[0] == 4 * len(train[0].subjects) and frames.shape[-2:] == (112, 112) and fps == 2.0


def test_captions_subjects_events_and_pixels_say_the_same_thing():
    """The grammar reads every phrasing of the program's captions back into its subjects; the first frame
    shows each subject that does not appear later, in its colour, at its start."""
    rng = random.Random(0)
    styles = set()
    for _ in range(60):
        subjects = world.sample_clip(rng, "never")
        caption, truth, events = world.annotate(subjects, rng)
        styles.add(caption.split()[0])
        said = [f for _, f in world.subjects_of(world.parse(caption))]
        assert [(f.colour, f.shape, f.size, f.start, f.kind, f.to) for f in said] == \
            [(s.colour, s.shape, s.size, s.start, s.kind, s.to) for s in subjects], caption
        assert [world.relation(e, caption) for e in events] == ["entailment"] * len(events)
        assert [t["name"] for t in truth] == [s.name for s in subjects]
        first = world.render(subjects)[0]
        for s in subjects:
            x, y = world.STARTS[s.start]
            visible = s.kind != "appear" and not any(  # later subjects drawn over it at its start
                o.start == s.start for o in subjects[subjects.index(s) + 1:])
            if visible:
                assert tuple(first[y, x]) == world.COLOURS[s.colour], (s, caption)
    assert styles == {"On", "The", "First,"}


DESCRIPTION = ("First, the small red square on the left moves to the right. Then a large blue circle at the "
               "top shrinks.")


@pytest.mark.parametrize("event, verdict", [
    ("The red square moves to the right.", "entailment"),
    ("The small red square slides to the right.", "entailment"),          # a paraphrase
    ("A red square at the left moves to the right.", "entailment"),        # "at the left" is "on the left"
    ("The square moves to the right.", "entailment"),                      # the only square
    ("The blue circle gets smaller.", "entailment"),
    ("The red square moves to the right, then the blue circle shrinks.", "entailment"),
    ("The blue circle shrinks, then the red square moves to the right.", "contradiction"),  # wrong order
    ("The red square moves to the left.", "contradiction"),                # another action
    ("The large red square moves to the right.", "contradiction"),         # another size
    ("The circle grows.", "contradiction"),
    ("The green circle shrinks.", "neutral"),                              # not in the video
    ("The red square moves to the right at the top.", "neutral"),          # outside the grammar
    ("A man opens a door.", "neutral"),
    ("The red square moves to the right quickly.", "neutral"),
])
def test_the_world_judge_on_worked_examples(event, verdict):
    assert world.relation(event, DESCRIPTION) == verdict


def test_the_world_judge_answers_the_reward_and_the_benchmark_tasks():
    """judge.url=world: extraction, entailment (numbered lines or a JSON list) and CN ratings, parsed by the
    tasks' own parsers; Escore of a right, a half right and a wrong caption."""
    j = judge.make_judge(config.JudgeConfig(url="world"))
    assert isinstance(j, judge.WorldJudge)
    assert j.extract_events([DESCRIPTION + " A dog barks."])[0] == [
        "The small red square moves to the right.", "The large blue circle shrinks.", "a dog barks"]
    asked = ["The red square moves to the left.", "The blue circle shrinks."]
    assert j.entail([(DESCRIPTION, asked)])[0] == ["contradiction", "entailment"]
    listed = {"description": DESCRIPTION, "events": '["The circle shrinks."]'}  # scoring.py lists them so
    assert json.loads(world.answer_entail(listed))["events"][0]["relationship"] == "entailment"
    assert j.rate_cn([(DESCRIPTION, "The red square moves to the right.")])[0] == \
        {"completeness": 5, "naturalness": 10}
    record = data.Record(id="x", video="x.mp4", caption=DESCRIPTION, subjects=None,
                         events=["The red square moves to the right.", "The blue circle shrinks."])
    outputs = [f"<think>{{\"subjects\": []}}</think><answer>{a}</answer>" for a in (
        DESCRIPTION, "The red square moves to the right.", "The red square moves to the left.")]
    cfg = config.RewardConfig(think_weight=0.0, format_weight=0.0, event=config.EventConfig(step=False))
    reward, parts, _ = rewards.compute_rewards(outputs, [record] * 3, cfg, j)
    assert parts["event"].tolist() == [1.0, 0.5, 0.0]


def test_world_command_line(tmp_path, capsys):
    assert world.main(["--help"]) == 0 and "usage" in capsys.readouterr().out
    assert world.main([str(tmp_path), "--train", "2", "--val", "1", "--test", "1", "--seed", "5"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["test", "train", "train.jsonl", "val", "val.jsonl"]
    with pytest.raises(SystemExit, match="unknown flag"):
        world.main([str(tmp_path), "--frames", "2"])
    with pytest.raises(SystemExit, match="the output folder comes first"):
        world.main(["--train", "2"])
