"""Perceiver AR (Hawthorne et al., 2022): autoregressive modelling of long contexts.

The last N positions of a sequence of L tokens are the latents. One causal
cross-attention lets each latent read the context up to its own position (all L
positions are keys, the N latents the queries, aligned at the bottom right); causal
self-attention layers then process the N latents, and a head predicts for each latent
the token that follows it. The cost is O(N L) for the cross-attention and O(N^2) per
self-attention layer, against O(L^2) per layer for a decoder-only Transformer.

Choices, and why:
- Positions: rotary embeddings on q and k of every attention, by absolute position in
  the sequence (a token's position is the number of real tokens before it: left padding
  takes no positions). A latent stands for a context position and gets that position's
  phase, so its query meets the keys at their true relative distance; a left-padded row
  has exactly the phases of the unpadded row.
- Context dropout (the paper's "cross-attend dropout"): in training, `context_dropout`
  is the fraction of the prefix positions (those before the latents) removed from each
  sequence, chosen at random per sequence. The kept positions are gathered in order
  with their rotary positions, so the cross-attention really reads fewer keys (its
  cost falls by that fraction of the prefix) and causality is unchanged. Never applied
  in evaluation or generation.
- Output head: a final LayerNorm and a Linear of its own (not tied to the embedding):
  byte and small vocabularies make it cheap, and the embedding stays free to serve
  only as input.
- Generation keeps a key/value cache: the cross-attention's rotated keys and values of
  every context position (a new token adds its own, the context is never projected
  again) and each self-attention layer's keys and values of the latents. The latent
  window starts at `num_latents` of generate (default: the model's N, or the prompt's
  length if shorter) and grows by one with each new token up to N: until then cached
  generation computes exactly what the model's forward on the whole sequence (with
  that many latents) computes, because causality makes an earlier latent's states
  independent of later ones. Once N latents are cached the window slides: the cache
  keeps the keys and values of the last N - 1 latents as they were computed, and the
  oldest latent remains only as a context key. A forward over the new window would
  recompute those latents without the latent that left, so past that point cached
  generation is an approximation of recomputing (the paper's and the usual choice: each
  step then costs one query's attention, not the window's). `use_cache=False`
  recomputes the whole forward per token (the exact model, slowly).
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import nn

from .checks import check_backend, check_dims, check_dropout, check_positive_int
from .layers import PerceiverLayer, self_attention_layer


class Rotation(NamedTuple):
    """Rotary phases of some positions, (B, 1, L, D/2) each; calling it rotates (B, H, L, D).

    A wide head stored padded (perceiver/padding.py) comes in wider than D: its padding
    channels, zeros, pass through unturned.
    """

    cos: torch.Tensor
    sin: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # Channel i pairs with channel i + D/2 (the "rotate half" layout).
        half = self.cos.shape[-1]
        first, second, padding = x.split((half, half, x.shape[-1] - 2 * half), dim=-1)
        cos, sin = self.cos.to(x.dtype), self.sin.to(x.dtype)
        return torch.cat((first * cos - second * sin, second * cos + first * sin, padding), dim=-1)


class RotaryEmbedding(nn.Module):
    """Rotary position embeddings (Su et al., 2021) for heads of `head_dim` channels.

    Pair i of a head turns by position * base^(-2i / head_dim); q . k then depends on
    the positions only through their difference.
    """

    def __init__(self, head_dim: int, base: float = 10_000.0):
        super().__init__()
        frequencies = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        # Not a parameter and not saved: rebuilt from the constructor's arguments.
        self.register_buffer("frequencies", frequencies.float(), persistent=False)

    def forward(self, positions: torch.Tensor) -> Rotation:
        """positions (B, L) int -> the Rotation of those positions."""
        angles = positions[:, None, :, None].float() * self.frequencies
        return Rotation(angles.cos(), angles.sin())


def _positions(tokens: torch.Tensor, padding: Optional[torch.Tensor]) -> torch.Tensor:
    """(B, L) positions: the number of real tokens before each (padding gets 0, never seen)."""
    if padding is None:
        return torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)
    return ((~padding).long().cumsum(dim=1) - 1).clamp_min(0)


def _last(x: Optional[torch.Tensor], count: int, dim: int) -> Optional[torch.Tensor]:
    """The last `count` entries along dim (x[..., -0:] would be all of them)."""
    if x is None:
        return None
    return x.narrow(dim, max(0, x.shape[dim] - count), min(count, x.shape[dim]))


@dataclass
class _Cache:
    """What generation keeps between steps (see the module's docstring)."""

    context_keys: torch.Tensor  # (B, H, capacity, D): rotated keys of the cross-attention, filled up to length
    context_values: torch.Tensor
    context_padding: Optional[torch.Tensor]  # (B, capacity) bool, None without padding
    length: int
    latent_keys: list[torch.Tensor]  # per self-attention layer (B, H, n, D), n <= num_latents
    latent_values: list[torch.Tensor]
    latent_padding: Optional[torch.Tensor]  # (B, n)
    next_position: torch.Tensor  # (B, 1) rotary position of the next token


class PerceiverAR(nn.Module):
    """Perceiver AR over a vocabulary of `vocab_size` tokens (see the module's docstring).

    Args:
        vocab_size: token ids are in [0, vocab_size).
        max_seq_len: the longest sequence (context and latents, padding included) the
            model takes, in forward and in generation.
        num_latents: N, the latent window: the last N positions are the queries of the
            cross-attention and the tokens of the self-attention layers.
        dim: the width of embeddings, latents and every attention (dim / num_heads
            channels per head, an even number for the rotary pairs).
        num_heads: heads of the cross-attention and of the self-attention layers.
        num_layers: causal self-attention layers on the latents.
        widening_factor: MLP width over dim.
        dropout: on each MLP's output, in training.
        context_dropout: the fraction of prefix positions dropped per sequence in
            training, in [0, 1).
        rotary_base: the rotary embedding's base (longer contexts like larger ones).
        backend: perceiver_kernels backend of every attention.

    forward(tokens, key_padding_mask=None, num_latents=None) returns the logits
    (B, n, vocab_size) of the last n positions: row i predicts the token after position
    L - n + i. key_padding_mask (B, L) bool, True = padding, must pad on the left; a
    latent on a padding position gets finite logits that mean nothing.
    """

    def __init__(
        self,
        vocab_size: int,
        max_seq_len: int,
        num_latents: int,
        dim: int,
        *,
        num_heads: int = 8,
        num_layers: int = 6,
        widening_factor: int = 4,
        dropout: float = 0.0,
        context_dropout: float = 0.0,
        rotary_base: float = 10_000.0,
        backend: str = "auto",
    ):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("max_seq_len", max_seq_len), ("num_latents", num_latents),
                            ("dim", dim), ("num_heads", num_heads), ("num_layers", num_layers),
                            ("widening_factor", widening_factor)):
            check_positive_int(name, value)
        if num_latents > max_seq_len:
            raise ValueError(f"num_latents ({num_latents}) must be at most max_seq_len ({max_seq_len})")
        if dim % num_heads or (dim // num_heads) % 2:
            raise ValueError(f"dim ({dim}) must be num_heads ({num_heads}) times an even head width "
                             "(rotary embeddings turn pairs of channels)")
        check_dropout("dropout", dropout)
        check_dropout("context_dropout", context_dropout)
        if isinstance(rotary_base, bool) or not isinstance(rotary_base, numbers.Real) or not rotary_base > 1:
            raise ValueError(f"rotary_base must be a number greater than 1, got {rotary_base!r}")
        check_backend(backend)
        self.vocab_size = vocab_size
        self.max_seq_len = max_seq_len
        self.num_latents = num_latents
        self.context_dropout = context_dropout
        self.embedding = nn.Embedding(vocab_size, dim)
        nn.init.normal_(self.embedding.weight, std=0.02)
        self.rotary = RotaryEmbedding(dim // num_heads, rotary_base)
        self.cross_attention = PerceiverLayer(dim, dim, num_heads=num_heads, widening_factor=widening_factor,
                                              dropout=dropout, backend=backend)
        self.layers = nn.ModuleList(
            self_attention_layer(dim, num_heads=num_heads, widening_factor=widening_factor, dropout=dropout,
                                 backend=backend)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size)

    # ---- checks ---------------------------------------------------------------------

    def _check_tokens(self, name: str, tokens, padding) -> Optional[torch.Tensor]:
        """Checks tokens (B, L) and their left padding; returns the padding mask or None."""
        check_dims(name, tokens, (2,), "(B, L) token ids")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name} must hold int64 or int32 token ids, got {tokens.dtype}")
        if tokens.shape[1] > self.max_seq_len:
            raise ValueError(f"{name} has {tokens.shape[1]} positions, more than max_seq_len={self.max_seq_len}")
        if padding is not None:
            check_dims("key_padding_mask", padding, (2,), f"(B, L) = {tuple(tokens.shape)} bool")
            if padding.dtype != torch.bool or padding.shape != tokens.shape:
                raise ValueError(f"key_padding_mask must be a bool tensor of the shape of {name} "
                                 f"{tuple(tokens.shape)} with True = padding, got {padding.dtype} "
                                 f"{tuple(padding.shape)}")
            if (padding[:, 1:] & ~padding[:, :-1]).any():
                raise ValueError("key_padding_mask must pad on the left: True only before a row's first real token")
        real = tokens if padding is None else tokens[~padding]
        if real.numel():
            low, high = torch.stack(torch.aminmax(real)).tolist()
            if low < 0 or high >= self.vocab_size:
                raise ValueError(f"{name} must hold ids in [0, vocab_size={self.vocab_size}), "
                                 f"got values from {low} to {high}")
        return padding

    def _check_num_latents(self, num_latents, length: int, limit: int, name: str) -> int:
        if num_latents is None:
            num_latents = min(self.num_latents, length)
        check_positive_int("num_latents", num_latents)
        if num_latents > min(length, limit):
            raise ValueError(f"num_latents ({num_latents}) must be at most the length of {name} ({length})"
                             + (f" and the model's num_latents ({limit})" if limit < length else ""))
        return num_latents

    # ---- the model ------------------------------------------------------------------

    def forward(self, tokens: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None, *,
                num_latents: Optional[int] = None) -> torch.Tensor:
        """tokens (B, L) -> logits (B, n, vocab_size) of the last n = num_latents positions.

        num_latents defaults to the model's; it may be anything from 1 to L.
        """
        padding = self._check_tokens("tokens", tokens, key_padding_mask)
        if num_latents is None and tokens.shape[1] < self.num_latents:
            raise ValueError(f"tokens has {tokens.shape[1]} positions, fewer than num_latents={self.num_latents}: "
                             "pass a longer sequence or a smaller num_latents")
        num_latents = self._check_num_latents(num_latents, tokens.shape[1], tokens.shape[1], "tokens")
        latents, _ = self._run(tokens, padding, num_latents, drop_context=self.training)
        return self.head(self.norm(latents))

    def _run(self, tokens: torch.Tensor, padding: Optional[torch.Tensor], num_latents: int, drop_context: bool,
             cache_capacity: Optional[int] = None) -> tuple[torch.Tensor, Optional[_Cache]]:
        """The latents' final states (B, n, dim), and the generation cache when a capacity is given."""
        if padding is not None:
            tokens = tokens.masked_fill(padding, 0)  # padding may hold any id: never embedded as such
        embedded = self.embedding(tokens)
        positions = _positions(tokens, padding)
        latents = embedded[:, -num_latents:]
        latent_rotation = self.rotary(positions[:, -num_latents:])
        latent_padding = None if padding is None else padding[:, -num_latents:]
        context, context_positions, context_padding = embedded, positions, padding
        if drop_context and self.context_dropout > 0:
            context, context_positions, context_padding = self._drop_context(embedded, positions, padding,
                                                                              num_latents)
        attention = self.cross_attention.attention
        keys, values = attention.project_kv(context)
        keys = self.rotary(context_positions)(keys)
        hidden = self.cross_attention._mlp_block(attention.attend(
            latents, keys, values, context_padding, causal=True, transform_queries=latent_rotation))
        latent_keys, latent_values = [], []
        for layer in self.layers:
            hidden, layer_keys, layer_values = _self_attention(layer, hidden, latent_rotation, latent_padding)
            latent_keys.append(layer_keys)
            latent_values.append(layer_values)
        if cache_capacity is None:
            return hidden, None
        batch, heads, length, head_dim = keys.shape
        context_keys = keys.new_empty(batch, heads, cache_capacity, head_dim)
        context_values = values.new_empty(batch, heads, cache_capacity, values.shape[-1])
        context_keys[:, :, :length] = keys
        context_values[:, :, :length] = values
        cached_padding = None
        if padding is not None:
            cached_padding = padding.new_zeros(batch, cache_capacity)
            cached_padding[:, :length] = padding
        next_position = (torch.full((batch, 1), tokens.shape[1], device=tokens.device) if padding is None
                         else (~padding).sum(dim=1, keepdim=True))  # the real tokens so far
        return hidden, _Cache(context_keys, context_values, cached_padding, length, latent_keys, latent_values,
                              latent_padding, next_position)

    def _drop_context(self, embedded, positions, padding, num_latents: int):
        """Keeps a random (1 - context_dropout) of each sequence's prefix, in order, and every latent."""
        batch, length, _ = embedded.shape
        prefix = length - num_latents
        keep = prefix - int(self.context_dropout * prefix)
        if keep == prefix:
            return embedded, positions, padding
        kept = torch.rand(batch, prefix, device=embedded.device).topk(keep, dim=1).indices.sort(dim=1).values
        latent_index = torch.arange(prefix, length, device=embedded.device).expand(batch, -1)
        index = torch.cat([kept, latent_index], dim=1)
        gathered = embedded.gather(1, index[..., None].expand(-1, -1, embedded.shape[-1]))
        return gathered, positions.gather(1, index), None if padding is None else padding.gather(1, index)

    # ---- generation -----------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        prompt: torch.Tensor,
        max_new_tokens: int,
        *,
        key_padding_mask: Optional[torch.Tensor] = None,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        num_latents: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Samples max_new_tokens tokens after prompt (B, L0); returns (B, L0 + max_new_tokens).

        key_padding_mask (B, L0), True = padding: prompts of different lengths padded on
        the left (the result keeps that padding; new tokens are real). temperature 0 is
        greedy decoding; otherwise logits are divided by it, then top_k keeps the k most
        likely tokens (k above the vocabulary keeps all) and top_p the smallest set whose
        probability reaches p, and a token is drawn with `generator` (on the model's
        device; None: torch's default). num_latents: the initial latent window (default
        min(N, L0)), growing to N (see the module's docstring for the cache and the
        sliding window). Call eval() first: dropout layers stay as the mode sets them.
        L0 + max_new_tokens must not exceed max_seq_len.
        """
        padding = self._check_tokens("prompt", prompt, key_padding_mask)
        check_positive_int("max_new_tokens", max_new_tokens)
        if prompt.shape[1] + max_new_tokens > self.max_seq_len:
            raise ValueError(f"the prompt's {prompt.shape[1]} positions plus max_new_tokens ({max_new_tokens}) "
                             f"exceed max_seq_len={self.max_seq_len}")
        if prompt.shape[1] == 0:
            raise ValueError("prompt must hold at least one position (B, L0 >= 1)")
        num_latents = self._check_num_latents(num_latents, prompt.shape[1], self.num_latents, "prompt")
        _check_sampling(temperature, top_k, top_p, generator, prompt.device)
        sample = functools.partial(_sample, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        tokens = [prompt]
        if use_cache:
            hidden, cache = self._run(prompt, padding, num_latents, drop_context=False,
                                      cache_capacity=prompt.shape[1] + max_new_tokens)
            tokens.append(sample(self.head(self.norm(hidden[:, -1]))))
            for _ in range(max_new_tokens - 1):
                tokens.append(sample(self._step(tokens[-1], cache)))
            return torch.cat(tokens, dim=1)
        for step in range(max_new_tokens):
            sequence = torch.cat(tokens, dim=1)
            if padding is not None:
                padding = torch.cat([key_padding_mask, padding.new_zeros(len(padding), step)], dim=1)
            hidden, _ = self._run(sequence, padding, min(num_latents + step, self.num_latents), drop_context=False)
            tokens.append(sample(self.head(self.norm(hidden[:, -1]))))
        return torch.cat(tokens, dim=1)

    def _step(self, token: torch.Tensor, cache: _Cache) -> torch.Tensor:
        """Logits (B, vocab_size) after appending token (B, 1): one new latent against the cache."""
        embedded = self.embedding(token)
        rotation = self.rotary(cache.next_position)
        attention = self.cross_attention.attention
        keys, values = attention.project_kv(embedded)
        end = cache.length + 1
        cache.context_keys[:, :, cache.length:end] = rotation(keys)
        cache.context_values[:, :, cache.length:end] = values
        cache.length = end
        context_padding = None if cache.context_padding is None else cache.context_padding[:, :end]
        # The new latent is the last position: it sees every cached key, so no causal mask.
        hidden = self.cross_attention._mlp_block(attention.attend(
            embedded, cache.context_keys[:, :, :end], cache.context_values[:, :, :end], context_padding,
            transform_queries=rotation))
        # The window keeps the newest num_latents latents: the oldest cached one slides out.
        kept = self.num_latents - 1
        if cache.latent_padding is not None:
            cache.latent_padding = torch.cat([_last(cache.latent_padding, kept, 1),
                                              cache.latent_padding.new_zeros(len(token), 1)], dim=1)
        for i, layer in enumerate(self.layers):
            hidden, cache.latent_keys[i], cache.latent_values[i] = _self_attention(
                layer, hidden, rotation, cache.latent_padding,
                _last(cache.latent_keys[i], kept, 2), _last(cache.latent_values[i], kept, 2))
        cache.next_position = cache.next_position + 1
        return self.head(self.norm(hidden[:, -1]))


def _self_attention(layer: PerceiverLayer, hidden: torch.Tensor, rotation: Rotation,
                    padding: Optional[torch.Tensor], past_keys: Optional[torch.Tensor] = None,
                    past_values: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A causal self-attention layer on latents; with past keys and values (generation)
    the new latents attend to those too. Returns the new states and all keys and values."""
    attention = layer.attention
    normed = attention.query_norm(hidden)
    keys, values = attention.project_kv(normed)
    keys = rotation(keys)
    if past_keys is not None:
        keys = torch.cat([past_keys, keys], dim=2)
        values = torch.cat([past_values, values], dim=2)
    out = layer._mlp_block(attention.attend(hidden, keys, values, padding, normed_queries=normed,
                                            causal=past_keys is None, transform_queries=rotation))
    return out, keys, values


def _check_sampling(temperature, top_k, top_p, generator, device: torch.device) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not (
            math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
    if top_k is not None:
        check_positive_int("top_k", top_k)
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, numbers.Real)
                              or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != device.type:
            raise ValueError(f"generator is on {generator.device}, the model's tokens on {device}")


def _sample(logits: torch.Tensor, temperature: float, top_k: Optional[int], top_p: Optional[float],
            generator: Optional[torch.Generator]) -> torch.Tensor:
    """(B, V) logits -> (B, 1) token ids."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        ordered, order = logits.sort(dim=-1, descending=True)
        probabilities = ordered.softmax(dim=-1)
        # Drop a token when the more likely ones already reach top_p (the first always stays).
        dropped = probabilities.cumsum(dim=-1) - probabilities >= top_p
        logits = logits.scatter(-1, order, ordered.masked_fill(dropped, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)
