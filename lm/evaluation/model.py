"""One scoring interface over any decoder-only model of ours: lm-evaluation-harness's contract.

    lm = LanguageModel(model, params, tokenizer, batch_size=16)
    lm.loglikelihood([("Question: 2+2=", " 4"), ...])   # [(log p(continuation | context), greedy?)]
    lm.loglikelihood_rolling(["a whole document", ...])  # [log p(document)]
    lm.generate_until([("Q: ...\nA:", ["\n"], 32), ...])  # [continuation text]

Requests whose contexts share a prefix (a question and its choices) become one prefix
tree: the prefix once, then each request's remainder as a branch that attends to the
prefix and to itself. Trees are packed side by side into rows of `row_length` tokens (256;
a longer tree gets a row of its own bucketed length), first fit from the longest, and a
compiled call scores about batch_size * row_length tokens; a mask keeps every tree to
itself (`_packed_tree_mask`) and positions restart with each tree. So padding is a few per
cent and a task compiles two or three programs, not one per length. Only the positions
whose next token is scored are projected onto the vocabulary (a loop over chunks of them,
as many as the call needs). Results come back in request order, and every tree is scored
on its own (float32 log-softmax), so they do not depend on the batch size or on what
shares its row.

Tokenisation follows the harness: a context's trailing spaces move to the continuation,
the pair is encoded whole and split where the context's tokens end; the model's BOS is
prepended when it uses one (a model without BOS gets its EOS before an empty context and
before every rolling document); inputs longer than the model's context keep their last
tokens.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lm import decode
from lm.models.attention import causal_mask

MIN_BUCKET = 32
PROJECT_CHUNK = 128  # positions projected onto the vocabulary at a time (bounds memory)
ROW_LENGTH = 256  # tokens per packed row (longer requests get longer rows)


def bucket_length(n: int, limit: int | None, minimum: int = MIN_BUCKET) -> int:
    """The padded length for a row of `n` tokens, capped at limit: multiples of 16 up to
    128 (short rows are most of a benchmark), then powers of two and their midpoints (192,
    256, 384, ...), so that padding stays small while a task compiles a handful of shapes."""
    if n <= 128:
        length = max(minimum, -(-n // 16) * 16)
    else:
        length = 1 << (n - 1).bit_length()
        if n <= length * 3 // 4:
            length = length * 3 // 4
    return min(length, limit) if limit else length


def _packed_tree_mask(trees: jax.Array, segments: jax.Array) -> jax.Array:
    """Causal mask of rows that pack several prefix trees side by side.

    trees [b, L]: which tree of the row a token belongs to (1, 2, ...; 0 = padding).
    segments [b, L]: within its tree, 1 = the shared context, 2 + a = branch a.
    -> [b, 1, L, L]: a token sees the earlier tokens of its own tree's context and of its
    own branch (`attention.prefix_tree_mask` per tree), nothing of the other trees.
    """
    q_tree, k_tree = trees[:, :, None], trees[:, None, :]
    q_seg, k_seg = segments[:, :, None], segments[:, None, :]
    visible = (k_tree == q_tree) & (k_tree != 0) & ((k_seg == q_seg) | (k_seg == 1))
    return causal_mask(trees.shape[1]) & visible[:, None]


def _packed_features(module, tokens, trees, segments, positions):
    """A `DecoderOnly` method (for `model.apply(..., method=)`): final hidden states
    [b, L, d] of rows packed with prefix trees (see `_packed_tree_mask`), as
    `DecoderOnly.features` computes them, with the packed rows' mask."""
    mask = _packed_tree_mask(trees, segments)
    return module.features(tokens, segment_ids=trees, positions=positions, mask=mask)


def _project_scores(model, params, hidden, targets):
    """hidden [r, d], targets [r] -> (target log-probs [r], target is the argmax [r])."""
    logits = model.apply({"params": params}, hidden[None], method=model.project)[0]
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logprobs, targets[:, None], axis=-1)[:, 0]
    return picked, logits.argmax(-1) == targets


@functools.partial(jax.jit, static_argnames=("model",))
def _score(model, params, tokens, trees, segments, positions, reads, targets, owners, num_reads):
    """Log-likelihoods of the branches of rows packed with prefix trees.

    tokens, trees, segments, positions [b, L]: the rows (see `_packed_tree_mask`; positions
      restart at 0 with each tree and continue its context in each branch).
    reads, targets, owners [r] (r: a multiple of PROJECT_CHUNK, at least b * L): the
      positions (flat indices into b * L) whose next-token distribution is read, the token
      wanted there, and the branch slot it adds to (0..r-1; r: unused); the first
      `num_reads` (a scalar) are used. Only those are projected onto the vocabulary,
      PROJECT_CHUNK at a time in a loop of ceil(num_reads / PROJECT_CHUNK) steps, so that
      the read count is a value, not a shape (one compiled program per row shape).
    -> (sum log-prob [r], every target the argmax [r]) per branch slot.
    """
    hidden = model.apply(
        {"params": params}, tokens, trees, segments, positions, method=_packed_features
    )
    hidden = hidden.reshape(-1, hidden.shape[-1])  # [b * L, d]
    r = reads.shape[0]

    def project_chunk(i, carry):
        picked, greedy = carry
        start = i * PROJECT_CHUNK
        where = jax.lax.dynamic_slice(reads, (start,), (PROJECT_CHUNK,))
        wanted = jax.lax.dynamic_slice(targets, (start,), (PROJECT_CHUNK,))
        p, g = _project_scores(model, params, hidden[where], wanted)  # [chunk, vocab] logits
        return (
            jax.lax.dynamic_update_slice(picked, p, (start,)),
            jax.lax.dynamic_update_slice(greedy, g, (start,)),
        )

    steps = (num_reads + PROJECT_CHUNK - 1) // PROJECT_CHUNK
    picked, greedy = jax.lax.fori_loop(
        0, steps, project_chunk, (jnp.zeros(r, jnp.float32), jnp.zeros(r, jnp.bool_))
    )
    sums = jax.ops.segment_sum(picked, owners, num_segments=r + 1)[:r]
    misses = jax.ops.segment_sum((~greedy).astype(jnp.int32), owners, num_segments=r + 1)[:r]
    return sums, misses == 0


class _Tree:
    """One row: a shared context and the branches that continue it, each branch seeing the
    context and itself only. A branch is (token ids, how many of its last ids are scored);
    `results` are the result indices the branches answer."""

    def __init__(
        self, context: list[int], branches: list[tuple[list[int], int]], results: list[int]
    ):
        self.context, self.branches, self.results = context, branches, results

    @property
    def length(self) -> int:
        return len(self.context) + sum(len(ids) - 1 for ids, _ in self.branches)

    @property
    def num_reads(self) -> int:
        return sum(scored for _, scored in self.branches)

    def layout(self):
        """-> tokens, segments, positions (lists), reads (index, target, branch) triples."""
        n = len(self.context)
        tokens, segments, positions = list(self.context), [1] * n, list(range(n))
        reads = []
        for a, (ids, scored) in enumerate(self.branches):
            # ids[j] is predicted at the context's last token (j = 0) or at ids[j - 1].
            where = [n - 1] + list(range(len(tokens), len(tokens) + len(ids) - 1))
            reads += [(where[j], ids[j], a) for j in range(len(ids) - scored, len(ids))]
            tokens += ids[:-1]
            segments += [2 + a] * (len(ids) - 1)
            positions += range(n, n + len(ids) - 1)
        return tokens, segments, positions, reads


MAX_BRANCHES = 16


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _trees(
    context: list[int], branches: list[tuple[list[int], int, int]], max_length: int
) -> list[_Tree]:
    """Rows for one shared context and its branches (ids, scored, result index): as many
    branches per row as fit in max_length (MAX_BRANCHES at most); a branch that does not fit
    with the whole context keeps the end of context + branch, as the harness truncates."""
    out: list[_Tree] = []
    current: list[tuple[list[int], int, int]] = []

    def flush():
        if current:
            out.append(
                _Tree(context, [(ids, n) for ids, n, _ in current], [i for _, _, i in current])
            )
            current.clear()

    for ids, scored, index in branches:
        if len(context) + len(ids) - 1 > max_length:
            whole = (context + ids)[-(max_length + 1) :]
            scored = min(scored, len(whole) - 1)
            out.append(_Tree(whole[:-scored], [(whole[-scored:], scored)], [index]))
            continue
        used = len(context) + sum(len(b) - 1 for b, _, _ in current)
        if len(current) == MAX_BRANCHES or used + len(ids) - 1 > max_length:
            flush()
        current.append((ids, scored, index))
    flush()
    return out


class LanguageModel:
    """loglikelihood / loglikelihood_rolling / generate_until over a decoder-only model.

    model, params: a `DecoderOnly` and its params (trained here or imported).
    tokenizer: ours or an imported model's (`encode`, `decode`, `bos_id`, `eos_id`, `add_bos`).
    batch_size, row_length: a compiled call scores batch_size rows of row_length tokens,
      each packed with several requests (or fewer, longer rows for longer requests).
    max_length: the longest input (default: the model's `max_len`).
    """

    def __init__(
        self,
        model,
        params,
        tokenizer,
        *,
        batch_size: int = 16,
        max_length: int | None = None,
        row_length: int = ROW_LENGTH,
    ):
        if model.config.architecture != "decoder":
            raise ValueError(
                "LanguageModel scores decoder-only models; an encoder-decoder "
                "is evaluated with Seq2SeqModel"
            )
        self.model, self.params, self.tokenizer = model, params, tokenizer
        self.batch_size = batch_size
        self.max_length = min(max_length or model.config.max_len, model.config.max_len)
        self.row_length = min(row_length, self.max_length)
        self._prefix = [tokenizer.bos_id] if tokenizer.add_bos else [tokenizer.eos_id]
        self.first_scored: float | None = None  # time.time() when the first batch came back

    # ------------------------------------------------------------------ tokenisation

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids), split as the harness does."""
        spaces = len(context) - len(context.rstrip(" "))
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tokenizer.encode(context + continuation)
        context_ids = self.tokenizer.encode(context) if context else []
        # As the harness: BOS when the model uses one; otherwise a prefix only for an empty
        # context, which needs something to condition on.
        prefix = self._prefix if (self.tokenizer.add_bos or not context_ids) else []
        return prefix + whole[: len(context_ids)], whole[len(context_ids) :]

    # ------------------------------------------------------------------ scoring

    def _rows(self, trees: list[_Tree]) -> list[tuple[int, list[int]]]:
        """Packs trees into rows: (row length, tree indices), longest rows first.

        A tree of n tokens goes in a row of length max(row_length, bucket_length(n)) -- most
        trees into rows of row_length -- and the trees of one row length are packed first
        fit, longest first, so that rows carry little padding."""
        # A row holds at most as many reads as tokens, so that a call's reads fit in its
        # b * L read slots: a tree's size is the larger of its tokens and its reads.
        size = [max(tree.length, tree.num_reads) for tree in trees]
        open_rows: dict[int, list[tuple[int, list[int]]]] = {}  # length -> [(room, trees)]
        for t in sorted(range(len(trees)), key=lambda t: -size[t]):
            length = max(self.row_length, bucket_length(size[t], None))
            rows = open_rows.setdefault(length, [])
            for r, (room, members) in enumerate(rows):
                if size[t] <= room:
                    rows[r] = (room - size[t], members + [t])
                    break
            else:
                rows.append((length - size[t], [t]))
        return [
            (length, members)
            for length in sorted(open_rows, reverse=True)
            for _, members in open_rows[length]
        ]

    def _score_trees(self, trees: list[_Tree], num_results: int) -> list[tuple[float, bool]]:
        """(sum log-prob, greedy?) for every result index the trees' branches answer.

        Trees are packed into rows (`_rows`); a call scores about batch_size * row_length
        tokens: batch_size rows of row_length, fewer of longer rows, and the last call of a
        length a power of two of rows, so that few shapes (each one a compilation) occur;
        the model's first call is one row (results come back early). Reads are numbered in
        call order; each branch gets a slot of the call's results."""
        results: list = [None] * num_results
        rows = self._rows(trees)
        start = 0
        while start < len(rows):
            length = rows[start][0]
            per_call = max(1, self.batch_size * self.row_length // length)
            if self.first_scored is None:
                # The run's first call scores one row: its results, and the progress bar's
                # first rate, come back after a sixteenth of a batch's compute, for one more
                # compiled shape.
                per_call = 1
            chunk = [members for n, members in rows[start : start + per_call] if n == length]
            start += len(chunk)
            num_rows = per_call if len(chunk) == per_call else 1 << (len(chunk) - 1).bit_length()
            reads = -(-num_rows * length // PROJECT_CHUNK) * PROJECT_CHUNK
            tokens = np.zeros((num_rows, length), np.int32)
            tree_ids = np.zeros((num_rows, length), np.int32)
            segments = np.zeros((num_rows, length), np.int32)
            positions = np.zeros((num_rows, length), np.int32)
            read_index = np.zeros(reads, np.int32)
            targets = np.zeros(reads, np.int32)
            owners = np.full(reads, reads, np.int32)
            answers = []  # result index of each branch slot
            j = 0
            for r, members in enumerate(chunk):
                at = 0
                for k, t in enumerate(members):
                    ids, segs, pos, wanted_reads = trees[t].layout()
                    span = slice(at, at + len(ids))
                    tokens[r, span], segments[r, span], positions[r, span] = ids, segs, pos
                    tree_ids[r, span] = k + 1
                    for index, target, branch in wanted_reads:
                        read_index[j] = r * length + at + index
                        targets[j] = target
                        owners[j] = len(answers) + branch
                        j += 1
                    answers += trees[t].results
                    at += len(ids)
            sums, greedy = _score(
                self.model,
                self.params,
                tokens,
                tree_ids,
                segments,
                positions,
                read_index,
                targets,
                owners,
                np.int32(j),
            )
            sums, greedy = np.asarray(sums), np.asarray(greedy)
            if self.first_scored is None:
                self.first_scored = time.time()
            for slot, index in enumerate(answers):
                results[index] = (float(sums[slot]), bool(greedy[slot]))
        return results

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """For each (context, continuation): log p(continuation | context) and whether every
        continuation token is the model's argmax.

        Consecutive requests whose contexts share most of their tokens (the choices of a
        multiple-choice question; Winogrande's two fillings of one sentence) share a row:
        the common prefix is computed once and each request's remainder attends to it and to
        itself (a prefix-tree mask), which gives the numbers of separate rows."""
        encoded = []
        for context, continuation in requests:
            context_ids, ids = self.encode_pair(context, continuation)
            if not ids:
                raise ValueError(f"empty continuation after tokenisation: {continuation!r}")
            encoded.append((context_ids, ids))
        groups: list[tuple[int, list[int]]] = []  # (shared prefix length, request indices)
        for i, (context_ids, _) in enumerate(encoded):
            if groups:
                shared, members = groups[-1]
                common = min(shared, _common_prefix(encoded[members[0]][0], context_ids))
                if common >= max(1, len(context_ids) // 2):
                    groups[-1] = (common, members + [i])
                    continue
            groups.append((len(context_ids), [i]))
        trees = []
        for shared, members in groups:
            prefix = encoded[members[0]][0][:shared]
            branches = [
                (encoded[i][0][shared:] + encoded[i][1], len(encoded[i][1]), i) for i in members
            ]
            trees += _trees(prefix, branches, self.max_length)
        return self._score_trees(trees, len(requests))

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        """log p(text) of whole documents, summed over windows of the model's context as the
        harness cuts them: disjoint windows of `max_length` predictions from the start; the
        last, shorter one keeps a full context of the tokens before it."""
        width = self.max_length
        trees, owner = [], []
        for d, text in enumerate(texts):
            ids = self._prefix + self.tokenizer.encode(text)
            targets, done = len(ids) - 1, 0
            while done < targets:
                count = min(width, targets - done)
                end = done + count + 1  # ids[done+1 : end] are this window's targets
                window = ids[max(0, end - width - 1) : end]
                trees.append(_Tree(window[:-count], [(window[-count:], count)], [len(owner)]))
                owner.append(d)
                done += count
        totals = [0.0] * len(texts)
        for d, (logprob, _) in zip(owner, self._score_trees(trees, len(owner)), strict=True):
            totals[d] += logprob
        return totals

    def generate_until(self, requests: Sequence[tuple[str, Sequence[str], int]]) -> list[str]:
        """Greedy continuations of each (context, stop strings, max new tokens), cut at the
        first stop string; batched by identical max-new-tokens."""
        out: list[str] = [""] * len(requests)
        by_budget: dict[int, list[int]] = {}
        for i, (_, _, max_tokens) in enumerate(requests):
            by_budget.setdefault(int(max_tokens), []).append(i)
        for max_tokens, indices in by_budget.items():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                room = self.max_length - max_tokens
                prompts = [
                    (self._prefix + self.tokenizer.encode(requests[i][0]))[-room:] for i in chunk
                ]
                continuations = decode.generate(
                    self.model,
                    self.params,
                    prompts,
                    max_new_tokens=max_tokens,
                    eos_id=self.tokenizer.eos_id,
                    pad_to=bucket_length(max(map(len, prompts)), room),
                )
                if self.first_scored is None:
                    self.first_scored = time.time()
                for i, ids in zip(chunk, continuations, strict=True):
                    out[i] = decode.cut_at_stop(self.tokenizer.decode(ids), requests[i][1])
        return out


class Seq2SeqModel:
    """generate_until over an encoder-decoder (translation): greedy decoding of each source.

    encoder_len: sources keep their first encoder_len - 1 tokens, then EOS (as in training).
    """

    def __init__(self, model, params, tokenizer, *, encoder_len: int, batch_size: int = 16):
        if model.config.architecture != "encoder_decoder":
            raise ValueError(
                "Seq2SeqModel needs an encoder-decoder; score decoder-only models "
                "with LanguageModel"
            )
        self.model, self.params, self.tokenizer = model, params, tokenizer
        self.encoder_len, self.batch_size = encoder_len, batch_size
        self.first_scored: float | None = None  # time.time() when the first batch came back

    def generate_until(self, requests: Sequence[tuple[str, Sequence[str], int]]) -> list[str]:
        """Greedy output for each (source text, stop strings, max new tokens)."""
        out: list[str] = [""] * len(requests)
        by_budget: dict[int, list[int]] = {}
        for i, (_, _, max_tokens) in enumerate(requests):
            by_budget.setdefault(int(max_tokens), []).append(i)
        for max_tokens, indices in by_budget.items():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                sources = [
                    self.tokenizer.encode(requests[i][0])[: self.encoder_len - 1]
                    + [self.tokenizer.eos_id]
                    for i in chunk
                ]
                outputs = decode.generate_seq2seq(
                    self.model,
                    self.params,
                    sources,
                    max_new_tokens=max_tokens,
                    bos_id=self.tokenizer.bos_id,
                    eos_id=self.tokenizer.eos_id,
                    pad_to=bucket_length(max(map(len, sources)), self.encoder_len),
                )
                if self.first_scored is None:
                    self.first_scored = time.time()
                for i, ids in zip(chunk, outputs, strict=True):
                    out[i] = decode.cut_at_stop(self.tokenizer.decode(ids), requests[i][1])
        return out


def harness_model(model, params, tokenizer, data_cfg, *, batch_size: int, max_length: int):
    """The harness's model for a Flax module of ours: a `LanguageModel` (decoder-only, inputs cut
    to `max_length` tokens) or a `Seq2SeqModel` (encoder-decoder, sources cut to the run's
    data_cfg.encoder_len), scoring `batch_size` rows per compiled batch."""
    if model.config.architecture == "decoder":
        return LanguageModel(model, params, tokenizer, batch_size=batch_size, max_length=max_length)
    return Seq2SeqModel(
        model, params, tokenizer, encoder_len=data_cfg.encoder_len, batch_size=batch_size
    )
