"""The Beam job: read prompt shards -> tokenize -> batch -> generate -> detokenize -> write.
Knows the engine only through model's public API."""
