"""The perceiver model layer: drop-in parity, layer semantics, chunked and subsampled decoding."""

import pytest
import torch
from perceiver_pytorch.perceiver_io import Attention as LucidrainsAttention

import perceiver
from perceiver import (CrossAttention, FourierPositionEncoding, PerceiverDecoder, PerceiverEncoder, PerceiverIO,
                       PerceiverProcessor, TrainablePositionEncoding)


@pytest.mark.parametrize("context_dim,heads,dim_head", [(None, 8, 64), (24, 3, 16), (40, 1, 7)])
def test_cross_attention_matches_perceiver_pytorch_both_ways(context_dim, heads, dim_head):
    torch.manual_seed(0)
    theirs = LucidrainsAttention(32, context_dim, heads=heads, dim_head=dim_head)
    ours = CrossAttention(32, context_dim, heads=heads, dim_head=dim_head)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 9, 32)
    context = torch.randn(2, 17, context_dim) if context_dim else None
    mask = torch.rand(2, 17 if context_dim else 9) > 0.3
    mask[:, 0] = True  # every query keeps a key: perceiver-pytorch averages all values otherwise
    for kwargs in ({}, {"mask": mask}):
        torch.testing.assert_close(ours(x, context, **kwargs), theirs(x, context, **kwargs))

    other = CrossAttention(32, context_dim, heads=heads, dim_head=dim_head)
    theirs.load_state_dict(other.state_dict())
    torch.testing.assert_close(theirs(x, context), other(x, context))
    assert [name for name, _ in ours.named_parameters()] == [name for name, _ in theirs.named_parameters()]


def test_cross_attention_extras_and_mask_conventions():
    torch.manual_seed(0)
    attention = CrossAttention(16, 12, heads=2, dim_head=8, value_dim_head=5, qkv_bias=True)
    assert attention.to_kv.out_features == 2 * (8 + 5) and attention.to_out.in_features == 10
    x, context = torch.randn(3, 4, 16), torch.randn(3, 6, 12)
    keep = torch.rand(3, 6) > 0.5
    keep[2] = False  # batch 2: nothing to attend to -> to_out(0) = its bias
    out = attention(x, context, mask=keep)
    torch.testing.assert_close(out, attention(x, context, key_padding_mask=~keep))
    torch.testing.assert_close(out[2], attention.to_out.bias.expand(4, -1))
    with pytest.raises(ValueError, match="not both"):
        attention(x, context, mask=keep, key_padding_mask=~keep)
    with pytest.raises(TypeError, match="True = keep"):
        attention(x, context, mask=keep.float())


def test_attention_dropout_runs_only_in_training():
    attention = CrossAttention(16, heads=2, dim_head=8, dropout=0.5)
    x = torch.randn(2, 5, 16)
    attention.eval()
    torch.testing.assert_close(attention(x), attention(x))
    attention.train()
    torch.manual_seed(1)
    first = attention(x)
    torch.manual_seed(2)
    assert not torch.allclose(first, attention(x))


def hf_style_reference(layer: perceiver.PerceiverLayer, queries, inputs=None):
    """The HF PerceiverLayer computation written out with plain ops."""
    attention = layer.attention
    normed_q = attention.query_norm(queries)
    normed_kv = attention.kv_norm(inputs) if inputs is not None else normed_q
    heads = attention.num_heads

    def split(x):
        return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)

    q, k, v = split(attention.query(normed_q)), split(attention.key(normed_kv)), split(attention.value(normed_kv))
    probs = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    context = (probs @ v).transpose(1, 2).reshape(queries.shape[0], queries.shape[1], -1)
    out = attention.output(context)
    if attention.use_query_residual:
        out = out + queries
    return out + layer.mlp(layer.layernorm(out))


@pytest.mark.parametrize("residual", [True, False])
def test_layer_semantics_with_different_qk_and_v_channels(residual):
    torch.manual_seed(0)
    layer = perceiver.PerceiverLayer(24, 40, qk_channels=16, v_channels=32, num_heads=4, widening_factor=2,
                                     use_query_residual=residual)
    queries, inputs = torch.randn(2, 5, 24), torch.randn(2, 11, 40)
    torch.testing.assert_close(layer(queries, inputs), hf_style_reference(layer, queries, inputs))
    self_layer = perceiver.self_attention_layer(24, num_heads=3, qk_channels=12)
    torch.testing.assert_close(self_layer(queries), hf_style_reference(self_layer, queries))


def test_encoder_processor_decoder_shapes_and_weight_sharing():
    encoder = PerceiverEncoder(input_dim=10, num_latents=8, latent_dim=16, num_heads=2)
    processor = PerceiverProcessor(16, num_layers_per_block=2, num_blocks=3, num_heads=4)
    assert len(processor.layers) == 2  # three blocks share the weights of two layers
    decoder = PerceiverDecoder(query_dim=12, latent_dim=16, output_dim=3)
    inputs = torch.randn(2, 50, 10)
    mask = torch.zeros(2, 50, dtype=torch.bool)
    mask[1, 30:] = True
    latents = processor(encoder(inputs, mask))
    assert latents.shape == (2, 8, 16)
    queries = torch.randn(2, 70, 12)
    assert decoder(latents, queries).shape == (2, 70, 3)
    # Padding keys do not change the result.
    trimmed = processor(encoder(inputs[1:, :30]))
    torch.testing.assert_close(latents[1:], trimmed, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("provider_kind", ["tensor", "fourier", "trainable"])
def test_chunked_and_subsampled_decoding_equal_the_full_decode(provider_kind):
    torch.manual_seed(0)
    if provider_kind == "tensor":
        provider = torch.randn(2, 103, 22)
    elif provider_kind == "fourier":
        provider = FourierPositionEncoding((7, 15), num_bands=5)  # 2 + 2 * 2 * 5 = 22 channels
    else:
        provider = TrainablePositionEncoding(103, 22, init_scale=1.0)
    channels = 22
    decoder = PerceiverDecoder(query_dim=channels, latent_dim=16, output_dim=4, num_heads=1)
    latents = torch.randn(2, 8, 16)
    full = decoder(latents, provider)
    total = full.shape[1]
    torch.testing.assert_close(decoder(latents, provider, chunk_size=10), full, rtol=1e-5, atol=1e-6)
    index = torch.randperm(total)[:37]
    torch.testing.assert_close(decoder(latents, provider, index=index), full[:, index], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(decoder(latents, provider, index=index, chunk_size=8), full[:, index],
                               rtol=1e-5, atol=1e-6)


def test_chunked_decoding_never_builds_the_full_query_array(monkeypatch):
    provider = FourierPositionEncoding((1000, 1000), num_bands=4)  # a million outputs
    requested = []
    real_build = provider.build

    def spy(batch_size, index, **kwargs):
        requested.append(None if index is None else index.numel())
        return real_build(batch_size, index, **kwargs)

    monkeypatch.setattr(provider, "build", spy)
    decoder = PerceiverDecoder(query_dim=provider.num_channels, latent_dim=8, output_dim=2)
    index = torch.arange(0, 1_000_000, 997)
    with torch.no_grad():
        out = decoder(torch.randn(1, 4, 8), provider, index=index, chunk_size=256)
    assert out.shape == (1, index.numel(), 2)
    assert None not in requested and max(requested) == 256


def test_fourier_features_match_huggingface():
    from transformers.models.perceiver.modeling_perceiver import PerceiverFourierPositionEncoding

    for kwargs in ({}, {"concat_pos": False}, {"sine_only": True}):
        theirs = PerceiverFourierPositionEncoding(num_bands=6, max_resolution=(9, 13), **kwargs)
        ours = FourierPositionEncoding((9, 13), num_bands=6, **kwargs)
        expected = theirs((9, 13), batch_size=2, device="cpu", dtype=torch.float32)
        assert ours.num_channels == theirs.output_size() == expected.shape[-1]
        # HF drops the batch dimension when concat_pos is False.
        torch.testing.assert_close(ours(2), expected.expand(2, 9 * 13, -1), rtol=0, atol=2e-6)


def test_perceiver_io_composes_and_trains():
    torch.manual_seed(0)
    queries = TrainablePositionEncoding(6, 12)
    model = PerceiverIO(
        encoder=PerceiverEncoder(input_dim=5, num_latents=4, latent_dim=16),
        processor=PerceiverProcessor(16, num_layers_per_block=1, num_heads=2),
        decoder=PerceiverDecoder(query_dim=12, latent_dim=16, output_dim=3),
        queries=queries,
        input_adapter=torch.nn.Linear(2, 5),
    )
    inputs = torch.randn(3, 20, 2)
    out = model(inputs)
    assert out.shape == (3, 6, 3)
    out.square().mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reaches {missing}"
    torch.testing.assert_close(model.decode(model.encode(inputs), index=torch.tensor([4, 1])), out[:, [4, 1]])


def test_bad_inputs_name_the_argument():
    encoder = PerceiverEncoder(input_dim=10, num_latents=4, latent_dim=16)
    decoder = PerceiverDecoder(query_dim=12, latent_dim=16, output_dim=3)
    with pytest.raises(ValueError, match="input_dim=10"):
        encoder(torch.randn(2, 30, 11))
    with pytest.raises(ValueError, match="key_padding_mask"):
        encoder(torch.randn(2, 30, 10), torch.zeros(2, 29, dtype=torch.bool))
    latents = torch.randn(2, 4, 16)
    with pytest.raises(ValueError, match="query_dim=12"):
        decoder(latents, torch.randn(2, 5, 13))
    with pytest.raises(ValueError, match="latent_dim=16"):
        decoder(torch.randn(2, 4, 15), torch.randn(2, 5, 12))
    with pytest.raises(ValueError, match="chunk_size"):
        decoder(latents, torch.randn(2, 5, 12), chunk_size=0)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        perceiver.MultiHeadAttention(16, qk_channels=10, num_heads=4)


@pytest.mark.parametrize("batch,num_queries,num_keys", [(0, 5, 7), (2, 0, 7), (0, 0, 0), (2, 5, 0)])
@pytest.mark.parametrize("residual", [True, False])
def test_empty_batches_and_query_sets_run_like_the_op(batch, num_queries, num_keys, residual):
    attention = perceiver.MultiHeadAttention(12, 10, qk_channels=8, v_channels=6, num_heads=2,
                                             use_query_residual=residual)
    queries = torch.randn(batch, num_queries, 12, requires_grad=True)
    inputs = torch.randn(batch, num_keys, 10, requires_grad=True)
    out = attention(queries, inputs)
    assert out.shape == (batch, num_queries, 12)
    out.sum().backward()
    assert queries.grad.shape == queries.shape and inputs.grad.shape == inputs.shape
    layer = perceiver.PerceiverLayer(12, 10, num_heads=2, use_query_residual=residual)
    assert layer(queries, inputs).shape == (batch, num_queries, 12)
    encoder = PerceiverEncoder(input_dim=10, num_latents=3, latent_dim=12, use_query_residual=residual)
    assert encoder(inputs).shape == (batch, 3, 12)
    cross = CrossAttention(12, 10, heads=2, dim_head=4)
    assert cross(queries, inputs).shape == (batch, num_queries, 12)


def test_bad_shapes_and_settings_name_the_argument():
    attention = CrossAttention(16, 12, heads=2, dim_head=8)
    x, context = torch.randn(2, 4, 16), torch.randn(2, 3, 12)
    with pytest.raises(ValueError, match=r"x must be \(B, Nq, query_dim\), got shape \(4, 16\)"):
        attention(x[0], context)
    with pytest.raises(ValueError, match=r"context must be \(B, Nk, context_dim\), got shape \(3, 12\)"):
        attention(x, context[0])
    with pytest.raises(ValueError, match=r"x must have 16 channels .* got shape \(2, 4, 15\)"):
        attention(x[..., :15], context)
    with pytest.raises(ValueError, match=r"context must have 12 channels .* got shape \(2, 3, 11\)"):
        attention(x, context[..., :11])
    with pytest.raises(ValueError, match=r"context must have 16 channels"):
        CrossAttention(16)(x, x[..., :15])
    with pytest.raises(TypeError, match="x must be a tensor"):
        attention(x.tolist(), context)
    mha = perceiver.MultiHeadAttention(16, 12, num_heads=2)
    with pytest.raises(ValueError, match=r"queries must be \(B, Nq, q_dim\)"):
        mha(x[0], context)
    with pytest.raises(ValueError, match=r"inputs must have 12 channels"):
        mha(x, context[..., :11])
    with pytest.raises(ValueError, match=r"queries must have 16 channels"):
        perceiver.self_attention_layer(16, num_heads=2)(x[..., :8])



def test_mask_errors_name_the_argument_passed_and_its_convention():
    attention = CrossAttention(16, 12, heads=2, dim_head=8)
    x, context = torch.randn(2, 4, 16), torch.randn(2, 9, 12)
    keep = torch.rand(2, 9) > 0.5
    # perceiver-pytorch flattens every dim after the batch: so does its drop-in.
    torch.testing.assert_close(attention(x, context, mask=keep[:, None]), attention(x, context, mask=keep))
    with pytest.raises(ValueError, match=r"^mask must be a bool tensor of shape \(B=2, Nk=9\) with True = keep "
                                         r".*got shape \(2, 8\)$"):
        attention(x, context, mask=keep[:, :8])
    with pytest.raises(TypeError, match=r"^mask .* True = keep .*got dtype torch.float32$"):
        attention(x, context, mask=keep.float())
    with pytest.raises(ValueError, match=r"^key_padding_mask .* True = padding .*got shape \(3, 9\)$"):
        attention(x, context, key_padding_mask=torch.zeros(3, 9, dtype=torch.bool))
    mha = perceiver.MultiHeadAttention(16, 12, num_heads=2)
    with pytest.raises(ValueError, match=r"^key_padding_mask .*\(B=2, Nk=9\) with True = padding"):
        mha(x, context, ~keep[:, :8])
    model = PerceiverIO(PerceiverEncoder(12, 4, 16), PerceiverProcessor(16, num_layers_per_block=1, num_heads=2),
                        PerceiverDecoder(16, 16, output_dim=3), queries=torch.randn(5, 16))
    assert model(context, key_padding_mask=~keep).shape == (2, 5, 3)
    with pytest.raises(TypeError, match=r"^key_padding_mask .* True = padding .*got dtype torch.int64$"):
        model(context, key_padding_mask=(~keep).long())


def test_a_batch_mismatch_names_the_arguments_with_their_shapes():
    attention = CrossAttention(16, 12, heads=2, dim_head=8)
    with pytest.raises(ValueError, match=r"^x and context must have the same batch size .* x of shape \(2, 4, 16\) "
                                         r"and context of shape \(3, 9, 12\)$"):
        attention(torch.randn(2, 4, 16), torch.randn(3, 9, 12))
    with pytest.raises(ValueError, match=r"^queries and inputs .* queries of shape \(2, 4, 16\) and inputs of shape "
                                         r"\(1, 9, 12\)$"):
        perceiver.MultiHeadAttention(16, 12)(torch.randn(2, 4, 16), torch.randn(1, 9, 12))


def test_an_input_dtype_other_than_the_weights_says_how_to_fix_it():
    attention = CrossAttention(16, 12, heads=2, dim_head=8)
    x, context = torch.randn(2, 4, 16), torch.randn(2, 9, 12)
    fix = r"convert the module \(module.to\(torch.float64\)\) or the input \({}.to\(torch.float32\)\)"
    with pytest.raises(TypeError, match=r"^x is torch.float64 but the module's weights are torch.float32: "
                                        + fix.format("x")):
        attention(x.double(), context.double())
    with pytest.raises(TypeError, match="^context is torch.float64 .*" + fix.format("context")):
        attention(x, context.double())
    with pytest.raises(TypeError, match="^inputs is torch.float64 .*" + fix.format("inputs")):
        PerceiverEncoder(12, 4, 16)(context.double())
    with pytest.raises(TypeError, match="^latents is torch.float64 .*" + fix.format("latents")):
        PerceiverDecoder(16, 16)(torch.randn(2, 3, 16).double(), torch.randn(2, 5, 16))
    # Either fix works, and under autocast torch casts the inputs itself.
    expected = attention(x, context)
    torch.testing.assert_close(attention.double()(x.double(), context.double()).float(), expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert attention.float()(x.half(), context).dtype == torch.bfloat16
        with pytest.raises(TypeError, match="^x is torch.float64"):  # a dtype autocast leaves alone
            attention(x.double(), context)


BAD_SETTINGS = {
    # id: (constructor call, exception, message)
    "cross-heads-0": (lambda: CrossAttention(16, heads=0), ValueError, r"heads must be a positive int, got 0"),
    "cross-dim_head-0": (lambda: CrossAttention(16, dim_head=0), ValueError, r"dim_head must be a positive int, got 0"),
    "cross-heads-float": (lambda: CrossAttention(16, heads=2.0), TypeError, r"heads must be a positive int, got float"),
    "cross-backend": (lambda: CrossAttention(16, backend="tritonn"), ValueError,
                      r"backend must be one of \('auto', .*'tritonn'"),
    "cross-dropout-1": (lambda: CrossAttention(16, dropout=1.0), ValueError, r"dropout must be in \[0, 1\), got 1.0"),
    "cross-dropout-negative": (lambda: CrossAttention(16, dropout=-0.1), ValueError,
                               r"dropout must be in \[0, 1\), got -0.1"),
    "cross-dropout-str": (lambda: CrossAttention(16, dropout="0.1"), TypeError,
                          r"dropout must be a float in \[0, 1\), got str"),
    "mha-num_heads-0": (lambda: perceiver.MultiHeadAttention(16, num_heads=0), ValueError,
                        r"num_heads must be a positive int, got 0"),
    "mha-qk_channels-0": (lambda: perceiver.MultiHeadAttention(16, qk_channels=0), ValueError,
                          r"qk_channels must be a positive int"),
    "mha-backend": (lambda: perceiver.MultiHeadAttention(16, backend="gpu"), ValueError,
                    r"backend must be one of .*'gpu'"),
    "mha-dropout": (lambda: perceiver.MultiHeadAttention(16, dropout=1.5), ValueError,
                    r"dropout must be in \[0, 1\), got 1.5"),
    "layer-attention_dropout": (lambda: perceiver.PerceiverLayer(16, attention_dropout=1.0), ValueError,
                                r"attention_dropout must be in \[0, 1\)"),
    "encoder-attention_dropout": (lambda: PerceiverEncoder(8, 4, 16, attention_dropout=2.0), ValueError,
                                  r"attention_dropout must be in \[0, 1\)"),
    "encoder-backend": (lambda: PerceiverEncoder(8, 4, 16, backend="cuda2"), ValueError, r"backend must be one of"),
    "processor-num_heads-0": (lambda: PerceiverProcessor(16, num_heads=0), ValueError,
                              r"num_heads must be a positive int, got 0"),
    "decoder-chunk_size-0": (lambda: PerceiverDecoder(12, 16, chunk_size=0), ValueError,
                             r"chunk_size must be a positive int, got 0"),
    "decoder-chunk_size-float": (lambda: PerceiverDecoder(12, 16, chunk_size=2.5), TypeError,
                                 r"chunk_size must be a positive int, got float"),
}


@pytest.mark.parametrize("case", BAD_SETTINGS)
def test_bad_settings_fail_at_construction(case):
    build, error, message = BAD_SETTINGS[case]
    with pytest.raises(error, match=message):
        build()


def test_cross_attention_scale_takes_effect_as_in_perceiver_pytorch():
    torch.manual_seed(0)
    theirs = LucidrainsAttention(32, 24, heads=2, dim_head=16)
    ours = CrossAttention(32, 24, heads=2, dim_head=16)
    ours.load_state_dict(theirs.state_dict())
    x, context = torch.randn(2, 5, 32), torch.randn(2, 9, 24)
    default = ours(x, context)
    assert ours.scale == theirs.scale == 16**-0.5
    ours.scale = theirs.scale = 0.9
    changed = ours(x, context)
    torch.testing.assert_close(changed, theirs(x, context))
    assert not torch.allclose(changed, default)
