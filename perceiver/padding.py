"""Wide attention heads stored padded to a multiple of 16 channels.

The fused kernels read a head's rows with TMA and sum its channels in power-of-two
chunks, which needs rows of a multiple of 16 channels (16-byte aligned in every
dtype); the released Perceiver IO models' heads have 261 and 322. The model layer pads
such heads once, when it builds its projections (`perceiver.from_hf` builds them too):
each head's q, k and v channels get zero columns up to the next multiple of 16 (zero
rows of the projection's weight and zero bias entries), and the output projection zero
columns where the padded value channels come in. Padded q and k channels add 0 to
every q.k; padded value channels hold P.0 = 0 and meet zero output columns; the
softmax scale stays that of the true head dim (the model passes it). So the outputs
are those of the unpadded model, and the padding's gradients are exactly zero
(dL/dq_pad = dS.k_pad = 0, dL/dk_pad = dS^T.q_pad = 0, dL/dv_pad = P^T.(dy.W_out_pad) = 0,
dL/dW_out_pad = dy^T.out_pad = 0): every optimizer that moves parameters by their
gradients, weight decay included, keeps it zero.

Only wide heads are padded (either head dim above 256): up to 256 channels the narrow
kernels and SDPA take any head dim at full speed (their tiles are powers of two, masked
in registers), and padding would only add bytes (24 -> 32 is a third more).

State dicts hold the true shapes both ways: a checkpoint of an unpadded model (an HF
model's, perceiver-pytorch's, one saved before padding existed) loads unchanged, and
what a padded model saves loads into a plain model. Writing into a padded layer's
weight directly (an init function, an adapter) must keep the padding zero;
`reset_parameters()` does.
"""

from __future__ import annotations

import math

import torch
from torch import nn

HEAD_ALIGNMENT = 16
# Heads up to this many channels are stored as they are (the narrow kernels' limit).
NARROW_MAX_HEAD_DIM = 256

# Channels along one side of a weight: (heads, true channels per head, stored channels
# per head) groups, laid end to end.
Groups = tuple[tuple[int, int, int], ...]


def stored_head_dims(head_dim_qk: int, head_dim_v: int) -> tuple[int, int]:
    """The head dims a model stores: a wide head's (either above 256) rounded up to a
    multiple of 16, narrow heads' unchanged."""
    if max(head_dim_qk, head_dim_v) <= NARROW_MAX_HEAD_DIM:
        return head_dim_qk, head_dim_v
    return tuple(-(-dim // HEAD_ALIGNMENT) * HEAD_ALIGNMENT for dim in (head_dim_qk, head_dim_v))


def _true_width(groups: Groups) -> int:
    return sum(heads * dim for heads, dim, _ in groups)


def _stored_width(groups: Groups) -> int:
    return sum(heads * stored for heads, _, stored in groups)


def _true_channels(groups: Groups, device: torch.device) -> torch.Tensor:
    """The stored positions of the true channels, in their order."""
    positions, start = [], 0
    for heads, dim, stored in groups:
        head_starts = start + stored * torch.arange(heads, device=device)
        positions.append((head_starts[:, None] + torch.arange(dim, device=device)).flatten())
        start += heads * stored
    return torch.cat(positions)


class HeadPaddedLinear(nn.Linear):
    """An nn.Linear storing each head's output channels (`rows`) or input channels
    (`columns`) padded with zeros (see the module's docstring).

    weight, bias, in_features and out_features are the stored (padded) ones, what the
    forward computes with; true_in_features and true_out_features the model's. The state
    dict holds the true shapes, copies of the true entries; loading takes the true
    shapes and writes zeros into the padding.
    """

    def __init__(self, rows: Groups, columns: Groups, bias: bool = True):
        # Read by reset_parameters, which nn.Linear's constructor calls.
        self.rows, self.columns = rows, columns
        super().__init__(_stored_width(columns), _stored_width(rows), bias)

    @property
    def true_in_features(self) -> int:
        return _true_width(self.columns)

    @property
    def true_out_features(self) -> int:
        return _true_width(self.rows)

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation of the true shape (the random draws an unpadded
        layer makes, in the same order), zeros in the padding."""
        true = nn.Linear(self.true_in_features, self.true_out_features, self.bias is not None,
                         device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            self.weight.copy_(self._pad("weight", true.weight))
            if self.bias is not None:
                self.bias.copy_(self._pad("bias", true.bias))

    def _true_shape(self, name: str) -> torch.Size:
        if name == "weight":
            return torch.Size((self.true_out_features, self.true_in_features))
        return torch.Size((self.true_out_features,))

    def _pad(self, name: str, value: torch.Tensor) -> torch.Tensor:
        stored = getattr(self, name)
        padded = value.new_zeros(stored.shape)
        rows = _true_channels(self.rows, value.device)
        if name == "weight":
            padded[rows[:, None], _true_channels(self.columns, value.device)] = value
        else:
            padded[rows] = value
        return padded

    def _strip(self, name: str, value: torch.Tensor) -> torch.Tensor:
        value = value.index_select(0, _true_channels(self.rows, value.device))
        if name == "weight":
            value = value.index_select(1, _true_channels(self.columns, value.device))
        return value

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in ("weight", "bias"):
            if prefix + name in destination:
                destination[prefix + name] = self._strip(name, destination[prefix + name])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for name in ("weight", "bias"):
            key, stored = prefix + name, getattr(self, name)
            if stored is None or key not in state_dict:
                continue
            value = state_dict[key]
            if isinstance(value, torch.Tensor) and value.shape == self._true_shape(name):
                state_dict[key] = self._pad(name, value)
            else:
                # Reported in the true shapes; the stored tensor stands in, so that nn.Module
                # does not report it again in the padded ones.
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {shape} from checkpoint, "
                                  f"the shape in current model is {tuple(self._true_shape(name))}.")
                state_dict[key] = stored
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return (f"in_features={self.true_in_features} (stored {self.in_features}), out_features="
                f"{self.true_out_features} (stored {self.out_features}), bias={self.bias is not None}")


def head_projection(in_features: int, rows: Groups, bias: bool = True) -> nn.Linear:
    """A projection into heads: an nn.Linear, or a HeadPaddedLinear where a head is padded."""
    if all(dim == stored for _, dim, stored in rows):
        return nn.Linear(in_features, _true_width(rows), bias)
    return HeadPaddedLinear(rows, ((1, in_features, in_features),), bias)


def merge_projection(columns: Groups, out_features: int, bias: bool = True) -> nn.Linear:
    """A projection out of heads (the output projection): an nn.Linear, or a
    HeadPaddedLinear where a head is padded."""
    if all(dim == stored for _, dim, stored in columns):
        return nn.Linear(_true_width(columns), out_features, bias)
    return HeadPaddedLinear(((1, out_features, out_features),), columns, bias)


def true_scale(head_dim_qk: int) -> float:
    """The softmax scale of a head of head_dim_qk true channels: the op's default for it,
    computed as the op computes it, so that unpadded models keep their exact numbers."""
    return 1.0 / math.sqrt(head_dim_qk)
