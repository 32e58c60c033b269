"""Trains the small Llama-shaped demo model shipped in model/assets/demo/, from public-domain text.

What it does, in order (every step seeded and deterministic):
  1. data:      the Jargon File 4.4.7 (Debian `jargon-text`) and the King James Bible (Debian
                `bible-kjv-text`, read with its `bible` program), lightly cleaned into paragraphs,
                cut into ~2 KB chunks; every 20th chunk of each source is held out.
  2. tokenizer: SentencePiece BPE, 4096 pieces, byte fallback (any UTF-8 round-trips),
                pad/bos/eos/unk = 0/1/2/3, trained on the training chunks only.
  3. model:     `model.decoder` weights (`init_params`) and forward (`Decoder.forward` + `.head`),
                so the trained weights are exactly the engine's; next-token cross-entropy,
                AdamW with linear warmup and cosine decay, batches of random 256-token windows.
  4. export:    every --export_minutes and at the end, `model.weights.save_params` (HF layout,
                float32) + tokenizer.model into --out, loadable by `Engine.from_pretrained` and
                by HF transformers alike.

Losses are in nats per token. The unigram baseline is the cross-entropy of the held-out tokens
under the training tokens' unigram frequencies.

Run (needs `apt-get install jargon-text bible-kjv-text`):
  PYTHONPATH=. python launch/train_demo.py --minutes 65 --out model/assets/demo
  PYTHONPATH=. python launch/train_demo.py --quick --out /tmp/demo_quick      # 1-minute smoke run
The step count is derived from the time budget after timing a few steps and is logged; pass
--steps N to rerun the same schedule exactly, whatever the machine's speed.

Speed (2 AMD EPYC cores with AVX-512, jax 0.10.2, float32, batch 16 x 256, 5.5M params; other
jobs shared the cores, so numbers are +-15%): ~2,100-2,450 tokens/s, 80-92 GFLOP/s counting
6 * params * tokens plus full (unmasked) attention; an isolated f32 matmul of these shapes runs
at ~185. Tried with short runs: batch 8 x 256 (~45 GFLOP/s), 32 x 256 and 64 x 128 (no faster
than 16 x 256), 16 x 512 (attention grows); XLA CPU flags (thunk runtime off, oneDNN, XNNPACK,
YNN fusion types, fast math) and unrolling the layer scan changed < 5%, within noise; 4 heads of
64 beat 8 heads of 32 by ~10-15% (the attention einsums contract over head_dim). bfloat16
weights were ~15% faster but the decoder's projections then run bf16-in/bf16-out (an isolated
bf16 matmul is 2x faster only with float32 output), so training stays float32.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import re
import shutil
import subprocess
import time

import model  # noqa: E402,F401  (first: its start-up defaults must precede jax's import)
import jax
import jax.numpy as jnp
import numpy as np
import optax
import sentencepiece as spm

from model.config import ModelConfig
from model.decoder import Decoder
from model.params import init_params, param_specs
from model.weights import save_params

JARGON_TXT = "/usr/share/doc/jargon-text/jargon.txt.gz"
KJV_RANGE = "Gen1:1-Rev22:21"
CHUNK_CHARS, HELDOUT_EVERY = 2000, 20
VOCAB, SEQ, BATCH, SEED = 4096, 256, 16, 0


# ---------------------------------------------------------------- data

def _plain(text: str) -> str:
    """ASCII quotes and dashes, so prompts typed on a keyboard look like the training text."""
    for a, b in (("\u201c", '"'), ("\u201d", '"'), ("\u2018", "'"), ("\u2019", "'"), ("\u2014", "--"),
                 ("\u00a0", " ")):
        text = text.replace(a, b)
    return text


def jargon_paragraphs() -> list[list[str]]:
    """The Jargon File's prose: one unit per paragraph, lines unwrapped, {cross-ref} braces removed.
    Starts at the second 'Welcome to the Jargon File' (the first is in the table of contents);
    drops tables and diagrams (anything drawn with box characters)."""
    with gzip.open(JARGON_TXT, "rt", encoding="utf-8") as f:
        text = f.read()
    start = text.index("Welcome to the Jargon File", text.index("Welcome to the Jargon File") + 1)
    paragraphs = []
    for block in re.split(r"\n\s*\n", text[start:]):
        if re.search("[\u2500-\u257f]", block):
            continue
        para = _plain(" ".join(block.split())).replace("{", "").replace("}", "")
        if para:
            paragraphs.append([para])
    return paragraphs


def kjv_paragraphs() -> list[list[str]]:
    """The King James Bible: one paragraph per chapter, its verses (numbers stripped) as units."""
    out = subprocess.run(["bible", "-f", KJV_RANGE], check=True, capture_output=True, text=True).stdout
    chapters: dict[str, list[str]] = {}
    for line in out.splitlines():
        m = re.match(r"(\w+?\d+):\d+ (.*)", line)  # "1Cor13:4 Charity suffereth long, ..."
        if m:
            chapters.setdefault(m.group(1), []).append(" ".join(m.group(2).split()))
    return list(chapters.values())


def chunks(paragraphs: list[list[str]]) -> list[str]:
    """~CHUNK_CHARS pieces of running text: units of a paragraph joined by spaces, paragraphs by
    newlines; a chunk closes after the unit that takes it past CHUNK_CHARS."""
    out, cur, size = [], [], 0
    for para in paragraphs:
        line = []
        for unit in para:
            line.append(unit)
            size += len(unit) + 1
            if size >= CHUNK_CHARS:
                out.append("\n".join(cur + [" ".join(line)]))
                cur, line, size = [], [], 0
        if line:
            cur.append(" ".join(line))
    if cur:
        out.append("\n".join(cur))
    return out


def split_data() -> tuple[list[str], list[str], list[str]]:
    """(train chunks, held-out chunks, tokenizer training units); every HELDOUT_EVERY-th chunk
    of each source is held out."""
    train, heldout, units = [], [], []
    for paragraphs in (jargon_paragraphs(), kjv_paragraphs()):
        for i, chunk in enumerate(chunks(paragraphs)):
            (heldout if i % HELDOUT_EVERY == HELDOUT_EVERY - 1 else train).append(chunk)
    for chunk in train:
        units.extend(chunk.split("\n"))
    return train, heldout, units


def train_tokenizer(units: list[str], path: str) -> spm.SentencePieceProcessor:
    """BPE like Llama's SentencePiece models: identity normalization (text kept as is, newlines
    included, through byte fallback), digits split, every input sentence used (no sampling).
    Written through model_writer so the file does not record a local path: reruns are
    byte-identical."""
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(units), model_writer=proto, model_type="bpe",
        vocab_size=VOCAB, character_coverage=0.9999, byte_fallback=True, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, input_sentence_size=0, max_sentence_length=1 << 16,
        num_threads=1, minloglevel=2)
    with open(path, "wb") as f:
        f.write(proto.getvalue())
    return spm.SentencePieceProcessor(model_file=path)


def token_stream(sp: spm.SentencePieceProcessor, texts: list[str]) -> np.ndarray:
    """All chunks as one int32 stream, each chunk led by BOS (prompts are encoded the same way)."""
    return np.concatenate([np.asarray([sp.bos_id()] + ids, np.int32) for ids in sp.encode(texts)])


def unigram_baseline(train: np.ndarray, heldout: np.ndarray) -> float:
    """Held-out cross-entropy (nats/token) under add-one-smoothed training unigram frequencies."""
    counts = np.bincount(train, minlength=VOCAB) + 1.0
    return float(-np.mean(np.log(counts / counts.sum())[heldout]))


# ---------------------------------------------------------------- model and training

def demo_config() -> ModelConfig:
    """~5.5M parameters, 22 MB in float32; the context is the training window."""
    return ModelConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=704, num_layers=6,
                       num_heads=4, num_kv_heads=2, head_dim=64, rms_norm_eps=1e-5, rope_theta=10000.0,
                       max_position_embeddings=SEQ, tie_word_embeddings=True, bos_token_id=1,
                       eos_token_ids=(2,), pad_token_id=0, architecture="LlamaForCausalLM")


def loss_fn(params: dict[str, jax.Array], cfg: ModelConfig, windows_bt: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy over windows [b, t + 1], in nats."""
    model = Decoder(cfg, params)
    inputs, targets = windows_bt[:, :-1], windows_bt[:, 1:]
    b, t = inputs.shape
    x = model.forward(inputs, jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)))
    return optax.softmax_cross_entropy_with_integer_labels(model.head(x), targets).mean()


def make_optimizer(cfg: ModelConfig, steps: int, peak_lr: float) -> optax.GradientTransformation:
    """AdamW (no decay on norms), global-norm clipping, warmup then cosine to peak_lr / 10."""
    warmup = min(200, steps // 10)
    schedule = optax.warmup_cosine_decay_schedule(0.0, peak_lr, warmup, max(steps, warmup + 1),
                                                  end_value=peak_lr / 10)
    decay_mask = {name: spec.init == "normal" for name, spec in param_specs(cfg).items()}
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.1, mask=decay_mask))


def sample_windows(stream: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    starts = rng.integers(0, len(stream) - SEQ - 1, BATCH)
    return np.stack([stream[s: s + SEQ + 1] for s in starts])


def eval_windows(stream: np.ndarray, limit: int) -> np.ndarray:
    """Up to `limit` windows (a multiple of BATCH) spread evenly over the stream, not overlapping."""
    n = min(limit, (len(stream) - 1) // SEQ) // BATCH * BATCH
    starts = np.linspace(0, len(stream) - SEQ - 1, n).astype(np.int64)
    return np.stack([stream[s: s + SEQ + 1] for s in starts])


def export(out: str, cfg: ModelConfig, params, tokenizer_path: str, summary: dict) -> None:
    save_params(out, cfg, params, dtype=np.float32)
    shutil.copyfile(tokenizer_path, os.path.join(out, "tokenizer.model"))
    with open(os.path.join(out, "training_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=65.0, help="wall-clock budget for training steps")
    p.add_argument("--steps", type=int, default=None, help="exact step count (else from --minutes)")
    p.add_argument("--out", default="model/assets/demo", help="export directory")
    p.add_argument("--work", default="/tmp/train_demo", help="tokenizer.model is written here")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--export_minutes", type=float, default=10.0)
    p.add_argument("--eval_minutes", type=float, default=5.0)
    p.add_argument("--quick", action="store_true", help="1-minute smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.minutes, args.eval_minutes, args.export_minutes = 1.0, 0.5, 1.0
    os.makedirs(args.work, exist_ok=True)
    t_start = time.time()
    log = lambda msg: print(f"[{time.time() - t_start:7.0f}s] {msg}", flush=True)  # noqa: E731

    train_text, heldout_text, units = split_data()
    tok_path = os.path.join(args.work, "tokenizer.model")
    sp = train_tokenizer(units, tok_path)
    train, heldout = token_stream(sp, train_text), token_stream(sp, heldout_text)
    baseline = unigram_baseline(train, heldout)
    log(f"data: {len(train_text)} train / {len(heldout_text)} held-out chunks, "
        f"{sum(map(len, train_text)) / 1e6:.2f}M / {sum(map(len, heldout_text)) / 1e6:.2f}M chars, "
        f"{len(train) / 1e6:.2f}M / {len(heldout) / 1e6:.3f}M tokens; unigram baseline {baseline:.3f} nats")

    cfg = demo_config()
    params = init_params(cfg, jax.random.key(SEED), jnp.float32)
    flops_per_token = 6 * cfg.num_params + 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * SEQ
    log(f"model: {cfg.num_params / 1e6:.2f}M params, {flops_per_token / 1e6:.1f} MFLOP/token (train)")
    heldout_w = eval_windows(heldout, 512 if not args.quick else 32)
    train_w = eval_windows(train, len(heldout_w))
    eval_loss = jax.jit(lambda prm, w: loss_fn(prm, cfg, w))

    def evaluate(prm, windows):
        return float(np.mean([eval_loss(prm, windows[i: i + BATCH]) for i in range(0, len(windows), BATCH)]))

    steps = args.steps or steps_for_budget(cfg, params, train, args.minutes, args.lr,
                                           eval_batches=2 * len(heldout_w) // BATCH,
                                           evals=args.minutes / args.eval_minutes, log=log)
    rng = np.random.default_rng(SEED)
    opt = make_optimizer(cfg, steps, args.lr)
    step_fn = jax.jit(lambda prm, st, w: _update(prm, st, w, cfg, opt), donate_argnums=(0, 1))
    opt_state = opt.init(params)
    summary = dict(steps=steps, batch=BATCH, seq=SEQ, lr=args.lr, seed=SEED, params=cfg.num_params,
                   train_tokens_in_data=int(len(train)), heldout_tokens_in_data=int(len(heldout)),
                   unigram_baseline=baseline, history=[])
    t_train, last_eval, last_export, running, paused = time.time(), time.time(), time.time(), [], 0.0
    for step in range(1, steps + 1):
        params, opt_state, loss = step_fn(params, opt_state, sample_windows(train, rng))
        running.append(loss)
        if step == steps or time.time() - last_eval > args.eval_minutes * 60:
            batch_loss = float(np.mean(jax.device_get(running)))  # waits for the step to finish
            train_s = time.time() - t_train - paused
            t_eval = time.time()
            record = dict(step=step, tokens=step * BATCH * SEQ, train_minutes=round(train_s / 60, 2),
                          train_batch_loss=batch_loss, train_loss=evaluate(params, train_w),
                          heldout_loss=evaluate(params, heldout_w),
                          tokens_per_s=round(step * BATCH * SEQ / train_s))
            summary["history"].append(record)
            running, last_eval = [], time.time()
            paused += last_eval - t_eval
            log(f"step {step}/{steps}  tokens {record['tokens'] / 1e6:.2f}M  batch loss "
                f"{batch_loss:.3f}  train {record['train_loss']:.3f}  held-out "
                f"{record['heldout_loss']:.3f}  (unigram {baseline:.3f})  {record['tokens_per_s']} tok/s "
                f"{record['tokens_per_s'] * flops_per_token / 1e9:.0f} GFLOP/s")
        if step == steps or time.time() - last_export > args.export_minutes * 60:
            t_export = time.time()
            summary.update(steps_done=step, wall_minutes=round((time.time() - t_train) / 60, 2))
            export(args.out, cfg, params, tok_path, summary)
            last_export = time.time()
            paused += last_export - t_export
            log(f"exported step {step} to {args.out}")


def steps_for_budget(cfg: ModelConfig, params, train: np.ndarray, minutes: float, lr: float,
                     eval_batches: int, evals: float, log) -> int:
    """Steps that fit `minutes`, from timing 3 steps (after compiling) on a throwaway optimizer;
    an eval batch (forward only) is counted as a third of a step."""
    opt = make_optimizer(cfg, 100, lr)
    step = jax.jit(lambda prm, st, w: _update(prm, st, w, cfg, opt))
    rng = np.random.default_rng(SEED + 1)
    jax.block_until_ready(step(params, opt.init(params), sample_windows(train, rng)))
    t0 = time.time()
    for _ in range(3):
        jax.block_until_ready(step(params, opt.init(params), sample_windows(train, rng)))
    step_s = (time.time() - t0) / 3
    steps = max(10, int((minutes * 60 / step_s - evals * eval_batches / 3) * 0.95))
    log(f"{step_s:.2f} s/step ({BATCH * SEQ / step_s:.0f} tokens/s): {steps} steps fit {minutes} min; "
        f"rerun with --steps {steps} for the same schedule")
    return steps


def _update(params, opt_state, windows, cfg: ModelConfig, opt: optax.GradientTransformation):
    loss, grads = jax.value_and_grad(loss_fn)(params, cfg, windows)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


if __name__ == "__main__":
    main()
