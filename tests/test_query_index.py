"""The rule for `index`, the same for every query provider, called directly or through a decoder.

Valid: None, or a 1-D int64 / int32 tensor of positions in [0, num_queries) (any order,
repeats, empty). Anything else raises TypeError (not a tensor, wrong dtype) or
IndexError (wrong shape, out of range, negative) naming `index` and the range.
"""

import pytest
import torch

from perceiver import (FourierPositionEncoding, MultimodalQueries, PerceiverDecoder, TensorQueries,
                       TrainablePositionEncoding)

NUM_QUERIES = 50


def make_provider(kind):
    torch.manual_seed(0)
    if kind == "tensor":
        return TensorQueries(torch.randn(NUM_QUERIES, 6))
    if kind == "tensor-batched":
        return TensorQueries(torch.randn(2, NUM_QUERIES, 6))
    if kind == "trainable":
        return TrainablePositionEncoding(NUM_QUERIES, 6, init_scale=1.0)
    if kind == "fourier":
        return FourierPositionEncoding((NUM_QUERIES,), num_bands=3)
    # 20 + 6 + 24 = 50 queries over three modalities of different widths.
    return MultimodalQueries({
        "b": FourierPositionEncoding((4, 5), num_bands=2),
        "a": TrainablePositionEncoding(6, 3, init_scale=1.0),
        "c": TensorQueries(torch.randn(24, 4)),
    })


PROVIDERS = ["tensor", "tensor-batched", "trainable", "fourier", "multimodal"]

GOOD = {
    "int64": torch.tensor([3, 0, 49, 3, 17]),
    "int32": torch.tensor([3, 0, 49, 3, 17], dtype=torch.int32),
    "empty": torch.tensor([], dtype=torch.long),
    "every-modality": torch.tensor([45, 2, 30, 7, 21, 49, 0]),
}

BAD = {
    # name: (index, exception, message fragment)
    "one-past-the-end": (torch.tensor([1, 50]), IndexError, r"index must hold positions in \[0, 50\)"),
    "wraps-to-row-5": (torch.tensor([55]), IndexError, r"\[0, 50\).*got values from 55 to 55"),
    "negative": (torch.tensor([-1, 3]), IndexError, r"index .*\[0, 50\).*negative"),
    "very-negative": (torch.tensor([-51]), IndexError, r"index .*\[0, 50\)"),
    "bool-mask": (torch.ones(NUM_QUERIES, dtype=torch.bool), TypeError, r"index .*\[0, 50\).*torch.bool.*nonzero"),
    "float": (torch.tensor([1.0, 2.0]), TypeError, r"index .*int64 or int32.*torch.float32"),
    "uint8": (torch.tensor([1, 2], dtype=torch.uint8), TypeError, r"index .*\[0, 50\).*torch.uint8"),
    "int16": (torch.tensor([1, 2], dtype=torch.int16), TypeError, r"index .*torch.int16"),
    "0-d": (torch.tensor(3), IndexError, r"index must be a 1-D .*\[0, 50\).*shape \(\)"),
    "2-d": (torch.tensor([[1, 2], [3, 4]]), IndexError, r"index must be a 1-D .*shape \(2, 2\)"),
    "list": ([1, 2], TypeError, r"index must be a 1-D .*\[0, 50\).*got list"),
    "int": (3, TypeError, r"index .*got int"),
}


def make_decoder(provider):
    torch.manual_seed(1)
    return PerceiverDecoder(query_dim=provider.num_channels, latent_dim=8, output_dim=3)


@pytest.mark.parametrize("name", GOOD)
@pytest.mark.parametrize("kind", PROVIDERS)
def test_valid_indices_give_the_rows_of_the_full_queries(kind, name):
    provider = make_provider(kind)
    index = GOOD[name]
    full = provider(2)
    got = provider(2, index)
    assert got.shape == (2, index.numel(), provider.num_channels)
    torch.testing.assert_close(got, full[:, index.long()])
    decoder = make_decoder(provider)
    latents = torch.randn(2, 4, 8)
    with torch.no_grad():
        expected = decoder(latents, provider)[:, index.long()]
        for chunk_size in (None, 2, 100):
            torch.testing.assert_close(decoder(latents, provider, index=index, chunk_size=chunk_size), expected,
                                       rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", BAD)
@pytest.mark.parametrize("kind", PROVIDERS)
def test_invalid_indices_raise_naming_index_and_the_range(kind, name):
    provider = make_provider(kind)
    index, error, message = BAD[name]
    with pytest.raises(error, match=message):
        provider(2, index)
    decoder = make_decoder(provider)
    latents = torch.randn(2, 4, 8)
    for chunk_size in (None, 1, 3):
        with pytest.raises(error, match=message):
            decoder(latents, provider, index=index, chunk_size=chunk_size)


def test_multimodal_queries_are_deterministic_and_a_whole_chunk_out_of_range_raises():
    provider = make_provider("multimodal")
    decoder = make_decoder(provider)
    latents = torch.randn(2, 4, 8)
    # Before the rule: uninitialised rows for these, and a TypeError for a chunk with no valid position.
    with pytest.raises(IndexError, match=r"\[0, 50\)"):
        decoder(latents, provider, index=torch.tensor([0, 1, 2, 60, 61, 62]), chunk_size=3)
    with pytest.raises(IndexError, match=r"\[0, 50\)"):
        provider(1, torch.tensor([-3, 5]))
    index = torch.tensor([49, 0, 25, 7])
    torch.testing.assert_close(provider(3, index), provider(3, index), rtol=0, atol=0)


def test_fourier_positions_do_not_wrap():
    provider = FourierPositionEncoding((NUM_QUERIES,), num_bands=3)
    with pytest.raises(IndexError, match="55"):
        provider(1, torch.tensor([55]))
    torch.testing.assert_close(provider(1, torch.tensor([5])), provider(1)[:, 5:6])


def test_the_index_is_checked_once_per_decode_not_once_per_chunk(monkeypatch):
    provider = make_provider("multimodal")
    decoder = make_decoder(provider)
    latents = torch.randn(2, 4, 8)
    calls = []
    real_aminmax = torch.aminmax

    def counting_aminmax(*args, **kwargs):
        calls.append(1)
        return real_aminmax(*args, **kwargs)

    monkeypatch.setattr(torch, "aminmax", counting_aminmax)
    with torch.no_grad():
        out = decoder(latents, provider, index=torch.arange(NUM_QUERIES).flip(0), chunk_size=4)
    assert out.shape == (2, NUM_QUERIES, 3)
    assert len(calls) == 1


def test_empty_decodes_keep_the_dtype():
    for kind in PROVIDERS:
        provider = make_provider(kind)
        empty = provider(2, torch.tensor([], dtype=torch.long), dtype=torch.float64)
        full = provider(2, dtype=torch.float64)
        assert empty.shape == (2, 0, provider.num_channels) and empty.dtype == full.dtype, kind


def test_index_of_checks_each_modality_against_its_own_size():
    provider = make_provider("multimodal")
    index, sizes = provider.index_of({"a": torch.tensor([5, 0]), "c": torch.tensor([23], dtype=torch.int32)})
    assert index.tolist() == [5, 0, *range(6, 26), 26 + 23]
    assert sizes == {"a": 2, "b": 20, "c": 1}
    # Position 6 of "a" (6 positions) would silently have been position 0 of "b".
    with pytest.raises(IndexError, match=r"points\['a'\] must hold positions in \[0, 6\)"):
        provider.index_of({"a": torch.tensor([6])})
    with pytest.raises(IndexError, match=r"points\['c'\].*\[0, 24\)"):
        provider.index_of({"c": torch.tensor([-1])})
    with pytest.raises(TypeError, match=r"points\['b'\]"):
        provider.index_of({"b": [1, 2]})
    with pytest.raises(ValueError, match=r"modalities \['d'\].*\['a', 'b', 'c'\]"):
        provider.index_of({"d": None})
