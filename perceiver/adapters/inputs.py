"""Input adapters: raw inputs (tokens, images, videos, audio, labels, several modalities)
to the (B, M, C) arrays a Perceiver IO encoder reads, equal to HF's preprocessors."""

from __future__ import annotations

import math
from typing import Mapping, Optional, Union

import torch
from torch import nn

from ..checks import check_channels, check_dims
from ..position import GridFourierEncoding, TrainablePositionEncoding
from ._hf import hf_type, load

PositionEncoding = Union[GridFourierEncoding, TrainablePositionEncoding]


def _position_encoding_from_hf(hf_module: nn.Module) -> PositionEncoding:
    if hf_type(hf_module) == "PerceiverFourierPositionEncoding":
        return GridFourierEncoding.from_hf(hf_module)
    if hf_type(hf_module) == "PerceiverTrainablePositionEncoding":
        table = hf_module.position_embeddings
        encoding = TrainablePositionEncoding(table.shape[0], table.shape[1])
        load(encoding, hf_module)
        return encoding
    raise TypeError(f"unsupported HF position encoding {hf_type(hf_module)}")


def _project_pos_dim_from_hf(hf_module: nn.Module) -> Optional[int]:
    return hf_module.project_pos_dim if hf_module.project_pos_dim > 0 else None


class _GridInputAdapter(nn.Module):
    """Base of the adapters whose features lie on a grid: adds position channels.

    Subclasses produce channels-last features (B, *grid, feature_channels); positions
    are either concatenated (num_channels = feature + position channels) or added
    (position channels must equal feature channels), optionally after projecting
    the position encoding to project_pos_dim channels with a Linear.
    """

    def __init__(self, position_encoding: PositionEncoding, feature_channels: int, project_pos_dim: Optional[int],
                 concat_or_add_pos: str):
        super().__init__()
        if not isinstance(position_encoding, (GridFourierEncoding, TrainablePositionEncoding)):
            raise TypeError("position_encoding must be a GridFourierEncoding or a TrainablePositionEncoding, "
                             f"got {type(position_encoding).__name__}")
        if concat_or_add_pos not in ("concat", "add"):
            raise ValueError(f"concat_or_add_pos must be 'concat' or 'add', got {concat_or_add_pos!r}")
        self.position_encoding = position_encoding
        self.position_projection = (nn.Linear(position_encoding.num_channels, project_pos_dim)
                                    if project_pos_dim is not None else nn.Identity())
        position_channels = project_pos_dim if project_pos_dim is not None else position_encoding.num_channels
        if concat_or_add_pos == "add" and position_channels != feature_channels:
            raise ValueError(f"concat_or_add_pos='add' needs as many position channels ({position_channels}) "
                             f"as feature channels ({feature_channels})")
        self.concat_or_add_pos = concat_or_add_pos
        self.num_channels = feature_channels + (position_channels if concat_or_add_pos == "concat" else 0)

    def _with_positions(self, name: str, features: torch.Tensor) -> torch.Tensor:
        batch, grid = features.shape[0], tuple(features.shape[1:-1])
        features = features.reshape(batch, math.prod(grid), features.shape[-1])
        if isinstance(self.position_encoding, GridFourierEncoding):
            if len(grid) != len(self.position_encoding.max_resolution):
                raise ValueError(f"{name} gives a {len(grid)}-D grid {grid}, but the Fourier encoding has "
                                 f"{len(self.position_encoding.max_resolution)} dimensions")
            positions = self.position_encoding(grid, batch, device=features.device, dtype=features.dtype)
        else:
            if self.position_encoding.num_queries != features.shape[1]:
                raise ValueError(f"{name} gives a grid {grid} of {features.shape[1]} positions, but the trainable "
                                 f"position encoding has {self.position_encoding.num_queries}")
            positions = self.position_encoding(batch)
        positions = self.position_projection(positions)
        if self.concat_or_add_pos == "concat":
            return torch.cat([features, positions], dim=-1)
        return features + positions

    def _load_positions_from_hf(self, hf_module: nn.Module) -> None:
        load(self.position_projection, hf_module.positions_projection)


class TokenInputAdapter(nn.Module):
    """Token (or byte) ids (B, L) -> embeddings plus learned positions (B, L, num_channels).

    L may be anything up to max_seq_len; position i uses row i of position_embeddings.
    (HF PerceiverTextPreprocessor.)
    """

    def __init__(self, vocab_size: int, num_channels: int, max_seq_len: int, init_scale: float = 0.02):
        super().__init__()
        self.embeddings = nn.Embedding(vocab_size, num_channels)
        self.position_embeddings = nn.Embedding(max_seq_len, num_channels)
        nn.init.normal_(self.embeddings.weight, std=init_scale)
        nn.init.normal_(self.position_embeddings.weight, std=init_scale)
        self.num_channels = num_channels
        self.max_seq_len = max_seq_len

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        check_dims("token_ids", token_ids, (2,), "(B, L)")
        if token_ids.shape[1] > self.max_seq_len:
            raise ValueError(f"token_ids has {token_ids.shape[1]} tokens, more than max_seq_len={self.max_seq_len}")
        positions = torch.arange(token_ids.shape[1], device=token_ids.device)
        return self.embeddings(token_ids) + self.position_embeddings(positions)

    @classmethod
    def from_hf(cls, hf_module: nn.Module) -> "TokenInputAdapter":
        """From a PerceiverTextPreprocessor."""
        vocab_size, num_channels = hf_module.embeddings.weight.shape
        adapter = cls(vocab_size, num_channels, hf_module.position_embeddings.num_embeddings)
        load(adapter.embeddings, hf_module.embeddings)
        load(adapter.position_embeddings, hf_module.position_embeddings)
        return adapter.train(hf_module.training)


def _space_to_depth(images: torch.Tensor, temporal_block: int, spatial_block: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/s, W/s, s*s*C), or (B, T, C, H, W) -> (B, T/t, H/s, W/s, t*s*s*C).

    Within a patch, channels are ordered (time, row, column, channel), as HF does.
    """
    s, t = spatial_block, temporal_block
    if images.dim() == 4:
        b, c, h, w = images.shape
        patches = images.reshape(b, c, h // s, s, w // s, s).permute(0, 2, 4, 3, 5, 1)
        return patches.reshape(b, h // s, w // s, s * s * c)
    b, n, c, h, w = images.shape
    patches = images.reshape(b, n // t, t, c, h // s, s, w // s, s).permute(0, 1, 4, 6, 2, 5, 7, 3)
    return patches.reshape(b, n // t, h // s, w // s, t * s * s * c)


class ImageInputAdapter(_GridInputAdapter):
    """Images (B, C, H, W) or videos (B, T, C, H, W), channels first -> (B, M, num_channels).

    prep_type picks the featurisation (HF PerceiverImagePreprocessor):
    - "conv": a convolutional stem, images only: 7x7 stride-2 conv (padding 3, no bias),
      optional batch norm, ReLU, 3x3 stride-2 max pool without padding, so
      H -> floor((ceil(H / 2) - 3) / 2) + 1 (224 -> 55); spatial_downsample must be 4.
    - "conv1x1": a 1x1 conv to out_channels with stride spatial_downsample, images only.
    - "pixels": raw pixels, every spatial_downsample-th row and column (and every
      temporal_downsample-th frame of a video).
    - "patches": space-to-depth into non-overlapping patches of spatial_downsample^2
      pixels (and temporal_downsample frames), optionally followed by a Linear to
      out_channels (conv_after_patching). A video whose frames all fall into one
      temporal patch becomes an image grid: HF's optical flow takes two frames of
      precomputed 3x3 patches (B, 2, 27, H, W) with temporal_downsample=2.
    Then the feature grid is flattened row-major to M positions and the position
    encoding (Fourier features of the grid, or a learned table of exactly M rows) is
    concatenated or added, see _GridInputAdapter.
    """

    def __init__(
        self,
        prep_type: str,
        position_encoding: PositionEncoding,
        *,
        in_channels: int = 3,
        out_channels: int = 64,
        spatial_downsample: Optional[int] = None,
        temporal_downsample: int = 1,
        conv_after_patching: bool = False,
        use_batchnorm: bool = True,
        project_pos_dim: Optional[int] = None,
        concat_or_add_pos: str = "concat",
    ):
        if prep_type not in ("conv", "conv1x1", "pixels", "patches"):
            raise ValueError(f"prep_type must be 'conv', 'conv1x1', 'pixels' or 'patches', got {prep_type!r}")
        # The stem has a fixed 4x reduction; other types default to no downsampling.
        if spatial_downsample is None:
            spatial_downsample = 4 if prep_type == "conv" else 1
        if prep_type == "conv" and spatial_downsample != 4:
            raise ValueError(f"prep_type='conv' downsamples by 4, got spatial_downsample={spatial_downsample}")
        if prep_type in ("conv", "conv1x1") and temporal_downsample != 1:
            raise ValueError(f"prep_type={prep_type!r} takes images, so temporal_downsample must be 1, "
                             f"got {temporal_downsample}")
        if conv_after_patching and prep_type != "patches":
            raise ValueError("conv_after_patching needs prep_type='patches'")
        if spatial_downsample < 1 or temporal_downsample < 1:
            raise ValueError(f"spatial_downsample and temporal_downsample must be >= 1, got "
                             f"{spatial_downsample} and {temporal_downsample}")
        patch_channels = in_channels * spatial_downsample ** 2 * temporal_downsample
        if prep_type in ("conv", "conv1x1") or conv_after_patching:
            feature_channels = out_channels
        else:
            feature_channels = patch_channels if prep_type == "patches" else in_channels
        super().__init__(position_encoding, feature_channels, project_pos_dim, concat_or_add_pos)
        self.prep_type = prep_type
        self.in_channels = in_channels
        self.spatial_downsample = spatial_downsample
        self.temporal_downsample = temporal_downsample
        if prep_type == "conv":
            self.featurizer = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(out_channels) if use_batchnorm else nn.Identity(),
                nn.ReLU(),
                nn.MaxPool2d(kernel_size=3, stride=2),
            )
        elif prep_type == "conv1x1":
            self.featurizer = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=spatial_downsample)
        self.patch_projection = nn.Linear(patch_channels, out_channels) if conv_after_patching else nn.Identity()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_dims("images", images, (4, 5), "(B, C, H, W) or (B, T, C, H, W)")
        if images.shape[-3] != self.in_channels:
            raise ValueError(f"images must have {self.in_channels} channels in dimension -3, "
                             f"got shape {tuple(images.shape)}")
        s, t = self.spatial_downsample, self.temporal_downsample
        if self.prep_type in ("conv", "conv1x1"):
            check_dims("images", images, (4,), f"(B, C, H, W) for prep_type={self.prep_type!r}")
            features = self.featurizer(images).permute(0, 2, 3, 1)
        elif self.prep_type == "pixels":
            if images.dim() == 4:
                features = images[:, :, ::s, ::s].permute(0, 2, 3, 1)
            else:
                features = images[:, ::t, :, ::s, ::s].permute(0, 1, 3, 4, 2)
        else:
            if images.dim() == 4 and t != 1:
                raise ValueError(f"images must be a video (B, T, C, H, W) for temporal_downsample={t}, "
                                 f"got shape {tuple(images.shape)}")
            blocks = (t, 1, s, s) if images.dim() == 5 else (1, s, s)
            if any(size % block for size, block in zip(images.shape[-len(blocks):], blocks)):
                raise ValueError(f"images shape {tuple(images.shape)} must be divisible into patches of "
                                 f"{t} frames x {s} x {s} pixels")
            features = _space_to_depth(images, t, s)
            if features.dim() == 5 and features.shape[1] == 1:
                features = features.squeeze(1)
            features = self.patch_projection(features)
        return self._with_positions("images", features)

    @classmethod
    def from_hf(cls, hf_module: nn.Module) -> "ImageInputAdapter":
        """From a PerceiverImagePreprocessor.

        For 4-D images with prep_type 'pixels' and spatial_downsample > 1, HF slices the
        batch and channel dimensions (no HF model does this); this adapter subsamples
        rows and columns instead. HF's interpolate_pos_encoding is not supported.
        """
        prep_type = hf_module.prep_type
        in_channels = hf_module.in_channels
        if hf_module.conv_after_patching:
            # HF never checks in_channels for patches (its optical flow keeps the default 3 for
            # 27-channel patch frames); the Linear after patching has the true patch width.
            blocks = hf_module.spatial_downsample ** 2 * hf_module.temporal_downsample
            in_channels, rest = divmod(hf_module.conv_after_patches.in_features, blocks)
            if rest:
                raise ValueError(f"HF conv_after_patching_in_channels={hf_module.conv_after_patches.in_features} "
                                 f"is not a multiple of the {blocks} pixels of a patch")
        adapter = cls(
            prep_type,
            _position_encoding_from_hf(hf_module.position_embeddings),
            in_channels=in_channels,
            out_channels=hf_module.out_channels,
            # HF accepts any power of 4 for 'conv' but always builds the one 4x stem.
            spatial_downsample=4 if prep_type == "conv" else hf_module.spatial_downsample,
            temporal_downsample=hf_module.temporal_downsample,
            conv_after_patching=hf_module.conv_after_patching,
            use_batchnorm=prep_type == "conv" and isinstance(hf_module.convnet.batchnorm, nn.BatchNorm2d),
            project_pos_dim=_project_pos_dim_from_hf(hf_module),
            concat_or_add_pos=hf_module.concat_or_add_pos,
        )
        if prep_type == "conv":
            load(adapter.featurizer[0], hf_module.convnet.conv)
            load(adapter.featurizer[1], hf_module.convnet.batchnorm)
        elif prep_type == "conv1x1":
            load(adapter.featurizer, hf_module.convnet_1x1)
        if hf_module.conv_after_patching:
            load(adapter.patch_projection, hf_module.conv_after_patches)
        adapter._load_positions_from_hf(hf_module)
        return adapter.train(hf_module.training)


class AudioInputAdapter(_GridInputAdapter):
    """Audio samples (B, N) or (B, N, 1) -> (B, N / samples_per_patch, num_channels).

    Consecutive samples_per_patch samples form one input position (its features);
    the 1-D position encoding is concatenated or added, see _GridInputAdapter.
    (HF PerceiverAudioPreprocessor.)
    """

    def __init__(self, samples_per_patch: int, position_encoding: PositionEncoding, *,
                 project_pos_dim: Optional[int] = None, concat_or_add_pos: str = "concat"):
        super().__init__(position_encoding, samples_per_patch, project_pos_dim, concat_or_add_pos)
        self.samples_per_patch = samples_per_patch

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        if not (audio.dim() == 2 or (audio.dim() == 3 and audio.shape[-1] == 1)):
            raise ValueError(f"audio must be (B, N) or (B, N, 1), got shape {tuple(audio.shape)}")
        if audio.shape[1] % self.samples_per_patch:
            raise ValueError(f"audio has {audio.shape[1]} samples, not a multiple of samples_per_patch="
                             f"{self.samples_per_patch}")
        patches = audio.reshape(audio.shape[0], -1, self.samples_per_patch)
        return self._with_positions("audio", patches)

    @classmethod
    def from_hf(cls, hf_module: nn.Module) -> "AudioInputAdapter":
        """From a PerceiverAudioPreprocessor."""
        adapter = cls(hf_module.samples_per_patch, _position_encoding_from_hf(hf_module.position_embeddings),
                      project_pos_dim=_project_pos_dim_from_hf(hf_module),
                      concat_or_add_pos=hf_module.concat_or_add_pos)
        adapter._load_positions_from_hf(hf_module)
        return adapter.train(hf_module.training)


class OneHotInputAdapter(nn.Module):
    """Label vectors (B, num_classes), one-hot or soft -> one input position (B, 1, num_classes).

    No embedding and no position encoding. (HF PerceiverOneHotPreprocessor.)
    """

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_channels = num_classes

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        check_dims("labels", labels, (2,), "(B, num_classes)")
        check_channels("labels", labels, self.num_channels)
        return labels[:, None, :]

    @classmethod
    def from_hf(cls, hf_module: nn.Module) -> "OneHotInputAdapter":
        """From a PerceiverOneHotPreprocessor."""
        return cls(hf_module.num_channels).train(hf_module.training)


class MultimodalInputAdapter(nn.Module):
    """Per-modality inputs {name: tensor} -> inputs (B, M, num_channels), modalities in sorted name order.

    Each modality goes through its own adapter (any module with a num_channels
    attribute that returns (B, M_name, C_name)); its positions are widened to the
    common num_channels = max C_name + min_padding_size with a learned per-modality
    padding vector, so the encoder can tell the modalities apart. Each position of
    modality m is replaced by the learned mask token of m with probability
    mask_probs[m] (default 0), in training and inference alike as in HF: its
    multimodal autoencoder masks the label with probability 1 to predict it. The
    modalities are concatenated in sorted name order. (HF PerceiverMultimodalPreprocessor.)
    """

    def __init__(self, modalities: Mapping[str, nn.Module], min_padding_size: int = 2,
                 mask_probs: Optional[Mapping[str, float]] = None, init_scale: float = 0.02):
        super().__init__()
        if not modalities:
            raise ValueError("modalities must name at least one modality adapter")
        mask_probs = dict(mask_probs or {})
        if not set(mask_probs) <= set(modalities):
            raise ValueError(f"mask_probs names modalities {sorted(set(mask_probs) - set(modalities))} "
                             f"that are not in modalities {sorted(modalities)}")
        if any(not 0.0 <= p <= 1.0 for p in mask_probs.values()):
            raise ValueError(f"mask_probs must be probabilities in [0, 1], got {mask_probs}")
        self.modalities = nn.ModuleDict(modalities)
        self.num_channels = max(adapter.num_channels for adapter in modalities.values()) + min_padding_size
        self.padding = nn.ParameterDict({
            name: nn.Parameter(torch.randn(1, self.num_channels - adapter.num_channels) * init_scale)
            for name, adapter in modalities.items()
        })
        self.mask_probs = mask_probs
        self.mask_tokens = nn.ParameterDict({
            name: nn.Parameter(torch.randn(1, self.num_channels) * init_scale) for name in mask_probs
        })

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if not isinstance(inputs, Mapping) or set(inputs) != set(self.modalities):
            got = sorted(inputs) if isinstance(inputs, Mapping) else type(inputs).__name__
            raise ValueError(f"inputs must be a dict with exactly the modalities {sorted(self.modalities)}, "
                             f"got {got}")
        parts = []
        for name in sorted(self.modalities):
            adapted = self.modalities[name](inputs[name])
            batch, positions, _ = adapted.shape
            padded = torch.cat([adapted, self.padding[name].expand(batch, positions, -1)], dim=-1)
            probability = self.mask_probs.get(name, 0.0)
            # Skipped at 0 so that unmasked modalities draw no random numbers.
            if probability > 0.0:
                masked = torch.rand(batch, positions, 1, device=padded.device) < probability
                padded = torch.where(masked, self.mask_tokens[name].to(padded.dtype), padded)
            parts.append(padded)
        return torch.cat(parts, dim=1)

    @classmethod
    def from_hf(cls, hf_module: nn.Module) -> "MultimodalInputAdapter":
        """From a PerceiverMultimodalPreprocessor, converting each modality with input_adapter_from_hf."""
        adapter = cls({name: input_adapter_from_hf(module) for name, module in hf_module.modalities.items()},
                      hf_module.min_padding_size, hf_module.mask_probs)
        load(adapter.padding, hf_module.padding)
        load(adapter.mask_tokens, hf_module.mask)
        return adapter.train(hf_module.training)


_INPUT_ADAPTERS = {
    "PerceiverTextPreprocessor": TokenInputAdapter,
    "PerceiverImagePreprocessor": ImageInputAdapter,
    "PerceiverAudioPreprocessor": AudioInputAdapter,
    "PerceiverOneHotPreprocessor": OneHotInputAdapter,
    "PerceiverMultimodalPreprocessor": MultimodalInputAdapter,
}


def input_adapter_from_hf(hf_module: nn.Module) -> nn.Module:
    """The input adapter equal to an HF Perceiver preprocessor, with its weights."""
    converter = _INPUT_ADAPTERS.get(hf_type(hf_module))
    if converter is None:
        raise TypeError(f"no input adapter for {hf_type(hf_module)}; supported: {sorted(_INPUT_ADAPTERS)}")
    return converter.from_hf(hf_module)
