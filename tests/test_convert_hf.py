"""Hugging Face import/export (`lm.convert.hf`) against goldens made by transformers itself.

tests/goldens/hf/<name>/ holds config.json + model.safetensors saved by transformers 5.23 and
reference.npz with its float32 logits (tests/reference/make_hf_goldens.py); nothing here
needs torch or transformers.
"""

import dataclasses
import functools
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lm import decode, parallel
from lm.convert import hf
from lm.convert.gguf import CheckpointFormatError
from lm.models import transformer as T
from lm.train import OptimizerConfig, create_trainer
from lm.utils import LazyArray, path_key
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

GOLDENS = pathlib.Path(__file__).parent / "goldens" / "hf"
NAMES = ["gpt2", "llama", "llama_tied", "mixtral", "t5", "t5_v1_1"]
# Max |logit difference| allowed against transformers: mixtral's is near its measured error
# (1.2e-6 on a CPU, every dropless dispatch alike), the others' the suite's first bound.
LOGIT_TOLERANCE = {"mixtral": 1e-5}


@functools.cache
def golden(name):
    return hf.load_hf(GOLDENS / name)


@functools.cache
def reference(name):
    return dict(np.load(GOLDENS / name / "reference.npz"))


def flat(params):
    return {
        path_key(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
    }


def tensor_shapes(path):
    with safe_open(str(path), framework="np") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def copy_golden(name, tmp_path):
    out = tmp_path / name
    shutil.copytree(GOLDENS / name, out, ignore=shutil.ignore_patterns("reference.npz"))
    for f in out.iterdir():
        f.chmod(0o644)
    return out


def edit_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def edit_tensors(directory, drop=(), **replace):
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    for name in drop:
        del tensors[name]
    tensors.update({k.replace("__", "."): v for k, v in replace.items()})
    save_file(tensors, str(path), metadata={"format": "pt"})


# ----------------------------------------------------------------------------- logits


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(name):
    pretrained, ref = golden(name), reference(name)
    model = T.build_model(pretrained.config)
    if pretrained.config.architecture == "decoder":
        logits = jax.jit(model.apply)({"params": pretrained.params}, jnp.asarray(ref["input_ids"]))
    else:
        encoder_inputs = jnp.asarray(ref["input_ids"])
        logits = jax.jit(model.apply)(
            {"params": pretrained.params},
            jnp.asarray(ref["decoder_input_ids"]),
            encoder_inputs=encoder_inputs,
        )
        encode = jax.jit(functools.partial(model.apply, method=T.EncoderDecoder.encode))
        encoded = encode({"params": pretrained.params}, encoder_inputs)
        np.testing.assert_allclose(encoded, ref["encoder_hidden"], rtol=0, atol=1e-4)
    assert logits.shape == ref["logits"].shape
    diff = float(np.max(np.abs(np.asarray(logits) - ref["logits"])))
    print(
        f"{name}: max |logit difference| vs transformers {ref['transformers_version']} = {diff:.2e}"
    )
    assert diff <= LOGIT_TOLERANCE.get(name, 1e-4)


def test_configs_map_every_field():
    gpt2, llama, tied = golden("gpt2").config, golden("llama").config, golden("llama_tied").config
    t5, v11 = golden("t5").config, golden("t5_v1_1").config
    assert (gpt2.vocab_size, gpt2.d_model, gpt2.num_layers, gpt2.num_heads, gpt2.mlp_dim) == (
        128,
        48,
        2,
        4,
        192,
    )
    assert (gpt2.mlp_activation, gpt2.position, gpt2.max_len, gpt2.norm, gpt2.use_bias) == (
        "gelu_tanh",
        "learned",
        64,
        "layernorm",
        True,
    )
    assert gpt2.tied_embeddings and gpt2.init_std == 0.15
    assert (llama.num_kv_heads, llama.head_dim, llama.mlp_dim, llama.rope_base, llama.norm_eps) == (
        2,
        16,
        80,
        10_000.0,
        1e-5,
    )
    assert llama.mlp_gated and llama.position == "rotary" and not llama.use_bias
    assert not llama.tied_embeddings and tied.tied_embeddings and tied.num_kv_heads == 1
    assert (t5.architecture, t5.position, t5.relative_buckets, t5.relative_max_distance) == (
        "encoder_decoder",
        "relative",
        32,
        128,
    )
    assert (t5.head_dim, t5.attention_scale, t5.norm, t5.norm_eps) == (8, 1.0, "rmsnorm", 1e-6)
    assert t5.tied_embeddings and t5.scale_tied_logits and t5.mlp_activation == "relu"
    assert not v11.tied_embeddings and v11.mlp_gated and v11.mlp_activation == "gelu_tanh"
    assert t5.shared_embeddings and t5.encoder_layers == 2
    moe = golden("mixtral").config
    assert (moe.num_experts, moe.experts_per_token, moe.router_aux_loss, moe.mlp_dim) == (
        4,
        2,
        0.02,
        24,
    )
    assert (moe.sliding_window, moe.global_every, moe.rope_base, moe.num_kv_heads) == (
        6,
        0,
        1e6,
        2,
    )
    assert moe.mlp_gated and moe.mlp_activation == "silu" and moe.norm == "rmsnorm"
    assert not moe.use_bias and not moe.tied_embeddings and hf.family_of(moe) == "mixtral"


def test_mixtral_params_are_the_experts_stacked():
    """HF's per-expert [out, in] linears are the rows of our [expert, in, out] kernels."""
    params = T.unstack_layers(golden("mixtral").params)
    tensors = load_file(str(GOLDENS / "mixtral" / "model.safetensors"))
    mlp = params["decoder"]["layer_1"]["mlp"]
    moe = "model.layers.1.block_sparse_moe."
    assert mlp["router"]["kernel"].shape == (32, 4)
    np.testing.assert_array_equal(mlp["router"]["kernel"], tensors[moe + "gate.weight"].T)
    for name, ours in [("w1", "wi_gate"), ("w3", "wi_up"), ("w2", "wo")]:
        kernel = mlp[ours]["kernel"]
        assert kernel.shape == ((4, 24, 32) if ours == "wo" else (4, 32, 24))
        for e in range(4):
            np.testing.assert_array_equal(kernel[e], tensors[f"{moe}experts.{e}.{name}.weight"].T)


def test_mixtral_config_options():
    base = json.loads((GOLDENS / "mixtral" / "config.json").read_text())
    config = golden("mixtral").config
    # Training-only jitter is accepted, not represented, and kept on export.
    jittered = {**base, "router_jitter_noise": 0.1}
    assert hf.config_from_hf(jittered) == config
    assert hf.config_to_hf(config, jittered)["router_jitter_noise"] == 0.1
    # No window; a null head_dim (hidden_size / heads) stays null.
    plain = {**base, "sliding_window": None, "head_dim": None}
    imported = hf.config_from_hf(plain)
    assert imported == dataclasses.replace(config, sliding_window=0)
    exported = hf.config_to_hf(imported, plain)
    assert exported["sliding_window"] is None and exported["head_dim"] is None
    assert hf.config_from_hf(exported) == imported
    # What the mixtral layout cannot say is refused on export, naming it.
    with pytest.raises(ValueError, match="num_experts_per_tok=1"):
        hf.config_to_hf(dataclasses.replace(config, experts_per_token=1))
    with pytest.raises(ValueError, match=r"model\.global_every=2 \(the mixtral layout"):
        hf.config_to_hf(dataclasses.replace(config, global_every=2))
    with pytest.raises(ValueError, match=r"model\.use_bias=True"):
        hf.config_to_hf(dataclasses.replace(config, use_bias=True))
    # An execution option (how the layers run) exports as it is.
    chunked = dataclasses.replace(config, logits_chunk=8, scan_layers=False)
    assert hf.config_to_hf(chunked, base) == hf.config_to_hf(config, base)


# ----------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_is_bit_identical(name, tmp_path):
    pretrained = golden(name)
    out = hf.export_hf(pretrained, tmp_path / "out")
    again = hf.load_hf(out)
    assert again.config == pretrained.config
    a, b = flat(pretrained.params), flat(again.params)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype == np.float32
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    original = json.loads((GOLDENS / name / "config.json").read_text())
    exported = json.loads((out / "config.json").read_text())
    assert exported == original  # every key, and (for this float32 model) every value
    assert tensor_shapes(out / "model.safetensors") == tensor_shapes(
        GOLDENS / name / "model.safetensors"
    )
    original_tensors = load_file(str(GOLDENS / name / "model.safetensors"))
    for key, value in load_file(str(out / "model.safetensors")).items():
        np.testing.assert_array_equal(value, original_tensors[key], err_msg=key)


@pytest.mark.parametrize("name", ["gpt2", "llama", "mixtral", "t5_v1_1"])
def test_export_without_a_source_config(name, tmp_path):
    pretrained = golden(name)
    out = hf.export_hf((pretrained.config, pretrained.params), tmp_path / "out")
    exported = json.loads((out / "config.json").read_text())
    original = json.loads((GOLDENS / name / "config.json").read_text())
    # All of transformers' keys but its version; Llama also gets transformers 4's rope_theta.
    assert set(original) - set(exported) == {"transformers_version"}
    assert set(exported) - set(original) <= {"rope_theta"}
    assert hf.load_hf(out).config == pretrained.config


def test_export_refuses_a_non_empty_directory_unless_overwrite(tmp_path):
    pretrained = golden("llama_tied")
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty.*overwrite=True"):
        hf.export_hf(pretrained, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    hf.export_hf(pretrained, tmp_path, overwrite=True)
    assert (tmp_path / "keep.txt").read_text() == "mine"
    assert hf.load_hf(tmp_path).config == pretrained.config
    hf.export_hf(pretrained, tmp_path / "empty_ok")  # a new or empty directory needs no flag


def test_export_rejects_what_the_layout_cannot_express(tmp_path):
    config = T.preset("llama", **T.TINY, num_kv_heads=2, qk_norm=True)
    params = {}
    for path, shape in hf.param_shapes(config).items():  # zeros of the right shapes
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = np.zeros(shape, np.float32)
    with pytest.raises(ValueError, match="qk_norm"):
        hf.export_hf((config, params), tmp_path / "a")
    with pytest.raises(ValueError, match="position='sinusoidal'"):
        hf.export_hf((T.preset("gpt2", **T.TINY, position="sinusoidal"), params), tmp_path / "b")
    pretrained = golden("llama")
    broken = T.unstack_layers(pretrained.params)  # name layers one by one
    del broken["decoder"]["layer_1"]["mlp"]["wi_up"]
    broken["decoder"]["layer_0"]["mlp"]["wo"]["kernel"] = np.zeros((3, 64), np.float32)
    with pytest.raises(
        CheckpointFormatError,
        match=r"missing decoder/layer_1/mlp/wi_up/kernel.*misshapen "
        r"decoder/layer_0/mlp/wo/kernel \(3, 64\)",
    ):
        hf.export_hf((pretrained.config, broken), tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_bfloat16_export_and_import(tmp_path):
    pretrained = golden("llama")
    out = hf.export_hf(pretrained, tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), framework="np") as f:
        assert f.get_slice("model.norm.weight").get_dtype() == "BF16"
    again = hf.load_hf(out)
    a, b = flat(pretrained.params), flat(again.params)
    for key in a:
        assert b[key].dtype == np.float32
        np.testing.assert_allclose(b[key], a[key], rtol=2**-8, atol=0, err_msg=key)


def test_sharded_and_bare_model_checkpoints(tmp_path):
    # A sharded checkpoint (model.safetensors.index.json + shards).
    pretrained = golden("llama")
    sharded = copy_golden("llama", tmp_path)
    tensors = load_file(str(sharded / "model.safetensors"))
    (sharded / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[:10], names[10:])):
        file = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, str(sharded / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for key, value in flat(hf.load_hf(sharded).params).items():
        np.testing.assert_array_equal(value, flat(pretrained.params)[key])
    # GPT2Model's names (no 'transformer.' prefix) with its attention-mask buffers.
    bare = copy_golden("gpt2", tmp_path)
    tensors = load_file(str(bare / "model.safetensors"))
    tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
    tensors["lm_head.weight"] = tensors["wte.weight"]  # a tied copy is accepted
    save_file(tensors, str(bare / "model.safetensors"), metadata={"format": "pt"})
    for key, value in flat(hf.load_hf(bare).params).items():
        np.testing.assert_array_equal(value, flat(golden("gpt2").params)[key])


# Meshes (data, fsdp, tensor) of the 8 test devices that split the golden models' kernels along
# their input axis, their heads and their vocabulary (llama_tied's one kv head stays whole).
STREAMED = [("gpt2", (1, 8, 1), True), ("llama", (2, 2, 2), True), ("llama_tied", (1, 4, 2), False)]
STREAMED += [("t5", (1, 2, 4), True), ("mixtral", (1, 4, 2), True)]


@pytest.mark.parametrize("name,mesh,scan", STREAMED, ids=[s[0] for s in STREAMED])
def test_streamed_import_places_the_eager_imports_params(name, mesh, scan):
    lazy = hf.load_hf(GOLDENS / name, lazy=True)
    assert all(isinstance(leaf, LazyArray) for leaf in jax.tree.leaves(lazy.params))
    config = dataclasses.replace(lazy.config, scan_layers=scan)
    trainer = create_trainer(
        config,
        T.build_model(config),
        OptimizerConfig(),
        10,
        parallel.ParallelConfig(mesh=mesh),
        init_params=lazy.params,
    )
    params = trainer.init_fn(0).params
    # Each device holds a block of its leaves, not a copy of the model.
    split = [x for x in jax.tree.leaves(params) if x.addressable_shards[0].data.shape != x.shape]
    assert len(split) >= len(jax.tree.leaves(params)) // 3
    placed = flat(T.unstack_layers(jax.device_get(params)))
    want = flat(T.unstack_layers(golden(name).params))
    assert placed.keys() == want.keys()
    for key, value in want.items():
        np.testing.assert_array_equal(placed[key], value, err_msg=key)


# ----------------------------------------------------------------------------- errors


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    d = copy_golden("llama", tmp_path)
    edit_tensors(d, drop=["model.layers.1.mlp.up_proj.weight"])
    with pytest.raises(CheckpointFormatError, match=r"no tensor 'model\.layers\.1\.mlp\.up_proj"):
        hf.load_hf(d)
    d = copy_golden("llama_tied", tmp_path)
    edit_tensors(d, model__layers__2__mlp__up_proj__weight=np.zeros((80, 64), np.float32))
    with pytest.raises(CheckpointFormatError, match=r"model\.layers\.2\.mlp\.up_proj\.weight"):
        hf.load_hf(d)
    d = copy_golden("t5", tmp_path / "tied_copy")
    edit_tensors(d, lm_head__weight=np.ones((128, 32), np.float32))
    with pytest.raises(CheckpointFormatError, match=r"'lm_head\.weight' differs from 'shared"):
        hf.load_hf(d)
    d = copy_golden("mixtral", tmp_path / "one_expert_short")
    edit_tensors(d, drop=["model.layers.1.block_sparse_moe.experts.3.w3.weight"])
    with pytest.raises(
        CheckpointFormatError,
        match=r"no tensor 'model\.layers\.1\.block_sparse_moe\.experts\.3\.w3\.weight'",
    ):
        hf.load_hf(d)


def test_config_that_disagrees_with_the_tensors(tmp_path):
    d = copy_golden("llama", tmp_path)
    edit_config(d, intermediate_size=96)
    with pytest.raises(
        CheckpointFormatError,
        match=r"'model\.layers\.0\.mlp\.gate_proj\.weight' has shape \(80, 64\) "
        r"but config\.json implies \(96, 64\)",
    ):
        hf.load_hf(d)
    d = copy_golden("t5_v1_1", tmp_path)
    edit_config(d, num_decoder_layers=3)
    with pytest.raises(CheckpointFormatError, match=r"no tensor 'decoder\.block\.2\."):
        hf.load_hf(d)
    d = copy_golden("gpt2", tmp_path)
    edit_config(d, tie_word_embeddings=False)
    with pytest.raises(CheckpointFormatError, match=r"no tensor 'lm_head\.weight'"):
        hf.load_hf(d)
    d = copy_golden("mixtral", tmp_path)
    edit_config(d, num_local_experts=3)  # the file holds a fourth expert
    with pytest.raises(
        CheckpointFormatError, match=r"block_sparse_moe\.experts\.3\.w1\.weight.*does not use"
    ):
        hf.load_hf(d)
    d = copy_golden("mixtral", tmp_path / "wider")
    edit_config(d, intermediate_size=32)
    with pytest.raises(
        CheckpointFormatError,
        match=r"'model\.layers\.0\.block_sparse_moe\.experts\.0\.w1\.weight' has shape "
        r"\(24, 32\) but config\.json implies \(32, 32\)",
    ):
        hf.load_hf(d)


def test_missing_and_truncated_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hf.load_hf(tmp_path / "nowhere")
    d = copy_golden("gpt2", tmp_path / "a")
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        hf.load_hf(d)
    d = copy_golden("gpt2", tmp_path / "b")
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        hf.load_hf(d)
    d = copy_golden("gpt2", tmp_path / "c")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFormatError, match="truncated or corrupt"):
        hf.load_hf(d)
    (d / "config.json").write_text('{"model_type": "gpt2", ')
    with pytest.raises(CheckpointFormatError, match="not readable JSON"):
        hf.load_hf(d)


@pytest.mark.parametrize(
    "name, changes, match",
    [
        ("gpt2", {"model_type": "bert"}, "model_type 'bert' is not supported"),
        (
            "llama",
            {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
            "rope_type",
        ),
        ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
        ("llama", {"attention_bias": True}, "attention_bias/mlp_bias"),
        ("llama", {"hidden_act": "quick_gelu"}, "hidden_act='quick_gelu'"),
        ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        ("t5", {"feed_forward_proj": "gated-gelu-fast"}, "feed_forward_proj"),
        ("t5_v1_1", {"scale_decoder_outputs": True}, "scale_decoder_outputs"),
        ("t5", {"relative_attention_num_buckets": 2}, "relative_attention_num_buckets"),
        ("t5", {"d_model": None}, "no 'd_model'"),
        ("mixtral", {"num_experts_per_tok": 1}, "num_experts_per_tok=1 .*a lone expert's"),
        ("mixtral", {"num_experts_per_tok": 5}, "num_experts_per_tok=5 .*num_local_experts=4"),
        ("mixtral", {"sliding_window": 0}, "sliding_window=0"),
        ("mixtral", {"rope_scaling": {"rope_type": "yarn"}}, "mixtral config: rope_scaling"),
        ("mixtral", {"hidden_act": "gelu_10"}, "mixtral config: hidden_act='gelu_10'"),
        ("mixtral", {"num_local_experts": None}, "mixtral config has no 'num_local_experts'"),
    ],
)
def test_unsupported_configs_name_the_option(name, changes, match):
    config = json.loads((GOLDENS / name / "config.json").read_text())
    config.update(changes)
    with pytest.raises(ValueError, match=match):
        hf.config_from_hf(config)


def test_transformers4_config_spellings():
    config = json.loads((GOLDENS / "llama" / "config.json").read_text())
    del config["rope_parameters"]
    config.update(rope_theta=500_000.0, rope_scaling=None)
    assert hf.config_from_hf(config).rope_base == 500_000.0
    exported = hf.config_to_hf(hf.config_from_hf(config), config)
    assert exported["rope_theta"] == 500_000.0 and "rope_parameters" not in exported
    t5 = json.loads((GOLDENS / "t5" / "config.json").read_text())
    del t5["scale_decoder_outputs"]  # transformers 4: a tied head is scaled
    assert hf.config_from_hf(t5).scale_tied_logits


# ----------------------------------------------------------------------------- tokenizer


def write_tokenizer(directory, *, bos_template):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 96)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos_template:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", 1)]
        )
    tok.save(str(directory / "tokenizer.json"))


def test_tokenizer_is_read_and_written(tmp_path):
    d = copy_golden("llama", tmp_path)
    assert golden("llama").tokenizer is None  # the goldens have no tokenizer.json
    # No tokenizer_config.json: ids from config.json, add_bos from the post-processor.
    write_tokenizer(d, bos_template=True)
    tok = hf.load_hf(d).tokenizer
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id, tok.add_bos) == (1, 2, -1, -1, True)
    assert tok.encode("w5 w7 zzz") == [5, 7, 0] and tok.vocab_size == 96
    # tokenizer_config.json wins over config.json.
    (d / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": {"content": "<s>"},
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "pad_token": "</s>",
                "add_bos_token": False,
            }
        )
    )
    pretrained = hf.load_hf(d)
    tok = pretrained.tokenizer
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id, tok.add_bos) == (1, 2, 2, 0, False)
    out = hf.export_hf(pretrained, tmp_path / "out")
    again = hf.load_hf(out).tokenizer
    assert (again.bos_id, again.eos_id, again.pad_id, again.unk_id, again.add_bos) == (
        1,
        2,
        2,
        0,
        False,
    )
    assert again.encode("w5 w9") == [5, 9]
    assert json.loads((out / "config.json").read_text())["pad_token_id"] == 2


# ----------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("name", ["llama", "mixtral"])
def test_cached_greedy_decode_of_an_import_equals_full_forward_argmax(name):
    """Mixtral's prompts and continuations run past its 6-position window."""
    pretrained = golden(name)
    model = T.build_model(pretrained.config)
    prompts = [[5, 17, 3, 40, 11], [8, 2]]
    new = 10
    out = decode.generate(model, pretrained.params, prompts, max_new_tokens=new)
    forward = jax.jit(model.apply)
    for prompt, got in zip(prompts, out, strict=True):
        assert len(got) == new
        sequence = jnp.asarray([prompt + got])
        argmax = np.asarray(jnp.argmax(forward({"params": pretrained.params}, sequence)[0], -1))
        # Each generated token is the full forward's argmax at the position before it.
        assert got == argmax[len(prompt) - 1 : len(prompt) - 1 + new].tolist()


# ----------------------------------------------------------------------------- transformers


@pytest.mark.parametrize("name", NAMES)
def test_exports_load_in_transformers(name, tmp_path):
    """Only where torch and transformers are installed (the [reference] extra)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pretrained, ref = golden(name), reference(name)
    for source in (pretrained, (pretrained.config, pretrained.params)):
        out = hf.export_hf(source, tmp_path / str(len(list(tmp_path.iterdir()))))
        auto = (
            transformers.AutoModelForSeq2SeqLM
            if name.startswith("t5")
            else transformers.AutoModelForCausalLM
        )
        model = auto.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
        kwargs = {"input_ids": torch.from_numpy(ref["input_ids"]).long()}
        if "decoder_input_ids" in ref:
            kwargs["decoder_input_ids"] = torch.from_numpy(ref["decoder_input_ids"]).long()
        with torch.no_grad():
            logits = model(**kwargs, use_cache=False).logits.float().numpy()
        np.testing.assert_allclose(logits, ref["logits"], rtol=0, atol=1e-5)


def test_convert_command_writes_the_hf_layout(tmp_path):
    """`python -m lm.main convert --model hf:DIR --out OUT`: a lossless copy; never overwrites."""
    import os
    import subprocess
    import sys

    source = pathlib.Path(__file__).parent / "goldens" / "hf" / "llama"
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lm.main", "convert", f"--model=hf:{source}", f"--out={out}"]
    env = {**os.environ, "XLA_FLAGS": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    again, original = hf.load_hf(out), hf.load_hf(source)
    assert again.config == original.config
    jax.tree.map(np.testing.assert_array_equal, again.params, original.params)
    before = (out / "model.safetensors").read_bytes()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2 and "not empty" in proc.stderr
    assert (out / "model.safetensors").read_bytes() == before


def test_families_are_one_table_and_experts_are_mixtral():
    assert hf.SUPPORTED == tuple(hf.FAMILIES) == ("gpt2", "llama", "mixtral", "t5")
    presets = [("gpt2", "gpt2", {}), ("llama", "llama", {}), ("t5", "t5", {})]
    presets += [("llama", "mixtral", {"num_experts": 4})]
    for preset, family, extra in presets:
        config = T.preset(preset, **T.TINY, num_kv_heads=2, **extra)
        assert hf.family_of(config) == family
        assert hf.FAMILIES[family].holds(config)
    mixtral = hf.config_to_hf(T.preset("llama", **T.TINY, num_kv_heads=2, num_experts=4))
    assert (mixtral["model_type"], mixtral["num_local_experts"]) == ("mixtral", 4)
    moe = T.preset("gpt2", **T.TINY, num_experts=4)
    with pytest.raises(
        ValueError, match=r"model\.num_experts=4 \(the gpt2 layout can only say 0\)"
    ):
        hf.config_to_hf(moe)


def test_init_from_a_hugging_face_directory_streams_its_params(tmp_path):
    from lm import finetune

    d = copy_golden("llama", tmp_path)
    write_tokenizer(d, bos_template=True)
    source = finetune.init_source(f"hf:{d}")
    assert all(isinstance(leaf, LazyArray) for leaf in jax.tree.leaves(source.params))
    assert source.model == dataclasses.asdict(golden("llama").config)
    streamed = flat(T.unstack_layers(source.params))
    for key, value in flat(T.unstack_layers(golden("llama").params)).items():
        np.testing.assert_array_equal(streamed[key], value, err_msg=key)
