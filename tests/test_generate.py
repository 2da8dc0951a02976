import pytest
import torch

from gptpipe.generate import generate, next_token
from gptpipe.model import GPTConfig, GPTModel

CFG = GPTConfig(vocab_size=50, context_length=8, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return GPTModel(CFG)


@torch.no_grad()
def test_greedy_is_argmax_of_the_full_forward(model):
    prompt = torch.tensor([[1, 2, 3]])
    out = generate(model, prompt, max_new_tokens=12)
    assert out.shape == (1, 15) and out[0, :3].tolist() == [1, 2, 3]
    for t in range(3, 15):  # each token is the argmax given the last context_length tokens
        context = out[:, max(0, t - CFG.context_length):t]
        assert out[0, t] == model(context)[0, -1].argmax()


def test_seeded_sampling_is_reproducible_and_top_k_restricts(model):
    prompt = torch.tensor([[1, 2, 3]])
    runs = [generate(model, prompt, 20, temperature=1.5, top_k=3,
                     generator=torch.Generator().manual_seed(9)) for _ in range(2)]
    assert torch.equal(*runs)
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.0]])
    picks = {next_token(logits, 10.0, top_k=2, generator=torch.Generator().manual_seed(s)).item()
             for s in range(50)}
    assert picks == {1, 3}
    assert next_token(logits).item() == 1


def test_stops_at_end_of_text(model):
    prompt = torch.tensor([[1, 2, 3]])
    greedy_next = generate(model, prompt, 1)[0, -1].item()
    out = generate(model, prompt, 10, eos_id=greedy_next)
    assert out[0].tolist() == [1, 2, 3, greedy_next]
