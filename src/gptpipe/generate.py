"""Autoregressive text generation: greedy, temperature and top-k sampling."""

import torch

from gptpipe.model import GPTModel


def next_token(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token from last-position logits (batch, vocab) -> (batch, 1).

    temperature 0 is greedy (argmax); otherwise sample from softmax(logits / temperature),
    restricted to the `top_k` most likely tokens when top_k is set.
    """
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = torch.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


@torch.inference_mode()
def generate(model: GPTModel, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, eos_id: int | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Extend token ids `idx` (batch, seq) by up to `max_new_tokens` tokens.

    The model sees at most its context length of the most recent tokens. Generation stops
    early when every sequence in the batch has produced `eos_id`.
    """
    was_training = model.training
    model.eval()
    context_length = model.cfg.context_length
    for _ in range(max_new_tokens):
        logits = model(idx[:, -context_length:])[:, -1, :]  # (batch, vocab)
        token = next_token(logits, temperature, top_k, generator)
        idx = torch.cat([idx, token], dim=1)
        if eos_id is not None and bool((token == eos_id).all()):
            break
    model.train(was_training)
    return idx
