"""prepare.py, the data preparation commands. prepare through the local judge server: an interrupted run
resumes asking each record once, malformed replies end in the rejects file, complete records are copied
untouched, the prompt is replaceable; the lexical stand-in's reading of captions. --check: its report and
exit status on the shipped clips, a truncated clip, an over-long prompt and a record without subjects (once
as a subprocess). The old `data.py prepare/check` commands point at prepare.py."""
import dataclasses
import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

import data
import judge_tasks
import prepare
from config import Config, load_config
from data import DataError

ROOT = Path(__file__).resolve().parent.parent
CLIPS = ROOT / "tests" / "data"
SHIPPED = [json.loads(line) for line in (CLIPS / "train.jsonl").read_text().splitlines() if line.strip()]
SETTINGS = [f"data.prompt_file={ROOT / 'prompts' / 'think.txt'}"]  # found from any working directory


def write_input(tmp_path, keep=()):
    """The shipped records with absolute video paths; subjects and events dropped except for ids in `keep`."""
    rows = []
    for row in SHIPPED:
        row = {**row, "video": str(CLIPS / row["video"])}
        if row["id"] not in keep:
            del row["subjects"], row["events"]
        rows.append(row)
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


def lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def lexical(caption):
    return json.loads(prepare.lexical_subjects({"caption": caption}))


# ----------------------------------------------------------------------------- prepare

@pytest.mark.parametrize("concurrency, cache", [(1, False), (4, True)])
def test_interrupted_prepare_resumes_asking_each_record_once(tmp_path, judge_server, judge_cfg, concurrency,
                                                             cache):
    keep = {SHIPPED[0]["id"], SHIPPED[1]["id"]}
    src, rows = write_input(tmp_path, keep)
    out = tmp_path / "out.jsonl"
    cfg = Config(judge=dataclasses.replace(judge_cfg, concurrency=concurrency,
                                           cache_dir=str(tmp_path / "cache") if cache else ""))
    # the 4th request fails: the judge cannot answer, the run stops
    judge_server.fail(None, None, None, "400")
    with pytest.raises(judge_tasks.JudgeError, match="rerun the same command to continue"):
        prepare.prepare(src, out, cfg)
    first = {r["id"]: r for r in lines(out)}
    if concurrency == 1:  # the 2 copies, then a line per answer, flushed as it comes
        assert len(first) == 2 + 3
    # answers in flight when the run stopped were cached (with concurrency 4): the rerun does not ask them
    counts = prepare.prepare(src, out, cfg)
    asked = len(rows) - len(keep)
    assert judge_server.requests == asked + 1  # each record once, plus the request that failed
    assert len({prompt for _, prompt in judge_server.seen}) == asked
    assert counts["skipped"] == len(first) and counts["rejected"] == 0
    assert counts["written"] + counts["copied"] + counts["skipped"] == len(rows)
    final = lines(out)
    assert [r["id"] for r in final] == [r["id"] for r in rows]  # back in the input's order
    assert all(first[r["id"]] == r for r in final if r["id"] in first)
    for row, got in zip(rows, final):
        expected = row if row["id"] in keep else {**row, **lexical(row["caption"])}
        assert got == expected
    assert all(r.subjects and r.events for r in data.load_records(out))


def test_malformed_replies_end_in_the_rejects_file(tmp_path, judge_server, judge_cfg):
    src, rows = write_input(tmp_path)
    out = tmp_path / "out.jsonl"
    cfg = Config(judge=dataclasses.replace(judge_cfg, concurrency=1, malformed_retries=1))
    judge_server.fail("malformed", "wrong_count")  # the first record: 1 + malformed_retries bad replies
    counts = prepare.prepare(src, out, cfg)
    assert (counts["rejected"], counts["written"]) == (1, len(rows) - 1)
    assert counts["judge_stats"]["malformed"] == 2
    (reject,) = lines(tmp_path / "out.rejects.jsonl")
    assert reject["id"] == rows[0]["id"] and reject["record"] == rows[0]
    assert reject["reason"].startswith("2 malformed replies, the last: judge reply: 'subjects' must be a "
                                       "list")
    requests = judge_server.requests
    assert prepare.prepare(src, out, cfg)["skipped"] == len(rows)  # rejects are not asked again either
    assert judge_server.requests == requests


def test_the_key_never_reaches_the_rejects_file(tmp_path, judge_server, judge_cfg, monkeypatch):
    key = "sk-test-0123456789-secret"
    monkeypatch.setenv("JUDGE_API_KEY", key)
    # every reply: "echo: Authorization: Bearer sk-..."
    judge_server.key, judge_server.echo_headers = key, True
    src, rows = write_input(tmp_path)
    cfg = Config(judge=dataclasses.replace(judge_cfg, malformed_retries=0))
    counts = prepare.prepare(src, tmp_path / "out.jsonl", cfg)
    assert counts["rejected"] == len(rows) and key in json.dumps(judge_server.seen)
    reasons = [r["reason"] for r in lines(tmp_path / "out.rejects.jsonl")]
    assert all("Bearer ***" in r and key not in r for r in reasons), reasons[0]


@pytest.mark.parametrize("reply, message", [
    ("Sure, here it is.", "no JSON"),
    ('{"subjects": [{"name": "man", "attributes": [], "actions": ["waves"]}]}', "'events' must be a list"),
    ('{"subjects": [], "events": ["a man waves"]}', "no subjects"),
    ('{"subjects": [{"name": "man", "attributes": [], "actions": []}], "events": []}', "no events"),
    ('{"subjects": [{"name": "man", "actions": ["waves"]}], "events": ["a man waves"]}', "lacks attributes"),
    ('{"subjects": [{"name": "man", "attributes": "bald", "actions": []}], "events": ["e"]}',
     "must be a list"),
    ('{"subjects": [{"name": "", "attributes": [], "actions": []}], "events": ["e"]}', "non-empty string"),
    ('{"subjects": [{"name": "man", "attributes": [], "actions": [], "age": 3}], "events": ["e"]}', "'age'"),
    ('{"subjects": [{"name": "man", "attributes": [], "actions": []}], "events": ["e"], "why": ""}', "'why'"),
    ('["man", "waves"]', "expected"),
])
def test_the_reply_parser_is_strict(reply, message):
    with pytest.raises(ValueError, match=message):
        prepare.parse_subjects_reply(reply)


def test_the_reply_parser_takes_the_json_out_of_prose_and_fences():
    reply = ("Here you are:\n```json\n{'subjects': [{'name': ' man ', 'attributes': ['bald',], "
             "'actions': []}], 'events': ['a man waves ']}\n```")
    assert prepare.parse_subjects_reply(reply) == {
        "subjects": [{"name": "man", "attributes": ["bald"], "actions": []}], "events": ["a man waves"]}


def test_complete_records_are_copied_untouched_without_a_judge(tmp_path):
    src = tmp_path / "train.jsonl"
    src.write_text((CLIPS / "train.jsonl").read_text())
    cfg = Config()  # its judge.url has no server: nothing to ask, so no judge is made
    counts = prepare.prepare(src, tmp_path / "out.jsonl", cfg)
    assert counts["copied"] == len(SHIPPED) and counts["judge"] == "not needed"
    assert lines(tmp_path / "out.jsonl") == SHIPPED
    # in another folder, relative video paths are rewritten to still find the clips
    (tmp_path / "sub").mkdir()
    prepare.prepare(src, tmp_path / "sub" / "out.jsonl", cfg)
    assert lines(tmp_path / "sub" / "out.jsonl")[0]["video"] == "../red_square_right.mp4"
    assert [r.video for r in data.load_records(tmp_path / "sub" / "out.jsonl")] == [
        r.video for r in data.load_records(src)]


def test_the_lexical_judge_prepares_and_rejects_what_it_cannot_read(tmp_path):
    src = tmp_path / "in.jsonl"
    human = [{"name": "square", "attributes": ["red"], "actions": ["moves right"]}]
    src.write_text(json.dumps({"video": "a.mp4", "caption": "A small red square moves to the right."}) + "\n"
                   + json.dumps({"video": "b.mp4", "caption": "Halfway through."}) + "\n"
                   + json.dumps({"video": "c.mp4", "caption": "A red square moves.", "subjects": human})
                   + "\n")
    counts = prepare.prepare(src, tmp_path / "out.jsonl", load_config(None, ["judge.url=lexical"]))
    assert (counts["written"], counts["rejected"]) == (2, 1)
    first, third = lines(tmp_path / "out.jsonl")
    assert first == {"video": "a.mp4", "caption": "A small red square moves to the right.", "id": "in:1",
                     "subjects": [{"name": "square", "attributes": ["small", "red"],
                                   "actions": ["moves to the right"]}],
                     "events": ["A small red square moves to the right"]}
    # present fields are kept
    assert third["subjects"] == human and third["events"] == ["A red square moves"]
    assert lines(tmp_path / "out.rejects.jsonl") == [
        {"id": "in:2", "reason": "malformed reply: judge reply: no subjects",
         "record": {"video": "b.mp4", "caption": "Halfway through."}}]


@pytest.mark.parametrize("caption, subjects", [
    ("A bald man in a red jacket picks up a cup and walks to the door.",
     [{"name": "man", "attributes": ["bald", "in a red jacket"],
       "actions": ["picks up a cup", "walks to the door"]}]),
    ("An orange circle on the left and a green circle on the right meet. It is red at first; then it turns "
     "blue.",
     [{"name": "circle", "attributes": ["orange", "on the left"], "actions": []},
      {"name": "green circle", "attributes": ["green", "on the right", "red at first"],
       "actions": ["meet", "turns blue"]}]),
    ("In a kitchen, a woman is cooking while two dogs suddenly run past.",
     [{"name": "woman", "attributes": [], "actions": ["is cooking"]},
      {"name": "dogs", "attributes": [], "actions": ["suddenly run past"]}]),
])
def test_the_lexical_stand_in_reads_simple_captions(caption, subjects):
    assert lexical(caption)["subjects"] == subjects


def test_the_subjects_prompt_is_replaceable(tmp_path, judge_server, judge_cfg):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"video": "a.mp4", "caption": "A red square moves."}) + "\n")
    prompt = tmp_path / "subjects.txt"
    prompt.write_text("[VideoCap-R1 data task: subjects]\nOur own wording.\n{caption}")
    cfg = Config(judge=dataclasses.replace(judge_cfg, prompts={"subjects": str(prompt)}, malformed_retries=0))
    prepare.prepare(src, tmp_path / "out.jsonl", cfg)
    assert judge_server.seen[-1][1] == ("[VideoCap-R1 data task: subjects]\nOur own wording.\n"
                                        "A red square moves.")
    prompt.write_text("Extract from {text}")
    with pytest.raises(DataError, match=r"must use exactly the fields \['caption'\]"):
        prepare.prepare(src, tmp_path / "again.jsonl", cfg)
    cfg.judge.prompts = {"subjets": str(prompt)}
    with pytest.raises(DataError, match="did you mean 'subjects'"):
        prepare.prepare(src, tmp_path / "again.jsonl", cfg)


def test_a_torn_last_line_is_dropped_and_a_foreign_out_refused(tmp_path, capsys):
    src, rows = write_input(tmp_path, keep={r["id"] for r in SHIPPED})
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[1])[:30])  # a crash in the middle of line 2
    counts = prepare.prepare(src, out, Config())
    assert (counts["skipped"], counts["copied"]) == (1, len(rows) - 1) and lines(out) == rows
    assert "out.jsonl:2: dropping a line cut short" in capsys.readouterr().err
    out.write_text(json.dumps({**rows[0], "id": "elsewhere"}) + "\n")
    with pytest.raises(DataError, match="out.jsonl:1: id 'elsewhere' is not in the input"):
        prepare.prepare(src, out, Config())
    with pytest.raises(DataError, match="OUT must differ from IN"):
        prepare.prepare(src, src, Config())


# ----------------------------------------------------------------------------- check

def test_check_fails_on_a_truncated_video_and_an_overlong_prompt(tmp_path, tiny_tokenizer):
    short, long = (str(CLIPS / f"{name}.mp4") for name in ("red_square_right", "red_and_blue_pass"))
    instruction = (ROOT / "prompts" / "think.txt").read_text().strip()
    # the limit is the short clip's prompt length (the stand-in tokenizer is tiny_tokenizer): it fits, the
    # long one not
    limit = len(data.encode(short, instruction, tiny_tokenizer, Config().data, "qwen2_vl")["input_ids"])
    cut = tmp_path / "cut.mp4"
    full = (CLIPS / "red_square_right.mp4").read_bytes()
    cut.write_bytes(full[:len(full) * 6 // 10])  # cut in the middle of its frames
    rows = [{"id": "short", "video": short}, {"id": "long", "video": long}, {"id": "cut", "video": str(cut)}]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({**row, **SHIPPED[0], **row}) + "\n" for row in rows))
    run = subprocess.run([sys.executable, "prepare.py", "--check", str(path), "config.yaml",
                          f"data.max_prompt_tokens={limit}", f"model.path={tmp_path / 'no-model'}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stderr
    report = run.stdout.splitlines()
    assert "2 of 3 videos read, 1 unreadable" in run.stdout and "text tokens are an upper bound" in report[0]
    assert report[report.index("unreadable videos:") + 1].startswith(f"  {cut}: ")
    over = report.index(f"prompts over data.max_prompt_tokens={limit} (text tokens an upper bound):")
    # 6 frames of 56x84
    assert report[over + 1].startswith(f"  long ({long}): {limit + 10} tokens (18 visual)")
    assert report[-1] == ("FAIL: 1 unreadable video(s): fix or remove them; 1 prompt(s) over "
                          f"data.max_prompt_tokens={limit}, where training would stop: lower "
                          "data.max_pixels or data.max_frames, or raise the limit")


@pytest.mark.parametrize("exact", [False, True])
def test_check_passes_on_the_shipped_set(tmp_path, capsys, tiny_model_dir, exact):
    model_path = tiny_model_dir("qwen2_vl") if exact else str(tmp_path / "no-model")
    status = prepare.main(["--check", str(CLIPS / "train.jsonl"), str(ROOT / "config.yaml"),
                           f"model.path={model_path}", *SETTINGS])
    report = capsys.readouterr().out.splitlines()
    assert status == 0, report
    assert f"{len(SHIPPED)} of {len(SHIPPED)} videos read, 0 unreadable" in report[1]
    assert ("the tokenizer of" in report[0]) == exact
    assert report[-1] == ("OK: every video reads, every prompt fits data.max_prompt_tokens=8192 and every "
                          "target data.max_target_tokens=2048")


def test_check_fails_without_subjects_while_tscore_is_on(tmp_path, capsys):
    path = tmp_path / "data.jsonl"
    record = {"video": str(CLIPS / "red_square_right.mp4"), "caption": "A red square."}
    path.write_text(json.dumps(record) + "\n")
    argv = ["--check", str(path), str(ROOT / "config.yaml"), f"model.path={tmp_path}", *SETTINGS]
    assert prepare.main(argv) == 1
    assert capsys.readouterr().out.splitlines()[-1] == (
        "FAIL: 1 record(s) without subjects while reward.think_weight=1.0: run python prepare.py")
    assert prepare.main(argv + ["reward.think_weight=0"]) == 0


def test_check_flags_a_target_over_max_target_tokens(tmp_path, capsys):
    """A 1 MB caption (which training refuses at start) fails --check, listed with its FILE:LINE."""
    path = tmp_path / "data.jsonl"
    record = {"video": str(CLIPS / "red_square_right.mp4"), "caption": "A red square.", "subjects": []}
    path.write_text(json.dumps(record) + "\n" + json.dumps({**record, "caption": "A red square. " * 75_000})
                    + "\n")
    argv = ["--check", str(path), str(ROOT / "config.yaml"), f"model.path={tmp_path}", *SETTINGS]
    assert prepare.main(argv) == 1
    report = capsys.readouterr().out.splitlines()
    over = report.index("targets over data.max_target_tokens=2048 (an upper bound):")
    assert report[over + 1] == f"  {path}:2: 'data:2', 65,599+ tokens (a caption of 1,050,000 characters)"
    assert report[-1] == ("FAIL: 1 target(s) over data.max_target_tokens=2048, which training refuses: "
                          "shorten their captions or raise the limit")


def test_user_errors_are_one_line(tmp_path, capsys):
    assert prepare.main([]) == 2 and capsys.readouterr().err.startswith("usage: python prepare.py")
    assert prepare.main(["--check", "data.max_frames=4", "config.yaml"]) == 2
    assert capsys.readouterr().err.startswith("usage")
    assert prepare.main([str(tmp_path / "missing.jsonl"), str(tmp_path / "out.jsonl"),
                         str(ROOT / "config.yaml")]) == 1
    assert capsys.readouterr().err == f"prepare.py: {tmp_path / 'missing.jsonl'}: no such file; set " \
        "data.train to the training JSONL\n"  # load_records' hint, written for grpo.py
    assert prepare.main(["--check", str(CLIPS / "train.jsonl"), str(ROOT / "config.yaml"),
                         "data.fpss=1"]) == 1
    assert "did you mean 'data.fps'" in capsys.readouterr().err
    assert prepare.main(["--help"]) == 0 and capsys.readouterr().out.startswith("usage: python prepare.py")


@pytest.mark.parametrize("argv, status", [(["prepare", "in.jsonl", "out.jsonl", "config.yaml"], 2),
                                          (["check", "data.jsonl", "config.yaml"], 2), (["--help"], 0)])
def test_the_old_data_commands_point_at_prepare(argv, status, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["data.py", *argv])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(ROOT / "data.py"), run_name="__main__")
    assert stop.value.code == status
    said = capsys.readouterr()
    assert "python prepare.py" in (said.out if status == 0 else said.err)
