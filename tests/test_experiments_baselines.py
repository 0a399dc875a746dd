"""Steering-vector baselines: the hook adds exactly c · v, the vector is the mean difference."""

import pytest
import torch
from jaxtyping import install_import_hook

with install_import_hook("experiments", "beartype.beartype"):
    from experiments.datasets import DataBundle, Pair
    from experiments.models import tiny_bert, tiny_llama
    from experiments.steering import SteeringVector, block_list, build_baselines
    from experiments.tokenization import pair_batches


@pytest.fixture(scope="module")
def bert():
    model, tokenizer = tiny_bert(hidden_size=32, num_layers=4, seed=0)
    return model.requires_grad_(False), tokenizer


PAIRS = [
    Pair("", "The film was wonderful.", "The film was terrible."),
    Pair("", "I loved the long walk.", "I hated the long walk."),
    Pair("", "A great meal.", "An awful meal."),
]
DATA = DataBundle(train=PAIRS, val=PAIRS[:1], heldout=PAIRS[:1])


def _hidden(model, tokenizer, texts):
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    out = model(**enc, output_hidden_states=True)
    return out.hidden_states, enc["attention_mask"]  # hidden_states[k + 1]: block k's output


def _next_block_input(model, tokenizer, texts, k):
    """The input of block ``k + 1``: block ``k``'s output after every hook on it."""
    seen = {}

    def grab(module, args, kwargs):
        seen["x"] = args[0] if args else kwargs["hidden_states"]

    handle = block_list(model)[k + 1].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(**tokenizer(texts, padding=True, return_tensors="pt"))
    finally:
        handle.remove()
    return seen["x"]


@pytest.mark.parametrize("c", [1.5, -0.25, torch.tensor([2.0, -1.0])])
def test_hook_adds_exactly_c_times_v_to_the_block_output(bert, c):
    model, tokenizer = bert
    texts = ["The bus stops here.", "Our office is on the third floor, next to the lifts."]
    v = torch.randn(32, generator=torch.Generator().manual_seed(0))
    k = 1
    steer = SteeringVector(block_list(model)[k], v, "vector_mid", k)
    base = _next_block_input(model, tokenizer, texts, k)
    with steer(model, c=c):
        shifted = _next_block_input(model, tokenizer, texts, k)
    scale = torch.as_tensor(c, dtype=torch.float32)
    scale = scale.reshape(-1, 1, 1) if scale.ndim else scale
    assert torch.equal(shifted, base + scale * v)
    assert torch.equal(_next_block_input(model, tokenizer, texts, k), base)  # hook removed


def test_hook_refuses_a_model_without_its_block(bert):
    model, _ = bert
    other, _ = tiny_bert(hidden_size=32, num_layers=4, seed=1)
    steer = SteeringVector(block_list(model)[0], torch.zeros(32), "vector_out", 0)
    with pytest.raises(ValueError, match="not part of this model"), steer(other, c=1.0):
        pass


def test_encoder_vectors_are_the_mean_difference_and_random_has_its_norm(bert):
    model, tokenizer = bert
    names = ["vector_out", "vector_mid", "random_out", "random_mid"]
    built = build_baselines(model, tokenizer, DATA, "encoder", names, 0.5, 7, 32, 2)
    assert {n: built[n].index for n in names} == {
        "vector_out": 3,
        "vector_mid": 2,
        "random_out": 3,
        "random_mid": 2,
    }
    for place, k in (("out", 3), ("mid", 2)):
        pooled = []
        for side in ("chosen", "rejected"):
            hidden, mask = _hidden(model, tokenizer, [getattr(p, side) for p in PAIRS])
            m = mask.unsqueeze(-1).float()  # (batch, seq, 1)
            pooled.append(((hidden[k + 1] * m).sum(1) / m.sum(1)).mean(0))
        torch.testing.assert_close(built[f"vector_{place}"].vector, pooled[0] - pooled[1])
        rand, mean_diff = built[f"random_{place}"].vector, built[f"vector_{place}"].vector
        torch.testing.assert_close(rand.norm(), mean_diff.norm())
        assert abs(float(torch.cosine_similarity(rand, mean_diff, dim=0))) < 0.9
    again = build_baselines(model, tokenizer, DATA, "encoder", ["random_out"], 0.5, 7, 32, 2)
    other = build_baselines(model, tokenizer, DATA, "encoder", ["random_out"], 0.5, 8, 32, 2)
    assert torch.equal(again["random_out"].vector, built["random_out"].vector)
    assert not torch.equal(other["random_out"].vector, built["random_out"].vector)


def test_causal_vectors_pool_the_completion_tokens_only():
    from experiments.models import ByteTokenizer

    model, tokenizer = tiny_llama(hidden_size=32, num_layers=4, seed=0)
    model.requires_grad_(False)
    assert isinstance(tokenizer, ByteTokenizer)
    pairs = [
        Pair("Q: how was it?\nA:", " lovely", " awful"),
        Pair("Q: and then?\nA:", " fun", " dull"),
    ]
    data = DataBundle(train=pairs, val=pairs[:1], heldout=pairs[:1])
    built = build_baselines(model, tokenizer, data, "causal", ["vector_mid"], 0.5, 0, 64, 8)
    k = built["vector_mid"].index
    assert k == 2
    cho, rej = pair_batches(tokenizer, pairs, 64)
    means = []
    for b in (cho, rej):
        out = model(input_ids=b.ids, attention_mask=b.attention, output_hidden_states=True)
        m = b.completion.unsqueeze(-1).float()
        means.append(((out.hidden_states[k + 1] * m).sum(1) / m.sum(1)).mean(0))
    torch.testing.assert_close(built["vector_mid"].vector, means[0] - means[1])
