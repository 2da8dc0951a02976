import pytest
import torch

from gptpipe.model import Dropout, GPTConfig, GPTModel, KVCache, cheap_dropout, from_book_state_dict

book_ch04 = pytest.importorskip("llms_from_scratch.ch04", reason="the book's code (make install)")

SMALL = GPTConfig(vocab_size=300, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.1)


def book_model(cfg: GPTConfig):
    return book_ch04.GPTModel(dict(vars(cfg)))


def test_shapes():
    model = GPTModel(SMALL)
    logits = model(torch.randint(0, 300, (3, 10)))
    assert logits.shape == (3, 10, 300)
    with pytest.raises(ValueError, match="longer than the context length"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_124m_parameter_count():
    with torch.device("meta"):
        model = GPTModel(GPTConfig())
    # 163M with the untied output head, as the book counts; 124M with GPT-2's weight tying
    total = sum(p.numel() for p in model.parameters())
    assert total == 162_419_712
    assert total - model.out_head.weight.numel() == 123_822_336


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_same_seed_same_initial_weights_as_the_book(qkv_bias):
    cfg = GPTConfig(**{**vars(SMALL), "qkv_bias": qkv_bias})
    torch.manual_seed(123)
    ours = GPTModel(cfg).state_dict()
    torch.manual_seed(123)
    theirs = from_book_state_dict(book_model(cfg).state_dict())
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_same_weights_same_logits_and_dropout_as_the_book():
    torch.manual_seed(0)
    book = book_model(SMALL)
    ours = GPTModel(SMALL)
    ours.load_state_dict(from_book_state_dict(book.state_dict()))
    idx = torch.randint(0, 300, (2, 16))
    book.eval(), ours.eval()
    torch.testing.assert_close(ours(idx), book(idx), rtol=0, atol=1e-5)
    book.train(), ours.train()  # dropout on: the same masks from the same RNG state
    torch.manual_seed(1)
    expected = book(idx)
    torch.manual_seed(1)
    torch.testing.assert_close(ours(idx), expected, rtol=0, atol=1e-5)


def test_cheap_dropout_drops_p_of_the_elements_and_keeps_the_mean():
    torch.manual_seed(0)
    x = torch.full((4, 250_000), 2.0, requires_grad=True)
    out = cheap_dropout(x, 0.1)
    kept = out != 0
    # p rounds to 6554/65536; a million Bernoulli draws have a standard deviation of 0.0003
    assert kept.float().mean().item() == pytest.approx(1 - 6554 / 65536, abs=0.0015)
    assert torch.equal(out[kept], torch.full_like(out[kept], 2 * 65536 / (65536 - 6554)))
    out.sum().backward()
    assert torch.equal(x.grad, out.detach() / 2)  # the gradient goes through the same mask
    # masks are fresh each call and reproducible from the seed
    torch.manual_seed(0)
    assert torch.equal(cheap_dropout(x, 0.1), out) and not torch.equal(cheap_dropout(x, 0.1), out)


def test_cheap_dropout_masks_are_independent_across_positions():
    torch.manual_seed(0)
    kept = (cheap_dropout(torch.ones(1_000_000), 0.5) != 0).float()
    # neighbours come from the same 64-bit draw: they must still be uncorrelated
    neighbours = (kept[:-1] * kept[1:]).mean().item()
    assert neighbours == pytest.approx(0.25, abs=0.003)


def test_use_cheap_dropout_switches_every_dropout_and_only_in_training():
    model = GPTModel(SMALL)
    idx = torch.randint(0, 300, (2, 16))
    model.use_cheap_dropout(True)
    switched = [m for m in model.modules() if isinstance(m, Dropout)]
    assert len(switched) == 1 + 2 * SMALL.n_layers  # embedding; per block shortcut and attention
    assert all(m.cheap_masks for m in switched)
    model.eval()
    plain = GPTModel(SMALL)
    plain.load_state_dict(model.state_dict())
    plain.eval()
    assert torch.equal(model(idx), plain(idx))  # no dropout in eval: the same function
    model.train(), plain.train()
    torch.manual_seed(1)
    cheap = model(idx)
    torch.manual_seed(1)
    assert not torch.equal(cheap, plain(idx))
    cache = KVCache(SMALL, 2)  # cached positions in training: torch's dropout, no error
    model(idx[:, :8], cache)
    assert model(idx[:, 8:], cache).shape == (2, 8, 300)


def test_spelled_out_attention_equals_scaled_dot_product_attention():
    torch.manual_seed(0)
    att = GPTModel(SMALL).trf_blocks[0].att
    q, k, v = torch.randn(3, 2, 4, 16, 8).unbind(0)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.manual_seed(1)
    dropped = att.causal_attention_with_dropout(q, k, v)
    torch.manual_seed(1)
    weights = torch.softmax((q @ k.transpose(2, 3) / 8**0.5).masked_fill(
        torch.ones(16, 16, dtype=torch.bool).triu(1), -torch.inf), dim=-1)
    torch.testing.assert_close(dropped, cheap_dropout(weights, 0.1) @ v, rtol=1e-5, atol=1e-6)
    att.dropout.p = 0.0  # the attention alone
    torch.testing.assert_close(att.causal_attention_with_dropout(q, k, v), expected, rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # scores and weights in bf16
        bf16 = att.causal_attention_with_dropout(q, k, v)
    assert bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.float(), expected, rtol=0.02, atol=0.02)


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_book_dropout_attention_is_the_books_op_for_op(qkv_bias):
    """The attention fp32 training takes on CUDA, run here: with the same weights and RNG state
    it gives the book's attention module bit for bit, dropout masks included."""
    cfg = GPTConfig(**{**vars(SMALL), "qkv_bias": qkv_bias, "drop_rate": 0.3})
    torch.manual_seed(0)
    book = book_model(cfg).train()
    ours = GPTModel(cfg).train()
    ours.load_state_dict(from_book_state_dict(book.state_dict()))
    ours.use_book_dropout(True)
    x = torch.randn(2, 16, 32)
    torch.manual_seed(3)
    expected = book.trf_blocks[0].att(x)
    torch.manual_seed(3)
    assert torch.equal(ours.trf_blocks[0].att(x), expected)
    idx = torch.randint(0, 300, (2, 16))  # and through the whole model (its LayerNorm and GELU
    torch.manual_seed(3)                   # round differently from the book's by an ulp)
    expected = book(idx)
    torch.manual_seed(3)
    torch.testing.assert_close(ours(idx), expected, rtol=0, atol=1e-5)
