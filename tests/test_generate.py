import copy
import itertools
import re

import pytest
import torch

from conftest import run_stage, stage_args, write_params
from gptpipe.checkpoint import save_model
from gptpipe.errors import PipelineError
from gptpipe.generate import beam_search, generate, next_logits, next_token
from gptpipe.model import GPTConfig, GPTModel, KVCache, TokenStep
from gptpipe.params import load_params
from gptpipe.quantize import prepare_for_decoding, transposed_copy

CFG = GPTConfig(vocab_size=50, context_length=8, emb_dim=16, n_heads=2, n_layers=2, drop_rate=0.0)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return GPTModel(CFG)


def draws(logits: torch.Tensor, n: int = 200, **kwargs) -> set[int]:
    return {next_token(logits, generator=torch.Generator().manual_seed(s), **kwargs).item() for s in range(n)}


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
    runs = [generate(model, prompt, 20, temperature=1.5, top_k=3, top_p=0.9,
                     generator=torch.Generator().manual_seed(9)) for _ in range(2)]
    assert torch.equal(*runs)
    other_seed = generate(model, prompt, 20, temperature=1.5, generator=torch.Generator().manual_seed(10))
    assert not torch.equal(runs[0], other_seed)
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.0]])
    assert draws(logits, temperature=10.0, top_k=2) == {1, 3}
    assert next_token(logits).item() == 1


def test_stops_at_end_of_text(model):
    prompt = torch.tensor([[1, 2, 3]])
    greedy_next = generate(model, prompt, 1)[0, -1].item()
    out = generate(model, prompt, 10, eos_id=greedy_next)
    assert out[0].tolist() == [1, 2, 3, greedy_next]


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert draws(logits, temperature=1.0, top_p=0.8) == {0, 1}  # 0.5 + 0.3 reaches 0.8
    assert draws(logits, temperature=1.0, top_p=0.81) == {0, 1, 2}
    assert draws(logits, temperature=1.0, top_p=1e-9) == {0}  # always at least the top token
    assert draws(logits, temperature=1.0, top_p=1.0) == {0, 1, 2, 3}


def test_top_p_applies_to_the_top_k_tempered_distribution():
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    # Alone, top-p 0.75 keeps three tokens (mass before the third: 0.7).
    assert draws(logits, temperature=1.0, top_p=0.75) == {0, 1, 2}
    # After top-k 3 the renormalised mass before the third is 0.7/0.9 > 0.75: two tokens.
    assert draws(logits, temperature=1.0, top_k=3, top_p=0.75) == {0, 1}
    # A high temperature flattens the three to about 1/3 each before top-p: all three stay.
    assert draws(logits, temperature=100.0, top_k=3, top_p=0.75) == {0, 1, 2}


def test_top_p_near_zero_is_greedy(model):
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    sampled = generate(model, prompt, 20, temperature=1.0, top_p=1e-6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, generate(model, prompt, 20))


@torch.no_grad()
def test_cached_forward_equals_the_full_forward(model):
    model.eval()
    idx = torch.randint(0, CFG.vocab_size, (2, CFG.context_length))
    full = model(idx)
    cache = KVCache(CFG, 2)
    chunks = [model(idx[:, a:b], cache) for a, b in [(0, 3), (3, 4), (4, 7), (7, 8)]]
    assert len(cache) == CFG.context_length
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="longer than the context length"):
        model(idx[:, :1], cache)


@torch.no_grad()
def test_static_shape_cache_equals_the_cache_of_filled_positions(model):
    """The CUDA-graph path (whole buffer, masked, positions given) computes what the default
    path (filled positions only) computes, token by token."""
    model.eval()
    idx = torch.randint(0, CFG.vocab_size, (2, CFG.context_length))
    filled, static = KVCache(CFG, 2), KVCache(CFG, 2, static_shapes=True)
    for t in range(CFG.context_length):
        expected = model(idx[:, t:t + 1], filled)
        torch.testing.assert_close(model(idx[:, t:t + 1], static, positions=torch.tensor([t])), expected,
                                   rtol=1e-5, atol=1e-5)
        static.length += 1
    with pytest.raises(ValueError, match="static_shapes"):
        model(idx[:, :1], KVCache(CFG, 2), positions=torch.tensor([0]))


# GPT-2's width: kernels may sum a product's terms in another order at some sizes only
WIDE = GPTConfig(vocab_size=300, context_length=4, emb_dim=768, n_heads=12, n_layers=1, drop_rate=0.0)


@pytest.mark.parametrize("mode", ["none", "int8"])
@pytest.mark.parametrize("cfg", [CFG, WIDE], ids=["tiny", "gpt2-wide"])
@torch.inference_mode()
def test_token_step_gives_the_forwards_logits_and_cache_bit_for_bit(mode, cfg):
    torch.manual_seed(0)
    model = prepare_for_decoding(GPTModel(cfg).eval(), mode, torch.device("cpu"))
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.context_length), generator=torch.Generator().manual_seed(3))
    by_forward, by_step = KVCache(cfg, 2), KVCache(cfg, 2)
    step = TokenStep(model, by_step)
    for t in range(cfg.context_length):
        expected = model(idx[:, t:t + 1], by_forward)[:, -1]
        assert torch.equal(step(idx[:, t:t + 1]), expected)
    with pytest.raises(ValueError, match="longer than the context length"):
        step(idx[:, :1])
    assert len(by_step) == len(by_forward) == cfg.context_length
    assert torch.equal(by_step.keys, by_forward.keys) and torch.equal(by_step.values, by_forward.values)


def test_generation_decodes_through_token_step_where_it_applies(model, monkeypatch):
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    by_modules = generate(model, prompt, 20, temperature=1.0, generator=torch.Generator().manual_seed(2))
    steps = []
    call = TokenStep.__call__
    monkeypatch.setattr(TokenStep, "__call__", lambda self, tokens: steps.append(1) or call(self, tokens))
    assert torch.equal(generate(model, prompt, 4), generate(model, prompt, 4, use_cache=False)) and not steps
    model.fuse_qkv()  # as the sample stage decodes on the CPU
    fused = generate(model, prompt, 20, temperature=1.0, generator=torch.Generator().manual_seed(2))
    # one step per token while the context has room (positions 3 to 7); once the window slides,
    # the forward rebuilds the cache at every token
    assert torch.equal(fused, by_modules) and len(steps) == CFG.context_length - prompt.shape[1]
    assert TokenStep.usable(model.train(), KVCache(CFG, 1)) is False
    assert TokenStep.usable(model.eval(), KVCache(CFG, 1, static_shapes=True)) is False
    with torch.autocast("cpu", dtype=torch.bfloat16):  # which TorchScript would not apply
        assert TokenStep.usable(model.eval(), KVCache(CFG, 1)) is False
    with pytest.raises(ValueError, match="eval mode on the CPU with fused"):
        TokenStep(model.train(), KVCache(CFG, 1))


@pytest.mark.parametrize("prompt_len", [3, CFG.context_length, CFG.context_length + 3])
def test_kv_cache_greedy_equals_no_cache_greedy_beyond_the_context(model, prompt_len):
    prompt = torch.randint(0, CFG.vocab_size, (2, prompt_len), generator=torch.Generator().manual_seed(1))
    new = 3 * CFG.context_length  # well past the context: the window slides for most tokens
    cached = generate(model, prompt, new, use_cache=True)
    assert cached.shape == (2, prompt_len + new)
    assert torch.equal(cached, generate(model, prompt, new, use_cache=False))


def test_kv_cache_sampling_equals_no_cache_sampling(model):
    prompt = torch.tensor([[1, 2, 3]])
    runs = [generate(model, prompt, 2 * CFG.context_length, temperature=1.0, top_k=10, top_p=0.9,
                     generator=torch.Generator().manual_seed(5), use_cache=use_cache)
            for use_cache in (True, False)]
    assert torch.equal(*runs)


@torch.no_grad()
def test_bf16_autocast_logits_are_close_to_fp32(model):
    model.eval()
    idx = torch.tensor([[1, 2, 3, 4]])
    fp32 = next_logits(model, idx, KVCache(CFG, 1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = next_logits(model, idx, KVCache(CFG, 1, torch.bfloat16))
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, fp32)
    torch.testing.assert_close(bf16, fp32, rtol=0.05, atol=0.05)
    out = generate(model, idx, 12, autocast_dtype=torch.bfloat16)
    assert out.shape == (1, 16) and out.dtype == torch.long


def test_one_beam_is_greedy(model):
    prompt = torch.tensor([[1, 2, 3]])
    assert torch.equal(beam_search(model, prompt, 2 * CFG.context_length, num_beams=1),
                       generate(model, prompt, 2 * CFG.context_length))


def test_beam_search_with_and_without_cache_agree(model):
    prompt = torch.tensor([[1, 2, 3]])
    runs = [beam_search(model, prompt, 2 * CFG.context_length, num_beams=3, eos_id=7, use_cache=use_cache)
            for use_cache in (True, False)]
    assert torch.equal(*runs)


TINY_VOCAB = GPTConfig(vocab_size=5, context_length=8, emb_dim=8, n_heads=2, n_layers=1, drop_rate=0.0)


@torch.no_grad()
def exhaustive_best(model, prompt: list[int], max_new: int, eos_id: int | None,
                    length_penalty: float) -> list[int]:
    """The highest-scoring continuation over all of them, each scored by a full forward."""
    candidates = []
    for n in range(1, max_new + 1):
        for tail in itertools.product(range(model.cfg.vocab_size), repeat=n):
            ends_early = n < max_new and tail[-1] != eos_id
            if ends_early or (eos_id is not None and eos_id in tail[:-1]):
                continue
            seq = torch.tensor([prompt + list(tail)])
            log_probs = torch.log_softmax(model(seq[:, :-1]), dim=-1)[0, len(prompt) - 1:]
            total = log_probs.gather(1, seq[0, len(prompt):, None]).sum().item()
            candidates.append((total / n ** length_penalty, prompt + list(tail)))
    return max(candidates)[1]


@pytest.mark.parametrize("eos_id", [None, 0])
@pytest.mark.parametrize("length_penalty", [-1.0, 0.0, 1.0, 3.0])
def test_beam_search_with_enough_beams_finds_the_exhaustive_best(eos_id, length_penalty):
    torch.manual_seed(4)
    model = GPTModel(TINY_VOCAB).eval()
    prompt, max_new = [1, 2], 3
    expected = exhaustive_best(model, prompt, max_new, eos_id, length_penalty)
    greedy = generate(model, torch.tensor([prompt]), max_new, eos_id=eos_id)[0].tolist()
    assert expected != greedy, "a model on which greedy search is best would not test the search"
    beams = TINY_VOCAB.vocab_size ** (max_new - 1)  # every prefix survives
    found = beam_search(model, torch.tensor([prompt]), max_new, beams, length_penalty, eos_id)
    assert found[0].tolist() == expected


def test_beam_search_stops_each_beam_at_end_of_text(model):
    prompt = torch.tensor([[1, 2, 3]])
    greedy_next = generate(model, prompt, 1)[0, -1].item()
    # With a strong preference for short outputs, the likely end token ends the search at once.
    out = beam_search(model, prompt, 10, num_beams=4, length_penalty=-5.0, eos_id=greedy_next)
    assert out[0].tolist() == [1, 2, 3, greedy_next]
    for length_penalty in (0.0, 1.0, 5.0):  # nothing follows an end token
        out = beam_search(model, prompt, 10, num_beams=4, length_penalty=length_penalty, eos_id=greedy_next)
        assert greedy_next not in out[0, 3:-1].tolist()
    assert beam_search(model, prompt, 0, num_beams=4).tolist() == prompt.tolist()


def run_sample_stage(tmp_path, **sample) -> str:
    if not (tmp_path / "model").exists():
        torch.manual_seed(0)
        save_model(tmp_path / "model", GPTModel(GPTConfig(context_length=16, emb_dim=8, n_heads=2,
                                                                      n_layers=1)))
    params = write_params(tmp_path / "params.yaml", {"train": {"device": "cpu"}, "sample": sample})
    run_stage("sample", params, *stage_args("sample", tmp_path))
    return (tmp_path / "sample.txt").read_text()


def test_sample_stage_writes_each_seeded_sample_under_a_header(tmp_path):
    opts = {"max_new_tokens": 6, "temperature": 1.0, "top_p": 0.9}
    one = run_sample_stage(tmp_path, **opts)
    three = run_sample_stage(tmp_path, num_samples=3, **opts)
    assert three == run_sample_stage(tmp_path, num_samples=3, **opts)
    texts = re.split(r"=== sample \d of 3 \(seed \d+\) ===\n", three)
    assert texts[0] == "" and len(texts) == 4
    assert re.findall(r"seed (\d+)", three) == ["123", "124", "125"]
    assert texts[1].strip() == one.strip() and one.startswith("Every effort moves you")
    assert len({t.strip() for t in texts[1:]}) > 1  # different seeds, different samples


def test_sample_stage_beam_search(tmp_path):
    text = run_sample_stage(tmp_path, max_new_tokens=5, temperature=0, num_beams=3, length_penalty=0.5)
    assert text.startswith("Every effort moves you") and "===" not in text


@pytest.mark.parametrize("sample, message", [
    ({"top_p": 0}, "sample.top_p must be in (0, 1]"),
    ({"top_p": 1.5}, "sample.top_p must be in (0, 1]"),
    ({"num_samples": 0}, "sample.num_samples must be at least 1"),
    ({"num_beams": 0}, "sample.num_beams must be at least 1"),
    ({"num_beams": 4, "temperature": 1.4}, "set sample.temperature to 0"),
    ({"length_penalty": "nan"}, "sample.length_penalty must be a finite number"),
])
def test_sample_params_are_validated(tmp_path, sample, message):
    with pytest.raises(PipelineError, match=re.escape(message)):
        load_params(write_params(tmp_path / "params.yaml", {"sample": sample}))


def test_a_batch_of_seeded_samples_equals_the_samples_drawn_one_by_one(model):
    """sample.num_samples decodes as one batch; row i still draws what seed i draws alone."""
    prompt = torch.tensor([[1, 2, 3]])
    seeds = [11, 12, 13, 14]
    options = dict(temperature=1.3, top_k=20, top_p=0.95)
    alone = [generate(model, prompt, 2 * CFG.context_length, generator=torch.Generator().manual_seed(s), **options)
             for s in seeds]
    batch = generate(model, prompt.repeat(len(seeds), 1), 2 * CFG.context_length,
                     generator=[torch.Generator().manual_seed(s) for s in seeds], **options)
    assert torch.equal(batch, torch.cat(alone))
    assert len({tuple(row.tolist()) for row in batch}) == len(seeds)


def test_a_finished_row_repeats_end_of_text_until_every_row_has_finished(model):
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    greedy = generate(model, prompt, 6)
    eos = greedy[0, 3].item()  # the first row's first new token ends it at once
    out = generate(model, prompt, 6, eos_id=eos)
    assert out[0, 3:].tolist() == [eos] * (out.shape[1] - 3)
    second = greedy[1, 3:].tolist()
    expected = second[:second.index(eos) + 1] if eos in second else second
    assert out[1, 3:3 + len(expected)].tolist() == expected


def test_int8_decoding_writes_valid_text_close_to_fp32(tmp_path):
    fp32 = run_sample_stage(tmp_path, max_new_tokens=8, temperature=0)
    int8 = run_sample_stage(tmp_path, max_new_tokens=8, temperature=0, quantize="int8")
    assert int8.startswith("Every effort moves you") and len(int8) > len("Every effort moves you")
    assert fp32.startswith("Every effort moves you")


def test_a_transposed_copy_made_in_pieces_equals_torchs():
    matrix = torch.randn(131, 7)  # pieces of 64 rows: two whole, one of 3
    transposed = transposed_copy(matrix)
    assert transposed.is_contiguous() and torch.equal(transposed, matrix.t().contiguous())


@torch.no_grad()
def test_fp32_decoding_with_fused_projections_gives_the_same_tokens(model):
    prompts = torch.randint(0, CFG.vocab_size, (4, 3), generator=torch.Generator().manual_seed(3))
    expected, logits = generate(model, prompts, 2 * CFG.context_length), model.eval()(prompts)
    fused = prepare_for_decoding(copy.deepcopy(model), "none", torch.device("cpu"))
    attention = fused.trf_blocks[0].att
    assert attention.W_qkv is not None and not hasattr(attention, "W_query")
    # The products with more outputs than inputs keep their weights as [in, out], the others as trained.
    wide = [attention.W_qkv.weight, fused.trf_blocks[0].ff.layers[0].weight, fused.out_head.weight]
    narrow = [attention.out_proj.weight, fused.trf_blocks[0].ff.layers[2].weight]
    assert all(w.t().is_contiguous() and not w.is_contiguous() for w in wide)
    assert all(w.is_contiguous() for w in narrow)
    assert torch.equal(fused.out_head.weight, model.out_head.weight)
    torch.testing.assert_close(fused(prompts), logits, rtol=1e-6, atol=1e-6)
    assert torch.equal(generate(fused, prompts, 2 * CFG.context_length), expected)


def test_int8_decoding_agrees_with_fp32_on_most_greedy_tokens(model):
    prompts = torch.randint(0, CFG.vocab_size, (8, 3), generator=torch.Generator().manual_seed(2))
    expected = generate(model, prompts, 6)
    quantized = prepare_for_decoding(model, "int8", torch.device("cpu"))
    agreement = (generate(quantized, prompts, 6)[:, 3:] == expected[:, 3:]).float().mean().item()
    assert agreement >= 0.5
    with pytest.raises(PipelineError, match="sample.quantize: int8 runs on the CPU"):
        prepare_for_decoding(model, "int8", torch.device("cuda"))


def test_decoding_uses_every_cpu_unless_the_environment_chose(monkeypatch):
    from gptpipe.device import decoding_threads
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2})  # 3 CPUs, torch set to 1
    torch.set_num_threads(1)
    try:
        with decoding_threads(torch.device("cpu")):
            assert torch.get_num_threads() == 3
        assert torch.get_num_threads() == 1
        with decoding_threads(torch.device("cuda")):  # GPU decoding: the CPU threads stay
            assert torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        with decoding_threads(torch.device("cpu")):
            assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
