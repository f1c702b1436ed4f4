"""Position encodings, which double as decoder query providers, and the grid Fourier
encoding of the input adapters (whose grid is known only at call time).

A query provider builds the queries for any subset of output indices on demand,
so a decoder never materialises the full (O, C) query array: call it with
`index` (flat output indices, see QueryProvider for the rule, or None for all of them).
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import torch
from torch import nn


def check_index(index, num_queries: int, name: str = "index") -> torch.Tensor:
    """`index` checked by the rule of QueryProvider; returned as int64 on its own device.

    The range check reads the minimum and maximum in one transfer: one device sync.
    """
    expected = f"a 1-D int64 or int32 tensor of positions in [0, {num_queries})"
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"{name} must be {expected}, got {type(index).__name__} (wrap it in torch.tensor)")
    if index.dtype not in (torch.int64, torch.int32):
        hint = "; for a bool mask pass mask.nonzero().squeeze(1)" if index.dtype == torch.bool else ""
        raise TypeError(f"{name} must be {expected}, got dtype {index.dtype}{hint}")
    if index.dim() != 1:
        raise IndexError(f"{name} must be {expected}, got shape {tuple(index.shape)}")
    if index.numel():
        low, high = torch.stack(torch.aminmax(index)).tolist()
        if low < 0 or high >= num_queries:
            raise IndexError(f"{name} must hold positions in [0, {num_queries}) (negative ones are not accepted), "
                             f"got values from {low} to {high}")
    return index.long()


class QueryProvider(nn.Module):
    """Builds (B, n, num_channels) queries for n output indices of `num_queries`.

    `index` is None (all num_queries outputs, in order) or a 1-D int64 or int32 tensor
    of flat output positions in [0, num_queries), on any device, in any order,
    repeats allowed, possibly empty; output row i is the query of position index[i].
    Anything else raises, naming `index` and the valid range: a non-tensor (a list,
    an int) or another dtype (a bool mask, floats) a TypeError; a 0-D or N-D tensor,
    a negative or a too large position an IndexError. Negative positions do not
    count from the end: they are always a mistake here, so they never wrap.

    `device` and `dtype` (None: the provider's own, CPU float32 for computed encodings)
    are those the queries are returned on and in.

    Subclasses implement build(); forward() checks `index` and calls it. A decoder
    checks `index` once per decode and calls build() for each chunk of it.
    """

    num_queries: int
    num_channels: int

    def forward(self, batch_size: int, index: Optional[torch.Tensor] = None, *,
                device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        if index is not None:
            index = check_index(index, self.num_queries)
        return self.build(batch_size, index, device=device, dtype=dtype)

    def build(self, batch_size: int, index: Optional[torch.Tensor], *,
              device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """forward() for an `index` that check_index has passed (or None)."""
        raise NotImplementedError


def linear_positions(index: torch.Tensor, index_dims: Sequence[int], endpoint: bool = True) -> torch.Tensor:
    """Coordinates in [-1, 1] of flat indices into an array of shape index_dims: (n, len(index_dims)).

    Per dimension of size n, coordinate i is torch.linspace(-1, 1, n)[i] (endpoint=True,
    the paper's full-array grid; bitwise as HF and DeepMind build it, which matters:
    the highest Fourier bands turn a one-ulp difference into 1e-2) or -1 + 2 i / n
    (endpoint=False, the grid DeepMind's subsampled multimodal decoder was trained
    with). Computed per index, so a subset equals the same rows of the full table.
    """
    coords = torch.unravel_index(index, tuple(index_dims))
    columns = []
    for c, size in zip(coords, index_dims):
        if endpoint:
            columns.append(torch.linspace(-1.0, 1.0, size, device=index.device)[c])
        else:
            columns.append(-1.0 + 2.0 * c.float() / size)
    return torch.stack(columns, dim=-1)


def fourier_features(positions: torch.Tensor, num_bands: int, max_resolution: Sequence[int],
                     concat_pos: bool = True, sine_only: bool = False) -> torch.Tensor:
    """Fourier features of (n, d) positions, as in the paper (and HF / DeepMind):

    frequencies f_k linearly spaced from 1 to max_resolution_d / 2 per dimension;
    channels [pos (if concat_pos), sin(pi f x) for every (d, k), cos(pi f x) (unless sine_only)].
    """
    bands = torch.stack([torch.linspace(1.0, res / 2, num_bands, device=positions.device) for res in max_resolution])
    # The width is spelled out: reshape(n, -1) cannot infer it when n = 0.
    scaled = (positions[:, :, None] * bands[None]).reshape(positions.shape[0], bands.numel())
    features = [torch.sin(math.pi * scaled)] if sine_only else [torch.sin(math.pi * scaled), torch.cos(math.pi * scaled)]
    if concat_pos:
        features.insert(0, positions)
    return torch.cat(features, dim=-1)


class FourierPositionEncoding(QueryProvider):
    """Fourier features of the positions of an array of shape index_dims (e.g. (H, W)).

    max_resolution defaults to index_dims; endpoint as in linear_positions. The full
    table is built once per device and dtype on that device and cached; a subset
    (`index`) is computed directly, so that huge outputs never build the full table.
    """

    def __init__(self, index_dims: Sequence[int], num_bands: int, max_resolution: Optional[Sequence[int]] = None,
                 concat_pos: bool = True, sine_only: bool = False, endpoint: bool = True):
        super().__init__()
        self.index_dims = tuple(index_dims)
        self.num_bands = num_bands
        self.max_resolution = tuple(max_resolution) if max_resolution is not None else self.index_dims
        if len(self.max_resolution) != len(self.index_dims):
            raise ValueError(f"max_resolution {self.max_resolution} must have one entry per dimension of {self.index_dims}")
        self.concat_pos = concat_pos
        self.sine_only = sine_only
        self.endpoint = endpoint
        self.num_queries = math.prod(self.index_dims)
        dims = len(self.index_dims)
        self.num_channels = dims * num_bands * (1 if sine_only else 2) + (dims if concat_pos else 0)
        self._tables: dict[tuple, torch.Tensor] = {}

    def _features(self, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        positions = linear_positions(index, self.index_dims, self.endpoint)
        return fourier_features(positions, self.num_bands, self.max_resolution, self.concat_pos,
                                self.sine_only).to(dtype)

    def build(self, batch_size: int, index: Optional[torch.Tensor], *,
              device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        device = torch.device("cpu") if device is None else torch.device(device)
        dtype = torch.float32 if dtype is None else dtype
        if index is not None:
            return self._features(index.to(device), dtype).expand(batch_size, -1, -1)
        key = (device, dtype)
        if key not in self._tables:
            self._tables[key] = self._features(torch.arange(self.num_queries, device=device), dtype)
        return self._tables[key].expand(batch_size, -1, -1)


class TrainablePositionEncoding(QueryProvider):
    """A learned (num_positions, num_channels) table, initialised N(0, init_scale^2)."""

    def __init__(self, num_positions: int, num_channels: int, init_scale: float = 0.02):
        super().__init__()
        self.num_queries = num_positions
        self.num_channels = num_channels
        self.position_embeddings = nn.Parameter(torch.randn(num_positions, num_channels) * init_scale)

    def build(self, batch_size: int, index: Optional[torch.Tensor], *,
              device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        table = self.position_embeddings
        if index is not None:
            table = table[index.to(table.device)]
        return table.to(device=device, dtype=dtype).expand(batch_size, -1, -1)


class TensorQueries(QueryProvider):
    """Queries given as a tensor: (B, O, C), or (O, C) shared by the batch."""

    def __init__(self, queries: torch.Tensor):
        super().__init__()
        if queries.dim() not in (2, 3):
            raise ValueError(f"queries must be (B, O, C) or (O, C), got shape {tuple(queries.shape)}")
        if isinstance(queries, nn.Parameter):
            self.queries = queries
        else:
            self.register_buffer("queries", queries, persistent=False)
        self.num_queries = queries.shape[-2]
        self.num_channels = queries.shape[-1]

    def build(self, batch_size: int, index: Optional[torch.Tensor], *,
              device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        queries = self.queries if index is None else self.queries[..., index.to(self.queries.device), :]
        queries = queries.to(device=device, dtype=dtype)
        return queries.expand(batch_size, -1, -1) if queries.dim() == 2 else queries


class MultimodalQueries(QueryProvider):
    """Queries of several modalities in one array, modalities in sorted name order.

    Sorted like the multimodal input and output adapters (and HF), so that a decoder
    output splits by modality the same way whatever order the dict was written in.
    Each modality's queries are padded to a common width (the widest modality plus
    min_padding_size) with a learned per-modality padding vector, as in the paper's
    multimodal decoder. An `index` may mix modalities: each index is served by its
    modality's provider, so subsets are built without the full array.
    """

    def __init__(self, providers: dict[str, QueryProvider], min_padding_size: int = 2):
        super().__init__()
        providers = dict(sorted(providers.items()))
        self.providers = nn.ModuleDict(providers)
        self.num_channels = max(p.num_channels for p in providers.values()) + min_padding_size
        self.padding = nn.ParameterDict({
            name: nn.Parameter(torch.randn(1, self.num_channels - p.num_channels)) for name, p in providers.items()
        })
        self.sizes = {name: p.num_queries for name, p in providers.items()}
        self.num_queries = sum(self.sizes.values())

    def _padded(self, name: str, batch_size: int, index: Optional[torch.Tensor], device, dtype) -> torch.Tensor:
        queries = self.providers[name].build(batch_size, index, device=device, dtype=dtype)
        padding = self.padding[name].to(queries.dtype).expand(batch_size, queries.shape[1], -1)
        return torch.cat([queries, padding], dim=-1)

    def build(self, batch_size: int, index: Optional[torch.Tensor], *,
              device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        if index is None:
            return torch.cat([self._padded(name, batch_size, None, device, dtype) for name in self.providers], dim=1)
        # A checked index puts every position in exactly one modality, so every row of
        # `out` is written. Modalities without positions still run (on an empty index)
        # so that `out` gets the dtype the full queries have (torch.cat's promotion).
        parts, start = [], 0
        for name, size in self.sizes.items():
            selected = (index >= start) & (index < start + size)
            parts.append((selected, self._padded(name, batch_size, index[selected] - start, device, dtype)))
            start += size
        first = parts[0][1]
        out = first.new_empty(batch_size, index.numel(), self.num_channels,
                              dtype=functools.reduce(torch.promote_types, (part.dtype for _, part in parts)))
        for selected, part in parts:
            out[:, selected] = part
        return out

    def index_of(self, points: dict[str, Optional[torch.Tensor]]) -> tuple[torch.Tensor, dict[str, int]]:
        """Flat indices of per-modality output points (None: all of that modality), and their counts.

        Each modality's points follow the rule for `index` (see QueryProvider) within
        that modality's size. The indices follow the modality order, so the decoder's
        output splits by the counts.
        """
        unknown = sorted(set(points) - set(self.sizes))
        if unknown:
            raise ValueError(f"points names modalities {unknown}; the modalities are {sorted(self.sizes)}")
        parts, sizes, start = [], {}, 0
        for name, size in self.sizes.items():
            local = points.get(name)
            local = torch.arange(size) if local is None else check_index(local, size, f"points[{name!r}]").cpu()
            parts.append(local + start)
            sizes[name] = local.numel()
            start += size
        return torch.cat(parts), sizes


class GridFourierEncoding(nn.Module):
    """Fourier features of the positions of whatever grid the input has (HF's Fourier encoding).

    forward(index_dims, batch_size) -> (B, prod(index_dims), num_channels): positions
    in [-1, 1] per dimension of index_dims (row-major), then fourier_features with
    frequencies up to max_resolution / 2. Unlike FourierPositionEncoding, the grid is
    only known at call time, so one adapter serves any input size, as in HF.
    """

    def __init__(self, num_bands: int, max_resolution: Sequence[int], concat_pos: bool = True,
                 sine_only: bool = False):
        super().__init__()
        self.num_bands = num_bands
        self.max_resolution = tuple(max_resolution)
        self.concat_pos = concat_pos
        self.sine_only = sine_only
        dims = len(self.max_resolution)
        self.num_channels = dims * num_bands * (1 if sine_only else 2) + (dims if concat_pos else 0)
        # One FourierPositionEncoding (which caches its table per device and dtype) per grid seen.
        self._encodings: dict[tuple, FourierPositionEncoding] = {}

    def forward(self, index_dims: Sequence[int], batch_size: int, *, device: Optional[torch.device] = None,
                dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        index_dims = tuple(int(size) for size in index_dims)
        if len(index_dims) != len(self.max_resolution):
            raise ValueError(f"index_dims {index_dims} must have one entry per dimension of max_resolution "
                             f"{self.max_resolution}")
        if index_dims not in self._encodings:
            self._encodings[index_dims] = FourierPositionEncoding(index_dims, self.num_bands, self.max_resolution,
                                                                  self.concat_pos, self.sine_only)
        return self._encodings[index_dims](batch_size, device=device, dtype=dtype)

    @classmethod
    def from_hf(cls, hf_module: nn.Module) -> "GridFourierEncoding":
        """From a PerceiverFourierPositionEncoding."""
        return cls(hf_module.num_bands, hf_module.max_resolution, hf_module.concat_pos, hf_module.sine_only)
