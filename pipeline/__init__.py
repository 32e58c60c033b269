"""The Beam job: read prompt shards -> tokenize -> batch -> generate -> detokenize -> write.
Knows the engine only through model's public API."""

import logging

# Workaround: Beam's BigQuery client module logs this on the root logger when it is imported without
# the optional apitools package, which the job never uses (it reads and writes files, not tables).
logging.getLogger().addFilter(lambda record: not record.getMessage().startswith("apitools not found"))

from pipeline import openai_batch  # noqa: E402,F401  (registers the OpenAI Batch format with records)
