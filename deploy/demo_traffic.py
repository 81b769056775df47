"""Drive a running kvcompact service with a mix of compactions and chats so every dashboard panel has data.

For trying the stack (`docker compose up -d`, then this against http://localhost:8000/v1) and for the dashboard
previews in docs/. Uses only the official `openai` client, as the service's users do. Each round compacts the
document with one method (in the background, polled), asks about it with and without streaming, and makes one
request that must 404, so the error panels show something too.

    python deploy/demo_traffic.py --base-url http://127.0.0.1:8000/v1 --model tiny-llama --minutes 10
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time

import openai

METHODS = ("am", "am-omp-fast", "truncate", "snapkv", "h2o")
DOCUMENT = ("The lighthouse keeper of Arden Point kept a ledger. He wrote that the supply locker code is 7-4-1-9 and "
            "that the locker stands behind the oil room; the relief boat comes every second Tuesday. ")
QUESTIONS = ("What is the locker code?", "Where is the locker?", "When does the relief boat come?")


def compact(client: openai.OpenAI, body: dict, timeout_s: float = 600.0) -> dict:
    """A background compaction polled to its end, so a slow one never holds an HTTP request open."""
    compaction = client.post("/compact", cast_to=dict, body={**body, "background": True})
    deadline = time.monotonic() + timeout_s
    while compaction["status"] in ("queued", "in_progress") and time.monotonic() < deadline:
        time.sleep(0.5)
        compaction = client.get(f"/compactions/{compaction['id']}", cast_to=dict)
    if compaction["status"] != "completed":
        raise RuntimeError(f"compaction {compaction['id']} ended {compaction['status']}")
    return compaction


def one_round(client: openai.OpenAI, model: str, method: str, keep_ratio: float, repeat: int) -> None:
    compaction = compact(client, {"model": model, "input": DOCUMENT * repeat, "method": method,
                                  "keep_ratio": keep_ratio})
    extra = {"compaction": {"encrypted_content": compaction["encrypted_content"]}}
    for question in QUESTIONS:
        messages = [{"role": "user", "content": question}]
        client.chat.completions.create(model=model, messages=messages, max_tokens=16, extra_body=extra)
        for _ in client.chat.completions.create(model=model, messages=messages, max_tokens=16, stream=True,
                                                extra_body=extra, stream_options={"include_usage": True}):
            pass
    try:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "?"}], max_tokens=4,
                                       extra_body={"compaction": {"encrypted_content": "kvc1.not-a-handle"}})
    except openai.NotFoundError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="none")
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, nargs="+", default=[2, 4, 8],
                        help="document lengths, in copies of the paragraph (small values for CPU-only runs)")
    args = parser.parse_args(argv)
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=600)
    deadline = time.monotonic() + args.minutes * 60
    settings = itertools.cycle(itertools.product(args.repeats, (0.1, 0.25, 0.5), METHODS))  # every method early on
    rounds = 0
    while time.monotonic() < deadline:
        repeat, keep_ratio, method = next(settings)
        try:
            one_round(client, args.model, method, keep_ratio, repeat)
            rounds += 1
        except (openai.APIError, RuntimeError) as error:  # keep going: failures are what error panels show
            print(f"{method} keep_ratio={keep_ratio}: {error}", file=sys.stderr)
    print(f"{rounds} rounds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
