"""The edge as the official OpenAI Python SDK (and plain HTTP for the
paths the SDK has no call for) sees it. Run by tests/sdk.rs with EDGE_URL,
API_KEY, MODEL (canonical), ALIAS and HIDDEN (a model the key may not use),
and by tests/vllm.rs with ENGINE=vllm.
Exits non-zero, with the reason, on the first expectation that fails."""

import json
import os
import sys

import httpx
import openai

edge = os.environ["EDGE_URL"]
key = os.environ["API_KEY"]
model, alias, hidden = os.environ["MODEL"], os.environ["ALIAS"], os.environ["HIDDEN"]
# ENGINE=vllm (scripts/test-vllm.sh): a real vLLM serves, and only what it
# serves for a plain Llama is tried (no rerank or Anthropic-style paths).
engine = os.environ.get("ENGINE", "sim")
client = openai.OpenAI(base_url=f"{edge}/v1", api_key=key, max_retries=0, timeout=30)


def fingerprint_ok(fingerprint):
    """The engine's fingerprint: the simulated engine's, or a vLLM build's."""
    if engine == "vllm":
        return isinstance(fingerprint, str) and fingerprint.startswith("vllm-")
    return fingerprint == "fp_sim_engine"


def tokens_ok(tokens, asked):
    """All the tokens asked for; a random-weight model in vLLM may stop early."""
    return tokens == asked if engine == "sim" else 1 <= tokens <= asked


def check(condition, what):
    if not condition:
        sys.exit(f"FAILED: {what}")


# /v1/models: canonical names and aliases (with root), only models the key may use.
listed = {m.id: m for m in client.models.list().data}
check(model in listed and alias in listed, f"{model} and {alias} listed: {sorted(listed)}")
check(getattr(listed[alias], "root", None) == model, f"{alias} names its root: {listed[alias]}")
check(hidden not in listed, f"{hidden} is not listed for this key: {sorted(listed)}")

# A stream without include_usage: every field the engine sends arrives,
# system_fingerprint included, and no usage chunk the client did not ask for.
chunks = list(client.chat.completions.create(
    model=alias, messages=[{"role": "user", "content": "hello"}], max_tokens=4, stream=True))
check(chunks, "chunks arrived")
# The engine (vLLM, and the simulated engine as vLLM does) writes it on the
# chunk that finishes the choice; the edge asked it for usage, which moves
# it to the usage chunk, and puts it back where the client expects it.
fingerprints = [c.system_fingerprint for c in chunks]
check(fingerprint_ok(chunks[-1].system_fingerprint) and set(fingerprints[:-1]) <= {None},
      f"system_fingerprint on the finishing chunk: {fingerprints}")
print(f"stream without include_usage: system_fingerprint={chunks[-1].system_fingerprint!r} "
      f"on the chunk with finish_reason={chunks[-1].choices[0].finish_reason!r}")
check(all(c.usage is None for c in chunks), "no usage chunk without include_usage")
check(all(c.model == model for c in chunks), "chunks name the canonical model")

# The same, asking for usage: the last chunk carries it.
chunks = list(client.chat.completions.create(
    model=alias, messages=[{"role": "user", "content": "hello"}], max_tokens=4, stream=True,
    stream_options={"include_usage": True}))
check(chunks[-1].usage is not None and tokens_ok(chunks[-1].usage.completion_tokens, 4),
      f"usage in the last chunk: {chunks[-1]}")

# Not streamed.
reply = client.chat.completions.create(
    model=alias, messages=[{"role": "user", "content": "hello"}], max_tokens=3)
check(fingerprint_ok(reply.system_fingerprint) and tokens_ok(reply.usage.completion_tokens, 3),
      f"{reply}")

if engine == "vllm":
    print(json.dumps({"ok": True}))
    sys.exit(0)

# The Responses API, whole and streamed.
response = client.responses.create(model=alias, input="say something", max_output_tokens=5)
check(response.output_text and response.usage.output_tokens == 5, f"{response}")
events = [e.type for e in client.responses.create(
    model=alias, input="say something", max_output_tokens=3, stream=True)]
check(events[0] == "response.created" and events[-1] == "response.completed", f"{events}")

# A model the key may not use is refused as OpenAI refuses it.
try:
    client.chat.completions.create(model=hidden, messages=[{"role": "user", "content": "x"}])
    check(False, f"{hidden} refused")
except openai.PermissionDeniedError as e:
    check(e.code == "model_not_allowed", f"refusal code: {e.code}")

# Paths the SDK has no call for, over plain HTTP with the same key.
http = httpx.Client(base_url=edge, headers={"Authorization": f"Bearer {key}"}, timeout=30)
anthropic = http.post("/v1/messages", json={
    "model": alias, "max_tokens": 4, "system": "be brief",
    "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]})
check(anthropic.status_code == 200 and anthropic.json()["usage"]["output_tokens"] == 4,
      f"/v1/messages: {anthropic.status_code} {anthropic.text}")
with http.stream("POST", "/v1/messages", json={
        "model": alias, "max_tokens": 3, "stream": True,
        "messages": [{"role": "user", "content": "hi"}]}) as streamed:
    names = [line[len("event: "):] for line in streamed.iter_lines() if line.startswith("event: ")]
check(names[0] == "message_start" and names[-1] == "message_stop", f"{names}")
rerank = http.post("/v1/rerank", json={"model": alias, "query": "mesh", "documents": ["a mesh", "b"]})
check(rerank.status_code == 200 and len(rerank.json()["results"]) == 2, f"rerank: {rerank.text}")
tokens = http.post("/tokenize", json={"model": alias, "prompt": "three small words"})
check(tokens.status_code == 200 and tokens.json()["count"] > 0, f"tokenize: {tokens.text}")
text = http.post("/detokenize", json={"model": alias, "tokens": tokens.json()["tokens"]})
check(text.status_code == 200 and "prompt" in text.json(), f"detokenize: {text.text}")
missing = http.post("/v1/audio/transcriptions", json={"model": alias})
check(missing.status_code == 404 and missing.json()["error"]["code"] == "not_found",
      f"unknown path: {missing.status_code} {missing.text}")
print(json.dumps({"ok": True}))
