"""perceiver.PerceiverAR: shapes, causality, left padding, context dropout, cached generation, sampling, errors."""

import pytest
import torch

import perceiver
import perceiver_kernels as pk
from perceiver.ar import RotaryEmbedding, _sample

VOCAB = 50


def make_model(num_latents=6, max_seq_len=40, sharpen=False, **kwargs):
    torch.manual_seed(0)
    model = perceiver.PerceiverAR(VOCAB, max_seq_len, num_latents, 16, num_heads=2, num_layers=2, **kwargs)
    if sharpen:
        # Random weights scaled up, so that greedy decoding does not repeat one token
        # and a wrong cache changes the choices.
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if parameter.dim() > 1:
                    parameter.mul_(3.0)
    return model.eval()


def tokens(batch, length, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_forward_gives_logits_for_the_latents():
    model = make_model()
    x = tokens(3, 20)
    assert model(x).shape == (3, 6, VOCAB)
    assert model(x, num_latents=20).shape == (3, 20, VOCAB)
    assert model(x[:, :6]).shape == (3, 6, VOCAB)  # no prefix: the latents are the whole sequence
    assert model(x.int()).shape == (3, 6, VOCAB)


def test_rotary_scores_depend_only_on_relative_position():
    rotary = RotaryEmbedding(8)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(i, j):
        return (rotary(torch.tensor([[i]]))(q) * rotary(torch.tensor([[j]]))(k)).sum().item()

    assert score(7, 3) == pytest.approx(score(104, 100), abs=1e-5)
    assert score(7, 3) != pytest.approx(score(7, 4), abs=1e-3)
    x = torch.randn(2, 3, 5, 8)
    rotated = rotary(torch.arange(5).expand(2, -1))(x)
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))  # a rotation
    torch.testing.assert_close(rotary(torch.zeros(2, 5, dtype=torch.long))(x), x)


def test_logits_at_a_position_ignore_every_later_token():
    model = make_model(num_latents=8)
    x = tokens(2, 24)
    before = model(x)  # rows for positions 16..23
    changed = x.clone()
    changed[:, 20:] = (changed[:, 20:] + 1) % VOCAB
    after = model(changed)
    torch.testing.assert_close(after[:, :4], before[:, :4], rtol=0, atol=1e-6)  # positions 16..19
    assert (after[:, 4] - before[:, 4]).abs().max() > 1e-3  # position 20 itself changed
    earlier = x.clone()
    earlier[:, 3] = (earlier[:, 3] + 1) % VOCAB  # a prefix token: every latent reads it
    assert ((model(earlier) - before).abs().amax(dim=-1) > 1e-4).all()


def test_left_padding_gives_the_logits_of_the_unpadded_rows():
    model = make_model(num_latents=6)
    lengths = (20, 15, 4)  # the last row has fewer real tokens than latents
    rows = [tokens(1, n, seed=n) for n in lengths]
    batch = torch.full((3, 20), 7)  # padding holds some id: it must not matter
    padding = torch.ones(3, 20, dtype=torch.bool)
    for i, row in enumerate(rows):
        batch[i, 20 - row.shape[1]:] = row[0]
        padding[i, 20 - row.shape[1]:] = False
    batch[2, :3] = 10_000  # not even a valid id
    padded = model(batch, padding)
    for i, row in enumerate(rows):
        alone = model(row, num_latents=min(6, row.shape[1]))
        torch.testing.assert_close(padded[i, 6 - alone.shape[1]:], alone[0], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(padded).all()  # latents on padding positions give finite logits


def test_context_dropout_only_in_training_and_the_cross_attention_reads_fewer_keys(monkeypatch):
    model = make_model(num_latents=4, context_dropout=0.5)
    reference = make_model(num_latents=4)
    reference.load_state_dict(model.state_dict())
    x = tokens(2, 24)
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)

    keys_seen = []
    real = pk.cross_attention

    def recording(q, k, v, **kwargs):
        keys_seen.append((q.shape[2], k.shape[2]))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(pk, "cross_attention", recording)
    model.train()
    torch.manual_seed(3)
    first = model(x)
    assert keys_seen[0] == (4, 10 + 4)  # half of the 20 prefix positions, and the 4 latents
    second = model(x)
    assert not torch.allclose(first, second)  # a new random subset each call
    first.sum().backward()
    assert model.embedding.weight.grad.abs().sum() > 0
    keys_seen.clear()
    model.eval()
    model(x)
    assert keys_seen[0] == (4, 24)


def test_context_dropout_keeps_positions_in_order_with_their_phases(monkeypatch):
    """With every prefix token the same, dropping positions changes which phases the
    cross-attention sees, not the tokens: the kept ones must keep their own positions."""
    model = make_model(num_latents=4, context_dropout=0.5)
    x = tokens(1, 24)
    kept_positions = []
    real_rotary = model.rotary.forward

    def recording(positions):
        kept_positions.append(positions.clone())
        return real_rotary(positions)

    monkeypatch.setattr(model.rotary, "forward", recording)
    model.train()
    model(x)
    latent_positions, context_positions = kept_positions[0], kept_positions[1]
    assert latent_positions.tolist() == [[20, 21, 22, 23]]
    prefix = context_positions[0, :-4]
    assert len(prefix) == 10 and (prefix.diff() > 0).all() and prefix.max() < 20
    assert context_positions[0, -4:].tolist() == [20, 21, 22, 23]


def test_first_cached_step_and_the_growing_window_equal_a_full_forward():
    model = make_model(num_latents=6, sharpen=True)
    prompt = tokens(2, 10)
    hidden, cache = model._run(prompt, None, 2, drop_context=False, cache_capacity=16)
    torch.testing.assert_close(model.head(model.norm(hidden)), model(prompt, num_latents=2), rtol=0, atol=0)
    sequence = prompt
    for step in range(4):  # 3, 4, 5, 6 latents: the window grows, nothing slides
        token = tokens(2, 1, seed=20 + step)
        sequence = torch.cat([sequence, token], dim=1)
        cached = model._step(token, cache)
        full = model(sequence, num_latents=3 + step)[:, -1]
        torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)
    assert cache.length == 14 and all(k.shape[2] == 6 for k in cache.latent_keys)
    # The next step slides the window: the cache keeps the last 6 latents as computed,
    # where a forward would recompute the window without the latent that left.
    token = tokens(2, 1, seed=30)
    cached = model._step(token, cache)
    full = model(torch.cat([sequence, token], dim=1), num_latents=6)[:, -1]
    assert all(k.shape[2] == 6 for k in cache.latent_keys + cache.latent_values) and cache.length == 15
    assert torch.isfinite(cached).all() and not torch.allclose(cached, full, atol=1e-4)


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=1.0), dict(top_k=5, top_p=0.9)])
def test_cached_generation_equals_recomputing_while_the_window_grows(sampling):
    model = make_model(num_latents=8, sharpen=True)
    prompt = tokens(3, 12)

    def generate(use_cache):
        generator = torch.Generator().manual_seed(5)
        return model.generate(prompt, 7, num_latents=2, generator=generator, use_cache=use_cache, **sampling)

    cached = generate(True)
    assert cached.shape == (3, 19) and torch.equal(cached[:, :12], prompt)
    assert torch.equal(cached, generate(False))
    assert len(set(cached[:, 12:].flatten().tolist())) > 3  # not one token repeated


def test_batched_left_padded_prompts_generate_as_each_prompt_alone():
    model = make_model(num_latents=8, sharpen=True)
    rows = [tokens(1, n, seed=n) for n in (12, 9, 5)]
    batch = torch.zeros(3, 12, dtype=torch.long)
    padding = torch.ones(3, 12, dtype=torch.bool)
    for i, row in enumerate(rows):
        batch[i, 12 - row.shape[1]:] = row[0]
        padding[i, 12 - row.shape[1]:] = False
    for use_cache in (True, False):
        out = model.generate(batch, 6, key_padding_mask=padding, temperature=0, num_latents=5, use_cache=use_cache)
        for i, row in enumerate(rows):
            alone = model.generate(row, 6, temperature=0, num_latents=min(5, row.shape[1]), use_cache=use_cache)
            assert torch.equal(out[i, 12:], alone[0, row.shape[1]:]), (use_cache, i)


def test_generation_past_the_window_slides_and_stops_at_the_requested_length():
    model = make_model(num_latents=4, max_seq_len=40, sharpen=True)
    prompt = tokens(2, 10)
    out = model.generate(prompt, 30, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 40) and torch.equal(out[:, :10], prompt)
    assert ((out >= 0) & (out < VOCAB)).all()
    # The first token comes from the same forward either way.
    first = [model.generate(prompt, 1, temperature=0, use_cache=c) for c in (True, False)]
    assert torch.equal(*first)


def test_sampling_options():
    model = make_model(num_latents=6, sharpen=True)
    prompt = tokens(2, 8)
    greedy = model.generate(prompt, 6, temperature=0)
    assert torch.equal(model.generate(prompt, 6, top_k=1), greedy)
    assert torch.equal(model.generate(prompt, 6, top_p=1e-6), greedy)
    same = [model.generate(prompt, 6, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(*same)
    others = {tuple(model.generate(prompt, 6, generator=torch.Generator().manual_seed(s))[0].tolist())
              for s in range(6)}
    assert len(others) > 1
    assert model.generate(prompt, 2, top_k=10 * VOCAB).shape == (2, 10)  # more than the vocabulary: all kept


def test_top_k_and_top_p_keep_only_the_most_likely_tokens():
    probabilities = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    logits = probabilities.log().expand(4000, -1)
    generator = torch.Generator().manual_seed(0)
    drawn = _sample(logits, 1.0, 2, None, generator)
    assert set(drawn.flatten().tolist()) == {0, 1}
    drawn = _sample(logits, 1.0, None, 0.5, generator)  # 0.4 < 0.5, 0.4 + 0.3 reaches it
    assert set(drawn.flatten().tolist()) == {0, 1}
    drawn = _sample(logits, 1.0, None, 0.75, generator)
    assert set(drawn.flatten().tolist()) == {0, 1, 2}
    counts = torch.bincount(_sample(logits, 1.0, None, None, generator).flatten(), minlength=4) / 4000
    torch.testing.assert_close(counts, probabilities[0], rtol=0, atol=0.04)
    hot = torch.bincount(_sample(logits, 100.0, None, None, generator).flatten(), minlength=4) / 4000
    assert hot.min() > 0.2  # a high temperature flattens the distribution


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(top_p=1.5), ValueError, "top_p"),
    (dict(top_k=0), ValueError, "top_k"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(num_latents=9), ValueError, "num_latents"),
    (dict(num_latents=7), ValueError, "num_latents"),  # more than the model's 6
    (dict(max_new_tokens=0), ValueError, "max_new_tokens"),
    (dict(max_new_tokens=33), ValueError, "max_new_tokens"),  # 8 + 33 > max_seq_len 40
    (dict(generator=0), TypeError, "generator"),
    (dict(key_padding_mask=torch.tensor([[False] * 7 + [True]] * 2)), ValueError, "left"),
    (dict(key_padding_mask=torch.zeros(2, 7, dtype=torch.bool)), ValueError, "key_padding_mask"),
])
def test_generate_rejects_bad_arguments_naming_them(kwargs, error, words):
    model = make_model(num_latents=6)
    arguments = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(error, match=words):
        model.generate(tokens(2, 8), **arguments)


def test_forward_rejects_bad_inputs_naming_them():
    model = make_model(num_latents=6, max_seq_len=40)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(tokens(1, 41))
    with pytest.raises(ValueError, match="num_latents"):
        model(tokens(1, 5))  # fewer positions than the model's latents
    with pytest.raises(ValueError, match="num_latents"):
        model(tokens(1, 10), num_latents=11)
    with pytest.raises(ValueError, match="vocab_size"):
        model(torch.full((1, 10), VOCAB))
    with pytest.raises(TypeError, match="tokens"):
        model(torch.zeros(1, 10))
    with pytest.raises(ValueError, match="tokens"):
        model(torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match="prompt"):
        model.generate(torch.zeros(2, 0, dtype=torch.long), 3)


@pytest.mark.parametrize("kwargs, words", [
    (dict(num_latents=50), "num_latents"),
    (dict(dim=18), "dim"),  # 9 channels per head: rotary needs pairs
    (dict(num_heads=5), "dim"),
    (dict(context_dropout=1.0), "context_dropout"),
    (dict(dropout=-0.1), "dropout"),
    (dict(rotary_base=1.0), "rotary_base"),
    (dict(backend="fast"), "backend"),
    (dict(num_layers=0), "num_layers"),
])
def test_constructor_rejects_bad_settings_naming_them(kwargs, words):
    arguments = {"vocab_size": VOCAB, "max_seq_len": 40, "num_latents": 6, "dim": 16, "num_heads": 2, **kwargs}
    with pytest.raises(ValueError, match=words):
        perceiver.PerceiverAR(**arguments)
