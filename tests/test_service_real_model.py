"""The one end-to-end test on the real bundled model: a compacted document answers like the full document.

Same path as production: the API process, a worker process with the bundled Qwen2.5-Coder-0.5B, embedded Redis,
the official client. The full-context answer is an ordinary chat with the document inline, which renders to the
same tokens as the compacted prefix followed by the question.
"""

from __future__ import annotations

import pytest

from tests.service_helpers import Service

NEEDLE = "7-4-1-9"
DOCUMENT = (
    "Harbor maintenance log, week 12. The north pier lights were replaced on Monday. A storm on Tuesday flooded "
    "the boat shed, and the pumps ran through the night. On Wednesday the crew repainted the lighthouse railings. "
    f"Important: the secret code for the supply locker is {NEEDLE}. The locker stands behind the oil room. "
    "On Thursday the ferry schedule changed to three crossings a day. Friday was quiet; the keeper wrote letters."
)
QUESTION = "What is the secret code for the supply locker? Answer with the code only."


@pytest.mark.real_model
def test_compacted_answer_equals_full_context_answer(tmp_path):
    """Keep 60% of the document's slots (at 50% this 122-token document loses a digit of the code, in the core
    alone as through the service)."""
    service = Service(tmp_path, {"KVC_MODEL": "bundled"})
    try:
        service.start(workers=1)
        client = service.client(max_retries=0, timeout=600)
        model = client.models.list().data[0].id
        compaction = client.post("/compact", body={"model": "bundled", "input": DOCUMENT, "keep_ratio": 0.6},
                                 cast_to=dict)
        assert compaction["status"] == "completed" and compaction["model"] == model
        compacted = client.chat.completions.create(
            model=model, temperature=0, max_tokens=12, messages=[{"role": "user", "content": QUESTION}],
            extra_body={"compaction": {"encrypted_content": compaction["encrypted_content"]}})
        full = client.chat.completions.create(
            model=model, temperature=0, max_tokens=12,
            messages=[{"role": "user", "content": DOCUMENT}, {"role": "user", "content": QUESTION}])
    finally:
        service.close()
    assert NEEDLE in full.choices[0].message.content
    assert compacted.choices[0].message.content == full.choices[0].message.content
    assert compacted.usage.prompt_tokens == full.usage.prompt_tokens
    assert compacted.usage.prompt_tokens_details.cached_tokens == compaction["usage"]["input_tokens"]
