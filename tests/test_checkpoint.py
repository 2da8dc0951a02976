"""The model directory (a Hugging Face GPT-2: config.json + model.safetensors) and the one safe
torch.load. That transformers loads it with the same logits: tests/test_weights.py."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gptpipe.checkpoint import (HEADER_KEY, HF_CONFIG, HF_WEIGHTS, load_model, read_model, save_model, to_hf_state_dict,
                                torch_load)
from gptpipe.errors import PipelineError
from gptpipe.model import GPTConfig, GPTModel

CFG = GPTConfig(vocab_size=50, context_length=8, emb_dim=16, n_heads=2, n_layers=1)


def trained_model(cfg: GPTConfig = CFG) -> GPTModel:
    torch.manual_seed(0)
    model = GPTModel(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 50, (2, 8))).sum().backward()
    optimizer.step()
    return model


def edit_header(directory, change) -> None:
    config = json.loads((directory / HF_CONFIG).read_text())
    change(config[HEADER_KEY])
    (directory / HF_CONFIG).write_text(json.dumps(config))


def test_round_trip_holds_weights_config_and_progress_only(tmp_path):
    model = trained_model()
    path = tmp_path / "model"
    save_model(path, model, step=1, epoch=1, tokens_seen=16)
    assert sorted(p.name for p in path.iterdir()) == [HF_CONFIG, HF_WEIGHTS]  # no temporary file
    with safe_open(path / HF_WEIGHTS, framework="pt") as f:  # plain tensors under GPT-2's names
        assert set(f.keys()) == set(to_hf_state_dict(model.state_dict(), CFG))
        assert f.metadata() == {"format": "pt"}  # what transformers asks for, nothing else
    header = json.loads((path / HF_CONFIG).read_text())[HEADER_KEY]
    assert header["config"]["emb_dim"] == 16 and header["progress"] == {"step": 1, "epoch": 1, "tokens_seen": 16}
    # the weights once, and c_attn's zero bias (GPT-2 always has one): 3 * emb_dim per layer
    assert (path / HF_WEIGHTS).stat().st_size < sum(p.numel() * 4 for p in model.parameters()) + 3 * 16 * 4 + 4096
    loaded, progress = load_model(path, torch.device("cpu"))
    assert loaded.cfg == CFG and not loaded.training and progress["step"] == 1
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    assert all(p.is_contiguous() for p in loaded.parameters())


def test_the_same_model_gives_the_same_bytes(tmp_path):
    """DVC hashes the files: neither may come out in a different order each time."""
    model = trained_model()
    for i in range(8):
        save_model(tmp_path / str(i), model, step=1, epoch=1)
    for name in (HF_CONFIG, HF_WEIGHTS):
        assert len({(tmp_path / str(i) / name).read_bytes() for i in range(8)}) == 1


def test_missing_truncated_and_foreign_models(tmp_path):
    with pytest.raises(PipelineError, match="not found: run the pretrain stage"):
        load_model(tmp_path / "nope", torch.device("cpu"))
    save_model(tmp_path / "good", trained_model(), step=1)
    data = (tmp_path / "good" / HF_WEIGHTS).read_bytes()
    (tmp_path / "good" / HF_WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(PipelineError, match="not a readable safetensors file"):
        read_model(tmp_path / "good")
    (tmp_path / "good" / HF_WEIGHTS).unlink()
    with pytest.raises(PipelineError, match="model.safetensors not found: .* is not a whole model"):
        read_model(tmp_path / "good")
    save_file({"weights": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(PipelineError, match="is a safetensors file, not a model of this pipeline"):
        read_model(tmp_path / "other.safetensors")
    save_model(tmp_path / "hf", trained_model(), step=1)
    config = json.loads((tmp_path / "hf" / HF_CONFIG).read_text())
    del config[HEADER_KEY]
    (tmp_path / "hf" / HF_CONFIG).write_text(json.dumps(config))
    with pytest.raises(PipelineError, match="has no 'gptpipe' entry: .* is not a model of this pipeline"):
        read_model(tmp_path / "hf")
    save_model(tmp_path / "v1", trained_model(), step=1)
    edit_header(tmp_path / "v1", lambda header: header.update(format_version=1))
    with pytest.raises(PipelineError, match="cannot read .format version 1, this version reads 2."):
        read_model(tmp_path / "v1")


def test_a_malicious_pickle_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"model": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(PipelineError, match="refused for safety") as e:
        torch_load(tmp_path / "evil.pt", "the file", "delete it")
    assert "\n" not in str(e.value) and "weights_only=False" not in str(e.value)
    assert not marker.exists()
    torch.load(tmp_path / "evil.pt", weights_only=False)  # the unsafe way runs the payload
    assert marker.exists()


def test_weights_that_do_not_fit_the_stored_config(tmp_path):
    save_model(tmp_path / "mixed", trained_model(), step=1)
    edit_header(tmp_path / "mixed", lambda header: header["config"].update(emb_dim=32))  # n_heads 2 divides 32
    with pytest.raises(PipelineError, match="do not fit the model config"):
        load_model(tmp_path / "mixed", torch.device("cpu"))


def test_query_key_value_biases_stored_as_zeros_and_refused_otherwise(tmp_path):
    """GPT-2 always has c_attn's bias: a model without qkv bias stores zeros, read back as none."""
    save_model(tmp_path / "model", trained_model(), step=1)
    with safe_open(tmp_path / "model" / HF_WEIGHTS, framework="pt") as f:
        assert not f.get_tensor("transformer.h.0.attn.c_attn.bias").any()
    assert "trf_blocks.0.att.W_query.bias" not in read_model(tmp_path / "model")[1]
    save_model(tmp_path / "biased", trained_model(GPTConfig(**{**vars(CFG), "qkv_bias": True})), step=1)
    edit_header(tmp_path / "biased", lambda header: header["config"].update(qkv_bias=False))
    with pytest.raises(PipelineError, match="query/key/value biases that are not zero, though its config says"):
        read_model(tmp_path / "biased")


def test_tied_embeddings_are_stored_once_and_stay_one_parameter(tmp_path):
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(**{**vars(CFG), "tie_embeddings": True}))
    save_model(tmp_path / "tied", model, step=0)
    with safe_open(tmp_path / "tied" / HF_WEIGHTS, framework="pt") as f:
        assert "lm_head.weight" not in f.keys()
    loaded, _ = load_model(tmp_path / "tied", torch.device("cpu"))
    assert loaded.out_head.weight is loaded.tok_emb.weight
    assert torch.equal(loaded.out_head.weight, model.out_head.weight)
    save_model(tmp_path / "untied", trained_model(), step=0)  # the book's: a head of its own
    with safe_open(tmp_path / "untied" / HF_WEIGHTS, framework="pt") as f:
        assert "lm_head.weight" in f.keys()


def test_weights_whose_sum_overflows_are_still_finite(tmp_path):
    """The finiteness check sums each tensor first; a sum that overflows is not a NaN weight."""
    model = trained_model()
    with torch.no_grad():
        model.final_norm.weight.fill_(3e38)  # finite, but 16 of them sum to inf in float32
    save_model(tmp_path / "huge", model, step=1)
    loaded, _ = load_model(tmp_path / "huge", torch.device("cpu"))
    assert torch.equal(loaded.final_norm.weight, model.final_norm.weight)
    with torch.no_grad():
        model.final_norm.weight[3] = float("nan")
    save_model(tmp_path / "nan", model, step=1)
    with pytest.raises(PipelineError, match="ln_f.weight holds NaN or infinite values"):
        load_model(tmp_path / "nan", torch.device("cpu"))
