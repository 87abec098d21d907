"""Write tiny random Hugging Face checkpoints and their logits, made by `transformers` itself.

Run by hand, from the repository root, in an environment with the `[reference]` extra
(torch==2.13.0 CPU, transformers); the default test-suite never imports torch and only
reads the files written here:

    python -m venv --system-site-packages /work/refvenv
    /work/refvenv/bin/pip install torch==2.13.0 transformers accelerate
    /work/refvenv/bin/python tests/reference/make_hf_goldens.py [NAME ...]

With names (e.g. `mixtral`) it writes only those models. A few seconds on a CPU. For each
model it writes `tests/goldens/hf/<name>/` with `config.json` + `model.safetensors`
(`save_pretrained(dir, safe_serialization=True)`) and `reference.npz`:

  decoder-only (gpt2, llama, llama_tied, mixtral):
    input_ids            [2, 16] int32     random ids (numpy seed 0), no padding, no mask
    logits               [2, 16, vocab] f32
  encoder-decoder (t5, t5_v1_1):
    input_ids            [2, 12] int32     encoder ids, random from [2, vocab) (no pad/eos)
    decoder_input_ids    [2, 8] int32      decoder_start_token_id (0) then random ids
    encoder_hidden       [2, 12, d_model] f32   encoder output (after its final norm)
    logits               [2, 8, vocab] f32
  transformers_version, torch_version   strings

Weights are drawn from a fixed torch seed, the model's index in MODELS (GPT-2/Llama/Mixtral:
initializer_range 0.15, Mixtral's router and experts too; T5: its own init with
initializer_factor 1, and the untied v1.1 head with std d_model**-0.5; logits are O(1)), then
perturbed so that no parameter is trivially zero or one: every norm weight gets +0.1*randn,
every norm/linear bias is 0.1*randn, and T5's relative_attention_bias is randn (std 1). A
wrong name, transpose or scale in an import therefore cannot pass. Mixtral's routing must use
every expert of every layer, with no near-tie between a token's k-th and (k+1)-th router
probabilities (`check_routing`).
All models run in float32 with eager attention and dropout off.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import sys
import time

import numpy as np
import torch
import transformers
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT_DIR = ROOT / "tests" / "goldens" / "hf"
INIT = 0.15


def gpt2():
    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=128,
            n_positions=64,
            n_embd=48,
            n_layer=2,
            n_head=4,
            n_inner=None,
            activation_function="gelu_new",
            layer_norm_epsilon=1e-5,
            initializer_range=INIT,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=True,
            bos_token_id=0,
            eos_token_id=0,
        )
    )


def llama(tied: bool = False):
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=96,
            hidden_size=64,
            intermediate_size=80,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1 if tied else 2,
            head_dim=16,
            max_position_embeddings=64,
            rope_theta=10000.0,
            rms_norm_eps=1e-5,
            hidden_act="silu",
            initializer_range=INIT,
            tie_word_embeddings=tied,
            attention_bias=False,
            mlp_bias=False,
            bos_token_id=1,
            eos_token_id=2,
        )
    )


def t5(v1_1: bool = False):
    model = T5ForConditionalGeneration(
        T5Config(
            vocab_size=128,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            relative_attention_num_buckets=32,
            relative_attention_max_distance=128,
            dropout_rate=0.0,
            layer_norm_epsilon=1e-6,
            initializer_factor=1.0,
            feed_forward_proj="gated-gelu" if v1_1 else "relu",
            tie_word_embeddings=not v1_1,
            is_encoder_decoder=True,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    if v1_1:
        # transformers 5 turns T5's `tie_word_embeddings=False` into `scale_decoder_outputs=False`
        # and still ties lm_head to shared (it unties only when a checkpoint holds both, as
        # T5 v1.1 checkpoints do). Untie by hand so the files have a separate lm_head.weight
        # and say `tie_word_embeddings: false`, as the published v1.1 checkpoints do.
        d_model = model.config.d_model
        model.lm_head.weight = nn.Parameter(
            torch.randn(model.config.vocab_size, d_model) * d_model**-0.5
        )
        model.all_tied_weights_keys.pop("lm_head.weight", None)
        model.config.tie_word_embeddings = False
        assert not model.config.scale_decoder_outputs
        assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
    return model


def mixtral():
    # Four experts of width 24 (not the hidden size: a transposed expert cannot fit), top-2;
    # a sliding window shorter than the 16-token inputs, so that the window is exercised.
    return MixtralForCausalLM(
        MixtralConfig(
            vocab_size=96,
            hidden_size=32,
            intermediate_size=24,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=64,
            rope_parameters={"rope_theta": 1_000_000.0, "rope_type": "default"},
            rms_norm_eps=1e-5,
            hidden_act="silu",
            initializer_range=INIT,
            tie_word_embeddings=False,
            sliding_window=6,
            num_local_experts=4,
            num_experts_per_tok=2,
            router_aux_loss_coef=0.02,
            router_jitter_noise=0.0,
            bos_token_id=1,
            eos_token_id=2,
        )
    )


# A model's seed is its index here: append new models so that the others' files stay the same.
MODELS = {
    "gpt2": gpt2,
    "llama": lambda: llama(tied=False),
    "llama_tied": lambda: llama(tied=True),
    "t5": lambda: t5(v1_1=False),
    "t5_v1_1": lambda: t5(v1_1=True),
    "mixtral": mixtral,
}


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith(
        ("RMSNorm", "LayerNorm")
    )


@torch.no_grad()
def perturb(model: nn.Module, gen: torch.Generator) -> None:
    """Make every norm weight/bias, linear bias and T5 relative bias non-trivial."""

    def randn(shape):
        return torch.randn(shape, generator=gen, dtype=torch.float32)

    for module in model.modules():
        if is_norm(module):
            module.weight.add_(0.1 * randn(module.weight.shape))
            if getattr(module, "bias", None) is not None:
                module.bias.copy_(0.1 * randn(module.bias.shape))
        elif getattr(module, "bias", None) is not None and isinstance(module.bias, nn.Parameter):
            module.bias.copy_(0.1 * randn(module.bias.shape))  # Linear, GPT-2 Conv1D
        if hasattr(module, "relative_attention_bias"):
            rel = module.relative_attention_bias
            if isinstance(rel, nn.Embedding):
                rel.weight.copy_(randn(rel.weight.shape))


def check_nontrivial(model: nn.Module, name: str) -> None:
    for pname, p in model.named_parameters():
        a = p.detach().numpy()
        if np.all(a == 0) or np.all(a == 1) or a.std() == 0:
            raise AssertionError(f"{name}: parameter {pname} is trivial")


def check_routing(model: nn.Module, ids: torch.Tensor, name: str) -> float:
    """A mixture of experts' routing must be robust: every expert of every layer is chosen by
    some token (so each expert's weights reach the logits), and no token's k-th and (k+1)-th
    router probabilities are so close that float error could swap them. Returns the smallest
    such gap."""
    k, experts = model.config.num_experts_per_tok, model.config.num_local_experts
    out = model(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        use_cache=False,
        output_router_logits=True,
    )
    gaps = []
    for layer, logits in enumerate(out.router_logits):
        top = torch.topk(torch.softmax(logits.float(), dim=-1), k + 1, dim=-1)
        used = torch.unique(top.indices[:, :k]).numel()
        if used != experts:
            raise AssertionError(f"{name}: layer {layer} routes to {used} of {experts} experts")
        gaps.append(float((top.values[:, k - 1] - top.values[:, k]).min()))
    if min(gaps) < 1e-4:
        raise AssertionError(f"{name}: a near-tie in the router (gap {min(gaps):.1e})")
    return min(gaps)


@torch.no_grad()
def make(name: str, seed: int) -> None:
    t0 = time.time()
    torch.manual_seed(seed)
    model = MODELS[name]()
    perturb(model, torch.Generator().manual_seed(1000 + seed))
    model.config._attn_implementation = "eager"
    model.eval()
    check_nontrivial(model, name)
    cfg = model.config
    rng = np.random.default_rng(0)
    arrays = {}
    if cfg.is_encoder_decoder:
        enc = rng.integers(2, cfg.vocab_size, (2, 12)).astype(np.int32)
        dec = rng.integers(2, cfg.vocab_size, (2, 8)).astype(np.int32)
        dec[:, 0] = cfg.decoder_start_token_id
        out = model(
            input_ids=torch.from_numpy(enc).long(),
            attention_mask=torch.ones(enc.shape, dtype=torch.long),
            decoder_input_ids=torch.from_numpy(dec).long(),
            use_cache=False,
        )
        arrays.update(
            input_ids=enc,
            decoder_input_ids=dec,
            encoder_hidden=out.encoder_last_hidden_state.float().numpy(),
        )
    else:
        ids = rng.integers(0, cfg.vocab_size, (2, 16)).astype(np.int32)
        out = model(
            input_ids=torch.from_numpy(ids).long(),
            attention_mask=torch.ones(ids.shape, dtype=torch.long),
            use_cache=False,
        )
        arrays.update(input_ids=ids)
        if getattr(cfg, "num_local_experts", 0):
            gap = check_routing(model, torch.from_numpy(ids).long(), name)
            print(f"[{name}] smallest top-k router probability gap {gap:.1e}", flush=True)
    logits = out.logits.float().numpy()
    arrays.update(
        logits=logits,
        transformers_version=np.array(transformers.__version__),
        torch_version=np.array(torch.__version__),
    )

    directory = OUT_DIR / name
    if directory.exists():
        shutil.rmtree(directory)
    model.save_pretrained(directory, safe_serialization=True)
    for extra in set(os.listdir(directory)) - {"config.json", "model.safetensors"}:
        os.remove(directory / extra)  # e.g. generation_config.json: not needed
    np.savez_compressed(directory / "reference.npz", **arrays)
    for f in os.listdir(directory):
        os.chmod(directory / f, 0o644)

    # The saved files must reload to the same weights and logits.
    again = (
        type(model)
        .from_pretrained(directory, dtype=torch.float32, attn_implementation="eager")
        .eval()
    )
    want = model.state_dict()
    for key, value in again.state_dict().items():
        torch.testing.assert_close(value, want[key], rtol=0, atol=0, msg=key)
    ids = torch.from_numpy(arrays["input_ids"]).long()
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    if cfg.is_encoder_decoder:
        kwargs["decoder_input_ids"] = torch.from_numpy(arrays["decoder_input_ids"]).long()
    np.testing.assert_allclose(again(**kwargs).logits.float().numpy(), logits, rtol=0, atol=1e-5)

    sizes = {f: os.path.getsize(directory / f) for f in sorted(os.listdir(directory))}
    print(
        f"[{name}] {sum(p.numel() for p in model.parameters())} params, "
        f"logits std {logits.std():.3f}, files {sizes}, {time.time() - t0:.1f}s",
        flush=True,
    )


def main(argv: list[str]) -> None:
    torch.set_grad_enabled(False)
    names = argv[1:] or list(MODELS)
    if unknown := sorted(set(names) - set(MODELS)):
        raise SystemExit(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    for seed, name in enumerate(MODELS):
        if name in names:
            make(name, seed)


if __name__ == "__main__":
    main(sys.argv)
