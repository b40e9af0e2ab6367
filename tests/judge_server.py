"""A small OpenAI-compatible judge server that answers the built-in prompts of judge.py
(and of scoring.py and prepare.py) with the lexical judge, and can be told to fail. For the
judge tests and for benchmarks:

    python tests/judge_server.py --port 8123 --latency 0.05 --model judge-test

In tests (tests/conftest.py has a fixture):
    server = JudgeServer(); server.start()          # on a free port of 127.0.0.1
    server.fail("500", "429")                       # the next two chat requests fail so
    server.reply = fn                               # fn(prompt) -> reply text, for a test's own prompts
    server.listed = []                              # /models lists these (default [model]): on-demand loading
    server.key = "sk-..."                           # every request needs this bearer key, else 401
    server.echo_headers = True                      # every body quotes the request's headers, as a
                                                    # careless proxy
    ... server.requests, server.max_in_flight ...   # counters; server.bodies: every chat request's JSON
    server.stop()

`prompt` is the first message's content: a re-ask with feedback (question, reply, parse error)
is answered as the question.

Failure modes, one per chat request, in order: "500", "429" (with server.retry_header:
server.retry_after), "400", "stall" (sleep server.stall, then answer), "malformed" (reply
text that is not JSON), "wrong_count" (one judged event missing), "badbody" (HTTP body
that is not JSON), "python" (the right answer in Python-dict quoting), "fenced" (in a
``` fence), "echo_key" (400 quoting the Authorization header, as a careless server
might), "length" (the reply cut in half, finish_reason "length", as at max_tokens),
"trickle" (the answer's body one byte every server.trickle seconds), "huge" (a body of
server.huge bytes, streamed), "backend_down" (LiteLLM's 500 for a configured model whose
backend does not answer). A request naming another model gets 404 like vLLM; with
server.no_db, a wrong key gets LiteLLM's 400 "No connected db." instead of 401. Replies
can also be scripted per request: server.replies, a list of reply texts, answered in order.
"""
import argparse
import contextlib
import json
import os
import sys
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import judge_tasks  # noqa: E402


def answer_prompt(prompt):
    """The lexical judge's reply to a built-in prompt, found by its first (marker) line."""
    for name, template in judge_tasks.TEMPLATES.items():
        if prompt.startswith(template.split("\n", 1)[0]):
            return judge_tasks.LEXICAL[name](unrender(template, prompt))
    if prompt.startswith("[VideoCap-R1 data task: "):
        return answer_data_prompt(prompt)
    return answer_eval_prompt(prompt)


def unrender(template, text):
    """Recover the {fields} of a rendered template (each field up to the next literal)."""
    pieces = judge_tasks.FIELD.split(template)  # [literal, field, literal, field, ..., literal]
    pos, fields = len(pieces[0]), {}
    for name, literal in zip(pieces[1::2], pieces[2::2]):
        end = text.find(literal, pos) if literal else len(text)
        fields[name], pos = text[pos:end], end + len(literal)
    return fields


# ---- the evaluation's own judge steps (extract_objects, entail with a JSON list, vdc_answer, vdc_grade):
# answered the same way, from scoring.TEMPLATES and scoring.LEXICAL
def answer_eval_prompt(prompt):
    if not prompt.startswith("[VideoCap-R1 eval task: "):
        return "OK"  # anything else, e.g. a health-check "Reply with OK."
    import scoring  # only here: the judge tests never need scoring.py
    for name, template in scoring.TEMPLATES.items():
        if prompt.startswith(template.split("\n", 1)[0]):
            return scoring.LEXICAL[name](unrender(template, prompt))
    return "OK"


# ---- prepare.py's judge step (subjects): answered from prepare.TEMPLATES and prepare.LEXICAL
def answer_data_prompt(prompt):
    import prepare  # only here, like scoring above
    for name, template in prepare.TEMPLATES.items():
        if prompt.startswith(template.split("\n", 1)[0]):
            return prepare.LEXICAL[name](unrender(template, prompt))
    return "OK"


class JudgeServer(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default backlog of 5 drops the SYN of a 6th connection made at once, which the client
    # then resends after 1 s: a client of 8 or 16 threads must find them all accepted
    request_queue_size = 64

    def __init__(self, port=0, model="judge-test", latency=0.0, models_endpoint=True, capacity=None):
        super().__init__(("127.0.0.1", port), _Handler)
        # at most `capacity` chat requests answered at once, the others queued, as a serving engine's batch
        self.slots = threading.Semaphore(capacity) if capacity else contextlib.nullcontext()
        self.model, self.latency, self.models_endpoint = model, latency, models_endpoint
        self.listed, self.key, self.echo_headers = [model], None, False
        self.stall, self.retry_after, self.retry_header = 1.0, 0, "Retry-After"
        self.trickle, self.huge, self.no_db, self.sent = 0.5, 0, False, 0  # sent: bytes of the last body
        self.reply, self.replies = answer_prompt, []
        self.plan = deque()
        self.requests = self.in_flight = self.max_in_flight = 0
        self.seen = []  # (Authorization header, prompt) of every chat request
        self.bodies = []
        self.lock = threading.Lock()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def fail(self, *modes):
        with self.lock:
            self.plan.extend(modes)

    def start(self):
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self):
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a real server
    disable_nagle_algorithm = True  # else headers and body wait on a 40 ms delayed ACK

    def log_message(self, *args):
        pass

    def _send(self, code, obj=None, raw=None, headers=()):
        body = raw.encode() if raw is not None else json.dumps(obj).encode()
        try:
            self.send_response(code)
            for k, v in headers:
                self.send_header(k, v)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client gave up (a stall past its timeout)
            pass

    def _refused(self):
        """401 when the server wants a key and the request lacks it; an echoing proxy quotes the headers."""
        auth = self.headers.get("Authorization")
        if self.server.key and auth != f"Bearer {self.server.key}" and self.server.no_db:
            self._send(400, {"error": {"message": "No connected db.", "type": "no_db_connection",
                                       "param": None, "code": "400"}})
            return True
        if self.server.key and auth != f"Bearer {self.server.key}":
            message = "Incorrect API key provided" if auth else "No API key provided"
            self._send(401, {"error": {"message": message}})
            return True
        return False

    def do_GET(self):
        srv = self.server
        if self._refused():
            return
        if srv.echo_headers:
            return self._send(200, {"echo": f"Authorization: {self.headers.get('Authorization')}"})
        if self.path.endswith("/models") and srv.models_endpoint:
            models = [{"id": m, "object": "model"} for m in srv.listed]
            return self._send(200, {"object": "list", "data": models})
        self._send(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self):
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        with srv.lock:
            srv.requests += 1
            srv.in_flight += 1
            srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
            mode = srv.plan.popleft() if srv.plan else None
            prompt = (body.get("messages") or [{}])[0].get("content", "")
            srv.seen.append((self.headers.get("Authorization"), prompt))
            srv.bodies.append(body)
        try:
            with srv.slots:
                time.sleep(srv.latency)
                self._answer(srv, body, prompt, mode)
        finally:
            with srv.lock:
                srv.in_flight -= 1

    def _answer(self, srv, body, prompt, mode):
        if not self.path.endswith("/chat/completions"):
            return self._send(404, {"error": {"message": f"no route {self.path}"}})
        if self._refused():
            return
        if body.get("model") != srv.model:
            return self._send(404, {"error": {"message": f"The model `{body.get('model')}` does not exist.",
                                              "type": "NotFoundError", "code": 404}})
        if mode in ("500", "400"):
            return self._send(int(mode), {"error": {"message": f"told to fail with {mode}"}})
        if mode == "429":
            return self._send(429, {"error": {"message": "rate limited"}},
                              headers=[(srv.retry_header, str(srv.retry_after))])
        if mode == "backend_down":
            return self._send(500, {"error": {"message": "litellm.InternalServerError: InternalServerError: "
                                              "OpenAIException - Connection error.. Received Model Group="
                                              f"{srv.model}", "type": None, "param": None, "code": "500"}})
        if mode in ("trickle", "huge"):
            return self._stream(srv, mode)
        if mode == "echo_key":
            return self._send(400, {"error": {"message": f"bad header {self.headers.get('Authorization')}"}})
        if mode == "badbody":
            return self._send(200, raw="<html>upstream error</html>")
        if mode == "stall":
            time.sleep(srv.stall)
        content = srv.replies.pop(0) if srv.replies else srv.reply(prompt)
        if srv.echo_headers:
            content = f"echo: Authorization: {self.headers.get('Authorization')}"
        if mode == "malformed":
            content = "Sure! Mostly entailment, I think."
        elif mode == "wrong_count":
            obj = json.loads(content)
            content = json.dumps({"events": obj["events"][:-1]})
        elif mode == "python":
            content = repr(json.loads(content))
        elif mode == "fenced":
            content = f"Here you are:\n```json\n{content}\n```"
        elif mode == "length":
            content = content[:len(content) // 2]
        self._send(200, {"id": "chatcmpl-test", "object": "chat.completion", "model": srv.model,
                         "choices": [{"index": 0, "finish_reason": "length" if mode == "length" else "stop",
                                      "message": {"role": "assistant", "content": content}}]})

    def _stream(self, srv, mode):
        """A 200 whose body comes one byte every srv.trickle seconds ("trickle", a valid completion), or
        srv.huge bytes in 64 KiB writes ("huge"); either ends when the client goes away."""
        body = (json.dumps({"choices": [{"message": {"role": "assistant", "content": "{}"}}]}).encode()
                if mode == "trickle" else b" " * srv.huge)
        step, srv.sent = (1, 0) if mode == "trickle" else (64 * 1024, 0)
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            for k in range(0, len(body), step):
                self.wfile.write(body[k:k + step])
                self.wfile.flush()
                srv.sent += step
                if mode == "trickle":
                    time.sleep(srv.trickle)
        except OSError:  # the client gave up
            self.close_connection = True


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--model", default="judge-test")
    ap.add_argument("--latency", type=float, default=0.0, help="seconds added to every chat request")
    args = ap.parse_args()
    server = JudgeServer(args.port, args.model, args.latency)
    print(f"lexical judge server (not an LLM) at {server.url}, model {args.model}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.server_close()
