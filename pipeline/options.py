"""Every flag of the job, in one PipelineOptions subclass."""

from __future__ import annotations

from apache_beam.options.pipeline_options import PipelineOptions

# Runs offline: the DirectRunner would first try the Prism runner, which downloads a binary.
DEFAULT_RUNNER = "apache_beam.runners.portability.fn_api_runner.FnApiRunner"


class JobOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--input", required=True,
                            help="glob of prompt shards, local or gs:// (e.g. 'gs://b/prompts/*.jsonl')")
        parser.add_argument("--output", required=True, help="output directory, local or gs://")
        parser.add_argument("--model", default="demo",
                            help="'demo', a checkpoint directory (local or gs://), or configs/models/X.yaml")
        parser.add_argument("--format", default="auto", choices=["auto", "jsonl", "text"],
                            help="input format; auto: .jsonl/.json -> jsonl, anything else -> text")
        parser.add_argument("--max_tokens", type=int, default=64, help="default completion length per record")
        parser.add_argument("--temperature", type=float, default=0.0, help="default temperature (0 = greedy)")
        parser.add_argument("--top_p", type=float, default=1.0, help="default top_p")
        parser.add_argument("--top_k", type=int, default=0, help="default top_k (0 = off)")
        parser.add_argument("--batch_tokens", type=int, default=16384,
                            help="token budget of one engine call (prompt + max_tokens, summed)")
        parser.add_argument("--max_slots", type=int, default=None, help="override the model config's max_slots")
        parser.add_argument("--max_len", type=int, default=None, help="override the model config's max_len")
        parser.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                            help="override the model config's dtype")
        parser.add_argument("--share_model", default="auto", choices=["auto", "true", "false"],
                            help="one engine per machine across SDK processes (auto: on accelerators)")
