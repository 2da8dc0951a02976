"""The GPT of the book's chapter 4: a GPT-2-style decoder-only transformer.

Modules are created in the same order as in the book's code, so that with the same seed
the parameters are initialised to the same values (nn.Linear and nn.Embedding defaults).
"""

import contextlib
import functools
import math
import warnings
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptpipe.params import GPTConfig


def cheap_keep_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """A dropout mask that costs a quarter of a random draw per element, and its scale.

    torch's CPU dropout draws one random number per element, and on the book's model that is
    about a sixth of a bf16 training step (bench/bench_train.py --profile). Here each 64-bit
    draw is cut into four 16-bit ones, and an element is dropped when its 16-bit number falls
    in the lowest round(p * 65536) of the 65536 values: p is rounded to 1/65536 (0.1 becomes
    0.10000610), and the scale 1/(1 - p) uses that rounded p, so the expected output is still x.
    """
    dropped_values = round(p * 65536)
    n = math.prod(shape)
    draws = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-2**63, None)
    keep = draws.view(torch.int16)[:n].view(shape) >= dropped_values - 32768
    return keep, 65536 / (65536 - dropped_values)


def cheap_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    keep, scale = cheap_keep_mask(x.shape, p, x.device)
    return x * keep * scale


class Dropout(nn.Dropout):
    """nn.Dropout, or with `cheap_masks` set, cheap_dropout: the same distribution of masks from
    a cheaper random stream. Off by default, so the fp32 path draws the book's exact masks."""

    cheap_masks: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:  # what nn.Dropout returns then, without its call
            return x
        if self.cheap_masks:
            return cheap_dropout(x, self.p)
        return super().forward(x)


class KVCache:
    """Keys and values of the positions a generation has seen, per layer, in buffers made for
    the whole context: (layers, batch, heads, context_length, head_dim).

    Each step writes its positions in place (no concatenation, no new memory) and attends over
    the positions filled so far; a single new token needs no mask. With `static_shapes`, it
    attends over the whole buffer through a mask of the positions filled instead, so that
    every step of a decoding has the same shapes: what CUDA graphs need (the caller then passes
    the positions and keeps len(cache)). Masked positions get exactly zero attention, so both
    give the results of attending over the filled positions only; on the CPU, attending over a
    256-position buffer at every token cost 13% of a decoding step (bench/README.md).
    The next position fed to the model is len(cache). A plain object, not an nn.Module: a
    module's buffer is found through nn.Module.__getattr__ after a failed lookup that formats an
    error message, and a decoding step reads the buffers four times a layer.
    """

    def __init__(self, cfg: GPTConfig, batch_size: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", static_shapes: bool = False):
        self.static_shapes = static_shapes
        shape = (cfg.n_layers, batch_size, cfg.n_heads, cfg.context_length, cfg.emb_dim // cfg.n_heads)
        # zeros, not empty: a masked position's weight is 0, and 0 × NaN garbage would be NaN
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.key_positions = torch.arange(cfg.context_length, device=device)
        self.length = 0

    def __len__(self) -> int:
        return self.length

    def clear(self) -> None:
        self.length = 0  # stale entries are masked until overwritten

    def reorder(self, index: torch.Tensor) -> None:
        """Keep the batch rows `index` (repeats allowed): beam search's surviving beams."""
        self.keys = self.keys.index_select(1, index)
        self.values = self.values.index_select(1, index)

    def update(self, layer: int, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Write the keys and values (batch, heads, len(positions), head_dim) of `positions`;
        return the keys and values to attend over and the mask (len(positions), keys) of what
        each of those positions may attend to, itself and the positions before it (None: all).
        Without static shapes those are the first len(cache) positions, which the model's
        forward has already counted the new ones into."""
        self.keys[layer].index_copy_(2, positions, keys)
        self.values[layer].index_copy_(2, positions, values)
        if self.static_shapes:
            return self.keys[layer], self.values[layer], self.key_positions <= positions[:, None]
        end = self.length
        mask = None if len(positions) == 1 else self.key_positions[:end] <= positions[:, None]
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end], mask


def check_fits(tokens: int, context_length: int) -> None:
    """The model attends to at most context_length positions: refuse a longer sequence."""
    if tokens > context_length:
        raise ValueError(f"sequence of {tokens} tokens is longer than the context length {context_length}")


class MultiHeadAttention(nn.Module):
    # Training with dropout: spell the attention out as the book does (softmax, then torch's
    # dropout on the weights) instead of scaled_dot_product_attention. The same numbers on the
    # CPU, where SDPA draws the book's masks; on CUDA, SDPA's kernels draw their own.
    book_dropout: bool = False

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.emb_dim // cfg.n_heads
        self.dropout = Dropout(cfg.drop_rate)  # on the attention weights
        self.W_query = nn.Linear(cfg.emb_dim, cfg.emb_dim, bias=cfg.qkv_bias)
        self.W_key = nn.Linear(cfg.emb_dim, cfg.emb_dim, bias=cfg.qkv_bias)
        self.W_value = nn.Linear(cfg.emb_dim, cfg.emb_dim, bias=cfg.qkv_bias)
        self.out_proj = nn.Linear(cfg.emb_dim, cfg.emb_dim)
        self.W_qkv: nn.Linear | None = None  # set by fuse_qkv

    def fuse_qkv(self) -> None:
        """Replace the query, key and value projections by one Linear that computes the three
        side by side: one matrix product per layer instead of three, for decoding, where a
        token's products are small and each call's fixed cost counts. The state dict then holds
        W_qkv instead of the book's three names."""
        projections = (self.W_query, self.W_key, self.W_value)
        with uninitialized_weights():  # copied in next: drawing them took 60 ms of the 124M model's 100
            fused = nn.Linear(self.W_query.in_features, 3 * self.W_query.out_features,
                              bias=self.W_query.bias is not None, device=self.W_query.weight.device,
                              dtype=self.W_query.weight.dtype)
        with torch.no_grad():
            fused.weight.copy_(torch.cat([w.weight for w in projections]))
            if fused.bias is not None:
                fused.bias.copy_(torch.cat([w.bias for w in projections]))
        self.W_qkv = fused
        del self.W_query, self.W_key, self.W_value

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (b, heads, t, head_dim)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        b, t, d = x.shape
        if self.W_qkv is not None:  # (b, t, 3 * d) -> three (b, heads, t, head_dim) views
            q, k, v = self.W_qkv(x).view(b, t, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = (self.split_heads(w(x)) for w in (self.W_query, self.W_key, self.W_value))
        dropout_p = self.dropout.p if self.training else 0.0
        if cache is not None:
            k, v, mask = cache.update(layer, positions, k, v)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        elif dropout_p > 0 and self.dropout.cheap_masks:
            out = self.causal_attention_with_dropout(q, k, v)
        elif dropout_p > 0 and self.book_dropout:
            out = self.book_attention(q, k, v)
        else:
            # On CPU this draws the same dropout mask on the attention weights as the book's
            # explicit softmax-then-dropout, so the two stay step-for-step identical.
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))

    def book_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention with dropout, op for op as the book's MultiHeadAttention computes it."""
        t = q.shape[2]
        scores = (q @ k.transpose(2, 3)).masked_fill(
            torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1), -torch.inf)
        weights = torch.softmax(scores / k.shape[-1] ** 0.5, dim=-1)
        return self.dropout(weights) @ v

    def causal_attention_with_dropout(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """What scaled_dot_product_attention computes in training, spelled out so that the
        dropout on the attention weights can use cheap masks. Under bf16 autocast the scores
        and weights stay bf16 (softmax sums in fp32), as in flash-attention kernels; the
        dropout's scale multiplies the output, a quarter the size of the weights."""
        t = q.shape[2]
        scores = (q / math.sqrt(self.head_dim)) @ k.transpose(2, 3)
        future = torch.full((t, t), -torch.inf, dtype=scores.dtype, device=q.device).triu(1)
        weights = torch.softmax(scores + future, dim=-1)
        keep, scale = cheap_keep_mask(weights.shape, self.dropout.p, weights.device)
        return (weights * keep) @ v * scale


class FeedForward(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim),
            nn.GELU(approximate="tanh"),
            nn.Linear(4 * cfg.emb_dim, cfg.emb_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: x + drop(att(norm1(x))), then x + drop(ff(norm2(x)))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.att = MultiHeadAttention(cfg)
        self.ff = FeedForward(cfg)
        self.norm1 = nn.LayerNorm(cfg.emb_dim)
        self.norm2 = nn.LayerNorm(cfg.emb_dim)
        self.drop_shortcut = Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_shortcut(self.att(self.norm1(x), cache, layer, positions))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class GPTModel(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = Dropout(cfg.drop_rate)
        self.trf_blocks = nn.Sequential(*(TransformerBlock(cfg) for _ in range(cfg.n_layers)))
        self.final_norm = nn.LayerNorm(cfg.emb_dim)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.out_head.weight = self.tok_emb.weight

    def fuse_qkv(self) -> None:
        """Every attention's three projections as one (MultiHeadAttention.fuse_qkv)."""
        for block in self.trf_blocks:
            block.att.fuse_qkv()

    def use_book_dropout(self, enabled: bool) -> None:
        """Attention dropout in the book's order and random stream on every device (see
        MultiHeadAttention.book_dropout)."""
        for module in self.modules():
            if isinstance(module, MultiHeadAttention):
                module.book_dropout = enabled

    def use_cheap_dropout(self, enabled: bool) -> None:
        """Draw dropout masks with cheap_dropout (the fast CPU path) instead of torch's dropout."""
        for module in self.modules():
            if isinstance(module, Dropout):
                module.cheap_masks = enabled

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (batch, seq) -> logits (batch, seq, vocab).

        With a cache, `idx` holds only the new tokens: they take positions len(cache) onwards,
        attend to the cached ones as well, and their keys and values are added to the cache.
        Given `positions` (a tensor, as a captured CUDA graph needs; the cache must then have
        static shapes), they take those instead, and keeping len(cache) is the caller's part.
        """
        if positions is not None and cache is not None and not cache.static_shapes:
            raise ValueError("explicit positions need a KVCache with static_shapes=True")
        if positions is None:
            past = 0 if cache is None else len(cache)
            check_fits(past + idx.shape[1], self.cfg.context_length)
            positions = torch.arange(past, past + idx.shape[1], device=idx.device)
            if cache is not None:
                cache.length = past + idx.shape[1]
        x = self.drop_emb(self.tok_emb(idx) + self.pos_emb(positions))  # (batch, seq, emb)
        if cache is None:
            x = self.trf_blocks(x)
        else:
            for layer, block in enumerate(self.trf_blocks):
                x = block(x, cache, layer, positions)
        return self.out_head(self.final_norm(x))


class TokenStep:
    """The model's forward for one new token per row at position len(cache), as one TorchScript
    function (decode_token) over the model's tensors, looked up once. Decoding on the CPU runs
    ~15 small ops a layer per token, and each product before them has streamed megabytes of
    weights through the caches, so an op costs about what code and data it must fetch again:
    called from Python, the time between products was a tenth of an fp32 token and a quarter of
    an int8 one. From TorchScript's interpreter a token took 3-5% less in fp32 and 17-23% less
    in int8 on the development machine (bench/README.md "Against llama.cpp"). Gives what
    forward(tokens, cache)[:, -1] gives, bit for bit (tests/test_generate.py). Made for a model
    in eval mode on the CPU with fused query/key/value projections (GPTModel.fuse_qkv), a cache
    without static shapes, and no autocast, which TorchScript does not apply: `usable` says
    whether this model and cache are such, now."""

    def __init__(self, model: GPTModel, cache: KVCache):
        if not self.usable(model, cache):
            raise ValueError("TokenStep needs a model in eval mode on the CPU with fused query/key/value "
                             "projections, a cache without static shapes, and no autocast")
        self.cache, self.context_length, self.heads = cache, model.cfg.context_length, model.cfg.n_heads
        self.embeddings = model.tok_emb.weight, model.pos_emb.weight
        blocks = model.trf_blocks
        norms = [norm for block in blocks for norm in (block.norm1, block.norm2)] + [model.final_norm]
        self.norms = [tensor for norm in norms for tensor in (norm.weight, norm.bias)]
        self.eps, self.gelu = model.final_norm.eps, blocks[0].ff.layers[1].approximate
        linears = [layer for block in blocks
                   for layer in (block.att.W_qkv, block.att.out_proj, block.ff.layers[0], block.ff.layers[2])]
        linears.append(model.out_head)
        if hasattr(model.out_head, "packed"):  # quantize.Int8Linear
            self.weights, self.biases, self.packed = [], [], [layer.packed for layer in linears]
        else:
            self.weights, self.biases, self.packed = [lin.weight for lin in linears], [lin.bias for lin in linears], []

    @staticmethod
    def usable(model: GPTModel, cache: KVCache) -> bool:
        return (not model.training and not cache.static_shapes and model.trf_blocks[0].att.W_qkv is not None
                and cache.keys.device.type == "cpu" and not torch.is_autocast_enabled("cpu"))

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (batch, vocab) after `tokens` (batch, 1), which are added to the cache."""
        cache = self.cache
        position = len(cache)
        check_fits(position + 1, self.context_length)
        cache.length = position + 1
        return scripted_decode_token()(tokens, position, *self.embeddings, self.norms, self.eps, self.weights,
                                       self.biases, self.packed, self.gelu, cache.keys, cache.values, self.heads)


def decode_token(tokens: torch.Tensor, position: int, token_embedding: torch.Tensor,
                 position_embedding: torch.Tensor, norms: list[torch.Tensor], eps: float,
                 weights: list[torch.Tensor], biases: list[torch.Tensor | None],
                 packed: list[torch.classes.quantized.LinearPackedParamsBase], gelu: str,
                 keys: torch.Tensor, values: torch.Tensor, heads: int) -> torch.Tensor:
    """GPTModel's forward for `tokens` (batch, 1) at `position`, its keys and values written into
    `keys` and `values` (KVCache's buffers); returns the logits (batch, vocab). The layer norms'
    weights and biases in `norms` as pairs, two per layer and the final norm's; the linear
    layers' in `weights` and `biases`, four per layer (fused query/key/value, out-projection,
    the two feed-forward layers) and the output head, or in `packed` for int8 (Int8Linear)."""
    batch, width = tokens.shape[0], token_embedding.shape[1]
    x = token_embedding[tokens] + position_embedding[position]  # (batch, 1, width)
    for layer in range(keys.shape[0]):
        qkv = project(normed(x, norms, 2 * layer, eps), 4 * layer, weights, biases, packed)
        q, k, v = qkv.view(batch, 3, heads, -1).unbind(1)  # (batch, heads, head_dim)
        keys[layer, :, :, position] = k
        values[layer, :, :, position] = v
        attended = F.scaled_dot_product_attention(q.unsqueeze(2), keys[layer, :, :, :position + 1],
                                                  values[layer, :, :, :position + 1])
        x = x + project(attended.view(batch, 1, width), 4 * layer + 1, weights, biases, packed)
        up = project(normed(x, norms, 2 * layer + 1, eps), 4 * layer + 2, weights, biases, packed)
        x = x + project(F.gelu(up, approximate=gelu), 4 * layer + 3, weights, biases, packed)
    return project(normed(x, norms, 2 * keys.shape[0], eps), 4 * keys.shape[0], weights, biases, packed)[:, -1]


def normed(x: torch.Tensor, norms: list[torch.Tensor], norm: int, eps: float) -> torch.Tensor:
    """Layer norm number `norm` of decode_token's `norms` applied to `x`."""
    return F.layer_norm(x, [x.shape[-1]], norms[2 * norm], norms[2 * norm + 1], eps)


def project(x: torch.Tensor, layer: int, weights: list[torch.Tensor], biases: list[torch.Tensor | None],
            packed: list[torch.classes.quantized.LinearPackedParamsBase]) -> torch.Tensor:
    """Linear layer number `layer` of decode_token's weights applied to `x`."""
    if len(packed) > 0:
        return int8_linear(x, packed[layer])
    return F.linear(x, weights[layer], biases[layer])


def int8_linear(x: torch.Tensor, packed: torch.classes.quantized.LinearPackedParamsBase) -> torch.Tensor:
    """x times an int8 weight packed for fbgemm (quantize.Int8Linear), the activations quantized on
    the fly; reduce_range: 7-bit activations, so that AVX2's 16-bit sums of u8 x s8 pairs cannot
    saturate."""
    return torch.ops.quantized.linear_dynamic(x, packed, True)


@functools.cache
def scripted_decode_token() -> torch.jit.ScriptFunction:
    """decode_token compiled by TorchScript, once per process (12-23 ms on the development
    machine, and its first call ~30 ms more than the next ones). TorchScript is marked deprecated
    in the torch this project pins (2.13), in favour of torch.compile, whose compilation of a
    decoding step took longer than a sample stage's whole run, and decoded slower
    (bench/README.md)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.script(decode_token)


@contextlib.contextmanager
def uninitialized_weights() -> Iterator[None]:
    """Modules built inside the block get their parameters allocated but not drawn: for weights
    that are loaded next. (The meta device does the same, but its first normal_ imports torch's
    compiler, a couple of seconds of a stage's start-up.)"""
    skipped = ("uniform_", "normal_", "kaiming_uniform_", "ones_", "zeros_")
    originals = {name: getattr(nn.init, name) for name in skipped}
    for name in skipped:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, function in originals.items():
            setattr(nn.init, name, function)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in eval mode (no dropout) inside the block, back in the mode it was in after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def from_book_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a state dict of the book's GPTModel to ours.

    The book's LayerNorm calls its parameters scale/shift, and its attention stores the
    causal mask as a buffer; everything else has the same names and shapes.
    """
    renamed = {}
    for key, value in state.items():
        if key.endswith(".mask"):
            continue
        key = key.removesuffix(".scale") + ".weight" if key.endswith(".scale") else key
        key = key.removesuffix(".shift") + ".bias" if key.endswith(".shift") else key
        renamed[key] = value
    return renamed
