"""End-to-end check of `recurformer serve` with the real Python `openai` client.

Run by tests/serve_openai.rs against the binary on loopback:
    python serve_openai.py BASE_URL MODEL_ID
Prints one line per check and exits non-zero at the first failure.
"""

import json
import sys
import threading
import time
import urllib.error
import urllib.request

import openai
from openai import OpenAI

BASE, MODEL = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=BASE + "/v1", api_key="unused", max_retries=0, timeout=120)


def check(cond, what):
    if not cond:
        raise SystemExit(f"FAILED: {what}")
    print(f"ok: {what}", flush=True)


def raw(method, path, body=None, content_type="application/json", headers=None):
    """(status, body text) of one HTTP request, errors included."""
    data = body if isinstance(body, (bytes, type(None))) else body.encode()
    req = urllib.request.Request(BASE + path, data=data, method=method)
    if content_type:
        req.add_header("Content-Type", content_type)
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metric(name):
    _, text = raw("GET", "/metrics", content_type=None)
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise SystemExit(f"FAILED: metric {name} missing from /metrics")


def chat(q, max_tokens=24, **kw):
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": q}],
        max_tokens=max_tokens,
        **kw,
    )
    return r


# --- the model loads while the socket is open: /health says when it is ready -----------------
deadline = time.time() + 120
while raw("GET", "/health", content_type=None)[0] != 200:
    if time.time() > deadline:
        raise SystemExit("FAILED: /health never answered 200")
    time.sleep(0.1)
print("ok: /health answers 200", flush=True)

# --- models -----------------------------------------------------------------------------------
models = [m.id for m in client.models.list().data]
check(models == [MODEL], f"models.list() names the served model: {models}")

# --- streamed and not: the same greedy text ---------------------------------------------------
q = "Name three novels by Jane Austen."
whole = chat(q, temperature=0)
text = whole.choices[0].message.content
check(whole.choices[0].finish_reason in ("stop", "length"), "a finish reason")
check(len(text) > 0, f"a non-empty answer: {text!r}")
check(
    whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens,
    "usage adds up",
)
pieces, finish, usage, roles = [], None, None, []
for chunk in client.chat.completions.create(
    model=MODEL,
    messages=[{"role": "user", "content": q}],
    max_tokens=24,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
):
    if chunk.usage is not None:
        usage = chunk.usage
    for c in chunk.choices:
        if c.delta.role:
            roles.append(c.delta.role)
        if c.delta.content:
            pieces.append(c.delta.content)
        if c.finish_reason:
            finish = c.finish_reason
check("".join(pieces) == text, "streamed text equals the whole answer (greedy)")
check(roles == ["assistant"], f"the role comes once, first: {roles}")
check(finish == whole.choices[0].finish_reason, "same finish reason streamed")
check(usage is not None and usage.completion_tokens == whole.usage.completion_tokens, "usage chunk")

# --- completions ------------------------------------------------------------------------------
c = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0)
check(c.choices[0].finish_reason == "length" and c.usage.completion_tokens == 8, "completion length")

# --- seeds ------------------------------------------------------------------------------------
def sampled(seed):
    return chat("Write one sentence about the sea.", 24, temperature=1.0, seed=seed).choices[0].message.content


a, b, other = sampled(11), sampled(11), sampled(12)
check(a == b, "the same seed reproduces the text")
check(a != other, "another seed gives another text")

# --- 8 concurrent clients ---------------------------------------------------------------------
questions = [
    "What is the capital of France?",
    "Name a colour.",
    "What is 3 + 4?",
    "Name an animal that flies.",
    "Say hello in Spanish.",
    "Name a planet.",
    "What do bees make?",
    "Name a season of the year.",
]
alone = [chat(x, 16, temperature=0).choices[0].message.content for x in questions]
results = [None] * len(questions)


def worker(i):
    try:
        results[i] = chat(questions[i], 16, temperature=0).choices[0].message.content
    except Exception as e:  # reported below
        results[i] = e


steps0, rows0 = metric("recurformer_decode_steps_total"), metric("recurformer_decode_sequence_steps_total")
threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(questions))]
t0 = time.time()
for t in threads:
    t.start()
for t in threads:
    t.join()
elapsed = time.time() - t0
steps = metric("recurformer_decode_steps_total") - steps0
rows = metric("recurformer_decode_sequence_steps_total") - rows0
for i, r in enumerate(results):
    check(r == alone[i], f"concurrent client {i} got its answer alone: {r!r} vs {alone[i]!r}")
print(f"8 concurrent clients in {elapsed:.1f} s, mean decode batch {rows / max(steps, 1):.2f}")
check(rows / max(steps, 1) > 1.5, "decode steps of concurrent clients ran batched")

# --- a client that disconnects mid-stream frees its slot --------------------------------------
cancelled0 = metric("recurformer_requests_cancelled_total")
stream = client.chat.completions.create(
    model=MODEL,
    messages=[{"role": "user", "content": "Tell me a very long story about a dragon."}],
    max_tokens=2000,
    temperature=0,
    stream=True,
)
got = 0
for chunk in stream:
    got += 1
    if got == 3:
        break
stream.close()
deadline = time.time() + 30
while time.time() < deadline:
    if metric("recurformer_requests_cancelled_total") > cancelled0 and metric("recurformer_active_sequences") == 0:
        break
    time.sleep(0.05)
check(metric("recurformer_requests_cancelled_total") == cancelled0 + 1, "the disconnect was seen")
check(metric("recurformer_active_sequences") == 0, "the slot was freed (/metrics)")

# --- bad requests -----------------------------------------------------------------------------
ok = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


def with_(**kw):
    return json.dumps({**ok, **kw})


chat_path = "/v1/chat/completions"
bad = [
    ("malformed JSON", "POST", chat_path, '{"messages": [', "application/json", 400),
    ("wrong content type", "POST", chat_path, json.dumps(ok), "text/plain", 415),
    ("form-encoded content type", "POST", chat_path, json.dumps(ok), "application/x-www-form-urlencoded", 415),
    ("missing messages", "POST", chat_path, json.dumps({"model": MODEL}), "application/json", 400),
    ("messages a string", "POST", chat_path, with_(messages="hi"), "application/json", 400),
    ("role missing", "POST", chat_path, with_(messages=[{"content": "x"}]), "application/json", 400),
    ("temperature 9", "POST", chat_path, with_(temperature=9), "application/json", 400),
    ("top_p 2", "POST", chat_path, with_(top_p=2), "application/json", 400),
    ("top_k 0", "POST", chat_path, with_(top_k=0), "application/json", 400),
    ("max_tokens -1", "POST", chat_path, with_(max_tokens=-1), "application/json", 400),
    ("max_tokens a string", "POST", chat_path, with_(max_tokens="ten"), "application/json", 400),
    ("n = 3", "POST", chat_path, with_(n=3), "application/json", 400),
    ("tools", "POST", chat_path, with_(tools=[{"type": "function", "function": {"name": "f"}}]), "application/json", 400),
    ("logit_bias", "POST", chat_path, with_(logit_bias={"5": 10}), "application/json", 400),
    ("unknown field", "POST", chat_path, with_(bogus=1), "application/json", 400),
    ("seed a string", "POST", chat_path, with_(seed="x"), "application/json", 400),
    ("max_tokens over the context", "POST", chat_path, with_(max_tokens=10**6), "application/json", 400),
    ("prompt over the context", "POST", "/v1/completions", json.dumps({"prompt": "hello " * 9000}), "application/json", 400),
    ("body over the limit", "POST", chat_path, with_(messages=[{"role": "user", "content": "x" * (5 << 20)}]), "application/json", 413),
    ("another model", "POST", chat_path, with_(model="gpt-4o"), "application/json", 404),
    ("unknown route", "GET", "/v1/embeddings", None, None, 404),
    ("wrong method", "DELETE", "/v1/models", None, None, 405),
    ("not UTF-8", "POST", chat_path, b"\xff\xfe{}", "application/json", 400),
]
for what, method, path, body, ct, status in bad:
    code, reply = raw(method, path, body, content_type=ct)
    try:
        err = json.loads(reply)["error"]
        shaped = all(k in err for k in ("message", "type", "code")) and len(err["message"]) > 10
    except (ValueError, KeyError, TypeError):
        shaped = False
    check(code == status and shaped, f"{what}: {status} with an error body (got {code} {reply[:120]!r})")
    if what == "prompt over the context":
        check("8192" in err["message"] and "tokens" in err["message"], f"token counts in: {err['message']}")

# The openai client raises its typed errors for them.
try:
    chat("Hi", temperature=5)
    check(False, "temperature 5 refused")
except openai.BadRequestError as e:
    check(e.status_code == 400, f"BadRequestError from the client: {e.message[:80]}")

# --- still healthy and still right ------------------------------------------------------------
check(raw("GET", "/health", content_type=None)[0] == 200, "healthy after all of that")
again = chat(q, temperature=0).choices[0].message.content
check(again == text, f"the same greedy answer as at the start: {again!r} vs {text!r}")
# The slot is freed just after the answer is sent: give the engine a moment.
deadline = time.time() + 10
while metric("recurformer_active_sequences") != 0 and time.time() < deadline:
    time.sleep(0.02)
check(metric("recurformer_active_sequences") == 0 and metric("recurformer_queue_length") == 0, "no slot leaked")
print("all checks passed")
