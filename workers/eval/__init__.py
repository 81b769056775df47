"""Quality evaluation harness (`kvcompact eval`): accuracy and log-perplexity of answers vs compaction ratio.

`datasets`, `prompts` and `scoring` use the standard library only, so the kvpress side script can import them from
its own virtual environment and ask exactly the same questions the same way.
"""
