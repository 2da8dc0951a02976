"""Weights in and out: Hugging Face GPT-2 directories (also in huggingface_hub's cache) and the
book's checkpoints give the same logits in our model, and our model directory, as pretrain writes
it, gives the same logits in transformers. Nothing is downloaded: the GPT-2 models are small and
randomly initialised."""

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import TINY, make_tokens, run_stage_process, stage_args, write_params
from gptpipe.checkpoint import load_model, save_model
from gptpipe.errors import PipelineError
from gptpipe.hub import GPT2_SIZES
from gptpipe.model import GPTConfig, GPTModel
from gptpipe.params import load_params
from gptpipe.tokenizer import encode, hf_tokenizer_files
from gptpipe.weights import initial_model

transformers = pytest.importorskip("transformers", reason="a test dependency: pip install -e '.[test]'")
book_ch04 = pytest.importorskip("llms_from_scratch.ch04", reason="the book's code (make install)")

SMALL_HF = dict(n_embd=64, n_layer=2, n_head=4, n_positions=32, vocab_size=100)
SMALL = GPTConfig(vocab_size=100, context_length=32, emb_dim=64, n_heads=4, n_layers=2,
                  qkv_bias=True, tie_embeddings=True)
TOKENS = torch.randint(0, 100, (2, 32), generator=torch.Generator().manual_seed(0))


def randomised(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter drawn at random (biases and LayerNorms start as 0 and 1, which would hide
    a misplaced one), in eval mode."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.2)
    return model.eval()


def hf_gpt2(tied: bool = True, **config) -> "transformers.GPT2LMHeadModel":
    cfg = transformers.GPT2Config(**{**SMALL_HF, **config}, tie_word_embeddings=tied,
                                  bos_token_id=None, eos_token_id=None)
    return randomised(transformers.GPT2LMHeadModel(cfg))


def hf_logits(model, tokens: torch.Tensor = TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def our_logits(model: GPTModel, tokens: torch.Tensor = TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(tokens)


def assert_same_logits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-4)


# ---------------------------------------------------------------- Hugging Face in

@pytest.mark.parametrize("tied", [True, False])
def test_hf_gpt2_directory_loads_with_the_same_logits(tmp_path, tied):
    hf = hf_gpt2(tied)
    hf.save_pretrained(tmp_path)
    ours = initial_model(GPTConfig(**{**vars(SMALL), "tie_embeddings": tied}), str(tmp_path))
    assert (ours.out_head.weight is ours.tok_emb.weight) == tied
    assert_same_logits(our_logits(ours), hf_logits(hf))


def test_openai_layout_without_prefix_and_with_mask_buffers(tmp_path):
    """openai-community/gpt2 stores GPT2Model's keys (h.0..., wte...) and, in older files,
    each layer's causal mask as attn.bias."""
    hf = hf_gpt2()
    state = {key.removeprefix("transformer."): value for key, value in hf.state_dict().items()
             if key != "lm_head.weight"}
    for i in range(SMALL_HF["n_layer"]):
        state[f"h.{i}.attn.bias"] = torch.ones(1, 1, 32, 32).tril()
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    hf.config.to_json_file(tmp_path / "config.json")
    assert_same_logits(our_logits(initial_model(SMALL, str(tmp_path))), hf_logits(hf))


def test_a_shorter_context_keeps_the_first_positions_and_their_logits(tmp_path):
    hf = hf_gpt2()
    hf.save_pretrained(tmp_path)
    ours = initial_model(GPTConfig(**{**vars(SMALL), "context_length": 16}), str(tmp_path))
    assert ours.pos_emb.weight.shape == (16, 64)
    assert_same_logits(our_logits(ours, TOKENS[:, :16]), hf_logits(hf, TOKENS[:, :16]))


def test_architecture_mismatch_lists_each_key_and_the_fix(tmp_path):
    hf_gpt2().save_pretrained(tmp_path)
    params_cfg = GPTConfig(**{**vars(SMALL), "context_length": 64, "qkv_bias": False})
    with pytest.raises(PipelineError) as e:
        initial_model(params_cfg, str(tmp_path))
    message = str(e.value)
    assert "model.context_length is 64 in the params, 32 in the checkpoint (or less)" in message
    assert "model.qkv_bias is false in the params, true in the checkpoint" in message
    assert "-S model.context_length=32 -S model.qkv_bias=true" in message
    assert "emb_dim" not in message


@pytest.mark.parametrize("config, message", [
    ({"activation_function": "relu"}, "'activation_function': 'relu'"),
    ({"layer_norm_epsilon": 1e-6}, "'layer_norm_epsilon': 1e-06"),
    ({"n_inner": 100}, "'n_inner': 100"),
    ({"model_type": "gpt_neo"}, "describes a 'gpt_neo' model"),
])
def test_hf_configs_that_compute_something_else_are_refused(tmp_path, config, message):
    hf_gpt2().save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    with pytest.raises(PipelineError, match=message.replace("(", r"\(")):
        initial_model(SMALL, str(tmp_path))


def test_missing_and_extra_weights_are_refused(tmp_path):
    hf_gpt2().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_layer": 3}))
    with pytest.raises(PipelineError, match="lacks the GPT-2 weight 'h.2.attn.c_attn.weight'"):
        initial_model(GPTConfig(**{**vars(SMALL), "n_layers": 3}), str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_layer": 1}))
    with pytest.raises(PipelineError, match="weights its config.json does not account for: h.1."):
        initial_model(GPTConfig(**{**vars(SMALL), "n_layers": 1}), str(tmp_path))


def test_unusable_init_from_paths(tmp_path):
    with pytest.raises(PipelineError, match="does not exist; give scratch, gpt2 "):
        initial_model(SMALL, str(tmp_path / "nowhere"))
    with pytest.raises(PipelineError, match="has no config.json"):
        initial_model(SMALL, str(tmp_path))
    hf_gpt2().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(PipelineError, match="has no model.safetensors"):
        initial_model(SMALL, str(tmp_path))
    torch.save({"model": "not a state dict"}, tmp_path / "other.pth")
    with pytest.raises(PipelineError, match="not a checkpoint of the book's GPTModel"):
        initial_model(SMALL, str(tmp_path / "other.pth"))
    torch.save(torch.nn.Linear(2, 2), tmp_path / "pickled.pth")  # a whole module: needs unpickling
    with pytest.raises(PipelineError, match="refused for safety"):
        initial_model(SMALL, str(tmp_path / "pickled.pth"))


def test_scratch_and_loaded_models_leave_the_rng_in_the_same_state(tmp_path):
    """So a run from loaded weights sees the batch order and dropout of a run from scratch."""
    hf_gpt2().save_pretrained(tmp_path)
    torch.manual_seed(7)
    initial_model(SMALL, "scratch")
    after_scratch = torch.rand(3)
    torch.manual_seed(7)
    initial_model(SMALL, str(tmp_path))
    assert torch.equal(torch.rand(3), after_scratch)


# ---------------------------------------------------------------- Hugging Face out: our model directory

@pytest.mark.parametrize("tied, qkv_bias", [(True, True), (False, True), (False, False)])
def test_our_model_loads_in_transformers_with_the_same_logits(tmp_path, tied, qkv_bias):
    cfg = GPTConfig(**{**vars(SMALL), "tie_embeddings": tied, "qkv_bias": qkv_bias})
    ours = randomised(GPTModel(cfg))
    save_model(tmp_path, ours, step=0)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert_same_logits(hf_logits(hf), our_logits(ours))
    lm_head, wte = hf.lm_head.weight, hf.transformer.wte.weight
    assert hf.config.tie_word_embeddings == tied
    assert (lm_head.data_ptr() == wte.data_ptr()) == tied
    if not tied:  # truly separate matrices, each as we trained it
        assert not torch.equal(lm_head, wte)
        assert torch.equal(lm_head, ours.out_head.weight)
    if not qkv_bias:
        assert all(not block.attn.c_attn.bias.any() for block in hf.transformer.h)


def test_our_model_with_gpt2s_tokenizer_files_is_what_llama_cpps_converter_reads(tmp_path):
    """What llama.cpp's convert_hf_to_gguf.py reads besides the weights: the context length under
    GPT-2's original name n_ctx, and a tokenizer that AutoTokenizer loads (hf_tokenizer_files,
    which bench/llama_cpp.py puts next to the model)."""
    save_model(tmp_path, randomised(GPTModel(SMALL)), step=0)
    assert json.loads((tmp_path / "config.json").read_text())["n_ctx"] == SMALL.context_length
    for name, data in hf_tokenizer_files().items():
        (tmp_path / name).write_bytes(data)
    text = "Every effort moves you <|endoftext|> naïve"
    assert transformers.AutoTokenizer.from_pretrained(tmp_path)(text)["input_ids"] == encode(text)


@pytest.mark.parametrize("saved_by", ["pretrain", "transformers"])
def test_our_model_as_init_from_gives_back_the_same_weights(tmp_path, saved_by):
    """Also once transformers saved it again (it keeps config.json's gptpipe entry); the model's
    own config, not GPT-2's defaults, gives the architecture: here no qkv bias."""
    cfg = GPTConfig(**{**vars(SMALL), "qkv_bias": False, "tie_embeddings": False})
    ours = randomised(GPTModel(cfg))
    save_model(tmp_path / "ours", ours, step=0)
    if saved_by == "transformers":
        transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ours").save_pretrained(tmp_path / "hf")
    back = initial_model(cfg, str(tmp_path / ("ours" if saved_by == "pretrain" else "hf"))).state_dict()
    expected = ours.state_dict()
    assert back.keys() == expected.keys()
    assert all(torch.equal(back[key], expected[key]) for key in expected)


# ---------------------------------------------------------------- the book's checkpoints

@pytest.mark.parametrize("qkv_bias", [False, True])
def test_book_checkpoints_load_with_the_same_logits(tmp_path, qkv_bias):
    cfg = GPTConfig(**{**vars(SMALL), "qkv_bias": qkv_bias, "tie_embeddings": False})
    book = randomised(book_ch04.GPTModel({key: value for key, value in vars(cfg).items()
                                          if key != "tie_embeddings"}))
    optimizer = torch.optim.AdamW(book.parameters())
    torch.save(book.state_dict(), tmp_path / "model.pth")
    torch.save({"model_state_dict": book.state_dict(), "optimizer_state_dict": optimizer.state_dict()},
               tmp_path / "model_and_optimizer.pth")
    with torch.no_grad():
        expected = book(TOKENS)
    for name in ("model.pth", "model_and_optimizer.pth"):
        assert_same_logits(our_logits(initial_model(cfg, str(tmp_path / name))), expected)


def test_book_checkpoint_shapes_are_checked_against_the_params(tmp_path):
    book = book_ch04.GPTModel({**{k: v for k, v in vars(SMALL).items() if k != "tie_embeddings"},
                               "n_layers": 3})
    torch.save(book.state_dict(), tmp_path / "model.pth")
    with pytest.raises(PipelineError) as e:
        initial_model(SMALL, str(tmp_path / "model.pth"))
    assert "model.n_layers is 2 in the params, 3 in the checkpoint" in str(e.value)
    assert "model.tie_embeddings is true in the params, false in the checkpoint" in str(e.value)


# ---------------------------------------------------------------- through the stages

def test_auto_keys_take_the_checkpoints_values_and_written_ones_are_checked(tmp_path):
    hf = hf_gpt2()
    hf.save_pretrained(tmp_path / "gpt2")
    params = load_params(write_params(tmp_path / "params.yaml", {  # the other model.* keys: auto
        "model": {"context_length": 16, "init_from": str(tmp_path / "gpt2")}}))
    ours = initial_model(params.model, params.model.init_from)
    assert ours.cfg == GPTConfig(**{**vars(SMALL), "context_length": 16})
    assert_same_logits(our_logits(ours, TOKENS[:, :16]), hf_logits(hf, TOKENS[:, :16]))
    params = load_params(write_params(tmp_path / "params.yaml", {
        "model": {"n_layers": 3, "qkv_bias": True, "init_from": str(tmp_path / "gpt2")}}))
    with pytest.raises(PipelineError) as e:
        initial_model(params.model, params.model.init_from)
    assert "model.n_layers is 3 in the params, 2 in the checkpoint" in str(e.value)
    assert "qkv_bias" not in str(e.value) and "emb_dim" not in str(e.value)


def save_to_hub_cache(model, hf_home: Path, repo: str, commit: str) -> None:
    """`model` saved by transformers, laid out in the Hugging Face cache at `hf_home` as
    huggingface_hub lays out a download of `repo` at `commit`: the files in blobs/ named by
    their hash, snapshots/<commit>/ linking to them, refs/main naming the commit."""
    folder = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    model.save_pretrained(folder / "saved")
    for file in (folder / "saved").iterdir():
        blob = folder / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        file.replace(blob)
        link = folder / "snapshots" / commit / file.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (folder / "saved").rmdir()
    (folder / "refs").mkdir()
    (folder / "refs/main").write_text(commit)


def test_gpt2_by_name_from_the_hub_cache_offline_then_back_to_transformers(tmp_path, corpus_path, monkeypatch):
    """The one-param run, `init_from: gpt2` with train.epochs 0, offline with the weights in
    huggingface_hub's cache: the architecture comes from the checkpoint (the model.* keys
    are auto), its first context_length positions are kept, the model pretrain writes computes
    what the checkpoint computes, here and in transformers."""
    hf = hf_gpt2(vocab_size=50257, n_positions=64)
    save_to_hub_cache(hf, tmp_path / "hf", *GPT2_SIZES["gpt2"])
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    params = write_params(tmp_path / "params.yaml", {
        "model": {"context_length": 32, "init_from": "gpt2"},
        "train": {**TINY["train"], "epochs": 0},
    }, corpus_path)
    make_tokens(tmp_path, params)
    result = run_stage_process("pretrain", params, *stage_args("pretrain", tmp_path))
    assert result.returncode == 0, result.stderr
    assert f"openai-community/gpt2 at revision {GPT2_SIZES['gpt2'][1]}" in result.stderr
    model, _ = load_model(tmp_path / "model", torch.device("cpu"))
    assert model.cfg == GPTConfig(**{**vars(SMALL), "vocab_size": 50257})
    assert json.loads((tmp_path / "train.json").read_text())["architecture"]["n_layers"] == 2
    tokens = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(1))
    expected = hf_logits(hf, tokens)
    assert_same_logits(our_logits(model, tokens), expected)

    exported = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "model").eval()
    assert_same_logits(hf_logits(exported, tokens), expected)


# ---------------------------------------------------------------- this pipeline's own model files

def test_init_from_an_earlier_runs_model(tmp_path):
    """A run can start from another experiment's data/model (or its model.safetensors): same
    weights, its architecture checked against the params like any checkpoint's."""
    torch.manual_seed(0)
    earlier = randomised(GPTModel(SMALL))
    save_model(tmp_path / "model", earlier, step=7)
    for path in (tmp_path / "model", tmp_path / "model/model.safetensors"):
        assert_same_logits(our_logits(initial_model(SMALL, str(path))), our_logits(earlier))
    shorter = GPTConfig(**{**vars(SMALL), "context_length": 16, "drop_rate": 0.0})  # both free to differ
    assert_same_logits(our_logits(initial_model(shorter, str(tmp_path / "model")), TOKENS[:, :16]),
                       our_logits(earlier, TOKENS[:, :16]))
    with pytest.raises(PipelineError, match="model.n_layers is 3 in the params, 2 in the checkpoint"):
        initial_model(GPTConfig(**{**vars(SMALL), "n_layers": 3}), str(tmp_path / "model"))
    (tmp_path / "lone.safetensors").write_bytes((tmp_path / "model/model.safetensors").read_bytes())
    with pytest.raises(PipelineError, match="safetensors file without the config.json"):
        initial_model(SMALL, str(tmp_path / "lone.safetensors"))


def test_init_from_must_not_be_empty(tmp_path):
    with pytest.raises(PipelineError, match="model.init_from is empty"):
        load_params(write_params(tmp_path / "params.yaml", {"model": {"init_from": " "}}))
