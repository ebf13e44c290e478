"""The official OpenAI Python SDK against an edge that refuses with 429:
the SDK's own retry waits as `Retry-After` says and then succeeds. Run by
tests/sdk.rs with EDGE_URL, EDGE_METRICS_URL, API_KEY (a key limited to
LIMIT requests per minute) and MODEL. Exits non-zero, with the reason, when an expectation
fails; prints one JSON line with what happened."""

import json
import os
import sys
import time

import httpx
import openai

edge, key, model = os.environ["EDGE_URL"], os.environ["API_KEY"], os.environ["MODEL"]
metrics_url = os.environ["EDGE_METRICS_URL"]
limit = int(os.environ["LIMIT"])
messages = [{"role": "user", "content": "hi"}]


def check(condition, what):
    if not condition:
        sys.exit(f"FAILED: {what}")


def refusals():
    """429s the edge has answered, from its metrics."""
    text = httpx.get(metrics_url, timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("infermesh_edge_rate_limited_total{"))


http = httpx.Client(base_url=edge, headers={"Authorization": f"Bearer {key}"}, timeout=30)
client = openai.OpenAI(base_url=f"{edge}/v1", api_key=key, max_retries=3, timeout=30)
# Until the SDK's first attempt meets a refusal (a share-out can refill the
# edge between the spending and the SDK's call): spend the key's requests
# over plain HTTP until the edge refuses, then call through the SDK.
for attempt in range(10):
    refused = None
    for _ in range(limit * 2):
        reply = http.post("/v1/chat/completions",
                          json={"model": model, "messages": messages, "max_tokens": 1})
        if reply.status_code == 429:
            refused = reply
            break
        check(reply.status_code == 200, f"{reply.status_code} {reply.text}")
    check(refused is not None, f"no 429 within {limit * 2} requests")
    retry_after = float(refused.headers["retry-after"])
    check(0 < retry_after <= 60, f"Retry-After {retry_after}")
    before = refusals()
    started = time.monotonic()
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=1)
    took = time.monotonic() - started
    check(reply.choices, f"{reply}")
    if refusals() > before:
        # Refused at first, then served after the wait the header asked for.
        check(took >= retry_after * 0.8,
              f"the SDK waited {took:.2f}s for a Retry-After of {retry_after}s")
        print(json.dumps({"ok": True, "retry_after": retry_after,
                          "waited_seconds": round(took, 2), "attempt": attempt}))
        sys.exit(0)
sys.exit("FAILED: the SDK's first attempt was never refused")
