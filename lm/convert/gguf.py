"""Import of GGUF checkpoints (llama.cpp's format) into `lm`'s own modules.

Two families are supported, each mapped onto `ModelConfig` options of the same
modules that train here:

- ``llama`` (e.g. SmolLM2): RoPE, RMSNorm, SwiGLU, grouped-query attention.
- ``gemma3`` (e.g. Gemma 3 270M): sliding-window local layers (5 local : 1 global)
  with their own RoPE base, query/key RMSNorm, norms on each sublayer's output,
  GeGLU (tanh), embeddings scaled by sqrt(d_model).

Quantised tensors are dequantised to float32 with the `gguf` package. GGUF stores a
linear layer's weight as ``[out, in]`` (as numpy sees it); our kernels are
``[in, ...out]``. Two conversions llama.cpp applied when it wrote such files are
undone here: the Llama family's query/key rows are permuted for llama.cpp's
interleaved RoPE (we use the half-split layout), and Gemma's RMSNorm weights
already include the ``+1`` of its ``x * (1 + w)`` norm (which is exactly our
``x * scale``, so they are used as they are).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Callable
from typing import Any

import numpy as np

from lm.data.tokenizers import PretrainedTokenizer, byte_level_bpe, sentencepiece_bpe
from lm.models.transformer import ModelConfig, to_layout


class CheckpointFormatError(ValueError):
    """The file is not the checkpoint it claims to be (format, architecture, tensors)."""


@dataclasses.dataclass
class Pretrained:
    """An imported model: its config, float32 params (nested dicts) and tokenizer."""

    config: ModelConfig
    params: dict[str, Any]
    tokenizer: PretrainedTokenizer
    source: str


def _reader(path: pathlib.Path):
    import gguf

    if path.is_dir():
        raise FileNotFoundError(
            f"{path} is a directory, not a GGUF file; pass gguf:FILE with a .gguf checkpoint, "
            "or hf:DIR for a Hugging Face directory."
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"GGUF file {path} does not exist; pass gguf:FILE with the path of a .gguf checkpoint."
        )
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise CheckpointFormatError(
            f'{path} is not a GGUF file (it starts with {magic!r}, not b"GGUF"); '
            "pass a .gguf checkpoint, or hf:DIR for a Hugging Face directory."
        )
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # The reader raises several kinds on a cut file.
        raise CheckpointFormatError(
            f"{path} could not be read as GGUF ({type(e).__name__}: {e}); the file is probably "
            f"truncated or corrupt ({path.stat().st_size:,} bytes): download it again."
        ) from e


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise CheckpointFormatError(f"GGUF metadata has no {key!r}; the file is incomplete.")
        return default
    return field.contents()


@dataclasses.dataclass(frozen=True)
class GgufFamily:
    """What one GGUF architecture adds to the fields every one has (`read_config`).

    config: (get: metadata key under the architecture -> value, d_model, heads) -> the
      `ModelConfig` fields of this family.
    interleaved_rope: llama.cpp stored the q/k rows interleaved for its RoPE
      (`_unpermute_rope_rows` undoes it).
    """

    config: Callable[[Callable, int, int], dict[str, Any]]
    interleaved_rope: bool


def _llama_fields(get, d_model: int, heads: int) -> dict[str, Any]:
    head_dim = int(get("rope.dimension_count", d_model // heads))
    return dict(head_dim=head_dim, mlp_activation="silu")


def _gemma3_fields(get, d_model: int, heads: int) -> dict[str, Any]:
    # Two facts are not in the file: local layers use RoPE base 10,000, and every sixth layer
    # is global (transformers' Gemma3 config defaults; see DATA.md).
    return dict(
        head_dim=int(get("attention.key_length")),
        mlp_activation="gelu_tanh",
        qk_norm=True,
        sublayer_output_norm=True,
        scale_embeddings=True,
        sliding_window=int(get("attention.sliding_window")),
        global_every=6,
        rope_local_base=10_000.0,
    )


# GGUF `general.architecture` -> its family; a new family is one entry.
FAMILIES = {
    "llama": GgufFamily(config=_llama_fields, interleaved_rope=True),
    "gemma3": GgufFamily(config=_gemma3_fields, interleaved_rope=False),
}
SUPPORTED = tuple(FAMILIES)


def read_config(reader) -> ModelConfig:
    """The `ModelConfig` the GGUF metadata describes."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED:
        raise CheckpointFormatError(
            f"GGUF architecture {arch!r} is not supported; supported: {SUPPORTED}."
        )
    get = lambda key, default=None: _field(reader, f"{arch}.{key}", default)  # noqa: E731
    d_model = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = int(get("vocab_size", len(tokens.data) if tokens else 0))
    common = dict(
        architecture="decoder",
        vocab_size=vocab,
        d_model=d_model,
        num_layers=int(get("block_count")),
        num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        mlp_dim=int(get("feed_forward_length")),
        mlp_gated=True,
        norm="rmsnorm",
        norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        position="rotary",
        rope_base=float(get("rope.freq_base", 10_000.0)),
        max_len=int(get("context_length")),
        use_bias=False,
        tied_embeddings="output.weight" not in {t.name for t in reader.tensors},
    )
    return ModelConfig(**common, **FAMILIES[arch].config(get, d_model, heads))


def read_tokenizer(reader) -> PretrainedTokenizer:
    """The tokenizer from the GGUF metadata (byte-level BPE or SentencePiece-style BPE)."""
    kind = _field(reader, "tokenizer.ggml.model")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    special = {
        name: int(_field(reader, f"tokenizer.ggml.{name}_token_id", -1))
        for name in ("bos", "eos", "unknown", "padding")
    }
    if kind == "gpt2":
        merges = list(_field(reader, "tokenizer.ggml.merges"))
        pre = _field(reader, "tokenizer.ggml.pre", "default")
        tok = byte_level_bpe(tokens, merges, types, split_digits=pre == "smollm")
        add_bos_default = False
    elif kind == "llama":
        unk = tokens[special["unknown"]] if special["unknown"] >= 0 else "<unk>"
        tok = sentencepiece_bpe(tokens, types, unk_token=unk)
        add_bos_default = True  # llama.cpp's default for SentencePiece vocabularies.
    else:
        raise CheckpointFormatError(
            f"GGUF tokenizer model {kind!r} is not supported "
            "(supported: 'gpt2' byte-level BPE, 'llama' SentencePiece)."
        )
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", add_bos_default))
    return PretrainedTokenizer(
        tok,
        vocab_size=len(tokens),
        pad_id=special["padding"],
        unk_id=special["unknown"],
        bos_id=special["bos"],
        eos_id=special["eos"],
        add_bos=add_bos,
    )


def _unpermute_rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of q/k rows [heads * head_dim, in] for interleaved RoPE.

    llama.cpp lists each head's rows as pairs (i, i + head_dim/2) next to each other; the
    half-split layout keeps the two halves apart.
    """
    rows, cols = w.shape
    return w.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def read_params(reader, config: ModelConfig) -> dict[str, Any]:
    """Float32 params with our module layout, checked against the config's shapes."""
    import gguf

    arch = _field(reader, "general.architecture")
    tensors = {t.name: t for t in reader.tensors}
    c = config
    hd = c.dim_per_head

    def get(name, shape):
        if name not in tensors:
            raise CheckpointFormatError(
                f"GGUF file has no tensor {name!r}, which a {arch} model with "
                f"{c.num_layers} layers needs; the file is incomplete or not this architecture."
            )
        t = tensors[name]
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise CheckpointFormatError(
                f"tensor {name!r} ({t.tensor_type.name}) could not be dequantised: {e}"
            ) from e
        w = np.asarray(w, np.float32).reshape(tuple(int(n) for n in reversed(t.shape)))
        if w.shape != shape:
            raise CheckpointFormatError(
                f"tensor {name!r} has shape {w.shape} but the metadata implies {shape}; "
                "the file is inconsistent with its own metadata."
            )
        return w

    def linear(name, out, inp):  # GGUF [out, in] -> kernel [in, out]
        return get(name, (out, inp)).T

    params: dict[str, Any] = {
        "token_embedding": {"embedding": get("token_embd.weight", (c.vocab_size, c.d_model))}
    }
    layers = {}
    for i in range(c.num_layers):
        p = f"blk.{i}."
        q = get(p + "attn_q.weight", (c.num_heads * hd, c.d_model))
        k = get(p + "attn_k.weight", (c.kv_heads * hd, c.d_model))
        if FAMILIES[arch].interleaved_rope:
            q, k = _unpermute_rope_rows(q, c.num_heads), _unpermute_rope_rows(k, c.kv_heads)
        attention = {
            "query": {"kernel": q.T.reshape(c.d_model, c.num_heads, hd)},
            "key": {"kernel": k.T.reshape(c.d_model, c.kv_heads, hd)},
            "value": {
                "kernel": linear(p + "attn_v.weight", c.kv_heads * hd, c.d_model).reshape(
                    c.d_model, c.kv_heads, hd
                )
            },
            "out": {
                "kernel": linear(p + "attn_output.weight", c.d_model, c.num_heads * hd).reshape(
                    c.num_heads, hd, c.d_model
                )
            },
        }
        layer = {
            "pre_attention_norm": {"scale": get(p + "attn_norm.weight", (c.d_model,))},
            "self_attention": attention,
            "pre_mlp_norm": {"scale": get(p + "ffn_norm.weight", (c.d_model,))},
            "mlp": {
                "wi_gate": {"kernel": linear(p + "ffn_gate.weight", c.mlp_dim, c.d_model)},
                "wi_up": {"kernel": linear(p + "ffn_up.weight", c.mlp_dim, c.d_model)},
                "wo": {"kernel": linear(p + "ffn_down.weight", c.d_model, c.mlp_dim)},
            },
        }
        if c.qk_norm:
            attention["query_norm"] = {"scale": get(p + "attn_q_norm.weight", (hd,))}
            attention["key_norm"] = {"scale": get(p + "attn_k_norm.weight", (hd,))}
        if c.sublayer_output_norm:
            layer["attention_output_norm"] = {
                "scale": get(p + "post_attention_norm.weight", (c.d_model,))
            }
            layer["mlp_output_norm"] = {"scale": get(p + "post_ffw_norm.weight", (c.d_model,))}
        layers[f"layer_{i}"] = layer
    layers["final_norm"] = {"scale": get("output_norm.weight", (c.d_model,))}
    params["decoder"] = layers
    if not c.tied_embeddings:
        params["lm_head"] = {"kernel": linear("output.weight", c.vocab_size, c.d_model)}
    return params


def load_gguf(path: str | os.PathLike) -> Pretrained:
    """Reads a GGUF checkpoint: config, float32 params and tokenizer.

    Raises:
      FileNotFoundError: no such file.
      CheckpointFormatError: not GGUF, truncated, an unsupported architecture, or a
        missing / misshapen tensor (the message names it).
    """
    path = pathlib.Path(path)
    reader = _reader(path)
    config = read_config(reader)
    params = to_layout(read_params(reader, config), config)  # GGUF names layers one by one
    return Pretrained(config, params, read_tokenizer(reader), str(path))
