"""Engine: prefill into cache slots, multi-step decode, and the in-flight batching loop.

Two jitted functions do all device work, each compiled once per shape:
  prefill(bucket):  a batch of right-padded prompts, or pieces of prompts, of one length bucket
                    (rows padded to a power of two) -> their KV written into chosen cache slots;
                    for a prompt's last piece its first token sampled and its slot's decode state set;
  decode:           `decode_steps` tokens for every slot at its own position, stop checks on device.
The KV cache and the per-slot decode state are donated to both.

One scheduler loop per engine, on its own thread, drives them: requests submitted from any thread
(`submit`) wait in one queue, a slot is refilled as soon as its sequence finishes (or, when its
length limit ends it within the decode dispatch in flight, right behind that dispatch) while the
other slots keep their place in the cache, and each request's future is resolved when it ends. Prefill
is chunked: while rows decode, each step prefills at most `prefill_chunk` tokens before the next
decode dispatch, and a long prompt goes in pieces over consecutive steps, holding its slot.
`generate` submits and waits. The loop's thread exits when it has nothing to do and starts again
with the next request, so an idle engine holds no thread.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import logging
import math
import os
import statistics
import threading
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.config import MIN_BUCKET, PRESETS, EngineConfig, ModelConfig, buckets_for
from model.constraints import TableManager, TokenAutomaton, advance, compile_constraint, mask_logits
from model.decoder import Decoder, stack_layers
from model.kv_cache import KVCache, StackedKVCache
from model.params import abstract_params, init_params, param_shardings
from model.platform import hot_path
from model.prefix_cache import PrefixCache
from model.quantize import quantize_params
from model.sampling import MAX_TOP_LOGPROBS, SamplingParams, sample, token_logprobs, top_logprobs
from model.sharding import bytes_per_device, make_mesh, named_sharding
from model.speculative import check_draft, draft_propose, ngram_propose, verify
from model.tokenizer import decode_completions, load_tokenizer
from model.weights import load_params, read_hf_config

log = logging.getLogger(__name__)

RUNNING, STOPPED, LENGTH = 0, 1, 2
FINISH_REASONS = {STOPPED: "stop", LENGTH: "length"}
# Checkpoints that ship with the project, by name.
CHECKPOINTS = {name: os.path.join(os.path.dirname(__file__), "assets", name) for name in ("demo", "demo-draft")}


def resolve_checkpoint(name_or_path: str) -> str:
    """The directory of a bundled checkpoint name ("demo"); other names and paths unchanged."""
    return CHECKPOINTS.get(os.fspath(name_or_path), os.fspath(name_or_path))


@dataclasses.dataclass
class GenerationOutput:
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop token, which is included) | "length" (max_new_tokens
    # reached, or prompt + completion reached max_len)
    prompt_len: int = 0
    logprobs: list[float] = dataclasses.field(default_factory=list)  # log p of each generated token
    # under the model's unmodified distribution (before temperature, top-k, top-p and a constraint)
    constraint_satisfied: bool | None = None  # with a constraint: the output is complete (its
    # automaton accepts it); False only when finish_reason is "length". None: no constraint.
    top_logprobs: list[list[tuple[int, float]]] | None = None  # with SamplingParams.top_logprobs = k:
    # per generated token, the k most likely (id, log p) under the model's own distribution, best first
    proposed_tokens: int = 0  # speculative decoding: proposals verified for this sequence
    accepted_tokens: int = 0  # of those, how many it kept


@dataclasses.dataclass
class ScoreOutput:
    """Label scoring: how likely each candidate continuation of a prompt is."""

    scores: list[float]  # log p(candidate | prompt) per candidate, summed over its tokens
    best: int  # the index of the highest score (the first, on ties)
    prompt_len: int = 0


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SlotState:
    """Per-slot decode state, on device. All arrays [slots] except stop_ids [slots, n_stop]."""

    token: jax.Array  # next token to feed (the last one sampled)
    position: jax.Array  # where `token` goes in the cache (= tokens already cached)
    active: jax.Array  # bool: still generating
    generated: jax.Array  # tokens generated so far
    max_new: jax.Array
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    seed: jax.Array
    stop_ids: jax.Array  # -1 pads
    cstate: jax.Array  # a constrained row's automaton state (global, in the engine's table)
    constrained: jax.Array  # bool: the row follows a constraint
    want_top: jax.Array  # bool: the row returns its top logprobs

    @classmethod
    def host(cls, slots: int, n_stop: int) -> "SlotState":
        """Inactive rows as numpy arrays, to be filled on the host (prefill rows) or placed on
        the device as they are (the empty cache's state)."""
        z = lambda dt: np.zeros((slots,), dt)  # noqa: E731
        return cls(token=z(np.int32), position=z(np.int32), active=z(bool), generated=z(np.int32),
                   max_new=np.ones((slots,), np.int32), temperature=z(np.float32), top_k=z(np.int32),
                   top_p=np.ones((slots,), np.float32), seed=z(np.uint32),
                   stop_ids=np.full((slots, n_stop), -1, np.int32), cstate=z(np.int32), constrained=z(bool),
                   want_top=z(bool))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SpecState:
    """Speculative decoding's device state beside the KV cache, donated with it."""

    history: jax.Array  # [slots, max_len]: each slot's tokens so far (prompt lookup reads them)
    draft_cache: Any = None  # the draft model's KV cache (speculative="draft"), kept in step with the cache


def _finish(token: jax.Array, state_like: SlotState, generated: jax.Array, position: jax.Array,
            max_len: int) -> jax.Array:
    """Finish code per row after sampling `token`: STOPPED, LENGTH or RUNNING."""
    stopped = jnp.any(token[:, None] == state_like.stop_ids, axis=-1)
    # `token` would be cached at `position`; prompt + completion may not exceed max_len.
    length = (generated >= state_like.max_new) | (position + 1 >= max_len)
    return jnp.where(stopped, STOPPED, jnp.where(length, LENGTH, RUNNING)).astype(jnp.int32)


class Engine:
    """A decoder with a static KV cache of `max_slots` sequences of up to `max_len` tokens."""

    def __init__(self, cfg: ModelConfig, params: dict[str, jax.Array], mesh: jax.sharding.Mesh,
                 config: EngineConfig | None = None, tokenizer: Any = None, hbm_bytes: int | None = None,
                 cost_model: bool = False, draft: tuple[ModelConfig, dict[str, Any]] | None = None, **overrides: Any):
        """config: how to serve (slots, max_len, scheduler; EngineConfig's defaults if None);
        overrides: EngineConfig fields to change, e.g. max_slots=8. hbm_bytes: memory per device
        for max_slots "auto" (default: what the devices report). cost_model: see HotPath (for
        launch/aot.py only). draft: the draft model's (config, params) for speculative="draft"
        (default: loaded from config.draft, in the weights' dtype)."""
        config = dataclasses.replace(config or EngineConfig(), **overrides)
        self.abstract = all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params))
        self.mesh = mesh
        if config.speculative == "draft" and draft is None:
            draft = self._load_draft(config.draft, params["final_norm"].dtype)
        if config.max_slots == "auto":
            hbm = hbm_bytes or device_memory(mesh)
            config = dataclasses.replace(config, max_slots=slots_that_fit(cfg, config, params, mesh, hbm, draft))
        self.config, self.cfg, self.mesh, self.tokenizer = config, cfg, mesh, tokenizer
        self.max_slots, self.max_len = config.max_slots, config.context_length(cfg)
        self.decode_steps, self.prefill_tokens = config.decode_steps, config.prefill_tokens
        self.batching, self.order = config.batching, config.order
        # prompts batch together by octave (groups); a prefill pads to the hot path's finer buckets
        self.groups = buckets_for(self.max_len)
        self.prefill_chunk = config.prefill_chunk
        # tokens of one piece of a long prompt: the largest group within the chunk (None: whole prompts)
        self.piece_len = max(b for b in self.groups if b <= self.prefill_chunk) if self.prefill_chunk else None
        self.dtype = params["final_norm"].dtype  # activations and cache; weights may be int8
        self.path = dataclasses.replace(hot_path(mesh.devices.flat[0].platform, config.hot_path),
                                        cost_model=cost_model)
        self.buckets = buckets_for(self.max_len, self.path.buckets_per_octave)
        if self.path.stacked_weights:
            params = stack_layers(params, cfg, mesh)
        cache_cls = StackedKVCache if self.path.stacked else KVCache
        # Weights given as ShapeDtypeStructs (Engine.abstract) make the cache and slot state
        # abstract too: the engine then lowers and compiles its functions but cannot run them.
        self.graphdef, self.params = nnx.split(Decoder(cfg, params, mesh, self.path, self.max_len))
        self.draft_cfg, self.draft_graphdef, self.draft_params = None, None, None
        if config.speculative == "draft":
            self.draft_cfg, draft_params = draft
            check_draft(self.draft_cfg, cfg, self.max_len)
            if self.path.stacked_weights:
                draft_params = stack_layers(draft_params, self.draft_cfg, mesh)
            self.draft_graphdef, self.draft_params = nnx.split(Decoder(self.draft_cfg, draft_params, mesh, self.path,
                                                                       self.max_len))
        new_cache = cache_cls.abstract if self.abstract else cache_cls.create
        int8 = config.kv_cache_dtype == "int8"
        self.cache = new_cache(cfg, self.max_slots, self.max_len, self.dtype, mesh, int8=int8)
        # rows of shared-prefix KV, kept apart from the slots (decode would write into them)
        self._new_cache = lambda c, slots: new_cache(c, slots, self.max_len, self.dtype, mesh, int8=int8)  # noqa: E731
        self.prefix_cache = None
        if config.prefix_cache_entries:  # with a draft, its KV rows are stored beside the model's
            store = self._new_cache(cfg, config.prefix_cache_entries)
            if self.draft_cfg is not None:
                store = (store, self._new_cache(self.draft_cfg, config.prefix_cache_entries))
            self.prefix_cache = PrefixCache(store, config.prefix_block)
        self._n_stop = 8
        self._constraints = TableManager(cfg.vocab_size, config.constraint_states, config.constraint_classes,
                                         config.constraint_automata)
        self._table = self._place_table()
        self._cache_sharding = self.cache.shardings(mesh)
        state = SlotState.host(self.max_slots, self._n_stop)
        self.state = self._place_state(jax.tree.map(_abstract, state) if self.abstract else state)
        # Speculative decoding: each row's tokens so far and the draft's KV cache (SpecState),
        # written by prefill and decode beside the cache; None without speculation.
        self.spec_k = config.num_speculative_tokens if config.speculative else 0
        self.spec_steps = max(1, self.decode_steps // 2)  # verify steps per dispatch
        self.spec = self._new_spec()
        self._gate = SpecGate()
        self._prefill = jax.jit(self._prefill_fn, donate_argnums=(1, 2))
        self._first = jax.jit(self._first_fn, donate_argnums=(0, 1))
        self._decode = jax.jit(self._decode_fn, donate_argnums=(1, 2, 3), static_argnums=(5, 6))
        self._verify = jax.jit(self._verify_fn, donate_argnums=(1, 2, 3), static_argnums=(5, 6, 7))
        self._remap = jax.jit(self._remap_fn, donate_argnums=(0,))
        self._forward = jax.jit(self._forward_fn)
        self._score = jax.jit(self._score_fn)
        # The scheduler: `_cond` guards `_incoming` and `_thread`; the rest is the loop's own.
        # `_device` is held while the cache and slot state are in use (the loop's step, warmup).
        self._cond, self._device = threading.Condition(), threading.RLock()
        self._incoming: list[_Sequence] = []
        self._thread: threading.Thread | None = None
        self._arrivals = self._clock = 0  # _clock: decode steps dispatched so far
        self._waiting: list[_Sequence] = []
        self._slot_of: list[_Sequence | None] = [None] * self.max_slots
        self._in_flight: _Dispatch | None = None
        self._stats: collections.Counter = collections.Counter()
        self._stats_lock = threading.Lock()

    # ------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(cls, path_or_preset: str, mesh_shape: Sequence[int] | None = None,
                        dtype: str = "bfloat16", max_slots: int | None = None, max_len: int | None = None,
                        quantize: str | None = None, seed: int = 0, config: EngineConfig | None = None,
                        **engine_kw: Any) -> "Engine":
        """Loads a checkpoint directory (local or gs://, config.json + *.safetensors) or a preset
        name: "demo" (the bundled checkpoint) or a random-weight shape from PRESETS (seeded).
        How it serves: `config` (EngineConfig's defaults if None: 32 slots, max_len min(2048, the
        model's context)), with max_slots, max_len and engine_kw (EngineConfig's fields) on top.
        The checkpoint's tokenizer, if any, becomes `engine.tokenizer`."""
        _check_dtype_and_quantize(dtype, quantize)
        given = {k: v for k, v in (("max_slots", max_slots), ("max_len", max_len)) if v is not None}
        config = dataclasses.replace(config or EngineConfig(), **given, **engine_kw)
        path_or_preset = os.fspath(path_or_preset)
        mesh = make_mesh(mesh_shape)
        jdtype = jnp.dtype(dtype)
        path_or_preset = resolve_checkpoint(path_or_preset)
        tokenizer = None
        if path_or_preset in PRESETS:
            cfg = PRESETS[path_or_preset]
            params = random_params(cfg, jdtype, mesh, seed)
        elif "://" in path_or_preset or os.path.isdir(path_or_preset):
            cfg = ModelConfig.from_hf_config(read_hf_config(path_or_preset))
            params = load_params(path_or_preset, cfg, jdtype, mesh)
            tokenizer = load_tokenizer(path_or_preset)
        else:
            raise ValueError(f"{path_or_preset!r} is neither a checkpoint directory nor a preset; "
                             f"presets: {sorted(PRESETS) + sorted(CHECKPOINTS)}")
        if quantize == "int8":
            params = quantize_params(params, cfg, mesh)
        enable_compilation_cache()
        return cls(cfg, params, mesh, config, tokenizer=tokenizer)

    @classmethod
    def abstract(cls, cfg: ModelConfig, mesh: jax.sharding.Mesh, dtype: str = "bfloat16",
                 quantize: str | None = None, hbm_bytes: int | None = None, cost_model: bool = False,
                 **engine_kw: Any) -> "Engine":
        """An engine whose weights, KV cache and slot state are jax.ShapeDtypeStructs with the
        shardings the real ones get on `mesh`; nothing is allocated. `mesh` may be built from
        devices this host does not have, e.g. a TPU slice from
        jax.experimental.topologies.get_topology_desc. Its own jitted functions then lower and
        compile for those devices (`lower_prefill`, `lower_decode`); it cannot generate.
        engine_kw are Engine's (max_slots, max_len, kv_cache_dtype, ...); hbm_bytes: the memory of
        one of those devices, for max_slots "auto"."""
        _check_dtype_and_quantize(dtype, quantize)
        params = abstract_params(cfg, jnp.dtype(dtype), mesh)
        if quantize == "int8":
            params = quantize_params(params, cfg, mesh)
        return cls(cfg, params, mesh, hbm_bytes=hbm_bytes, cost_model=cost_model, **engine_kw)

    # ------------------------------------------------------------ jitted device functions

    def _prefill_fn(self, weights, cache: KVCache, spec: SpecState | None, tokens_bt, starts_b, lengths_b, slots_b):
        """tokens_bt: row i's prompt tokens from starts_b[i] (its cached prefix or earlier pieces
        end there) to lengths_b[i], right-padded, for cache slot slots_b[i]: their keys and values
        go into the cache (a speculative engine's token history and draft cache too). Returns
        (cache, spec, float32 logits [b, vocab] after each row's last token), which _first_fn
        samples from: it is a function of its own because the sampler takes the TPU compiler
        longer than the model's forward, and its variants are one per row count, not one per
        (rows, bucket) pair."""
        model, draft = self._models(weights)
        b = tokens_bt.shape[0]
        x, cache = model.prefill(tokens_bt, starts_b, slots_b, cache)
        logits = model.head(x[jnp.arange(b), lengths_b - starts_b - 1][:, None])[:, 0]
        logits = jax.lax.with_sharding_constraint(logits, self._logits_sharding(b))
        cache = jax.lax.with_sharding_constraint(cache, self._cache_sharding)
        if spec is not None:  # the piece's tokens; the draft's KV
            positions = starts_b[:, None] + jnp.arange(tokens_bt.shape[1])[None, :]
            positions = jnp.where(positions < lengths_b[:, None], positions, self.max_len)  # padding: dropped
            history = spec.history.at[slots_b[:, None], positions].set(tokens_bt, mode="drop")
            draft_cache = spec.draft_cache
            if draft is not None:
                draft_cache = draft.prefill(tokens_bt, starts_b, slots_b, draft_cache)[1]
            spec = self._place_spec(SpecState(history, draft_cache))
        return cache, spec, logits

    def _first_fn(self, state: SlotState, history, logits, lengths_b, slots_b, final_b, rows: SlotState, table):
        """The first token of each prefill row from its logits, and the row's slot state. final_b:
        the prompt ends at lengths_b[i]; the slot decodes from the next dispatch. Otherwise that
        was a piece of a longer prompt: the slot stays inactive at position lengths_b[i], where
        the next piece starts (decode writes a padding key there, which that piece overwrites).
        history: a speculative engine's token history (None without), the token appended."""
        masked = self._mask(logits, rows.cstate, table, rows.constrained)
        token = self._sample(masked, rows.temperature, rows.top_k, rows.top_p, rows.seed, jnp.zeros_like(lengths_b))
        logprob = token_logprobs(logits, token)
        top = self._top(logits, rows.want_top)
        code = _finish(token, rows, jnp.ones_like(lengths_b), lengths_b, self.max_len)
        new = dataclasses.replace(rows, token=token, position=lengths_b, active=final_b & (code == RUNNING),
                                  generated=jnp.ones_like(lengths_b),
                                  cstate=advance(rows.cstate, token, table, rows.constrained))
        state = jax.tree.map(lambda s, r: s.at[slots_b].set(r, mode="drop"), state, new)
        if history is not None:
            history = self._place_rows(history.at[slots_b, lengths_b].set(token, mode="drop"))
        return self._place_state(state), history, token, logprob, code, top

    def _decode_fn(self, weights, cache: KVCache, state: SlotState, spec: SpecState | None, table, steps: int,
                   chunks: int):
        """`steps` tokens for every active slot, attending over the cache's first `chunks` chunks
        (compiled once per count: the cost of a step follows the live length, not max_len). A
        speculative engine's history and draft cache follow along."""
        model, draft = self._models(weights)

        def step(carry, _):
            cache, s, spec = carry
            pos = jnp.minimum(s.position, self.max_len - 1)
            logits, cache = model.decode_step(s.token, pos, cache, chunks)
            if draft is not None:
                spec = dataclasses.replace(spec, draft_cache=draft.decode_step(s.token, pos, spec.draft_cache,
                                                                               chunks)[1])
            constrained = s.constrained & s.active
            masked = self._mask(logits, s.cstate, table, constrained)
            token = self._sample(masked, s.temperature, s.top_k, s.top_p, s.seed, s.generated)
            logprob = token_logprobs(logits, token)
            top = self._top(logits, s.want_top & s.active)
            emitted = s.active
            generated = s.generated + emitted
            position = s.position + emitted
            code = jnp.where(emitted, _finish(token, s, generated, position, self.max_len), RUNNING)
            s = dataclasses.replace(s, token=jnp.where(emitted, token, s.token), position=position,
                                    generated=generated, active=s.active & (code == RUNNING),
                                    cstate=advance(s.cstate, token, table, constrained))
            if spec is not None:
                spec = dataclasses.replace(spec, history=spec.history.at[
                    jnp.arange(token.shape[0]), jnp.where(emitted, position, self.max_len)].set(token, mode="drop"))
            return (cache, s, spec), (token, logprob, emitted, code, top)

        (cache, state, spec), (tokens, logprobs, emitted, codes, top) = jax.lax.scan(
            step, (cache, state, spec), length=steps)
        cache = jax.lax.with_sharding_constraint(cache, self._cache_sharding)
        return cache, self._place_state(state), self._place_spec(spec), tokens, logprobs, emitted, codes, top

    def _verify_fn(self, weights, cache: KVCache, state: SlotState, spec: SpecState, table, steps: int,
                   chunks: int, always: bool = False):
        """`steps` speculative steps for every active slot: prompt lookup or the draft model
        proposes up to k tokens per row, one forward over each row's last token and its proposals
        checks them (speculative.verify), and each row keeps its accepted proposals and the token
        drawn after them, cut at a stop token or its length limit: 1 to k + 1 tokens per step. A
        constrained row proposes nothing (its one token is masked as in decode). The caches'
        positions past what a row kept hold rejected proposals; they lie past its position, so
        nothing attends to them before the row's next tokens overwrite them. On the CPU path, a
        step where no row has a proposal runs a plain one-token forward instead (unless `always`:
        for measuring)."""
        model, draft = self._models(weights)
        k, width = self.spec_k, self.spec_k + 1
        offsets = jnp.arange(width)[None, :]
        cfg = self.config

        def propose_with_draft(s, draft_cache):
            """k + 1 draft steps from the row's last token: k proposals (each drawn from q) and
            the draft's KV for all of them, so it stays in step whatever is accepted."""
            token, tokens, logqs = s.token, [], []
            for j in range(k + 1):  # unrolled: k is small, and a loop's per-step overhead is not
                pos = jnp.minimum(s.position + j, self.max_len - 1)
                logits, draft_cache = draft.decode_step(token, pos, draft_cache, chunks)
                if j < k:
                    token, logq = draft_propose(logits, s.temperature, s.top_k, s.top_p, s.seed, s.generated + j)
                    tokens.append(token)
                    logqs.append(logq)
            return jnp.stack(tokens, axis=1), jnp.stack(logqs, axis=1), draft_cache

        def step(carry, _):
            cache, s, spec = carry
            history, draft_cache, logq = spec.history, spec.draft_cache, None
            if draft is None:
                proposals, proposed = ngram_propose(history, jnp.minimum(s.position, self.max_len - 1), k,
                                                    cfg.prompt_lookup_max, cfg.prompt_lookup_min)
            else:
                proposals, logq, draft_cache = propose_with_draft(s, draft_cache)
                proposed = jnp.full_like(s.position, k)
            constrained = s.constrained & s.active
            proposed = jnp.where(s.active & ~constrained, proposed, 0)
            tokens_bt = jnp.concatenate([s.token[:, None], proposals], axis=1)
            pos = jnp.minimum(s.position, self.max_len - 1)

            def one_token(cache):  # no row has a proposal (prompt lookup found no match): a plain step
                logits, cache = model.decode_step(s.token, pos, cache, chunks)
                return jnp.broadcast_to(logits[:, None], (logits.shape[0], width, logits.shape[1])), cache
            if self.path.stacked or always:  # TPU/GPU: k + 1 positions cost about what one does
                logits, cache = model.decode_tokens(tokens_bt, pos, cache, chunks)
            else:  # the CPU: they cost more than one (compute-bound); skip them where nothing is proposed
                logits, cache = jax.lax.cond(jnp.any(proposed > 0), lambda c: model.decode_tokens(
                    tokens_bt, pos, c, chunks), one_token, cache)
            masked = logits.at[:, 0].set(self._mask(logits[:, 0], s.cstate, table, constrained))
            out, accepted = verify(masked, proposals, proposed, s.temperature, s.top_k, s.top_p, s.seed, s.generated,
                                   logq, greedy_only=self.path.cost_model)
            b = out.shape[0]
            flat = lambda x: x.reshape(b * width, *x.shape[2:])  # noqa: E731
            logprob = token_logprobs(flat(logits), flat(out)).reshape(b, width)
            top = jax.tree.map(lambda x: x.reshape(b, width, -1), self._top(flat(logits), jnp.repeat(
                s.want_top & s.active, width)))
            generated, position = s.generated[:, None] + offsets + 1, s.position[:, None] + offsets + 1
            codes = jax.vmap(lambda tok, gen, pos: _finish(tok, s, gen, pos, self.max_len), in_axes=1, out_axes=1)(
                out, generated, position)
            ends = (codes != RUNNING) & (offsets <= accepted[:, None])
            first_end = jnp.argmax(ends, axis=1)
            ended = jnp.any(ends, axis=1)
            count = jnp.where(s.active, jnp.where(ended, first_end + 1, accepted + 1), 0)
            code = jnp.where(s.active & ended, jnp.take_along_axis(codes, first_end[:, None], axis=1)[:, 0], RUNNING)
            last = jnp.take_along_axis(out, jnp.maximum(count - 1, 0)[:, None], axis=1)[:, 0]
            history = history.at[jnp.arange(b)[:, None], jnp.where(offsets < count[:, None], position,
                                                                   self.max_len)].set(out, mode="drop")
            spec = SpecState(history, draft_cache)
            s = dataclasses.replace(s, token=jnp.where(s.active, last, s.token), position=s.position + count,
                                    generated=s.generated + count, active=s.active & (code == RUNNING),
                                    cstate=advance(s.cstate, out[:, 0], table, constrained))
            kept = jnp.minimum(accepted, count)  # proposals kept: a stop or the length limit may cut them
            return (cache, s, spec), (out, logprob, count, code, top, proposed, kept)

        (cache, state, spec), (tokens, logprobs, count, codes, top, proposed, kept) = jax.lax.scan(
            step, (cache, state, spec), length=steps)
        cache = jax.lax.with_sharding_constraint(cache, self._cache_sharding)
        return (cache, self._place_state(state), self._place_spec(spec), tokens, logprobs, count, codes, top,
                proposed, kept)

    def _remap_fn(self, state: SlotState, remap):
        """Constrained rows' states after the constraint table was repacked (TableManager)."""
        cstate = jnp.where(state.constrained, remap[jnp.minimum(state.cstate, remap.shape[0] - 1)], state.cstate)
        return self._place_state(dataclasses.replace(state, cstate=cstate))

    def _place_table(self):
        """The constraint table on the devices, whole on each (it is small)."""
        table = self._constraints.table
        if self.abstract:
            return jax.tree.map(_abstract, table)
        return jax.device_put(table, jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec()))

    # The cost model (launch/aot.py) costs the common step: no row constrained, none asking for top
    # logprobs. Both run under lax.cond, so a step without them skips them on the device too.
    def _mask(self, logits, cstate, table, constrained):
        return logits if self.path.cost_model else mask_logits(logits, cstate, table, constrained)

    def _top(self, logits, want):
        if self.path.cost_model:
            k = min(MAX_TOP_LOGPROBS, logits.shape[-1])
            return jnp.zeros((logits.shape[0], k), jnp.int32), jnp.zeros((logits.shape[0], k), jnp.float32)
        return top_logprobs(logits, want)

    def _sample(self, logits, *rows):
        if self.path.cost_model:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return sample(logits, *rows)

    def _new_spec(self) -> SpecState | None:
        if not self.spec_k:
            return None
        history = np.zeros((self.max_slots, self.max_len), np.int32)
        draft = None if self.draft_cfg is None else self._new_cache(self.draft_cfg, self.max_slots)
        return SpecState(self._place_rows(_abstract(history) if self.abstract else history), draft)

    def _load_draft(self, name_or_path: str, dtype) -> tuple[ModelConfig, dict[str, Any]]:
        """The draft checkpoint's config and weights (abstract for an abstract engine)."""
        path = resolve_checkpoint(name_or_path)
        if not ("://" in path or os.path.isdir(path)):
            raise ValueError(f"draft={name_or_path!r} is not a checkpoint directory; bundled drafts: "
                             f"{sorted(n for n in CHECKPOINTS if 'draft' in n)}")
        cfg = ModelConfig.from_hf_config(read_hf_config(path))
        if self.abstract:
            return cfg, abstract_params(cfg, dtype, self.mesh)
        return cfg, load_params(path, cfg, dtype, self.mesh)

    @property
    def _weights(self) -> tuple[Any, Any]:
        """What prefill, decode and verify read: the model's weights and the draft's (or None)."""
        return self.params, self.draft_params

    def _models(self, weights) -> tuple[Decoder, Decoder | None]:
        draft = None if self.draft_graphdef is None else nnx.merge(self.draft_graphdef, weights[1])
        return nnx.merge(self.graphdef, weights[0]), draft

    def _place_spec(self, spec: SpecState | None) -> SpecState | None:
        if spec is None:
            return None
        draft_cache = spec.draft_cache
        if draft_cache is not None and isinstance(jax.tree.leaves(draft_cache)[0], jax.core.Tracer):
            draft_cache = jax.lax.with_sharding_constraint(draft_cache, draft_cache.shardings(self.mesh))
        return SpecState(self._place_rows(spec.history), draft_cache)

    def _place_state(self, state: SlotState) -> SlotState:
        """The slot state's one placement (slots over 'data'), inside jit and out, so that calls
        never see a new input sharding (which would recompile)."""
        return jax.tree.map(self._place_rows, state)

    def _logits_sharding(self, rows: int) -> jax.sharding.NamedSharding:
        """A prefill's logits [rows, vocab], between _prefill and _first: the vocabulary split as
        the head's weight is."""
        return named_sharding((None, "vocab"), (rows, self.cfg.vocab_size), self.mesh)

    def _place_rows(self, x):
        """An array of per-slot rows (the slot state's, the speculative history) placed as the
        slot state is: rows over 'data'."""
        sharding = named_sharding(("slots",) + (None,) * (x.ndim - 1), x.shape, self.mesh)
        if isinstance(x, jax.core.Tracer):
            return jax.lax.with_sharding_constraint(x, sharding)
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
        return jax.device_put(x, sharding)

    def _forward_fn(self, params, tokens_bt):
        model = nnx.merge(self.graphdef, params)
        b, t = tokens_bt.shape
        return model.head(model.forward(tokens_bt, jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))))

    def _score_fn(self, params, tokens_bt, positions_bt, segments_bt, source_bm, target_bm):
        """log p(target_bm[i, j]) given the row up to its token at index source_bm[i, j], in rows
        that pack a prompt and its candidates (Decoder.forward's segments)."""
        model = nnx.merge(self.graphdef, params)
        x = model.forward(tokens_bt, positions_bt, segments_bt)
        h = jnp.take_along_axis(x, source_bm[:, :, None], axis=1)
        return token_logprobs(model.head(h).reshape(-1, self.cfg.vocab_size), target_bm.reshape(-1)).reshape(
            target_bm.shape)

    # ------------------------------------------------------------ public API

    def weights(self) -> dict[str, Any]:
        """The weights, as `load_params` returns them (a list of arrays for a per-layer weight)."""
        return nnx.merge(self.graphdef, self.params).weights()

    def logits(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """Full causal forward, no cache: float32 [batch, longest prompt, vocab].
        Positions past a prompt's own length are NaN."""
        self._check_concrete("logits")
        prompts = self._check_prompts(prompts, limit=self.max_len)
        longest = max(len(p) for p in prompts)
        t = self._group(longest)
        tokens = np.zeros((len(prompts), t), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = p
        out = np.array(self._forward(self.params, jnp.asarray(tokens))[:, :longest])
        for i, p in enumerate(prompts):
            out[i, len(p):] = np.nan
        return out

    def score(self, prompts: Sequence[Sequence[int]],
              candidates: Sequence[Sequence[Sequence[int]]]) -> list[ScoreOutput]:
        """Label scoring: for each prompt, the log-probability of each of its candidate
        continuations (token-id lists; encode them as continuations of the prompt's text), summed
        over the candidate's tokens. The prompt and all its candidates run as one packed row, so
        the prompt is computed once: a candidate sees the prompt and its own earlier tokens only.
        Rows of similar length are batched within the prefill token budget. Runs beside the
        generation loop (it reads only the weights)."""
        self._check_concrete("score")
        prompts = self._check_prompts(prompts, limit=self.max_len - 1)
        if len(candidates) != len(prompts):
            raise ValueError(f"{len(candidates)} candidate lists for {len(prompts)} prompts; give one list each")
        checked, packed = [], []
        for i, (p, cands) in enumerate(zip(prompts, candidates)):
            if isinstance(cands, (str, bytes)) or not cands:
                raise ValueError(f"prompt {i}: candidates must be a non-empty list of token-id lists")
            cands = self._check_prompts(cands, limit=self.max_len)
            n = len(p)
            tokens, positions, segments, source = list(p), list(range(n)), [0] * n, []
            for seg, c in enumerate(cands, start=1):  # candidate seg: positions n.., its first token scored at n - 1
                source += [n - 1] + list(range(len(tokens), len(tokens) + len(c) - 1))
                tokens += c
                positions += range(n, n + len(c))
                segments += [seg] * len(c)
            if len(tokens) > self.max_len:
                raise ValueError(f"prompt {i} with its candidates holds {len(tokens)} tokens; max_len is {self.max_len}")
            checked.append(cands)
            packed.append((tokens, positions, segments, source, [t for c in cands for t in c]))
        out = []
        for p, cands, lps in zip(prompts, checked, self._score_rows(packed)):
            ends = np.cumsum([len(c) for c in cands])
            scores = [float(lps[e - len(c):e].sum()) for c, e in zip(cands, ends)]
            out.append(ScoreOutput(scores, int(np.argmax(scores)), len(p)))
        return out

    def _score_rows(self, rows: list[tuple[list[int], ...]]) -> list[np.ndarray]:
        """log p of each row's targets (see _score_fn): rows of (tokens, positions, segments,
        source, target), run in batches of one padded length within the prefill token budget."""
        out: list[np.ndarray | None] = [None] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
        while order:
            t = self._score_len(len(rows[order[0]][0]))
            group = [i for i in order if self._score_len(len(rows[i][0])) == t][:self.prefill_batch(t)]
            order = order[len(group):]
            b = next(n for n in self.prefill_rows(t) if n >= len(group))
            m = max(8, 1 << math.ceil(math.log2(max(len(rows[i][4]) for i in group) or 1)))
            tokens, positions = np.zeros((b, t), np.int32), np.zeros((b, t), np.int32)
            segments = np.full((b, t), -1, np.int32)
            source, target = np.zeros((b, m), np.int32), np.zeros((b, m), np.int32)
            for r, i in enumerate(group):
                tok, pos, seg, src, tgt = rows[i]
                tokens[r, :len(tok)], positions[r, :len(tok)], segments[r, :len(tok)] = tok, pos, seg
                source[r, :len(src)], target[r, :len(tgt)] = src, tgt
            with self._timed("score", self._score):
                lps = np.asarray(self._score(self.params, *map(jnp.asarray, (tokens, positions, segments, source,
                                                                             target))))
            for r, i in enumerate(group):
                out[i] = lps[r, :len(rows[i][4])]
        return out

    def _score_len(self, n: int) -> int:
        """A packed scoring row's padded length: quarter steps between the length buckets (a
        prompt and its labels often just pass a power of two; 4 shapes per octave, not 1)."""
        below = max([b for b in self.groups if b < n] or [MIN_BUCKET])
        step = max(MIN_BUCKET, below // 4)
        return min(self.max_len, -(-n // step) * step)

    def prompt_logprobs(self, prompts: Sequence[Sequence[int]]) -> list[list[float | None]]:
        """log p of each prompt token given the tokens before it (None for the first), as vLLM's
        prompt_logprobs: a full forward per batch of prompts of one padded length."""
        self._check_concrete("prompt_logprobs")
        prompts = self._check_prompts(prompts, limit=self.max_len)
        rows = [(p, list(range(len(p))), [0] * len(p), list(range(len(p) - 1)), p[1:]) for p in prompts]
        return [[None] + [float(x) for x in lps] for lps in self._score_rows(rows)]

    @property
    def compile_counts(self) -> dict[str, int]:
        """How many variants of each device function have been compiled (or loaded from the
        persistent cache): JAX's own count of each jitted function's cache entries."""
        count = lambda fn: getattr(fn, "_cache_size", lambda: 0)()  # noqa: E731
        return {"prefill": count(self._prefill), "first": count(self._first), "decode": count(self._decode),
                "verify": count(self._verify),
                "forward": count(self._forward), "score": count(self._score)}

    def generate(self, prompts: Sequence[Sequence[int]],
                 sampling: SamplingParams | Sequence[SamplingParams] | None = None) -> list[GenerationOutput]:
        """Generates for every prompt (lists of token ids); outputs are in input order.

        More prompts than slots run through the slots in turn: a finished sequence frees its slot
        and the next waiting prompt is prefilled into it while the others keep decoding. Calls
        from several threads share the slots.
        """
        return [f.result() for f in self.submit(prompts, sampling)]

    def submit(self, prompts: Sequence[Sequence[int]],
               sampling: SamplingParams | Sequence[SamplingParams] | None = None,
               on_tokens: Any = None) -> list[concurrent.futures.Future]:
        """Queues prompts for the scheduler loop; returns a future per prompt, resolved with its
        GenerationOutput when it ends (or with the exception that failed it). Bad input raises
        ValueError here, for the whole call, before anything is queued. on_tokens(i, token_ids),
        if given, streams: it is called on the loop's thread with prompt i's new tokens as they
        arrive (the first after its prefill, then per decode dispatch), before its future is
        resolved; keep it quick."""
        self._check_concrete("generate")
        prompts = self._check_prompts(prompts, limit=self.max_len - 1)
        if sampling is None:
            sampling = SamplingParams()
        params = [sampling] * len(prompts) if isinstance(sampling, SamplingParams) else list(sampling)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts; give one or one each")
        stops = [self._stop_ids(sp) for sp in params]
        if self.tokenizer is None and any(sp.stop for sp in params):
            raise ValueError("stop strings need the checkpoint's tokenizer; this engine has none (a preset)")
        seqs = [_Sequence(p, sp, st, min(sp.max_new_tokens, self.max_len - len(p)),
                          self.prefix_cache.hashes(p) if self.prefix_cache is not None else [],
                          on_tokens=None if on_tokens is None else functools.partial(on_tokens, i))
                for i, (p, sp, st) in enumerate(zip(prompts, params, stops))]
        with self._cond:
            for q in seqs:
                q.arrival, q.clock, self._arrivals = self._arrivals, self._clock, self._arrivals + 1
            self._incoming += seqs
            if self._thread is None:
                # Not a daemon: the interpreter joins it at exit (it ends once nothing is left),
                # instead of killing it inside a device call (an abort, seen as exit code -6).
                self._thread = threading.Thread(target=self._serve, name="engine-loop", daemon=False)
                self._thread.start()
            self._cond.notify()
        return [q.future for q in seqs]

    def _serve(self) -> None:
        """The scheduler loop: admits new requests, then runs one step, until nothing is left."""
        while True:
            with self._cond:
                if not self._incoming and not self._busy():
                    self._thread = None  # the next submit starts a new loop
                    return
                arrivals, self._incoming = self._incoming, []
            with self._device:
                try:
                    self._admit(arrivals)
                    self._step()
                except Exception as e:  # noqa: BLE001 (fail what the engine held, keep serving)
                    self._fail_all(e, arrivals)

    def _busy(self) -> bool:
        return bool(self._waiting or self._in_flight or any(self._slot_of))

    def _admit(self, arrivals: list["_Sequence"]) -> None:
        """Adds requests to the waiting list, in the order the slots take them, grouped by length
        (octave): arrival order, or (order="longest_first") the largest max_new_tokens first, less
        the decode steps run since the request arrived. Among requests that arrived together
        that is longest first. The aging bounds a short request's wait: a caller waiting on a
        whole call (a Beam batch) gets it back and submits its next one while later calls keep the
        slots full. Without it, every short request would wait behind each later call's long
        ones, all callers' calls would end together, and the slots would drain before any
        caller submitted again."""
        if not arrivals:
            return
        self._ensure_stop_width(max(len(q.stop_ids) for q in arrivals))
        rank = (lambda q: q.clock - q.limit) if self.order == "longest_first" else (lambda q: 0)  # noqa: E731
        self._waiting = sorted(self._waiting + arrivals, key=lambda q: (rank(q), self._group(len(q.prompt)),
                                                                       q.arrival))

    def _step(self) -> None:
        """Prefills within the step's token budget, then dispatches the next decode and reads the last one."""
        if self.spec_k and self._gate.cost is None and not self._in_flight and not any(self._slot_of):
            # before the first prefill: measure a verify step's cost, once, while no slot is in use
            self._calibrate([1])
        refill = self.batching == "inflight" or not any(self._slot_of)  # static: only when every slot is free
        decoding = any(q is not None and q.decoding for q in self._slot_of)
        # the budget protects running rows; with none, the whole step goes to prefill
        room = self.prefill_chunk if decoding and self.prefill_chunk else math.inf
        while batch := self._take_batch(refill, room):
            room -= self._run_prefill(batch)
        running = [q for q in self._slot_of if q is not None and q.decoding]
        # Dispatch the next decode before reading the last one, so host bookkeeping overlaps
        # device work; unless the last one surely ends every running row (no wasted step).
        if self._in_flight and (not running or all(len(q.tokens) + self._in_flight.steps >= q.limit
                                                   for q in running)):
            self._collect()
            return
        dispatched = None
        if running:
            chunks = self.decode_chunks(max(len(q.prompt) + len(q.tokens) for q in running))
            speculate = self.spec_k > 0 and self._gate.speculate()
            fn, steps = (self._verify, self.spec_steps) if speculate else (self._decode, self.decode_steps)
            self._clock += steps
            with self._timed("decode", fn):
                self.cache, self.state, self.spec, *out = fn(self._weights, self.cache, self.state, self.spec,
                                                               self._table, steps, chunks)
            dispatched = _Dispatch(out, [q if q is not None and q.decoding else None for q in self._slot_of], steps,
                                   speculate)
        if self._in_flight:
            self._collect()
        self._in_flight = dispatched

    def decode_chunks(self, longest: int) -> int:
        """Cache chunks a decode dispatch attends over while the longest running row holds
        `longest` tokens: every running row's positions during this dispatch, even if the one in
        flight (not yet collected) also ran all its steps, lie within them."""
        most = max(self.decode_steps, self.spec_steps * (self.spec_k + 1) if self.spec_k else 0)
        return self.cache.chunks_for(min(longest + 2 * most + self.spec_k, self.max_len))

    def _collect(self) -> None:
        """Appends the in-flight dispatch's tokens to their sequences (as the slots were when it
        was dispatched), and frees the slots whose sequence ended."""
        d, self._in_flight = self._in_flight, None
        with self._timed("decode_wait"):
            out = [np.asarray(x) for x in d.out[:4]]
            top = jax.tree.map(np.asarray, d.out[4]) if any(q is not None and q.params.top_logprobs
                                                             for q in d.slot_of) else None
            if d.speculative:  # [steps, slots, k + 1] tokens, [steps, slots] counts
                tokens, lps, counts, codes = out
                proposed, kept = (np.asarray(x) for x in d.out[5:7])
            else:  # [steps, slots]: one token per step where emitted
                tokens, lps, counts, codes = out[0][..., None], out[1][..., None], out[2].astype(np.int32), out[3]
                top = None if top is None else jax.tree.map(lambda x: x[:, :, None], top)
        if d.speculative:
            live = [s for s, q in enumerate(d.slot_of) if q is not None and not q.future.done()]
            with self._stats_lock:
                self._stats["spec_proposed"] += int(proposed[:, live].sum())
                self._stats["spec_accepted"] += int(kept[:, live].sum())
                self._stats["spec_steps"] += int((counts[:, live] > 0).sum())
            verified = proposed[:, live].sum(axis=1) > 0  # the steps that ran the verify forward
            self._gate.record(int(kept[verified][:, live].sum()), int((counts[verified][:, live] > 0).sum()))
        for s, q in enumerate(d.slot_of):
            if q is None or q.future.done():  # done: ended at a stop string since this was dispatched
                continue
            before, code = len(q.tokens), RUNNING
            for step in range(d.steps):
                n = int(counts[step, s])
                q.tokens += tokens[step, s, :n].tolist()
                q.logprobs += lps[step, s, :n].tolist()
                if q.top is not None:
                    for j in range(n):
                        q.add_top(top[0][step, s, j], top[1][step, s, j])
                if d.speculative:
                    q.proposed += int(proposed[step, s])
                    q.accepted += int(kept[step, s])
                if codes[step, s] != RUNNING:
                    code = int(codes[step, s])
                    break
            q.emit(before)
            if code == RUNNING and self._slot_of[s] is not q:
                raise RuntimeError(f"slot {s} was refilled, but its sequence did not end in the dispatch it was "
                                   "expected to end in")
            if code != RUNNING:
                q.finish(FINISH_REASONS[code])
                if self._slot_of[s] is q:  # else a prefill took the slot when this dispatch was queued
                    self._slot_of[s] = None
        self._end_at_stop_strings([q for q in d.slot_of if q is not None])

    def _end_at_stop_strings(self, seqs: list["_Sequence"]) -> None:
        """Ends the running sequences whose completion text holds one of their stop strings, so
        their slots take new work at once instead of generating tokens the job would cut off.
        The text is decoded as the job decodes it (decode_completions), once per dispatch for
        the sequences that have stop strings. A sequence keeps the tokens of the dispatch it
        was in, beyond the stop string: the caller cuts the text."""
        live = [q for q in seqs if q.params.stop and not q.future.done()]
        if not live:
            return
        texts = decode_completions(self.tokenizer, [q.prompt for q in live], [q.tokens for q in live])
        for q, text in zip(live, texts):
            if any(stop in text for stop in q.params.stop):
                q.finish("stop")
                if self._slot_of[q.slot] is q:
                    self._slot_of[q.slot] = None

    def _fail_all(self, error: Exception, arrivals: list["_Sequence"]) -> None:
        """A step failed: every sequence the engine holds (running, being prefilled, waiting, just
        arrived) fails with it, so no caller waits forever and the loop cannot fail on the same
        state again; the cache and slot state start afresh (they may have been donated). Callers
        resubmit what they want retried (EngineHandler retries each failed request alone)."""
        held = [*self._slot_of, *(self._in_flight.slot_of if self._in_flight else []), *self._waiting, *arrivals]
        log.exception("engine step failed; failing the %d sequences it held", sum(q is not None for q in held))
        for q in held:
            if q is not None and not q.future.done():
                q.future.set_exception(error)
        self._slot_of, self._in_flight, self._waiting = [None] * self.max_slots, None, []
        self.cache = type(self.cache).create(self.cfg, self.max_slots, self.max_len, self.dtype, self.mesh,
                                             int8=self.cache.k_scale is not None)
        self.state = self._place_state(SlotState.host(self.max_slots, self._n_stop))
        self.spec = self._new_spec()

    def _bucket(self, n: int) -> int:
        """The length a prefill of n tokens pads to."""
        return next(b for b in self.buckets if b >= n)

    def _group(self, n: int) -> int:
        """The octave of n tokens: prompts of one group batch together (and pad to the longest's bucket)."""
        return next(b for b in self.groups if b >= n)

    def prefill_batch(self, bucket: int) -> int:
        """Most rows per prefill call for a bucket: as many as fit the token budget at its group's
        length (the rows a call of that group may take), at most max_slots."""
        return max(1, min(self.max_slots, self.prefill_tokens // self._group(bucket)))

    def prefill_rows(self, bucket: int) -> list[int]:
        """The row counts a prefill of this bucket compiles for: powers of two up to
        prefill_batch(bucket), from the fewest that make the hot path's min_prefill_tokens (within
        the step's prefill budgets). Refilling one slot must not pay for a full batch of rows."""
        top = self.prefill_batch(bucket)
        floor = min(self.path.min_prefill_tokens, self.prefill_chunk or math.inf, self.prefill_tokens)
        least = min(top, 1 << math.ceil(math.log2(max(1, -(-floor // bucket)))))
        return [r for r in sorted({min(1 << i, top) for i in range(top.bit_length() + 1)}) if r >= least]

    def _piece_end(self, q: "_Sequence", start: int) -> int:
        """Where the piece of q's prompt that starts at `start` ends."""
        return len(q.prompt) if self.piece_len is None else min(len(q.prompt), start + self.piece_len)

    def _free_slots(self) -> list[int]:
        """The slots a prefill may fill now: empty ones, then (in-flight batching) those whose
        sequence surely ends within the decode dispatch in flight, by its length limit. Device work
        runs in the order it is queued, so a prefill queued now writes such a slot after that
        dispatch is done with it, and the new sequence decodes from the next dispatch on instead
        of one dispatch later (when the end would be read back)."""
        empty = [s for s, q in enumerate(self._slot_of) if q is None]
        if self.batching != "inflight" or not self._in_flight:
            return empty
        ending = [s for s, q in enumerate(self._in_flight.slot_of) if q is not None and self._slot_of[s] is q
                  and len(q.tokens) + self._in_flight.steps >= q.limit]
        return empty + ending

    def _take_batch(self, refill: bool, room: float) -> list[tuple["_Sequence", int | None]]:
        """The sequences of the next prefill call, each with the prefix-store row to copy into its
        slot first (or None). Prompts that hold a slot mid-prefill come first, then waiting ones
        take free slots (if `refill`); all with their next piece in the first one's length group
        (octave), as many as fit `room` tokens (padded rows x the group's length, which the call's
        bucket does not exceed). Of waiting sequences that miss the
        prefix cache, one per first block goes at a time (counting those mid-prefill): the others
        then find its prefix cached."""
        held = [q for q in self._slot_of if q is not None and not q.decoding]
        free = self._free_slots() if refill else []
        candidates = held + (self._waiting if free else [])
        if not candidates:
            return []
        found = {}

        def start(q: _Sequence) -> int:
            if q.slot is not None:
                return q.filled
            if id(q) not in found:
                found[id(q)] = self.prefix_cache.lookup(q.hashes) if self.prefix_cache is not None else (None, 0)
            return found[id(q)][1]

        def group(q: _Sequence) -> int:
            return self._group(self._piece_end(q, start(q)) - start(q))

        t = group(candidates[0])
        fits = [r for r in self.prefill_rows(t) if r * t <= room]
        if not fits:
            return []
        batch, missed_heads = [], {q.hashes[0] for q in held if q.cached == 0 and q.hashes}
        for q in candidates:
            if len(batch) == fits[-1] or (q.slot is None and not free):
                break
            if group(q) != t:
                continue
            row = None
            if q.slot is None:  # waiting: it takes a slot
                row, cached = found[id(q)]
                if cached == 0 and q.hashes:
                    if q.hashes[0] in missed_heads:
                        continue
                    missed_heads.add(q.hashes[0])
                q.slot, q.filled, q.cached = free.pop(0), cached, cached
                self._slot_of[q.slot] = q
            batch.append((q, row))
        taken = set(id(q) for q, _ in batch)
        self._waiting = [q for q in self._waiting if id(q) not in taken]
        return batch

    def _run_prefill(self, batch: list[tuple["_Sequence", int | None]]) -> int:
        """One prefill call: each sequence's next piece into its slot, after copying the given
        prefix-store row there. A sequence whose last piece this is gets its first token and
        decodes from the next dispatch (or ends); the others keep their slot for the next piece.
        Returns the tokens the call ran: rows x bucket, padding included."""
        ends = [self._piece_end(q, q.filled) for q, _ in batch]
        t = self._bucket(max(end - q.filled for (q, _), end in zip(batch, ends)))
        b = next(r for r in self.prefill_rows(t) if r >= len(batch))
        tokens, start_ids, lengths, slot_ids, final, rows = self._padding_prefill(b, t)
        starts_of = self._constraint_starts([q for (q, _), end in zip(batch, ends) if end == len(q.prompt)])
        for r, ((q, row), end) in enumerate(zip(batch, ends)):
            if row is not None:
                self._load_prefix(row, q.slot)
            tokens[r, : end - q.filled] = q.prompt[q.filled:end]
            start_ids[r], lengths[r], slot_ids[r], final[r] = q.filled, end, q.slot, end == len(q.prompt)
            sp = q.params
            rows.max_new[r], rows.temperature[r] = sp.max_new_tokens, sp.temperature
            rows.top_k[r], rows.top_p[r], rows.seed[r] = sp.top_k, sp.top_p, sp.seed
            rows.stop_ids[r, : len(q.stop_ids)] = q.stop_ids
            rows.want_top[r] = sp.top_logprobs > 0
            if id(q) in starts_of:
                rows.cstate[r], rows.constrained[r] = starts_of[id(q)], True
        first, first_lp, codes, (top_ids, top_lps) = self._call_prefill(tokens, start_ids, lengths, slot_ids, final,
                                                                        rows)
        done = []
        for r, ((q, _), end, tok, lp, code) in enumerate(zip(batch, ends, first, first_lp, codes)):
            q.filled = end
            if not q.decoding:
                continue
            done.append(q)
            if self.prefix_cache is not None and q.cached < len(q.hashes) * self.prefix_cache.block:
                self.prefix_cache.insert(q.hashes, self._prefix_rows(), q.slot)  # it brings a longer prefix
            q.tokens.append(int(tok))
            q.logprobs.append(float(lp))
            if q.top is not None:
                q.add_top(top_ids[r], top_lps[r])
            q.emit(len(q.tokens) - 1)
            if code != RUNNING:
                q.finish(FINISH_REASONS[int(code)])
                self._slot_of[q.slot] = None
        self._end_at_stop_strings(done)
        return b * t

    def _prefix_rows(self):
        """What the prefix cache stores a slot's row of: the KV cache, and the draft's beside it."""
        return self.cache if self.draft_cfg is None else (self.cache, self.spec.draft_cache)

    def _load_prefix(self, row: int, slot: int) -> None:
        loaded = self.prefix_cache.load(self._prefix_rows(), row, slot)
        if self.draft_cfg is None:
            self.cache = loaded
        else:
            self.cache, draft_cache = loaded
            self.spec = dataclasses.replace(self.spec, draft_cache=draft_cache)

    def _constraint_starts(self, seqs: list["_Sequence"]) -> dict[int, int]:
        """The initial table state of each constrained sequence about to start decoding (by id),
        after making room for their automata in the device table."""
        seqs = [q for q in seqs if q.params.constraint is not None]
        if not seqs:
            return {}
        in_use = [q.params.constraint for q in self._slot_of
                  if q is not None and q.decoding and q.params.constraint is not None]
        before = self._constraints.table
        starts, remap = self._constraints.offsets([q.params.constraint for q in seqs], in_use)
        if remap is not None:
            self.state = self._remap(self.state, jnp.asarray(remap))
        if self._constraints.table is not before:
            self._table = self._place_table()
        return {id(q): s for q, s in zip(seqs, starts)}

    def constraint(self, kind: str, spec: Any = None) -> TokenAutomaton:
        """A constraint for SamplingParams(constraint=...), compiled for this engine's tokenizer,
        EOS ids and vocabulary (cached: the same kind and spec compile once). kind: "json_schema"
        (spec: a schema, dict or JSON text), "json_object" (any JSON object), "regex" (spec: a
        pattern the whole output matches) or "choice" (spec: a list of strings). Raises ValueError
        naming the reason when the spec cannot be compiled."""
        if self.tokenizer is None:
            raise ValueError("constraints need the checkpoint's tokenizer; this engine has none (a preset)")
        return compile_constraint(kind, spec, self.tokenizer, eos_ids=self.cfg.eos_token_ids,
                                  vocab_size=self.cfg.vocab_size)

    def prefill_shapes(self) -> list[tuple[int, int]]:
        """(rows, bucket) of every prefill the engine can run, i.e. compiles in warmup(): with
        chunked prefill, only buckets up to a piece's length."""
        return [(b, t) for t in self.buckets if self.piece_len is None or t <= self.piece_len
                for b in self.prefill_rows(t)]

    def warmup_functions(self) -> list[tuple]:
        """What warmup() compiles: ("prefill", rows, bucket) per prefill shape, ("first", rows)
        per row count among them (the first tokens' sampler), and ("decode", chunks), plus
        ("verify", chunks) when speculative, per count of live cache chunks (one on the stacked
        path). launch/aot.py compiles the same list."""
        shapes = self.prefill_shapes()
        chunks = range(1, len(self.cache.sizes) + 1)
        return ([("prefill", b, t) for b, t in shapes] + [("first", b) for b in sorted({b for b, _ in shapes})]
                + [(kind, n) for kind in ("decode", "verify")[:1 + bool(self.spec_k)] for n in chunks])

    def warmup(self) -> dict[str, float]:
        """Compiles what warmup_functions() lists now (every prefill shape, its first tokens'
        sampler, the decode step), so that a job compiles nothing later. Prefill runs on padding rows
        only (their writes are dropped), decode only while no slot is active. Returns how many
        functions this compiled (or loaded from the persistent cache) and the seconds it took."""
        self._check_concrete("warmup")
        before, start = sum(self.compile_counts.values()), time.perf_counter()
        with self._device:
            for b, t in self.prefill_shapes():
                self._call_prefill(*self._padding_prefill(b, t))
            if not bool(jnp.any(self.state.active)):
                self._calibrate(range(1, len(self.cache.sizes) + 1))
        return {"functions": sum(self.compile_counts.values()) - before,
                "compile_s": round(time.perf_counter() - start, 3)}

    def _calibrate(self, chunk_counts) -> None:
        """Compiles decode (and verify) for each count of live cache chunks, running them while no
        slot is active. A speculative engine also times both over the fewest chunks and tells
        SpecGate what a verify step costs in decode steps."""
        for chunks in chunk_counts:
            self._run_idle(self._decode, self.decode_steps, chunks)
            if self.spec_k:
                self._run_idle(self._verify, self.spec_steps, chunks)
        if self.spec_k:  # idle rows propose nothing: `always` runs the verify forward anyway
            first = min(chunk_counts)
            decode = self._run_idle(self._decode, self.decode_steps, first, timed=True) / self.decode_steps
            verify = self._run_idle(self._verify, self.spec_steps, first, True, timed=True) / self.spec_steps
            self._gate.cost = verify / decode

    def _run_idle(self, fn, steps: int, chunks: int, *static, timed: bool = False) -> float:
        """Runs a decode-like dispatch while no slot is active (compiling it); `timed`: three more
        times. Returns the median seconds of the timed runs (or of the one run)."""
        times = []
        for _ in range(4 if timed else 1):
            start = time.perf_counter()
            with self._timed("decode", fn):
                self.cache, self.state, self.spec, *_ = fn(self._weights, self.cache, self.state, self.spec,
                                                          self._table, steps, chunks, *static)
                jax.block_until_ready(self.state)
            times.append(time.perf_counter() - start)
        return statistics.median(times[1:] or times)

    def stats(self) -> dict[str, float]:
        """Totals since the engine was built: seconds in prefill and decode calls (dispatch, plus
        waiting for their results), seconds of calls that compiled (not in prefill_s or
        decode_s), functions compiled, and calls. Cheap: it never waits on the scheduler loop."""
        with self._stats_lock:
            s = dict(self._stats)
        return {"prefill_s": s.get("prefill_s", 0.0), "decode_s": s.get("decode_s", 0.0) + s.get("decode_wait_s", 0.0),
                "compile_s": s.get("compile_s", 0.0), "compiled_functions": sum(self.compile_counts.values()),
                "prefill_calls": int(s.get("prefill_calls", 0)), "decode_calls": int(s.get("decode_calls", 0)),
                "spec_proposed": int(s.get("spec_proposed", 0)), "spec_accepted": int(s.get("spec_accepted", 0)),
                "spec_steps": int(s.get("spec_steps", 0))}

    @contextlib.contextmanager
    def _timed(self, kind: str, *fns):
        """Adds the block's seconds to `kind`, or to compile when one of `fns` (jitted functions)
        compiled in it."""
        count = lambda: sum(getattr(fn, "_cache_size", lambda: 0)() for fn in fns)  # noqa: E731
        size, start = count(), time.perf_counter()
        yield
        seconds = time.perf_counter() - start
        compiled = count() > size
        with self._stats_lock:
            self._stats["compile_s" if compiled else f"{kind}_s"] += seconds
            if fns:
                self._stats[f"{kind}_calls"] += 1

    def lower_prefill(self, rows: int, bucket: int) -> jax.stages.Lowered:
        """The prefill of `rows` prompts padded to `bucket` tokens (their first tokens are
        lower_first's), lowered for the engine's mesh (as warmup() would call it); `.compile()`
        it for cost and memory figures."""
        tokens, starts, lengths, slots, *_ = self._padding_prefill(rows, bucket)
        return self._prefill.lower(self._weights, self.cache, self.spec, *map(_abstract, (tokens, starts, lengths,
                                                                                          slots)))

    def lower_first(self, rows: int) -> jax.stages.Lowered:
        """The first tokens of a prefill of `rows` prompts (sampled from its logits), lowered."""
        _, _, lengths, slots, final, rows_host = self._padding_prefill(rows, MIN_BUCKET)
        logits = jax.ShapeDtypeStruct((rows, self.cfg.vocab_size), jnp.float32, sharding=self._logits_sharding(rows))
        return self._first.lower(self.state, None if self.spec is None else self.spec.history, logits,
                                 *map(_abstract, (lengths, slots, final)), jax.tree.map(_abstract, rows_host),
                                 self._table)

    def lower_decode(self, chunks: int) -> jax.stages.Lowered:
        """The decode dispatch (`decode_steps` tokens per slot) over the cache's first `chunks`
        chunks, lowered for the engine's mesh."""
        return self._decode.lower(self._weights, self.cache, self.state, self.spec, self._table, self.decode_steps,
                                  chunks)

    def lower_verify(self, chunks: int) -> jax.stages.Lowered:
        """The speculative dispatch (`spec_steps` verify steps of k + 1 positions per slot) over
        the cache's first `chunks` chunks, lowered for the engine's mesh (speculative engines)."""
        return self._verify.lower(self._weights, self.cache, self.state, self.spec, self._table, self.spec_steps,
                                  chunks, True)

    def _padding_prefill(self, b: int, t: int) -> tuple[np.ndarray, ...]:
        """Inputs of a prefill of b padding rows of t tokens, whose writes are all dropped:
        (tokens, starts, lengths, slots, final, rows)."""
        return (np.zeros((b, t), np.int32), np.zeros((b,), np.int32), np.ones((b,), np.int32),
                np.full((b,), self.max_slots, np.int32), np.zeros((b,), bool), SlotState.host(b, self._n_stop))

    def _check_concrete(self, what: str) -> None:
        if self.abstract:
            raise RuntimeError(f"{what}() needs weights on devices; this Engine is abstract (Engine.abstract): "
                               "it only lowers and compiles (lower_prefill, lower_decode)")

    def _call_prefill(self, tokens, starts, lengths, slot_ids, final, rows: SlotState):
        rows = jax.tree.map(jnp.asarray, rows)
        lengths, slot_ids = jnp.asarray(lengths), jnp.asarray(slot_ids)
        with self._timed("prefill", self._prefill, self._first):
            self.cache, spec, logits = self._prefill(self._weights, self.cache, self.spec, jnp.asarray(tokens),
                                                     jnp.asarray(starts), lengths, slot_ids)
            self.state, history, first, logprob, codes, top = self._first(
                self.state, None if spec is None else spec.history, logits, lengths, slot_ids, jnp.asarray(final),
                rows, self._table)
            self.spec = None if spec is None else dataclasses.replace(spec, history=history)
            return np.asarray(first), np.asarray(logprob), np.asarray(codes), jax.tree.map(np.asarray, top)

    def _stop_ids(self, sp: SamplingParams) -> tuple[int, ...]:
        ids = tuple(sp.stop_token_ids) + (() if sp.ignore_eos else self.cfg.eos_token_ids)
        for t in ids:
            if not 0 <= t < self.cfg.vocab_size:
                raise ValueError(f"stop token id {t} is outside the vocabulary [0, {self.cfg.vocab_size})")
        return tuple(dict.fromkeys(ids))

    def _ensure_stop_width(self, n: int):
        if n > self._n_stop:  # widen (one recompile) only when a request needs more stop ids
            self._n_stop = 1 << math.ceil(math.log2(n))
            pad = self._n_stop - self.state.stop_ids.shape[1]
            self.state = self._place_state(dataclasses.replace(
                self.state, stop_ids=jnp.pad(self.state.stop_ids, ((0, 0), (0, pad)), constant_values=-1)))

    def _check_prompts(self, prompts, limit: int) -> list[list[int]]:
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise ValueError(f"prompts must be a list of token-id lists; got {type(prompts).__name__}")
        if not prompts:
            raise ValueError("prompts is empty; give at least one prompt")
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, (str, bytes)):
                raise ValueError(f"prompt {i} is a {type(p).__name__}; encode it to token ids first")
            p = [int(t) for t in p]
            if not p:
                raise ValueError(f"prompt {i} is empty; it needs at least one token")
            if len(p) > limit:
                raise ValueError(f"prompt {i} has {len(p)} tokens; max_len is {self.max_len}, "
                                 f"which allows at most {limit} prompt tokens here")
            bad = [t for t in p if not 0 <= t < self.cfg.vocab_size]
            if bad:
                raise ValueError(f"prompt {i} has token id {bad[0]} outside the vocabulary "
                                 f"[0, {self.cfg.vocab_size})")
            out.append(p)
        return out


@dataclasses.dataclass(eq=False)
class _Sequence:
    """One request from submission to its output: the scheduler's only per-request record."""

    prompt: list[int]
    params: SamplingParams
    stop_ids: tuple[int, ...]
    limit: int  # most tokens it may generate: max_new_tokens, cut to what the cache holds
    hashes: list[bytes]  # the prompt's prefix-cache block hashes
    arrival: int = 0
    clock: int = 0  # the engine's decode steps dispatched before it arrived
    slot: int | None = None  # the cache slot it holds, from its first prefill piece on
    filled: int = 0  # prompt tokens in its slot's cache: where its next prefill piece starts
    cached: int = 0  # of those, the prefix copied in from the prefix cache
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top: list[list[tuple[int, float]]] | None = None  # per token, when params.top_logprobs > 0
    proposed: int = 0  # speculative proposals verified for it
    accepted: int = 0  # of those, kept
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)
    on_tokens: Any = None  # called on the loop's thread with each batch of new token ids, before the end

    def __post_init__(self):
        if self.params.top_logprobs:
            self.top = []

    def add_top(self, ids: np.ndarray, lps: np.ndarray) -> None:
        k = self.params.top_logprobs
        self.top.append([(int(i), float(lp)) for i, lp in zip(ids[:k], lps[:k])])

    def emit(self, before: int) -> None:
        """Hands the tokens generated since `before` to on_tokens; a callback's error ends nothing."""
        if self.on_tokens is not None and len(self.tokens) > before:
            try:
                self.on_tokens(self.tokens[before:])
            except Exception:  # noqa: BLE001 (a listener must not fail the engine loop)
                log.exception("an on_tokens callback failed")

    @property
    def decoding(self) -> bool:
        """Its whole prompt is in its slot: it decodes (or has ended)."""
        return self.slot is not None and self.filled == len(self.prompt)

    def finish(self, reason: str) -> None:
        satisfied = None
        if self.params.constraint is not None:
            satisfied = _accepts(self.params.constraint, self.tokens, self.stop_ids)
        self.future.set_result(GenerationOutput(self.tokens, reason, len(self.prompt), self.logprobs, satisfied,
                                                self.top, self.proposed, self.accepted))


@dataclasses.dataclass
class _Dispatch:
    """A decode or speculative dispatch in flight: its outputs (device arrays), the sequences of
    the slots it ran, and its steps (each emits at least one token for every running row)."""

    out: list[Any]
    slot_of: list[_Sequence | None]
    steps: int
    speculative: bool


class SpecGate:
    """Whether the next dispatch speculates. While verifying proposals yields fewer tokens per
    step than the step costs (`cost`, in plain decode steps, measured by Engine.warmup or at the
    engine's first step), speculation pays nothing and the batch decodes plainly. Acceptance is a
    moving average of proposals kept per row and verify step (steps where no row had a proposal
    ran as plain steps and say nothing about it). While off, one speculative dispatch probes it
    after 1, 2, 4 ... up to MAX_WAIT plain ones, so a batch that keeps rejecting pays for at most
    one slow dispatch in MAX_WAIT."""

    MAX_WAIT = 64

    def __init__(self, cost: float | None = None):
        self.cost, self.rate, self.wait, self.backoff = cost, None, 0, 1

    def speculate(self) -> bool:
        if self.wait > 0:
            self.wait -= 1
            return False
        return True

    def record(self, kept: int, row_steps: int) -> None:
        if not row_steps:
            return
        rate = kept / row_steps
        self.rate = rate if self.rate is None else 0.5 * (self.rate + rate)
        if 1 + self.rate < (1.0 if self.cost is None else self.cost):
            self.wait, self.backoff = self.backoff, min(2 * self.backoff, self.MAX_WAIT)
        else:
            self.backoff = 1


def _accepts(automaton: TokenAutomaton, tokens: list[int], stop_ids: tuple[int, ...]) -> bool:
    """Whether the tokens (up to a stop id) are a complete output of the automaton."""
    state = 0
    for t in tokens:
        if t in stop_ids:
            break
        if not 0 <= t < automaton.vocab_size or (state := automaton.step(state, t)) < 0:
            return False
    return bool(automaton.accepting[state])


def _check_dtype_and_quantize(dtype: str, quantize: str | None) -> None:
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize={quantize!r}; expected None or 'int8'")
    if dtype not in ("bfloat16", "float32"):
        raise ValueError(f"dtype={dtype!r}; expected 'bfloat16' or 'float32'")


def _abstract(x: np.ndarray) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(x.shape, x.dtype)


def device_memory(mesh: jax.sharding.Mesh) -> int:
    """Bytes of memory one device of the mesh has, as the device reports it."""
    device = mesh.devices.flat[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats or not stats.get("bytes_limit"):
        raise ValueError(f"max_slots='auto' needs the devices' memory size, and {device.platform} devices do not "
                         "report one: give max_slots as a number")
    return int(stats["bytes_limit"])


def slots_that_fit(cfg: ModelConfig, config: EngineConfig, params: dict, mesh: jax.sharding.Mesh,
                   hbm_bytes: int, draft: tuple[ModelConfig, dict] | None = None) -> int:
    """How many cache slots fit in config.hbm_utilization of each device's hbm_bytes after the
    weights (and the prefix cache's rows; a draft model's weights and cache included), as whole rows of the mesh's 'data' axis (slots are split
    over it). Activations and compile temporaries live in the share left over."""
    dtype = params["final_norm"].dtype
    max_len, int8 = config.context_length(cfg), config.kv_cache_dtype == "int8"
    group = mesh.shape["data"]
    cache_cls = StackedKVCache if hot_path(mesh.devices.flat[0].platform, config.hot_path).stacked else KVCache
    models = [cfg] + ([draft[0]] if draft else [])  # a draft model's cache rows sit beside each slot's

    def cache_bytes(slots: int) -> int:
        return sum(bytes_per_device(cache_cls.abstract(c, slots, max_len, dtype, mesh, int8=int8)) for c in models)
    per_group = cache_bytes(group)
    prefix = cache_bytes(config.prefix_cache_entries) if config.prefix_cache_entries else 0
    weights = bytes_per_device(params) + (bytes_per_device(draft[1]) if draft else 0)
    room = config.hbm_utilization * hbm_bytes - weights - prefix
    if room < per_group:
        gib = lambda n: f"{n / 2**30:.2f} GiB"  # noqa: E731
        raise ValueError(f"no room for a cache slot: weights {gib(weights)} + prefix cache {gib(prefix)} per device "
                         f"leave {gib(max(room, 0))} of hbm_utilization {config.hbm_utilization} x {gib(hbm_bytes)}, "
                         f"and {group} slot(s) of max_len {max_len} take {gib(per_group)}; use more devices on "
                         "'model', int8 weights or KV cache, a shorter max_len, or a higher hbm_utilization")
    return int(room // per_group) * group


def enable_compilation_cache(path: str | None = None) -> None:
    """JAX's persistent compilation cache, so a second job on the machine skips compiling. The
    directory: `path`, else $JAX_COMPILATION_CACHE_DIR (which JAX reads itself), else ~/.cache."""
    if path is None and os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    jax.config.update("jax_compilation_cache_dir",
                      path or os.path.join(os.path.expanduser("~"), ".cache", "llm_batch_jax"))


def random_params(cfg: ModelConfig, dtype: jnp.dtype, mesh: jax.sharding.Mesh, seed: int = 0) -> dict[str, jax.Array]:
    """Random weights created directly in their sharding (never whole on one device)."""
    init = jax.jit(lambda key: init_params(cfg, key, dtype), out_shardings=param_shardings(cfg, mesh))
    return init(jax.random.key(seed))
