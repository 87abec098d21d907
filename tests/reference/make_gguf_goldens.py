"""Write golden logits for the two GGUF checkpoints, computed by Hugging Face `transformers`.

Run by hand, from the repository root, in an environment with the `[reference]` extra
(torch==2.13.0 CPU, transformers, accelerate) plus `gguf`; the default test-suite never
imports torch and only reads the files written here:

    python -m venv --system-site-packages /work/refvenv
    /work/refvenv/bin/pip install torch==2.13.0 transformers accelerate
    /work/refvenv/bin/python tests/reference/make_gguf_goldens.py

About 3-5 minutes on a 2-core CPU (much of it dequantising the Gemma 3 file and loading its
262,144-piece tokenizer). It writes `tests/goldens/gguf/{smollm2,gemma3}.npz`, each with:

  prompts          [4] unicode       the prompt strings
  input_ids        [4, L] int32      HF tokenizer ids (default special tokens), right-padded with -1
  lengths          [4] int32         number of ids per prompt
  last_positions   [4, 4] int32      the last 4 positions of each prompt
  vocab_ids        [V_sub] int32     sorted union of the top-32 ids at every recorded position
                                     and 512 ids drawn with numpy seed 0 from the whole vocabulary
  logits           [4, 4, V_sub] f32 logits at last_positions restricted to vocab_ids
  logsumexp        [4, 4] f32        logsumexp over the full vocabulary at last_positions
  argmax           [4, 4] int32      argmax over the full vocabulary at last_positions
  greedy           [4, 32] int32     32 greedy new tokens per prompt (batch 1, no padding,
                                     not stopped at EOS, no logits processors)
  greedy_margin    [4, 32] f32       top-1 minus top-2 logit at each greedy step (from one
                                     full forward pass); a tiny margin means a tie-prone step
  transformers_version, torch_version   strings

Every prompt runs alone (batch 1, no padding, float32 weights dequantised by transformers,
eager attention). The script checks that `generate` did nothing but argmax: a plain forward
pass over prompt + the 32 generated tokens must give the same argmax at every step.
"""

from __future__ import annotations

import os
import pathlib
import sys
import time

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from lm.data.assets import fetch  # noqa: E402

OUT_DIR = ROOT / "tests" / "goldens" / "gguf"
MODELS = ("smollm2", "gemma3")
# Chosen among a few candidates so that greedy decoding has no near-tie early on (see
# greedy_margin): a near-tie lets float32 rounding in another implementation pick the
# other token and the continuations then differ for reasons that are not bugs.
PROMPTS = (
    "The history of the town begins in the twelfth century, when a small group of "
    "merchants built a market beside the river.",
    "def fibonacci(n):",
    "1, 2, 3, 4, 5, 6,",
    "The cat sat on the mat. The cat sat on the mat. The cat sat on the",
)
N_LAST = 4  # recorded positions per prompt
TOP_K = 32  # top ids per recorded position kept in vocab_ids
N_RANDOM = 512  # random vocabulary ids kept in vocab_ids
N_NEW = 32  # greedy tokens per prompt


def load(name: str):
    path = pathlib.Path(fetch(name))
    directory, filename = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=filename, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    return tokenizer, model


@torch.inference_mode()
def forward_logits(model, ids: list[int]) -> np.ndarray:
    """Float32 logits [len(ids), vocab] of one unpadded sequence."""
    out = model(
        input_ids=torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        use_cache=False,
    )
    return out.logits[0].float().numpy()


@torch.inference_mode()
def greedy(model, ids: list[int], vocab: int) -> list[int]:
    """N_NEW greedy tokens: no EOS stop, no logits processors."""
    config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=N_NEW,
        min_new_tokens=0,
        eos_token_id=None,
        pad_token_id=None,
        bos_token_id=None,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        suppress_tokens=None,
        begin_suppress_tokens=None,
        bad_words_ids=None,
        forced_bos_token_id=None,
        forced_eos_token_id=None,
        temperature=None,
        top_k=None,
        top_p=None,
        use_cache=True,
    )
    out = model.generate(
        input_ids=torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        generation_config=config,
    )
    new = out[0, len(ids) :].tolist()
    assert len(new) == N_NEW, (len(new), N_NEW)
    assert all(0 <= t < vocab for t in new)
    return new


def make(name: str) -> dict[str, np.ndarray]:
    t0 = time.time()
    tokenizer, model = load(name)
    vocab = model.config.vocab_size
    print(
        f"[{name}] loaded {type(model).__name__} and {type(tokenizer).__name__} "
        f"(vocab {vocab}) in {time.time() - t0:.1f}s",
        flush=True,
    )

    encoded = [tokenizer(p)["input_ids"] for p in PROMPTS]
    lengths = np.array([len(e) for e in encoded], np.int32)
    assert lengths.min() >= N_LAST and lengths.max() <= 40, lengths
    assert lengths.max() >= 20, lengths
    input_ids = np.full((len(PROMPTS), lengths.max()), -1, np.int32)
    for i, e in enumerate(encoded):
        input_ids[i, : len(e)] = e
        print(f"[{name}] prompt {i}: {len(e)} ids {tokenizer.convert_ids_to_tokens(e)}", flush=True)

    last_positions = np.stack([np.arange(n - N_LAST, n) for n in lengths]).astype(np.int32)
    full = np.stack([forward_logits(model, e)[last_positions[i]] for i, e in enumerate(encoded)])
    full = full.astype(np.float32)  # [4, 4, vocab]
    top = np.argsort(-full, axis=-1)[..., :TOP_K]
    rand = np.random.default_rng(0).choice(vocab, N_RANDOM, replace=False)
    vocab_ids = np.union1d(top.ravel(), rand).astype(np.int32)
    m = full.max(-1, keepdims=True)
    logsumexp = (m[..., 0] + np.log(np.exp(full - m).sum(-1))).astype(np.float32)
    argmax = full.argmax(-1).astype(np.int32)

    tokens, margins = [], []
    for i, e in enumerate(encoded):
        t = time.time()
        new = greedy(model, e, vocab)
        # generate must be plain argmax: check against one uncached forward pass.
        logits = forward_logits(model, e + new)[len(e) - 1 : len(e) - 1 + N_NEW]
        plain = logits.argmax(-1)
        if not np.array_equal(plain, new):
            bad = np.nonzero(plain != np.array(new))[0]
            raise AssertionError(
                f"[{name}] prompt {i}: generate differs from argmax at steps {bad}"
            )
        top2 = np.sort(logits, axis=-1)[:, -2:]
        margins.append(top2[:, 1] - top2[:, 0])
        tokens.append(new)
        print(
            f"[{name}] greedy {i} ({time.time() - t:.1f}s, min margin {margins[-1].min():.4f}): "
            f"{tokenizer.decode(new)!r}",
            flush=True,
        )

    print(f"[{name}] done in {time.time() - t0:.1f}s", flush=True)
    return dict(
        prompts=np.array(PROMPTS),
        input_ids=input_ids,
        lengths=lengths,
        last_positions=last_positions,
        vocab_ids=vocab_ids,
        logits=np.take(full, vocab_ids, axis=-1).astype(np.float32),
        logsumexp=logsumexp,
        argmax=argmax,
        greedy=np.array(tokens, np.int32),
        greedy_margin=np.array(margins, np.float32),
        transformers_version=np.array(transformers.__version__),
        torch_version=np.array(torch.__version__),
    )


def main(argv: list[str]) -> None:
    torch.set_grad_enabled(False)
    names = argv[1:] or MODELS
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for name in names:
        arrays = make(name)
        path = OUT_DIR / f"{name}.npz"
        np.savez_compressed(path, **arrays)
        print(f"wrote {path.relative_to(ROOT)} ({os.path.getsize(path)} bytes)", flush=True)


if __name__ == "__main__":
    main(sys.argv)
