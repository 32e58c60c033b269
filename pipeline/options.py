"""Every flag of the job, in one PipelineOptions subclass."""

from __future__ import annotations

from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.formats import FORMATS

# Runs offline: the DirectRunner would first try the Prism runner, which downloads a binary.
DEFAULT_RUNNER = "apache_beam.runners.portability.fn_api_runner.FnApiRunner"

# Flags that do not change what a shard's output holds: a rerun may change them and still resume.
# Every other JobOptions flag is part of the configuration hash in each shard's completion marker.
NOT_IN_CONFIG = frozenset({"input", "output", "overwrite", "shards_per_pass", "limit", "progress_interval_s",
                           "batch_tokens", "share_model", "verbose"})


class JobOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--input", required=True,
                            help="glob of prompt shards, local or gs:// (e.g. 'gs://b/prompts/*.jsonl')")
        parser.add_argument("--output", required=True, help="output directory, local or gs://")
        parser.add_argument("--model", default="demo",
                            help="'demo', a checkpoint directory (local or gs://), or configs/models/X.yaml")
        parser.add_argument("--format", default="auto", choices=list(FORMATS),
                            help="input format; auto: .jsonl/.json -> jsonl (openai if the first record has "
                                 "custom_id and body), .parquet, .tfrecord/.tfrec -> tfrecord, else text")
        parser.add_argument("--prompt_column", default="prompt", help="Parquet: the column holding the prompt")
        parser.add_argument("--id_column", default="id",
                            help="Parquet: the column holding the record id (absent: '<shard>:<row>')")
        parser.add_argument("--prompt_feature", default="prompt",
                            help="TFRecord: the tf.train.Example bytes feature holding the prompt")
        parser.add_argument("--id_feature", default="id",
                            help="TFRecord: the feature holding the record id (absent: '<shard>:<record>')")
        parser.add_argument("--max_tokens", type=int, default=64, help="default completion length per record")
        parser.add_argument("--temperature", type=float, default=0.0, help="default temperature (0 = greedy)")
        parser.add_argument("--top_p", type=float, default=1.0, help="default top_p")
        parser.add_argument("--top_k", type=int, default=0, help="default top_k (0 = off)")
        parser.add_argument("--batch_tokens", type=int, default=None,
                            help="token budget of one Beam batch (prompt + max_tokens, summed); default: "
                                 "2 x max_slots x max_len, two full loads of the engine's slots")
        parser.add_argument("--max_slots", type=int, default=None, help="override the model config's max_slots")
        parser.add_argument("--max_len", type=int, default=None, help="override the model config's max_len")
        parser.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                            help="override the model config's dtype")
        parser.add_argument("--share_model", default="auto", choices=["auto", "true", "false"],
                            help="one engine per machine across SDK processes (auto: on accelerators)")
        # resume, limits and progress (see io.py and the README's "Resume" section)
        parser.add_argument("--overwrite", action="store_true",
                            help="redo every shard, even complete ones written with another configuration")
        parser.add_argument("--shards_per_pass", type=int, default=0,
                            help="run the pending shards in pipelines of N shards each, so that a long "
                                 "local job checkpoints every N shards (0: all in one pipeline)")
        parser.add_argument("--limit", type=int, default=None,
                            help="process only the first N records (shard order, then line order)")
        parser.add_argument("--max_record_bytes", type=int, default=1 << 20,
                            help="a longer input line becomes a record_too_large error, unread")
        parser.add_argument("--progress_interval_s", type=float, default=30.0,
                            help="seconds between progress lines (INFO, logger 'pipeline')")
        parser.add_argument("--verbose", action="store_true",
                            help="with a fatal error, print its traceback too (pipeline.run prints one line)")
