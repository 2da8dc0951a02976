import pytest
import torch

from gptpipe.model import GPTConfig, GPTModel, from_book_state_dict

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
