"""judge.py: its docstring examples, and the HTTP judge client against tests/judge_server.py
on 127.0.0.1: answers, retries, failures as NaN, malformed replies, the cache, concurrency,
the health check, prompt files and the API key."""
import dataclasses
import doctest
import glob
import json
import math
import socket
import threading
import time
from types import SimpleNamespace

import pytest

from config import RewardConfig
import judge as judge_lib
import judge_tasks
from judge import HTTPJudge, LexicalJudge, make_judge
from judge_tasks import JudgeError
from rewards import compute_rewards

CAPTION = "A bald man waves. A small dog barks at him. The man picks up a red cup."
EVENTS = ["man waves", "dog barks", "man drinks coffee"]


@pytest.fixture
def judge(judge_cfg):
    j = HTTPJudge(judge_cfg)
    yield j
    j.close()


def with_cfg(cfg, **changes):
    return HTTPJudge(dataclasses.replace(cfg, **changes))


def test_docstring_examples():  # decode_reply and render, which were rewards.py's
    assert doctest.testmod(judge_lib).failed == 0


def test_answers_equal_the_lexical_judge(judge):
    lexical = LexicalJudge()
    pairs = [(CAPTION, EVENTS), ("A cat.", ["dog sleeps"]), ("Nothing.", [])]
    assert judge.entail(pairs) == lexical.entail(pairs) == [
        ["entailment", "entailment", "neutral"], ["neutral"], []]
    assert judge.describe() == f"judge-test @ {judge.url}"


def test_the_http_judge_decodes_what_the_server_answers(judge, judge_server):
    """Replies a server wrote (not the lexical judge's), each decoded into the task's result; the question
    carries the caption inside its tags."""
    replies = {"extract_events": '{"events": [" the man waves ", "the dog barks", ""]}',
               "rate_cn": 'Sure: {"completeness": 3, "naturalness": 5}'}
    judge_server.reply = lambda prompt: next(r for task, r in replies.items() if f"task: {task}]" in prompt)
    assert judge.extract_events([CAPTION]) == [["the man waves", "the dog barks"]]
    assert f"<caption>\n{CAPTION}\n</caption>" in judge_server.seen[-1][1]
    assert judge.rate_cn([(CAPTION, "A man waves.")], max_score=5) == [{"completeness": 3, "naturalness": 5}]
    assert "<candidate>\nA man waves.\n</candidate>" in judge_server.seen[-1][1]
    assert "integers from 0 to 5" in judge_server.seen[-1][1]


def test_the_lexical_judge_worked_examples():
    """extract_events: the caption's sentences (split at . ! ? ;); rate_cn: completeness = round(max * shared
    content words / the reference's), naturalness = round(max * distinct words / words) of the candidate.
    Reference content words {dog, run, cat, sleep, bird, sing}; the candidate has dog, run, cat, sleep
    (4 of 6: round(3.33) = 3) in 7 words, 5 distinct (dog runs and cat sleeps: round(3.57) = 4)."""
    lexical = LexicalJudge()
    caption = "A bald man waves. A small dog barks at him! The man picks up a red cup."
    assert lexical.extract_events([caption]) == [
        ["A bald man waves", "A small dog barks at him", "The man picks up a red cup"]]
    pair = ("A dog runs. A cat sleeps. A bird sings.", "A dog runs and a cat sleeps and sleeps.")
    assert lexical.rate_cn([pair], max_score=5) == [{"completeness": 3, "naturalness": 4}]


@pytest.mark.parametrize("mode", ["python", "fenced"])
def test_tolerated_reply_forms(judge, judge_server, mode):
    judge_server.fail(mode)
    assert judge.entail([(CAPTION, EVENTS)]) == [["entailment", "entailment", "neutral"]]
    assert judge_server.requests == 1 and judge.stats["malformed"] == 0


def test_retries_500(judge, judge_server):
    judge_server.fail("500", "500")
    assert judge.extract_events([CAPTION])[0] is not None
    assert judge_server.requests == 3 and judge.stats["retries"] == 2


class Sleeps:
    """judge.py's `time`, but sleep() records each delay instead of waiting it."""

    def __init__(self):
        self.delays = []

    def sleep(self, seconds):
        self.delays.append(seconds)

    def __getattr__(self, name):
        return getattr(time, name)


def test_backoff_doubles_up_to_max_backoff(judge_cfg, judge_server, monkeypatch):
    """backoff 0.01 s, max_backoff 0.05 s, four 500s: waits of 0.01 * 2**attempt, capped."""
    monkeypatch.setattr(judge_lib, "time", clock := Sleeps())
    judge_server.fail("500", "500", "500", "500")
    assert with_cfg(judge_cfg, retries=4).extract_events([CAPTION])[0] is not None
    assert clock.delays == pytest.approx([0.01, 0.02, 0.04, 0.05])


def test_retry_after_is_capped_by_max_backoff(judge_cfg, judge_server, monkeypatch):
    """A 429 asking for 100 s waits max_backoff (0.05 s), one asking for 0 s waits 0 s."""
    monkeypatch.setattr(judge_lib, "time", clock := Sleeps())
    judge_server.retry_after = 100
    judge_server.fail("429", "429")
    assert with_cfg(judge_cfg).extract_events([CAPTION])[0] is not None
    judge_server.retry_after = 0
    judge_server.fail("429")
    assert with_cfg(judge_cfg).extract_events(["Another caption."])[0] is not None
    assert clock.delays == [0.05, 0.05, 0.0]


def test_retry_after_is_honoured(judge, judge_server):
    judge_server.retry_after = 1  # seconds, against a backoff of 0.01
    judge_server.fail("429")
    t = time.perf_counter()
    judge = with_cfg(judge.cfg, max_backoff=10.0)
    assert judge.extract_events([CAPTION])[0] is not None
    assert time.perf_counter() - t >= 1.0 and judge_server.requests == 2


def test_stall_past_timeout_is_retried(judge, judge_server):
    judge_server.stall = 0.6
    judge_server.fail("stall")
    judge = with_cfg(judge.cfg, timeout=0.3)
    assert judge.extract_events([CAPTION])[0] is not None
    assert judge.stats["retries"] == 1 and judge_server.requests == 2


def test_400_is_not_retried_and_says_why(judge, judge_server, capsys):
    judge_server.fail("400")
    assert judge.extract_events([CAPTION]) == [None]
    assert judge_server.requests == 1 and judge.stats["failures"] == 1
    assert "HTTP 400" in judge.last_error and "told to fail with 400" in judge.last_error
    assert "judge: 1 of 1 tasks failed (1 HTTP request); last: " in capsys.readouterr().err


def test_each_thread_sees_why_its_own_request_failed(judge, judge_server):
    """prepare.py asks from several threads: the error it quotes must be its own thread's, not the
    latest of any thread's (last_error)."""
    judge_server.fail("400")
    seen = {}

    def first():
        assert judge.extract_events([CAPTION]) == [None]
        seen["first"] = judge.error_here
    thread = threading.Thread(target=first)
    thread.start()
    thread.join()
    judge_server.fail("badbody", "badbody", "badbody", "badbody")
    assert judge.extract_events([CAPTION + " again"]) == [None]
    assert "HTTP 400" in seen["first"] and "HTTP 400" not in judge.error_here
    assert judge.last_error == judge.error_here != seen["first"]
    assert judge.extract_events([CAPTION]) != [None] and judge.error_here == ""


def test_exhausted_retries_give_nan_and_are_counted(judge_cfg, judge_server):
    judge = with_cfg(judge_cfg, concurrency=1)  # one at a time: the first request gets all failures
    judge_server.fail(*["500"] * 4)  # 1 + retries (3) attempts, all failing
    record = SimpleNamespace(caption=CAPTION, events=EVENTS, subjects=[])
    outputs = ["<think>{\"subjects\": []}</think><answer>A man waves.</answer>"] * 2
    outputs[1] = outputs[1].replace("waves", "waves twice")  # a different request
    reward, parts, stats = compute_rewards(outputs, [record] * 2, RewardConfig(), judge)
    assert [math.isnan(x) for x in parts["event"].tolist()] == [True, False]
    assert [math.isnan(x) for x in reward.tolist()] == [True, False]
    assert stats["judge_failed"] == 1 and judge.stats["failures"] == 1
    assert "gave up after 4 attempts" in judge.last_error


@pytest.mark.parametrize("mode", ["malformed", "wrong_count", "badbody"])
def test_malformed_reply_is_reasked(judge, judge_server, mode):
    judge_server.fail(mode)
    assert judge.entail([(CAPTION, EVENTS)]) == [["entailment", "entailment", "neutral"]]
    assert judge.stats["malformed"] == 1 and judge_server.requests == 2


def test_malformed_reply_fails_after_its_retries(judge, judge_server):
    judge_server.fail("malformed", "wrong_count", "malformed")  # 1 + malformed_retries (2)
    assert judge.entail([(CAPTION, EVENTS)]) == [None]
    assert judge.stats["malformed"] == 3 and judge.stats["failures"] == 1
    assert "malformed reply to 'entail'" in judge.last_error


def test_cache_survives_a_restart(judge_cfg, judge_server, tmp_path):
    cfg = dataclasses.replace(judge_cfg, cache_dir=str(tmp_path / "cache"))
    first = HTTPJudge(cfg).entail([(CAPTION, EVENTS), ("A cat.", ["cat sleeps"])])
    assert judge_server.requests == 2
    again = HTTPJudge(cfg)  # a new process would build a new judge from the same config
    assert again.entail([(CAPTION, EVENTS), ("A cat.", ["cat sleeps"])]) == first
    assert judge_server.requests == 2 and again.stats["cache_hits"] == 2
    files = glob.glob(str(tmp_path / "cache" / "*"))
    assert len(files) == 2 and all(f.endswith(".json") for f in files)  # no temp files left
    judge_server.fail("500", "500")  # a changed max_tokens is a different key: asked again
    assert HTTPJudge(dataclasses.replace(cfg, max_tokens=7)).entail([(CAPTION, EVENTS)]) == first[:1]
    assert judge_server.requests == 5


def test_failures_are_not_cached(judge_cfg, judge_server, tmp_path):
    cfg = dataclasses.replace(judge_cfg, cache_dir=str(tmp_path), malformed_retries=0)
    judge_server.fail("malformed")
    assert HTTPJudge(cfg).extract_events([CAPTION]) == [None]
    assert glob.glob(str(tmp_path / "*")) == []


def test_identical_tasks_are_asked_once(judge, judge_server):
    assert len(judge.extract_events([CAPTION] * 5)) == 5 and judge_server.requests == 1


@pytest.mark.parametrize("concurrency", [1, 8])
def test_requests_run_concurrently(judge_cfg, judge_server, concurrency):
    judge_server.latency = 0.05
    judge = with_cfg(judge_cfg, concurrency=concurrency)
    t = time.perf_counter()
    assert None not in judge.extract_events([f"A man waves {k} times." for k in range(16)])
    elapsed = time.perf_counter() - t
    if concurrency == 1:
        assert judge_server.max_in_flight == 1
    else:
        assert 1 < judge_server.max_in_flight <= 8
    # one at a time takes at least 16 x 0.05 s; 8 at once about 2 x 0.05 s, bounded with room by the former
    assert elapsed >= 16 * 0.05 if concurrency == 1 else elapsed < 16 * 0.05, elapsed


def test_health_check(judge_cfg, judge_server):
    make_judge(dataclasses.replace(judge_cfg, health_check=True))
    with pytest.raises(JudgeError, match="/models lists \\['judge-test'\\], not 'Qwen-72B', and a test "
                                         "request for it failed: .*HTTP 404.*The model `Qwen-72B` does "
                                         "not exist.*Set judge.model"):
        make_judge(dataclasses.replace(judge_cfg, model="Qwen-72B", health_check=True))
    judge_server.models_endpoint = False  # falls back to one tiny chat call
    make_judge(dataclasses.replace(judge_cfg, health_check=True))
    with pytest.raises(JudgeError, match="HTTP 404.*The model `Qwen-72B` does not exist"):
        make_judge(dataclasses.replace(judge_cfg, model="Qwen-72B", health_check=True))


def test_health_check_connection_refused(judge_cfg):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    cfg = dataclasses.replace(judge_cfg, url=url, health_check=True)
    with pytest.raises(JudgeError, match=f"judge-test @ {url}.*cannot reach the server.*judge.url=lexical"):
        make_judge(cfg)


def test_prompt_file_replaces_a_template(judge_cfg, judge_server, tmp_path):
    path = tmp_path / "entail.txt"
    path.write_text("Does {description} entail each of:\n{events}\nAnswer JSON.")
    judge = with_cfg(judge_cfg, prompts={"entail": str(path)})
    judge.entail([("A man waves.", ["man waves"])])
    assert judge_server.seen[-1][1] == "Does A man waves. entail each of:\n1. man waves\nAnswer JSON."
    path.write_text("Does {caption} entail {events}?")
    with pytest.raises(JudgeError, match="must use exactly the fields \\['description', 'events'\\]"):
        with_cfg(judge_cfg, prompts={"entail": str(path)})
    with pytest.raises(JudgeError, match="cannot read"):
        with_cfg(judge_cfg, prompts={"entail": str(tmp_path / "missing.txt")})


def test_api_key_is_sent_but_never_shown(judge_cfg, judge_server, tmp_path, monkeypatch, capsys, caplog):
    key = "sk-test-0123456789-secret"
    monkeypatch.setenv("JUDGE_API_KEY", key)
    cfg = dataclasses.replace(judge_cfg, cache_dir=str(tmp_path), health_check=True)
    judge = make_judge(cfg)
    assert judge.extract_events([CAPTION])[0] is not None
    assert judge_server.seen[0][0] == f"Bearer {key}"
    judge_server.fail("echo_key")  # a server that quotes the header back in its error
    assert judge.extract_events(["Another caption."]) == [None]
    assert key in json.dumps(judge_server.seen)  # the server really had it ...
    errors = []
    for bad in (dataclasses.replace(cfg, model="nope"),
                dataclasses.replace(cfg, url="http://127.0.0.1:9/v1")):
        with pytest.raises(JudgeError) as e:
            make_judge(bad)
        errors.append(str(e.value))
    captured = capsys.readouterr()
    shown = [captured.out, captured.err, caplog.text, json.dumps(judge.stats), judge.last_error,
             judge.describe(), repr(judge),
             *errors, *(open(f).read() for f in glob.glob(str(tmp_path / "*")))]
    assert "***" in judge.last_error
    assert not [s for s in shown if key in s]  # ... and we never show it


# ----------------------------------------------------------- real servers' ways (transformers serve, LiteLLM)

def test_health_check_asks_a_model_that_models_does_not_list(judge_cfg, judge_server, capsys):
    judge_server.listed = ["some-loaded-model"]  # a server that loads models on demand lists only loaded ones
    make_judge(dataclasses.replace(judge_cfg, health_check=True))
    assert judge_server.requests == 1  # one tiny chat request decided
    assert "/models does not list 'judge-test' but the server answers for it" in capsys.readouterr().err


def test_401_says_whether_a_key_was_sent(judge_cfg, judge_server, monkeypatch):
    judge_server.key = "sk-the-right-one"
    cfg = dataclasses.replace(judge_cfg, health_check=True)
    monkeypatch.delenv("JUDGE_API_KEY", raising=False)
    with pytest.raises(JudgeError, match=r"HTTP 401: no key was sent \(\$JUDGE_API_KEY is not set\)"):
        make_judge(cfg)
    with pytest.raises(JudgeError, match=r"no key was sent \(judge.api_key_env is empty\)"):
        make_judge(dataclasses.replace(cfg, api_key_env=""))
    judge = HTTPJudge(judge_cfg)  # no health check: the chat request says so too
    assert judge.extract_events([CAPTION]) == [None] and "no key was sent" in judge.last_error
    monkeypatch.setenv("JUDGE_API_KEY", "sk-a-wrong-one")
    with pytest.raises(JudgeError, match=r"HTTP 401: the key in \$JUDGE_API_KEY was refused"):
        make_judge(cfg)
    monkeypatch.setenv("JUDGE_API_KEY", "sk-the-right-one")
    assert make_judge(cfg).extract_events([CAPTION])[0] is not None


def test_a_reply_cut_at_max_tokens_says_so(judge, judge_server):
    judge_server.fail("length", "length", "length")
    assert judge.entail([(CAPTION, EVENTS)]) == [None]
    assert "truncated at max_tokens=1024: raise judge.max_tokens, or eval.judge_max_tokens" in \
        judge.last_error
    assert "cut off at the length limit" in judge_server.bodies[-1]["messages"][-1]["content"]


def test_a_malformed_reply_is_reasked_with_its_error_and_cached_as_the_question(judge_cfg, judge_server,
                                                                                 tmp_path):
    cfg = dataclasses.replace(judge_cfg, cache_dir=str(tmp_path))
    judge_server.fail("malformed")
    assert HTTPJudge(cfg).entail([(CAPTION, EVENTS)]) == [["entailment", "entailment", "neutral"]]
    first, second = (b["messages"] for b in judge_server.bodies)
    assert second[0] == first[0] and len(first) == 1
    assert second[1] == {"role": "assistant", "content": "Sure! Mostly entailment, I think."}
    assert second[2]["role"] == "user" and second[2]["content"].startswith(
        "That reply could not be used: no JSON in the reply 'Sure! Mostly entailment, I think.'.")
    again = HTTPJudge(cfg)  # the cache key is the question's, not the re-ask's
    assert again.entail([(CAPTION, EVENTS)]) == [["entailment", "entailment", "neutral"]]
    assert again.stats["cache_hits"] == 1 and judge_server.requests == 2
    judge_server.fail("malformed")  # evaluate.py's switch: the official scripts re-ask the same bytes
    HTTPJudge(judge_cfg, feedback=False).extract_events([CAPTION])
    assert judge_server.bodies[-1] == judge_server.bodies[-2]


def test_failures_are_counted_per_call(judge_cfg, judge_server, capsys):
    # two threads ask at once (as prepare.py does); each one's line counts its own requests
    release = threading.Event()

    def reply(prompt, lexical=judge_server.reply):
        if "slow" in prompt:
            release.wait(5)
        return "not JSON" if "fails" in prompt else lexical(prompt)
    judge_server.reply = reply
    judge = with_cfg(judge_cfg, malformed_retries=0)
    slow = threading.Thread(target=judge.extract_events, args=(["A slow man fails.", "A slow dog barks."],))
    slow.start()
    deadline = time.monotonic() + 5
    while judge_server.in_flight < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert judge.extract_events(["A quick man fails."]) == [None]  # fails while the two slow ones wait
    release.set()
    slow.join()
    lines = [x for x in capsys.readouterr().err.splitlines() if "tasks failed" in x]
    assert sorted(x.split(";")[0] for x in lines) == ["judge: 1 of 1 tasks failed (1 HTTP request)",
                                                      "judge: 1 of 2 tasks failed (2 HTTP requests)"]
    assert judge.stats["failures"] == 2


def test_a_timeout_names_the_setting(judge_cfg, judge_server):
    judge_server.stall = 0.6
    judge_server.fail("stall")
    judge = with_cfg(judge_cfg, timeout=0.3, retries=0)
    assert judge.extract_events([CAPTION]) == [None]
    assert "ReadTimeout after judge.timeout=0.3 s" in judge.last_error


def test_the_key_is_redacted_also_url_encoded(judge_cfg, monkeypatch):
    key = "sk-a/b+c=d e"
    monkeypatch.setenv("JUDGE_API_KEY", key)
    judge = make_judge(judge_cfg)
    text = "Bearer sk-a/b+c=d e; GET /v1?key=sk-a%2Fb%2Bc%3Dd%20e; form key=sk-a%2Fb%2Bc%3Dd+e"
    assert judge._redact(text) == "Bearer ***; GET /v1?key=***; form key=***"


def test_the_key_is_redacted_from_what_an_echoing_proxy_sends(judge_cfg, judge_server, tmp_path, monkeypatch,
                                                               capsys):
    key = "sk-test-0123456789-secret"
    monkeypatch.setenv("JUDGE_API_KEY", key)
    judge_server.key, judge_server.echo_headers = key, True  # /models and every reply quote our headers
    cfg = dataclasses.replace(judge_cfg, cache_dir=str(tmp_path / "cache"), health_check=True)
    judge = make_judge(cfg)  # /models is no model list: a tiny chat request decides
    assert judge.extract_events([CAPTION]) == [None]  # "echo: Authorization: Bearer sk-...": no JSON
    judge_server.echo_headers = False
    judge_server.reply = lambda prompt: json.dumps({"events": [f"the header was Bearer {key}"]})
    assert judge.extract_events(["Another caption."]) == [["the header was Bearer ***"]]
    judge_server.models_endpoint, judge_server.key = False, "sk-another"  # 401 on the probe
    with pytest.raises(JudgeError) as e:
        make_judge(cfg)
    assert key in json.dumps(judge_server.seen)  # the server really had it ...
    captured = capsys.readouterr()
    shown = [captured.out, captured.err, str(e.value), judge.last_error, json.dumps(judge.stats),
             *(open(f).read() for f in glob.glob(str(tmp_path / "cache" / "*")))]
    assert "***" in judge.last_error and len(shown) == 6  # one cache file: the reply that parsed
    assert not [s for s in shown if key in s]  # ... and we never show or store it


# ----------------------------------------------------------- proxies, slow and huge bodies, the URL's secrets

def test_a_trickled_body_cannot_hold_a_call_past_the_timeout(judge_cfg, judge_server):
    judge_server.trickle = 0.2  # a ~70-byte body one byte every 0.2 s: 14 s in all
    judge_server.fail("trickle")
    judge = with_cfg(judge_cfg, timeout=1.0, retries=0)
    t = time.perf_counter()
    assert judge.extract_events([CAPTION]) == [None]
    assert time.perf_counter() - t < 1.0 + 0.3
    assert "the body was still arriving at judge.timeout=1 s" in judge.last_error
    assert judge.stats["failures"] == 1 and 1 < judge_server.sent < 10


def test_a_huge_body_is_refused_while_it_streams(judge_cfg, judge_server):
    judge_server.huge = 64 * 2 ** 20
    judge_server.fail("huge", "huge")
    judge = with_cfg(judge_cfg, retries=1)
    assert judge.extract_events([CAPTION]) == [None]
    assert "a body over 4 MiB (judge.MAX_BODY) was refused" in judge.last_error
    assert judge.stats["retries"] == 1 and judge_server.sent < 16 * 2 ** 20  # read no further than the cap
    assert judge.extract_events([CAPTION])[0] is not None  # the next request is answered


@pytest.mark.parametrize("header, value, wait", [("llm_provider-retry-after", "1", 1.0),  # LiteLLM's
                                                 ("retry-after-ms", "1200", 1.2), ("Retry-After", "1", 1.0)])
def test_the_wait_a_server_asks_for_is_honoured(judge_cfg, judge_server, header, value, wait):
    judge_server.retry_header, judge_server.retry_after = header, value
    judge_server.fail("429")
    judge = with_cfg(judge_cfg, max_backoff=10.0)
    t = time.perf_counter()
    assert judge.extract_events([CAPTION])[0] is not None
    assert wait <= time.perf_counter() - t < wait + 0.5 and judge_server.requests == 2
    judge_server.retry_after = "30000" if header.endswith("-ms") else "30"  # capped at judge.max_backoff
    judge_server.fail("429")
    t = time.perf_counter()
    assert with_cfg(judge_cfg, max_backoff=0.3).extract_events(["Other."])[0] is not None
    assert 0.3 <= time.perf_counter() - t < 1.0


def test_server_wait_reads_each_header():
    later = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 100))
    assert 98 < judge_lib.server_wait({"Retry-After": later}) <= 100  # an HTTP date
    assert judge_lib.server_wait({"retry-after-ms": "250", "Retry-After": "9"}) == 0.25  # ms first
    assert judge_lib.server_wait({"Retry-After": "soon", "llm_provider-retry-after": "60"}) == 60.0
    assert judge_lib.server_wait({"Retry-After": "-1"}) is None and judge_lib.server_wait({}) is None


def test_a_proxy_listing_a_model_whose_backend_is_down_is_refused_at_start(judge_cfg, judge_server):
    # LiteLLM lists its configured models whether or not their backend answers; the test request tells
    judge_server.fail("backend_down", "backend_down")
    t = time.perf_counter()
    with pytest.raises(JudgeError, match=r"/models lists 'judge-test', but a test request for it failed: .*"
                                         r"HTTP 500: .*Connection error.*start that backend"):
        make_judge(dataclasses.replace(judge_cfg, health_check=True, backoff=1.0, retries=5))
    assert judge_server.requests == 2 and time.perf_counter() - t < 3  # one retry, not 31 s of them


def test_a_bare_500_for_a_wrong_model_is_reported_quickly(judge_cfg, judge_server):
    # transformers serve answers a model it cannot load with a bare 500, and lists only loaded models
    judge_server.listed = []
    judge_server.fail("500", "500")
    t = time.perf_counter()
    with pytest.raises(JudgeError, match=r"/models lists \[\], not 'judge-test'.*HTTP 500.*Set judge.model"):
        make_judge(dataclasses.replace(judge_cfg, health_check=True, backoff=1.0, retries=5))
    assert time.perf_counter() - t < 3


def test_litellms_no_connected_db_points_at_the_key(judge_cfg, judge_server, monkeypatch):
    judge_server.key, judge_server.no_db = "sk-master", True  # LiteLLM without a database, a wrong key
    monkeypatch.setenv("JUDGE_API_KEY", "sk-wrong")
    with pytest.raises(JudgeError, match=r"HTTP 400: .*No connected db.*check the key in \$JUDGE_API_KEY"):
        make_judge(dataclasses.replace(judge_cfg, health_check=True))
    judge = HTTPJudge(judge_cfg)
    assert judge.extract_events([CAPTION]) == [None] and "check the key in $JUDGE_API_KEY" in judge.last_error


def test_unset_request_settings_are_not_sent(judge_cfg, judge_server):
    with_cfg(judge_cfg, temperature=None, max_tokens=None).extract_events([CAPTION])
    with_cfg(judge_cfg).extract_events(["Another."])
    assert [("temperature" in b, "max_tokens" in b) for b in judge_server.bodies] == [(False, False),
                                                                                     (True, True)]


def test_url_credentials_are_never_shown_or_stored(judge_cfg, judge_server, tmp_path, capsys):
    password = "pw-0123456789/secret"
    url = judge_server.url.replace("http://", f"http://judge-user:{password.replace('/', '%2F')}@")
    cfg = dataclasses.replace(judge_cfg, url=url, cache_dir=str(tmp_path), health_check=True)
    judge = make_judge(cfg)
    assert judge.describe() == f"judge-test @ {judge_server.url.replace('http://', 'http://***@')}"
    basic = judge_server.seen[0][0]
    assert basic.startswith("Basic ")  # requests sends the URL's credentials
    judge_server.replies = [json.dumps({"events": [f"{password} and {basic}"]})]
    assert judge.extract_events([CAPTION]) == [["*** and Basic ***"]]
    judge_server.fail("echo_key")
    assert judge.extract_events(["Another caption."]) == [None]
    with pytest.raises(JudgeError) as e:
        make_judge(dataclasses.replace(cfg, model="nope"))
    shown = [*capsys.readouterr(), str(e.value), judge.last_error, judge.describe(),
             *(open(f).read() for f in glob.glob(str(tmp_path / "*")))]
    assert "Basic ***" in judge.last_error and len(shown) == 6
    assert not [s for s in shown if password in s or "%2Fsecret" in s or basic[6:] in s]
    assert judge_lib.redact_url("http://u:p@h:1/v1?x=1") == "http://***@h:1/v1?x=1"
    assert judge_lib.redact_url("lexical") == "lexical"


def test_a_reply_that_is_neither_json_nor_python_is_quoted():
    with pytest.raises(ValueError, match=r"neither JSON nor a Python literal: '\{events: \[a man waves\]\}'"):
        judge_tasks.decode_reply("Sure: {events: [a man waves]}")
