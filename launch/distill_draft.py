"""Distils a small draft model for speculative decoding from a target checkpoint (the demo's by default).

The draft is a `model.decoder` model several times smaller than the target, with the target's
vocabulary, special ids, rotary settings and context, trained with optax so that its next-token
distribution matches the target's:
  --loss kl  KL(target || draft) over the vocabulary at every position, the target's logits
             computed on the fly by its jitted forward (frozen, no gradient);
  --loss ce  plain next-token cross-entropy on the text (the baseline the distillation is
             measured against).
The draft's tied embedding starts as the target's, projected onto its top singular directions
(--init target; --init random starts from init_params alone). Everything else is
launch/train_demo.py's: the same text (Jargon File + KJV, every 20th chunk held out), encoded
with the target's own tokenizer.model; the same batches (16 random 256-token windows), AdamW
schedule and export (`model.weights.save_params`, float32, HF layout, plus the
target's tokenizer.model), so the draft loads in `Engine.from_pretrained` and in transformers.

Run (needs `apt-get install jargon-text bible-kjv-text`, like train_demo):
  PYTHONPATH=. python launch/distill_draft.py --steps 600 --eval_every 200      # model/assets/demo-draft
  PYTHONPATH=. python launch/distill_draft.py --steps 600 --loss ce --out /tmp/draft-ce   # the baseline
  PYTHONPATH=. python launch/distill_draft.py --minutes 20 --out /tmp/draft     # steps from a time budget
With --minutes the step count follows from timing a few steps, and is logged; --steps N reruns
the same schedule exactly (the run is deterministic given --seed and the step count).
launch/bench_draft.py measures how many of a draft's proposals the target accepts.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from typing import Any, Callable

import model  # noqa: E402,F401  (first: its start-up defaults must precede jax's import)
import jax
import jax.numpy as jnp
import numpy as np
import optax
import sentencepiece as spm

from launch import train_demo as demo
from model.config import ModelConfig
from model.decoder import Decoder
from model.params import init_params
from model.sharding import make_mesh
from model.speculative import check_draft
from model.weights import load_params, read_hf_config

LOSSES = ("kl", "ce")
INITS = ("random", "target")


@dataclasses.dataclass(frozen=True)
class DraftShape:
    """The draft's own dimensions; everything else comes from the target's config."""

    layers: int = 2
    hidden: int = 128
    heads: int = 2
    kv_heads: int = 1
    ffw: int = 352


def draft_config(target: ModelConfig, shape: DraftShape) -> ModelConfig:
    """The target's config with the draft's dimensions: same vocabulary, special ids, rotary
    settings and context, so that both read the same token ids at the same positions."""
    if shape.hidden % shape.heads:
        raise ValueError(f"draft hidden={shape.hidden} is not a multiple of heads={shape.heads}")
    return dataclasses.replace(target, num_layers=shape.layers, hidden_size=shape.hidden,
                               num_heads=shape.heads, num_kv_heads=shape.kv_heads,
                               head_dim=shape.hidden // shape.heads, intermediate_size=shape.ffw)


def projected_embeddings(params: dict[str, Any], cfg: ModelConfig, target_params: dict[str, Any]) -> dict[str, Any]:
    """params with the embedding (and an untied head) replaced by the target's, projected onto
    their top cfg.hidden_size singular directions: the draft starts from the target's view of
    which tokens are alike instead of from noise."""
    out, d = dict(params), cfg.hidden_size
    for name, rows_are_tokens in (("embed", True), ("lm_head", False)):
        if name not in params:
            continue
        w = np.asarray(target_params[name], np.float64)
        w = w if rows_are_tokens else w.T  # [vocab, target width]
        _, _, vt = np.linalg.svd(w, full_matrices=False)
        projected = (w @ vt[:d].T).astype(np.float32)  # [vocab, d]
        out[name] = jnp.asarray(projected if rows_are_tokens else projected.T)
    return out


def load_target(path: str) -> tuple[ModelConfig, dict[str, Any]]:
    """(config, float32 params on one device) of a checkpoint directory."""
    cfg = ModelConfig.from_hf_config(read_hf_config(path))
    return cfg, load_params(path, cfg, np.float32, make_mesh((1, 1)))


def logits_of(params: dict[str, Any], cfg: ModelConfig, tokens_bt: jax.Array) -> jax.Array:
    """Float32 next-token logits [b, t, v] of a full causal forward from position 0."""
    model = Decoder(cfg, params)
    b, t = tokens_bt.shape
    return model.head(model.forward(tokens_bt, jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))))


def kl_per_token(target_logits_btv: jax.Array, draft_logits_btv: jax.Array) -> jax.Array:
    """KL(target || draft) in nats at each position [b, t]."""
    log_p = jax.nn.log_softmax(target_logits_btv, axis=-1)
    log_q = jax.nn.log_softmax(draft_logits_btv, axis=-1)
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def kl_loss(params, cfg: ModelConfig, target_params, target_cfg: ModelConfig, windows_bt: jax.Array) -> jax.Array:
    """Mean KL(target || draft) over the windows' input positions [b, t + 1] (the last token is
    only a label, as in train_demo.loss_fn, so both losses see the same positions)."""
    inputs = windows_bt[:, :-1]
    target = jax.lax.stop_gradient(logits_of(target_params, target_cfg, inputs))
    return kl_per_token(target, logits_of(params, cfg, inputs)).mean()


def ce_loss(params, cfg: ModelConfig, target_params, target_cfg: ModelConfig, windows_bt: jax.Array) -> jax.Array:
    del target_params, target_cfg  # the baseline never looks at the target
    return demo.loss_fn(params, cfg, windows_bt)


LOSS_FNS = {"kl": kl_loss, "ce": ce_loss}


def make_step(cfg: ModelConfig, target_cfg: ModelConfig, opt: optax.GradientTransformation,
              loss: str) -> Callable:
    """Jitted (params, opt_state, target_params, windows) -> (params, opt_state, loss). The
    target's weights are an argument, not a constant folded into the program."""
    loss_fn = LOSS_FNS[loss]

    def update(params, opt_state, target_params, windows):
        value, grads = jax.value_and_grad(loss_fn)(params, cfg, target_params, target_cfg, windows)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return jax.jit(update, donate_argnums=(0, 1))


def make_eval(cfg: ModelConfig, target_cfg: ModelConfig) -> Callable:
    """Jitted (params, target_params, windows) -> (KL to the target, draft CE, target CE), means in nats."""
    def evaluate(params, target_params, windows):
        inputs, labels = windows[:, :-1], windows[:, 1:]
        p, q = logits_of(target_params, target_cfg, inputs), logits_of(params, cfg, inputs)
        ce = lambda lg: optax.softmax_cross_entropy_with_integer_labels(lg, labels).mean()  # noqa: E731
        return kl_per_token(p, q).mean(), ce(q), ce(p)
    return jax.jit(evaluate)


def evaluate(eval_fn: Callable, params, target_params, windows: np.ndarray) -> dict[str, float]:
    """Means over `windows`, in batches of train_demo.BATCH."""
    rows = [eval_fn(params, target_params, windows[i: i + demo.BATCH]) for i in range(0, len(windows), demo.BATCH)]
    kl, ce, target_ce = (float(np.mean(col)) for col in zip(*jax.device_get(rows)))
    return dict(kl=kl, ce=ce, target_ce=target_ce)


def distill(target_cfg: ModelConfig, target_params, cfg: ModelConfig, stream: np.ndarray, steps: int,
            loss: str = "kl", lr: float = 3e-3, seed: int = 0, init: str = "random",
            on_step: Callable | None = None) -> dict[str, Any]:
    """Trains a draft of config `cfg` for `steps` batches of random windows of `stream`; returns its
    params. init "target": the embedding starts as the target's, projected (projected_embeddings).
    on_step(step, params, loss) is called after each step (the loss is a device array)."""
    check_draft(cfg, target_cfg)
    if loss not in LOSS_FNS:
        raise ValueError(f"loss={loss!r}; expected one of {LOSSES}")
    if init not in INITS:
        raise ValueError(f"init={init!r}; expected one of {INITS}")
    params = init_params(cfg, jax.random.key(seed), jnp.float32)
    if init == "target":
        params = projected_embeddings(params, cfg, target_params)
    opt = demo.make_optimizer(cfg, steps, lr)
    step_fn = make_step(cfg, target_cfg, opt, loss)
    opt_state, rng = opt.init(params), np.random.default_rng(seed)
    for step in range(1, steps + 1):
        params, opt_state, value = step_fn(params, opt_state, target_params, demo.sample_windows(stream, rng))
        if on_step:
            on_step(step, params, value)
    return params


def steps_for_budget(cfg: ModelConfig, target_cfg: ModelConfig, target_params, stream: np.ndarray, loss: str,
                     minutes: float, lr: float, eval_s: float) -> tuple[int, float]:
    """(steps that fit `minutes` less `eval_s` of evaluation, seconds per step), from timing 3
    steps after compiling, on a throwaway optimizer and draft."""
    params = init_params(cfg, jax.random.key(1), jnp.float32)
    opt = demo.make_optimizer(cfg, 100, lr)
    step = make_step(cfg, target_cfg, opt, loss)
    rng = np.random.default_rng(1)
    params, state, value = step(params, opt.init(params), target_params, demo.sample_windows(stream, rng))
    jax.block_until_ready(value)
    t0 = time.time()
    for _ in range(3):
        params, state, value = step(params, state, target_params, demo.sample_windows(stream, rng))
    jax.block_until_ready(value)
    step_s = (time.time() - t0) / 3
    return max(10, int((minutes * 60 - eval_s) / step_s * 0.95)), step_s


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", default="model/assets/demo", help="target checkpoint directory")
    p.add_argument("--out", default="model/assets/demo-draft", help="export directory")
    p.add_argument("--loss", choices=LOSSES, default="kl")
    p.add_argument("--minutes", type=float, default=20.0, help="wall-clock budget for training steps")
    p.add_argument("--steps", type=int, default=None, help="exact step count (else from --minutes)")
    p.add_argument("--init", choices=INITS, default="target",
                   help="target: start from the target's embedding, projected to the draft's width; "
                        "random: from init_params alone")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval_windows", type=int, default=128, help="held-out windows for the final evaluation")
    p.add_argument("--eval_every", type=int, default=0, help="steps between held-out evaluations (0: end only)")
    defaults = DraftShape()
    for field in dataclasses.fields(DraftShape):
        p.add_argument(f"--{field.name}", type=int, default=getattr(defaults, field.name), help="draft shape")
    args = p.parse_args(argv)
    t_start = time.time()
    log = lambda msg: print(f"[{time.time() - t_start:7.0f}s] {msg}", flush=True)  # noqa: E731

    target_cfg, target_params = load_target(args.target)
    shape = DraftShape(args.layers, args.hidden, args.heads, args.kv_heads, args.ffw)
    cfg = draft_config(target_cfg, shape)
    tok_path = os.path.join(args.target, "tokenizer.model")
    sp = spm.SentencePieceProcessor(model_file=tok_path)
    if sp.get_piece_size() != target_cfg.vocab_size:
        raise ValueError(f"{tok_path} has {sp.get_piece_size()} pieces; the target's vocabulary has "
                         f"{target_cfg.vocab_size} tokens")
    train_text, heldout_text, _ = demo.split_data()
    train, heldout = demo.token_stream(sp, train_text), demo.token_stream(sp, heldout_text)
    heldout_w = demo.eval_windows(heldout, args.eval_windows)
    log(f"data: {len(train) / 1e6:.2f}M train / {len(heldout) / 1e3:.1f}K held-out tokens; "
        f"target {target_cfg.num_params / 1e6:.2f}M params, draft {cfg.num_params / 1e6:.3f}M "
        f"({target_cfg.num_params / cfg.num_params:.1f}x fewer), loss {args.loss}")

    eval_fn = make_eval(cfg, target_cfg)
    evals = 1 + (args.steps or 0) // args.eval_every if args.eval_every else 1
    t0 = time.time()
    evaluate(eval_fn, init_params(cfg, jax.random.key(1), jnp.float32), target_params, heldout_w[: demo.BATCH])
    eval_s = (time.time() - t0) * len(heldout_w) / demo.BATCH * evals
    if args.steps:
        steps = args.steps
    else:
        steps, step_s = steps_for_budget(cfg, target_cfg, target_params, train, args.loss, args.minutes,
                                         args.lr, eval_s)
        log(f"{step_s:.2f} s/step: {steps} steps fit {args.minutes} min; rerun with --steps {steps} "
            f"for the same schedule")

    history, running, t_train = [], [], time.time()

    def on_step(step, params, value):
        running.append(value)
        if step == steps or (args.eval_every and step % args.eval_every == 0):
            record = dict(step=step, tokens=step * demo.BATCH * demo.SEQ,
                          train_batch_loss=float(np.mean(jax.device_get(running))),
                          train_minutes=round((time.time() - t_train) / 60, 2),
                          heldout=evaluate(eval_fn, params, target_params, heldout_w))
            running.clear()
            history.append(record)
            h = record["heldout"]
            log(f"step {step}/{steps}  batch {args.loss} {record['train_batch_loss']:.3f}  held-out: "
                f"KL {h['kl']:.3f}  draft CE {h['ce']:.3f}  target CE {h['target_ce']:.3f}")

    params = distill(target_cfg, target_params, cfg, train, steps, args.loss, args.lr, args.seed, args.init, on_step)
    flags = " ".join(f"--{k} {v}" for k, v in vars(args).items() if k not in ("minutes", "steps"))
    summary = dict(command=f"PYTHONPATH=. python launch/distill_draft.py {flags} --steps {steps}",
                   target=args.target, loss=args.loss, init=args.init, steps=steps, batch=demo.BATCH,
                   seq=demo.SEQ, lr=args.lr, seed=args.seed, shape=dataclasses.asdict(shape),
                   params=cfg.num_params, target_params=target_cfg.num_params,
                   heldout_windows=len(heldout_w), wall_minutes=round((time.time() - t_start) / 60, 2),
                   history=history)
    demo.export(args.out, cfg, params, tok_path, summary)
    log(f"exported {args.out}")


if __name__ == "__main__":
    main()
