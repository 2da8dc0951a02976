"""Autoregressive text generation: greedy, temperature, top-k, top-p and beam search.

Generation runs the model with a KV cache, so each new token costs one position's compute.
The results equal the plain loop of the book (crop the sequence to its last context_length
tokens, run the full forward, read the last position): while the sequence fits the context
the cache holds exactly what that forward would recompute; once it outgrows the context the
window slides, every token moves to a new position and so every key and value changes, and
the cache is rebuilt from the last context_length tokens at each step.
"""

import contextlib
from collections.abc import Sequence

import torch

from gptpipe.device import decoding_threads
from gptpipe.model import GPTModel, KVCache, TokenStep, eval_mode
from gptpipe.params import GPT2_VOCAB_SIZE, SampleParams
from gptpipe.precision import autocast
from gptpipe.tokenizer import decode, encode_prompt, gpt2_encoding


Generators = torch.Generator | Sequence[torch.Generator] | None


def next_token(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
               top_p: float = 1.0, generator: Generators = None) -> torch.Tensor:
    """Pick the next token from last-position logits (batch, vocab) -> (batch, 1).

    temperature 0 is greedy (argmax). Otherwise: keep the `top_k` most likely tokens, divide
    the logits by `temperature`, keep the smallest set of most likely tokens whose tempered
    probability reaches `top_p` (always at least the most likely one), and sample from those,
    with `generator`, or with one generator per row (row i then draws what it would alone).
    Ids beyond GPT-2's 50,257 (a padded vocabulary) are never picked: no tokenizer decodes them.
    """
    logits = logits[:, :GPT2_VOCAB_SIZE]
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    scaled = logits / temperature
    if not bool(torch.isfinite(scaled.amax(dim=-1)).all()):  # a tiny temperature overflowed float32:
        scaled = (logits - logits.amax(dim=-1, keepdim=True)).double() / temperature  # the same distribution
    probs = torch.softmax(scaled, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        sorted_probs = sorted_probs.double()  # float32 sums drift by ulps: a token at the boundary would flip
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_sorted = mass_before >= top_p  # the top token has mass_before 0 and always stays
        probs = probs.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), 0.0)
    if isinstance(generator, Sequence):
        return torch.cat([torch.multinomial(row[None], 1, generator=g) for row, g in zip(probs, generator)])
    return torch.multinomial(probs, num_samples=1, generator=generator)


def new_cache(model: GPTModel, batch_size: int, autocast_dtype: torch.dtype | None,
              static_shapes: bool = False) -> KVCache:
    """An empty cache for `model`, in the dtype its keys and values are computed in."""
    weight = model.tok_emb.weight
    return KVCache(model.cfg, batch_size, autocast_dtype or weight.dtype, weight.device, static_shapes)


class StepDecoder:
    """Decodes one position per call on CUDA by replaying a CUDA graph captured once (one launch
    for the whole forward instead of hundreds: at batch 1 a 124M model on a GPU is bound by
    kernel launches, not by the GPU). Every call has the same shapes: the new tokens and their
    position are copied into fixed buffers, and the cache has static shapes."""

    def __init__(self, model: GPTModel, cache: KVCache, autocast_dtype: torch.dtype | None):
        self.model, self.cache, self.autocast_dtype = model, cache, autocast_dtype
        device = cache.keys.device
        self.tokens = torch.zeros(cache.keys.shape[1], 1, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.logits = self.capture()  # before anything is cached: the warm-up steps write at position 0

    def forward(self) -> torch.Tensor:
        with autocast(self.tokens.device, self.autocast_dtype):
            return self.model(self.tokens, self.cache, positions=self.position)[:, -1, :].float()

    def capture(self) -> torch.Tensor:
        """Record the forward as a CUDA graph, after warm-up steps on a side stream (as
        torch.cuda.graph requires); returns the output buffer each replay refills."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.forward()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            return self.forward()

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (batch, vocab) after `tokens` (batch, 1), which take position len(cache)."""
        self.tokens.copy_(tokens)
        self.position.fill_(len(self.cache))
        self.graph.replay()
        self.cache.length += 1
        return self.logits.clone()


def token_decoder(model: GPTModel, cache: KVCache | None,
                  autocast_dtype: torch.dtype | None) -> StepDecoder | TokenStep | None:
    """What decodes one new token per row fastest on this model and cache: a CUDA graph on CUDA,
    TokenStep where it applies, otherwise None (the model's forward)."""
    if cache is None:
        return None
    if cache.static_shapes and cache.keys.device.type == "cuda":
        return StepDecoder(model, cache, autocast_dtype)
    return TokenStep(model, cache) if TokenStep.usable(model, cache) else None


def next_logits(model: GPTModel, idx: torch.Tensor, cache: KVCache | None,
                decoder: StepDecoder | TokenStep | None = None) -> torch.Tensor:
    """Logits (batch, vocab) of the token after `idx` (batch, seq), as the full forward over the
    last context_length tokens gives them.

    `cache` must hold the keys and values of a prefix of `idx` (empty at first); only the rest
    is run, and added to it; a single new token through `decoder` when given. Without a cache
    the full forward is run.
    """
    context_length = model.cfg.context_length
    if cache is None:
        return model(idx[:, -context_length:])[:, -1, :].float()
    if idx.shape[1] > context_length:  # the window slides: every position changes
        cache.clear()
        idx = idx[:, -context_length:]
    new = idx[:, len(cache):]
    if decoder is not None and new.shape[1] == 1:
        return decoder(new).float()
    return model(new, cache)[:, -1, :].float()


def no_autograd(autocast_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """inference_mode, whose ops skip the version counters and view tracking that no_grad still
    keeps: a tenth of an int8 decoding step on 2 CPU cores (bench/README.md). Under autocast,
    no_grad: under inference_mode autocast does not cache its casts of the weights and would
    re-cast every weight at every token."""
    return torch.no_grad() if autocast_dtype is not None else torch.inference_mode()


def generate(model: GPTModel, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float = 1.0, eos_id: int | None = None,
             generator: Generators = None, num_beams: int = 1, length_penalty: float = 1.0,
             use_cache: bool = True, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Extend token ids `idx` (batch, seq) by up to `max_new_tokens` tokens.

    The model sees at most its context length of the most recent tokens. A row that produced
    `eos_id` repeats it from then on; generation stops when every row has. `num_beams` above 1 runs
    beam_search instead (one prompt, temperature 0). `use_cache=False` re-runs the full
    forward for every token (same result, slower); `autocast_dtype` runs the model under
    autocast in that dtype (e.g. torch.bfloat16), which changes the result slightly.
    """
    if num_beams > 1:
        if temperature != 0.0:
            raise ValueError(f"beam search is deterministic: use temperature 0 with num_beams {num_beams}")
        return beam_search(model, idx, max_new_tokens, num_beams, length_penalty, eos_id, use_cache, autocast_dtype)
    graphed = use_cache and idx.device.type == "cuda"
    with no_autograd(autocast_dtype), eval_mode(model), autocast(idx.device, autocast_dtype):
        cache = new_cache(model, idx.shape[0], autocast_dtype, static_shapes=graphed) if use_cache else None
        finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        decoder = token_decoder(model, cache, autocast_dtype)
        for _ in range(max_new_tokens):
            logits = next_logits(model, idx, cache, decoder)
            token = next_token(logits, temperature, top_k, top_p, generator)
            if eos_id is not None:
                token = token.masked_fill(finished[:, None], eos_id)
                finished |= token[:, 0] == eos_id
            idx = torch.cat([idx, token], dim=1)
            if finished.all():
                break
    return idx.clone()  # a normal tensor again, which autograd may save (an inference tensor it may not)


@torch.no_grad()
def beam_search(model: GPTModel, idx: torch.Tensor, max_new_tokens: int, num_beams: int,
                length_penalty: float = 1.0, eos_id: int | None = None, use_cache: bool = True,
                autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The continuation of one prompt `idx` (1, seq) with the best score found by beam search.

    A continuation's score is the sum of its tokens' log-probabilities divided by
    (number of new tokens) ** length_penalty, as in Hugging Face: above 0 favours longer
    continuations, below 0 shorter ones. A beam ends at `eos_id` (which is kept and counted)
    or after `max_new_tokens`. Each step extends every live beam by every token and keeps the
    `num_beams` best that do not end at `eos_id` as live beams; the best ending at `eos_id`
    becomes a finished candidate only when it ranks among the step's `num_beams` best, as in
    Hugging Face transformers (so with length_penalty <= 0 an unlikely end of text does not win
    by being short). Ids beyond GPT-2's 50,257 are never chosen. Deterministic; with num_beams 1
    and no eos_id it is greedy search. Returns (1, seq + new tokens).
    """
    if idx.shape[0] != 1:
        raise ValueError(f"beam search takes one prompt, got a batch of {idx.shape[0]}")
    if num_beams < 1:
        raise ValueError(f"num_beams must be at least 1, got {num_beams}")
    if max_new_tokens == 0:
        return idx
    cache = new_cache(model, 1, autocast_dtype) if use_cache else None
    beams = idx  # (live beams, seq)
    beam_scores = torch.zeros(1, device=idx.device)  # sum of log-probs of each live beam
    best: tuple[float, torch.Tensor] | None = None  # (score, sequence) of the best finished beam

    def consider(score_sum: float, sequence: torch.Tensor) -> None:
        nonlocal best
        new_tokens = sequence.shape[0] - idx.shape[1]
        score = score_sum / new_tokens ** length_penalty
        if best is None or score > best[0]:
            best = (score, sequence)

    with eval_mode(model), autocast(idx.device, autocast_dtype):
        decoder = token_decoder(model, cache, autocast_dtype)
        for _ in range(max_new_tokens):
            log_probs = torch.log_softmax(next_logits(model, beams, cache, decoder)[:, :GPT2_VOCAB_SIZE], dim=-1)
            candidates = beam_scores[:, None] + log_probs  # (live beams, vocab)
            if eos_id is not None:  # beams ending here all have the same length: the best one may win
                row = int(candidates[:, eos_id].argmax())
                ended = candidates[row, eos_id]
                if int((candidates > ended).sum()) < num_beams:
                    consider(ended.item(), torch.cat([beams[row], beams.new_tensor([eos_id])]))
                candidates[:, eos_id] = float("-inf")
            vocab = candidates.shape[1]
            beam_scores, flat = candidates.flatten().topk(min(num_beams, candidates.numel()))
            keep = beam_scores > float("-inf")
            beam_scores, flat = beam_scores[keep], flat[keep]
            if not len(flat):
                break
            parent = flat // vocab
            beams = torch.cat([beams[parent], (flat % vocab)[:, None]], dim=1)
            if cache is not None:
                cache.reorder(parent)
        else:
            for score_sum, sequence in zip(beam_scores.tolist(), beams):
                consider(score_sum, sequence)
    return best[1][None, :]


def sample_texts(model: GPTModel, opts: SampleParams, device: torch.device,
                 autocast_dtype: torch.dtype | None = None) -> list[str]:
    """What the sample stage writes: opts.num_samples continuations of opts.prompt (the prompt
    included), each ending before <|endoftext|>. Sample i draws with seed opts.seed + i, the
    samples decoded together as one batch (the weights are read once per step for all), on the CPU
    with every CPU's thread (device.decoding_threads)."""
    prompt = encode_prompt(opts.prompt)
    eos_id = gpt2_encoding().eot_token
    batch_size = 1 if opts.num_beams > 1 else opts.num_samples  # beam search is deterministic
    with decoding_threads(device):
        rows = generate(model, torch.tensor([prompt] * batch_size, device=device), opts.max_new_tokens,
                        temperature=opts.temperature, top_k=opts.top_k, top_p=opts.top_p, eos_id=eos_id,
                        generator=[torch.Generator(device=device).manual_seed(opts.seed + i) for i in range(batch_size)],
                        num_beams=opts.num_beams, length_penalty=opts.length_penalty, autocast_dtype=autocast_dtype)
    rows = [rows[0]] * opts.num_samples if opts.num_beams > 1 else rows
    texts = []
    for row in rows:
        new = row[len(prompt):].tolist()
        texts.append(decode(prompt + new[:new.index(eos_id) if eos_id in new else len(new)]))
    return texts
