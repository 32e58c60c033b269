"""Structured outputs as token automata that run on the device, inside the decode scan.

A constraint (a JSON schema, any JSON object, a regex, a list of choices) is compiled once on the
host into a token-level DFA: outlines-core turns the schema into a regex and the regex into an
index of (state, token) -> next state over the tokenizer's vocabulary. This module turns that
index into small numpy tables; the engine puts them on the device, and two pure jnp functions
mask the logits and advance the state of every row at every step, so a constrained row never
waits for the host. Why outlines-core (the only one of the three candidates that gives the table)
and the compile times: docs/benchmarks.md, "Structured outputs".

One automaton (`TokenAutomaton`, numpy, initial state 0):

    next_state[S, C] int32   state x token class -> next state; -1 = the token is not allowed
    token_class[V]   int32   token id -> class; tokens whose columns are equal share a class
    accepting[S]     bool    the output may end here: EOS ids are allowed exactly in these states

Tokens are grouped into classes because a dense [S, V] table does not fit: the labeling schema
(enum label, number, string of <= 80 characters) has 880 states, so dense is 14 MB for the demo's
4,096 tokens and 451 MB for a 128k vocabulary, where its columns take only 104 and 492 distinct
values (2.25 MB with token_class). Class 0 never allows anything (special tokens, and ids past the
tokenizer's vocabulary when the model's is padded). EOS ids form the last class, a self-loop in
accepting states, so EOS needs no special case on the device.

Batched form (`AutomatonTable`, made by `pack`): the automata of the rows in a batch are stacked
into one table of fixed capacity, so that a new schema arriving never changes a shape:

    next_state[S_max, C_max]  int32  every automaton's rows, its states shifted by offsets[a]
                                     (so next states are global); columns padded with -1
    token_class[A_max, V]     int32  each automaton's class map
    automaton_of[S_max]       int32  which automaton (row of token_class) a global state is in
    accepting[S_max]          bool

A row carries one int32, its global state (starting at offsets[a] when it is admitted), and a
bool saying whether it is constrained. `mask_logits` gathers the row's class map and its state's
row of next_state (two [b, V] gathers, skipped when no row is constrained) and sets disallowed
logits to -inf; unconstrained rows come back bit-identical. `advance` moves the state by the
token sampled.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import logging
import math
import re
import threading
import weakref
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

KINDS = ("json_schema", "json_object", "regex", "choice")
MAX_TABLE_ENTRIES = 1 << 24  # states x classes of one automaton: 64 MB of int32
CACHE_SIZE = 64


@dataclasses.dataclass(frozen=True, eq=False)
class TokenAutomaton:
    """A token-level DFA over one tokenizer's vocabulary; initial state 0 (shapes: module docstring)."""

    next_state: np.ndarray  # [S, C] int32
    token_class: np.ndarray  # [V] int32
    accepting: np.ndarray  # [S] bool
    kind: str
    regex: str  # what outlines-core compiled

    @property
    def num_states(self) -> int:
        return self.next_state.shape[0]

    @property
    def num_classes(self) -> int:
        return self.next_state.shape[1]

    @property
    def vocab_size(self) -> int:
        return self.token_class.shape[0]

    @property
    def nbytes(self) -> int:
        return self.next_state.nbytes + self.token_class.nbytes + self.accepting.nbytes

    def allowed(self, state: int) -> np.ndarray:
        """Token ids allowed in a state, ascending."""
        return np.flatnonzero(self.next_state[state, self.token_class] >= 0)

    def step(self, state: int, token: int) -> int:
        """The next state, or -1 if the token is not allowed."""
        return int(self.next_state[state, self.token_class[token]])

    def dense(self) -> np.ndarray:
        """next_state as [S, V] (for inspection and tests; large for big vocabularies)."""
        return self.next_state[:, self.token_class]


class CacheInfo(NamedTuple):
    hits: int
    misses: int
    size: int


class _LRU:
    """Compiled automata (or the ValueError a spec gave) by key, least recently used out first."""

    def __init__(self, size: int):
        self.size, self.hits, self.misses = size, 0, 0
        self._d: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            if key in self._d:
                self.hits += 1
                self._d.move_to_end(key)
                return self._d[key]
            self.misses += 1
            return None

    def put(self, key, value):
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self.size:
                self._d.popitem(last=False)


_cache = _LRU(CACHE_SIZE)
_vocabularies: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> _Vocab
_vocab_lock = threading.Lock()


def cache_info() -> CacheInfo:
    return CacheInfo(_cache.hits, _cache.misses, len(_cache._d))


def cache_clear() -> None:
    global _cache
    _cache = _LRU(CACHE_SIZE)


@dataclasses.dataclass(frozen=True)
class _Vocab:
    token_bytes: list  # bytes | None per id
    fingerprint: str


def token_bytes(tokenizer) -> list:
    """The bytes of each token id (None for control pieces), computed once per tokenizer object."""
    return _vocab(tokenizer).token_bytes


def _vocab(tokenizer) -> _Vocab:
    """The tokenizer's token bytes and their hash, computed once per tokenizer object: the cache key
    uses the hash, so two loads of one tokenizer share compiled automata."""
    with _vocab_lock:
        found = _vocabularies.get(tokenizer)
    if found is None:
        token_bytes = list(tokenizer.token_bytes())
        h = hashlib.blake2b(digest_size=16)
        for b in token_bytes:
            h.update(b"\xff" if b is None else len(b).to_bytes(4, "little") + b)
        found = _Vocab(token_bytes, h.hexdigest())
        with _vocab_lock:
            _vocabularies[tokenizer] = found
    return found


def compile_constraint(kind: str, spec: Any, tokenizer, eos_ids: Sequence[int] | None = None,
                       vocab_size: int | None = None) -> TokenAutomaton:
    """The token automaton of a constraint, from the cache when this (kind, spec, vocabulary, EOS ids,
    vocab_size) was compiled before.

    kind: "json_schema" (spec: a schema as a dict or JSON text), "json_object" (spec ignored: any
    JSON object, bounded as `_json_object_regex` says), "regex" (spec: a pattern the whole output
    must match, in the Rust `regex` crate's syntax) or "choice" (spec: a non-empty list of strings).
    tokenizer: has token_bytes() (model.tokenizer's do). eos_ids: the ids that end a sequence,
    allowed only in accepting states (default: the tokenizer's eos_id). vocab_size: the model's
    logits width when it exceeds the tokenizer's (padded embeddings); extra ids are never allowed.
    Raises ValueError naming the reason when the spec cannot be compiled.
    """
    canonical = _canonical(kind, spec)
    vocab = _vocab(tokenizer)
    eos = tuple(sorted({int(i) for i in ((tokenizer.eos_id,) if eos_ids is None and tokenizer.eos_id is not None
                                         else eos_ids or ())}))
    width = max(vocab_size or 0, len(vocab.token_bytes), *(i + 1 for i in eos))
    key = (kind, canonical, vocab.fingerprint, eos, width)
    found = _cache.get(key)
    if found is None:
        try:
            found = _compile(kind, _regex_of(kind, canonical), vocab.token_bytes, eos, width)
        except ValueError as e:
            found = e
        _cache.put(key, found)
    if isinstance(found, ValueError):
        raise ValueError(str(found))
    return found


def _canonical(kind: str, spec: Any) -> str | tuple | None:
    """A hashable form of the spec. JSON keys keep their order: it is the order fields are written in."""
    if kind == "json_schema":
        if isinstance(spec, str):
            try:
                spec = json.loads(spec)
            except json.JSONDecodeError as e:
                raise ValueError(f"json_schema is not valid JSON: {e}") from None
        if not isinstance(spec, dict):
            raise ValueError(f"json_schema must be a JSON object; got {type(spec).__name__}")
        return json.dumps(_enforceable(spec, "schema"), separators=(",", ":"), ensure_ascii=False)
    if kind == "json_object":
        return None
    if kind == "regex":
        if not isinstance(spec, str):
            raise ValueError(f"regex must be a string; got {type(spec).__name__}")
        return spec
    if kind == "choice":
        if isinstance(spec, str) or not isinstance(spec, (list, tuple)):
            raise ValueError(f"choice must be a list of strings; got {type(spec).__name__}")
        if not spec:
            raise ValueError("choice is an empty list; expected at least one string")
        bad = [c for c in spec if not isinstance(c, str)]
        if bad:
            raise ValueError(f"choice must be a list of strings; {bad[0]!r} is a {type(bad[0]).__name__}")
        return tuple(spec)
    raise ValueError(f"constraint kind {kind!r}; expected one of {KINDS}")


# Keywords outlines-core's schema compiler accepts but does not enforce (checked against 0.2.14): an
# output could break them, so a schema using them is refused rather than silently not followed.
# (additionalProperties is enforced by construction: only the listed properties are generated.)
_NOT_ENFORCED = ("uniqueItems", "contains", "minContains", "maxContains", "minProperties", "maxProperties",
                 "patternProperties", "propertyNames", "dependentRequired", "dependentSchemas", "contentEncoding",
                 "contentMediaType")
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")
MAX_INTEGER_RANGE = 1024  # an integer range with bounds becomes an enum of its values, up to this many


def _enforceable(node: Any, path: str) -> Any:
    """The schema with integer bounds rewritten as enums (outlines-core ignores numeric bounds);
    ValueError naming the keyword and where it is for what cannot be enforced."""
    if isinstance(node, list):
        return [_enforceable(x, f"{path}[{i}]") for i, x in enumerate(node)]
    if not isinstance(node, dict):
        return node
    for key in _NOT_ENFORCED:
        if key in node and node[key] not in (False, None):
            raise ValueError(f"json_schema: {key!r} at {path} is not supported (the constraint compiler cannot "
                             "enforce it); leave it out")
    out = {k: (v if k in ("enum", "const", "default", "examples") else _enforceable(v, f"{path}.{k}"))
           for k, v in node.items()}
    bounds = [k for k in _BOUNDS if k in node]
    if bounds:
        if node.get("type") != "integer" or "enum" in node or "const" in node:
            if "enum" in node or "const" in node:
                return out
            raise ValueError(f"json_schema: {bounds[0]!r} at {path} is only supported on an integer with both "
                             f"bounds (at most {MAX_INTEGER_RANGE} values); use an enum or a string pattern")
        low = node.get("minimum", -math.inf)
        if "exclusiveMinimum" in node:
            low = max(low, node["exclusiveMinimum"] + 1)
        high = node.get("maximum", math.inf)
        if "exclusiveMaximum" in node:
            high = min(high, node["exclusiveMaximum"] - 1)
        step = node.get("multipleOf", 1)
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (low, high, step)) or step <= 0:
            raise ValueError(f"json_schema: the bounds at {path} must be numbers (multipleOf > 0)")
        if not math.isfinite(low) or not math.isfinite(high) or high - low >= MAX_INTEGER_RANGE * step:
            raise ValueError(f"json_schema: the integer at {path} needs both bounds and at most "
                             f"{MAX_INTEGER_RANGE} values to be enforced; got {bounds}")
        values = [v for v in range(math.ceil(low), math.floor(high) + 1) if v % step == 0]
        if not values:
            raise ValueError(f"json_schema: no integer at {path} satisfies {bounds}")
        out = {k: v for k, v in out.items() if k not in _BOUNDS}
        out["enum"] = values
    return out


@functools.cache
def _json_object_regex() -> str:
    """Any JSON object two levels deep: its values are scalars, or arrays and objects of scalars.
    Unbounded nesting is not a regular language, so no finite automaton takes all of JSON.
    outlines-core's own bound for {"type": "object"} (three levels) has 1,623 states and took 5-7 s
    on the demo vocabulary; this one 401 states and 0.2 s (docs/benchmarks.md)."""
    from outlines_core import json_schema as js

    key = rf"{js.STRING}{js.WHITESPACE}:{js.WHITESPACE}"
    sep = rf"{js.WHITESPACE},{js.WHITESPACE}"
    scalar = rf"({js.STRING}|{js.NUMBER}|{js.BOOLEAN}|{js.NULL})"

    def array_and_object(value: str) -> tuple[str, str]:
        array = rf"\[{js.WHITESPACE}({value}({sep}{value})*)?{js.WHITESPACE}\]"
        obj = rf"\{{{js.WHITESPACE}({key}{value}({sep}{key}{value})*)?{js.WHITESPACE}\}}"
        return array, obj

    inner_array, inner_object = array_and_object(scalar)
    return array_and_object(rf"({scalar}|{inner_array}|{inner_object})")[1]


def _regex_of(kind: str, canonical) -> str:
    if kind == "regex":
        return canonical
    if kind == "choice":
        return "(" + "|".join(_escape(c) for c in canonical) + ")"
    if kind == "json_object":
        return _json_object_regex()
    from outlines_core.json_schema import build_regex_from_schema

    try:
        return build_regex_from_schema(canonical)
    except Exception as e:  # outlines-core raises ValueError, TypeError or a Rust panic's error
        raise ValueError(f"json_schema cannot be compiled: {e}") from None


_REGEX_META = set("\\.+*?()|[]{}^$#&-~ ")


def _escape(text: str) -> str:
    """text as a literal in the Rust regex syntax; characters that do not print as themselves are
    written \\x{..}, so a pattern and its error messages stay on one line."""
    return "".join("\\" + c if c in _REGEX_META else c if c.isprintable() else f"\\x{{{ord(c):x}}}" for c in text)


# outlines-core's DFA has leftmost-first semantics: once an alternative completes the whole
# pattern, the alternatives after it that could go on are dropped, so "(a|ab)" would never
# write "ab". Every pattern is therefore compiled followed by a sentinel character spelled by one
# extra token: a match is only complete after the sentinel, so no alternative is cut short, and a
# state is accepting when the sentinel token leads from it to the end. U+10FFFF is a
# noncharacter: no output should hold it.
_SENTINEL = r"\x{10FFFF}"
_SENTINEL_BYTES = "\U0010FFFF".encode()


def _compile(kind: str, regex: str, token_bytes: list, eos: tuple[int, ...], width: int) -> TokenAutomaton:
    import outlines_core

    _check_syntax(kind, regex)
    by_bytes: dict[bytes, list[int]] = {}
    for i, b in enumerate(token_bytes):
        if b and i not in eos:  # special tokens (None) and empty pieces never stand for text
            by_bytes.setdefault(b, []).append(i)
    sentinel = width  # an id past the vocabulary; outlines-core's EOS is width + 1, its edges dropped
    by_bytes.setdefault(_SENTINEL_BYTES, []).append(sentinel)
    wrapped = f"(?:{regex}){_SENTINEL}"
    try:
        index = outlines_core.Index(wrapped, outlines_core.Vocabulary(width + 1, by_bytes))
    except Exception as e:
        raise ValueError(f"{kind} cannot be compiled: {str(e).replace(wrapped, regex)}") from None
    src, tok, dst, accepting, initial = _edges(index, sentinel)
    next_state, token_class = _classify(kind, src, tok, dst, accepting.size, width)
    next_state, token_class, accepting = _live(next_state, token_class, accepting, initial)
    if not accepting.size:
        raise ValueError(f"{kind} cannot be completed with this tokenizer's tokens: {regex[:200]!r}")
    if eos:  # one more class: a self-loop in accepting states, nothing elsewhere
        token_class[list(eos)] = next_state.shape[1]
        next_state = np.concatenate([next_state, np.where(accepting, np.arange(accepting.size), -1)[:, None]], 1)
    return TokenAutomaton(next_state.astype(np.int32), token_class, accepting, kind, regex)


def _check_syntax(kind: str, regex: str) -> None:
    """The pattern alone must be valid (wrapped, "a)(b" would be), with the reason when it is not.
    A one-token vocabulary makes this cheap (7 ms for the labeling schema)."""
    import outlines_core

    try:
        outlines_core.Index(regex, outlines_core.Vocabulary(1, {b"\x00": [0]}))
    except Exception as e:
        if "incompatible" in str(e):  # the pattern is fine, the one-token vocabulary cannot write it
            return
        hint = ""
        try:
            re.compile(regex)
        except re.error as python_error:  # outlines-core only says that building the automaton failed
            hint = f" ({python_error})"
        raise ValueError(f"{kind} cannot be compiled: {e}{hint}") from None


def _edges(index, sentinel: int):
    """outlines-core's index as edge arrays (src, token, dst) over dense state numbers (its own
    are sparse), without the sentinel's and EOS's edges; the accepting states (those the sentinel
    leads out of) and the initial state."""
    transitions = index.get_transitions()
    finals = index.get_final_states()
    states = np.array(sorted(transitions.keys() | set(finals)), np.int64)
    number = np.zeros(states.max() + 1, np.int32)
    number[states] = np.arange(states.size, dtype=np.int32)
    src, tok, dst = [], [], []
    for s, out in transitions.items():
        src.append(np.full(len(out), number[s], np.int32))
        tok.append(np.fromiter(out.keys(), np.int64, len(out)))
        dst.append(number[np.fromiter(out.values(), np.int64, len(out))])
    src, tok, dst = (np.concatenate(x) if x else np.zeros(0, np.int64) for x in (src, tok, dst))
    is_final = np.zeros(states.size, bool)
    is_final[number[list(finals)]] = True
    accepting = np.zeros(states.size, bool)
    ends = tok == sentinel
    accepting[src[ends & is_final[dst]]] = True
    keep = tok < sentinel
    return src[keep], tok[keep], dst[keep], accepting, int(number[index.get_initial_state()])


def _classify(kind, src, tok, dst, num_states: int, width: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """next_state [S, C] and token_class [V]: tokens grouped by their column (next state in every
    state). Two random 64-bit hashes of each column name the groups, and the table is then checked
    exactly against every edge. Class 0 is the column with no edge."""
    rng = np.random.default_rng(seed)
    h = np.zeros((width + 1, 2), np.uint64)  # row `width` has no edge: class 0 exists even if no token needs it
    with np.errstate(over="ignore"):
        for k in range(2):
            weight = rng.integers(1, 2**63, num_states, dtype=np.uint64)
            np.add.at(h[:, k], tok, weight[src] * (dst.astype(np.uint64) + np.uint64(k * 7919 + 1)))
    cls = np.unique(h, axis=0, return_inverse=True)[1].reshape(-1)
    never = cls[width]
    cls = np.where(cls == never, 0, np.where(cls < never, cls + 1, cls))[:width].astype(np.int32)
    num_classes = int(cls.max(initial=0)) + 2  # + 1 for EOS
    if num_states * num_classes > MAX_TABLE_ENTRIES:
        raise ValueError(f"{kind} needs {num_states} states x {num_classes} token classes = "
                         f"{num_states * num_classes:,} table entries; the limit is {MAX_TABLE_ENTRIES:,}")
    next_state = np.full((num_states, num_classes - 1), -1, np.int32)
    next_state[src, cls[tok]] = dst
    # Exact: every edge is in its token's class column, and no column allows more than its tokens' edges.
    if ((next_state[src, cls[tok]] == dst).all()
            and ((next_state >= 0).sum(0)[cls] == np.bincount(tok, minlength=width)[:width]).all()):
        return next_state, cls
    if seed >= 3:  # a hash collision put two different columns in one class: astronomically rare
        raise RuntimeError("token classes could not be separated in 4 tries")
    return _classify(kind, src, tok, dst, num_states, width, seed + 1)


def _live(next_state, token_class, accepting, initial):
    """Only the states on a path from the initial state to an accepting one, renumbered from 0 =
    initial, so that no row is ever led where nothing is allowed; classes that became equal merge."""
    num = accepting.size
    rows, cols = np.nonzero(next_state >= 0)
    pairs = np.unique(rows.astype(np.int64) * num + next_state[rows, cols])
    edges = np.stack([pairs // num, pairs % num], 1)  # [E, 2] distinct (state, next state)
    reach, coreach = np.zeros(num, bool), accepting.copy()
    reach[initial] = True
    for seen, a, b in ((reach, 0, 1), (coreach, 1, 0)):
        frontier = seen.copy()
        while frontier.any():
            new = np.zeros(num, bool)
            new[edges[frontier[edges[:, a]], b]] = True
            frontier = new & ~seen
            seen |= frontier
    live = reach & coreach
    if not live[initial]:
        return next_state[:0], token_class, accepting[:0]
    order = np.concatenate([[initial], np.flatnonzero(live & (np.arange(num) != initial))])
    renumber = np.full(num + 1, -1, np.int32)  # index -1 (not allowed) stays -1
    renumber[order] = np.arange(order.size, dtype=np.int32)
    table = renumber[next_state[order]]
    columns, merged = np.unique(np.concatenate([np.full((order.size, 1), -1, np.int32), table], 1), axis=1,
                                return_inverse=True)  # the all -1 column first, so it stays class 0
    merged = merged.reshape(-1)
    never = merged[0]
    remap = np.where(merged == never, 0, np.where(merged < never, merged + 1, merged))[1:]
    out = np.full((order.size, columns.shape[1]), -1, np.int32)
    out[:, remap] = table
    return out, remap[token_class].astype(np.int32), accepting[order]


class AutomatonTable(NamedTuple):
    """Several automata stacked for a batch (shapes: module docstring); a pytree of arrays."""

    next_state: jax.Array  # [S_max, C_max] int32, global state ids
    token_class: jax.Array  # [A_max, V] int32
    automaton_of: jax.Array  # [S_max] int32
    accepting: jax.Array  # [S_max] bool


def pack(automata: Sequence[TokenAutomaton], max_states: int, max_classes: int, max_automata: int,
         vocab_size: int | None = None) -> tuple[AutomatonTable, np.ndarray]:
    """The automata stacked into one table of fixed capacity (numpy arrays; put them on the device
    with jax.device_put), and offsets[a]: automaton a's initial state in it. vocab_size: the logits
    width (default: the automata's); ids past an automaton's vocabulary are never allowed."""
    if len(automata) > max_automata:
        raise ValueError(f"{len(automata)} automata; the table holds {max_automata}")
    total = sum(a.num_states for a in automata)
    if total > max_states:
        raise ValueError(f"the automata have {total} states together; the table holds {max_states}")
    widest = max((a.num_classes for a in automata), default=0)
    if widest > max_classes:
        raise ValueError(f"an automaton has {widest} token classes; the table holds {max_classes}")
    v = vocab_size or max((a.vocab_size for a in automata), default=1)
    next_state = np.full((max_states, max_classes), -1, np.int32)
    token_class = np.zeros((max_automata, v), np.int32)
    automaton_of = np.zeros(max_states, np.int32)
    accepting = np.zeros(max_states, bool)
    offsets = np.zeros(len(automata), np.int32)
    start = 0
    for a, auto in enumerate(automata):
        if auto.vocab_size > v:
            raise ValueError(f"automaton {a} covers {auto.vocab_size} token ids; vocab_size is {v}")
        stop = start + auto.num_states
        next_state[start:stop, :auto.num_classes] = np.where(auto.next_state >= 0, auto.next_state + start, -1)
        token_class[a, :auto.vocab_size] = auto.token_class
        automaton_of[start:stop] = a
        accepting[start:stop] = auto.accepting
        offsets[a] = start
        start = stop
    return AutomatonTable(next_state, token_class, automaton_of, accepting), offsets


def allowed_mask(state_b: jax.Array, table: AutomatonTable) -> jax.Array:
    """[b, V] bool: the tokens each row's state allows."""
    class_bv = table.token_class[table.automaton_of[state_b]]
    return jnp.take_along_axis(table.next_state[state_b], class_bv, axis=1) >= 0


def mask_logits(logits_bv: jax.Array, state_b: jax.Array, table: AutomatonTable,
                constrained_b: jax.Array) -> jax.Array:
    """Logits [b, V] with the tokens a constrained row's state does not allow set to -inf. Rows
    with constrained_b False come back bit-identical; with none constrained nothing is gathered."""

    def masked(logits):
        keep = allowed_mask(state_b, table) | ~constrained_b[:, None]
        return jnp.where(keep, logits, -jnp.inf)

    return jax.lax.cond(constrained_b.any(), masked, lambda logits: logits, logits_bv)


def advance(state_b: jax.Array, token_b: jax.Array, table: AutomatonTable,
            constrained_b: jax.Array) -> jax.Array:
    """Each constrained row's state [b] after its token [b]. A token its state does not allow (only
    possible if the logits were not masked) leaves the state as it was, as do unconstrained rows."""
    class_b = table.token_class[table.automaton_of[state_b], token_b]
    next_b = table.next_state[state_b, class_b]
    return jnp.where(constrained_b & (next_b >= 0), next_b, state_b)


class TableManager:
    """The automata an engine's rows use, packed into one fixed-capacity AutomatonTable.

    `offsets(automata, in_use)` makes room for the automata a batch of rows needs and returns each
    one's initial (global) state. An automaton stays in the table while any row uses it, and after,
    until its room is needed; then the automata no row uses are dropped and the rest repacked, and
    `remap` (old global state -> new) must be applied to the rows' states. The capacity (states,
    classes, automata) only grows, by powers of two, when the automata in use need more: a new
    shape, so the engine's functions compile again (once per growth).
    """

    def __init__(self, vocab_size: int, states: int, classes: int, automata: int):
        self.vocab_size = vocab_size
        self.capacity = (states, classes, automata)
        self.loaded: list[TokenAutomaton] = []
        self.table, self._offsets = self._pack()

    def _pack(self):
        table, offsets = pack(self.loaded, *self.capacity, vocab_size=self.vocab_size)
        return table, {id(a): int(o) for a, o in zip(self.loaded, offsets)}

    def offsets(self, automata: Sequence[TokenAutomaton], in_use: Sequence[TokenAutomaton]
                ) -> tuple[list[int], np.ndarray | None]:
        """(initial state of each of `automata`, remap or None). in_use: the automata of rows
        still running, which keep their place or are moved with the remap."""
        new = list({id(a): a for a in automata if id(a) not in self._offsets}.values())
        if not new:
            return [self._offsets[id(a)] for a in automata], None
        for a in new:
            if a.vocab_size > self.vocab_size:
                raise ValueError(f"a constraint covers {a.vocab_size} token ids; the model's vocabulary has "
                                 f"{self.vocab_size}")
        old_table, old_offsets = self.table, self._offsets
        if self._fits(self.loaded + new):
            self.loaded += new  # appended: the others keep their offsets
        else:
            keep = {id(a) for a in in_use} | {id(a) for a in automata}
            self.loaded = [a for a in self.loaded if id(a) in keep] + new
            need = self._need(self.loaded)
            if not self._fits(self.loaded):
                self.capacity = tuple(max(c, 1 << math.ceil(math.log2(max(n, 1))))
                                      for c, n in zip(self.capacity, need))
                log.warning("constraint table grows to %s (states, classes, automata): the engine compiles again",
                            self.capacity)
        self.table, self._offsets = self._pack()
        moved = any(self._offsets.get(i, o) != o for i, o in old_offsets.items())
        if moved:  # (growing alone moves nothing: the capacity only grows)
            remap = np.zeros(old_table.next_state.shape[0], np.int32)
            for a in self.loaded:
                if id(a) in old_offsets:
                    o, n = old_offsets[id(a)], self._offsets[id(a)]
                    remap[o:o + a.num_states] = np.arange(n, n + a.num_states, dtype=np.int32)
        else:
            remap = None
        return [self._offsets[id(a)] for a in automata], remap

    def _need(self, automata) -> tuple[int, int, int]:
        return (sum(a.num_states for a in automata), max((a.num_classes for a in automata), default=1),
                len(automata))

    def _fits(self, automata) -> bool:
        return all(n <= c for n, c in zip(self._need(automata), self.capacity))
