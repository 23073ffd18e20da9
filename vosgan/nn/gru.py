"""``FusedGRU``: a drop-in for ``nn.GRU(batch_first=True)`` (one layer, one direction)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from vosgan.nn.fuse import register_fuser
from vosgan.ops.gru import gru


class FusedGRU(nn.Module):
    """Single-layer unidirectional batch-first GRU running the fused op (:mod:`vosgan.ops.gru`).

    Parameters, their names, shapes, initialisation and the ``state_dict`` are those of
    ``nn.GRU(input_size, hidden_size, batch_first=True)``: ``weight_ih_l0 (3H, I)``,
    ``weight_hh_l0 (3H, H)``, ``bias_ih_l0 (3H,)``, ``bias_hh_l0 (3H,)``.

    Args:
        input_size: ``I``. hidden_size: ``H``.
        num_layers, batch_first, bidirectional: only ``1``, ``True``, ``False`` are supported;
            anything else raises ``ValueError``.
        bias: as ``nn.GRU``. dropout: accepted for signature compatibility; like ``nn.GRU`` with
            one layer, it has no effect.
        impl: ``"auto"`` (fused where available, else the reference with a one-time warning),
            ``"reference"``, ``"cpp"`` or ``"cuda"``.

    Shapes: ``input (B, T, I)`` or unbatched ``(T, I)``; ``hx (1, B, H)`` / ``(1, H)`` or
    ``None``. Returns ``(output (B, T, H), h_n (1, B, H))`` (unbatched: ``(T, H)``, ``(1, H)``).

    Under autocast the GRU computes in the parameters' dtype: the kernel accumulates in float32
    anyway and the layer is tiny. Double backward is not supported (see :mod:`vosgan.ops.gru`).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = True,
        dropout: float = 0.0,
        bidirectional: bool = False,
        impl: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if num_layers != 1:
            raise ValueError(f"FusedGRU: num_layers={num_layers} is not supported (only 1)")
        if not batch_first:
            raise ValueError("FusedGRU: batch_first=False is not supported; use batch_first=True")
        if bidirectional:
            raise ValueError("FusedGRU: bidirectional=True is not supported (one direction only)")
        if input_size <= 0 or hidden_size <= 0:
            raise ValueError(
                f"FusedGRU: input_size and hidden_size must be > 0, got {input_size}, {hidden_size}"
            )
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = 1
        self.bias = bias
        self.batch_first = True
        self.dropout = float(dropout)
        self.bidirectional = False
        self.impl = impl
        kw = {"device": device, "dtype": dtype}
        self.weight_ih_l0 = nn.Parameter(torch.empty(3 * hidden_size, input_size, **kw))
        self.weight_hh_l0 = nn.Parameter(torch.empty(3 * hidden_size, hidden_size, **kw))
        if bias:
            self.bias_ih_l0 = nn.Parameter(torch.empty(3 * hidden_size, **kw))
            self.bias_hh_l0 = nn.Parameter(torch.empty(3 * hidden_size, **kw))
        else:
            self.register_parameter("bias_ih_l0", None)
            self.register_parameter("bias_hh_l0", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.GRU``'s initialisation: every parameter ~ U(-1/sqrt(H), 1/sqrt(H))."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    @classmethod
    def from_gru(cls, module: nn.GRU, impl: str = "auto") -> FusedGRU:
        """A ``FusedGRU`` sharing ``module``'s parameter objects (optimizer state stays valid)."""
        if not isinstance(module, nn.GRU):
            raise TypeError(f"FusedGRU.from_gru: expected nn.GRU, got {type(module).__name__}")
        if getattr(module, "proj_size", 0):
            raise ValueError("FusedGRU.from_gru: proj_size is not supported")
        p = module.weight_ih_l0
        new = cls(
            module.input_size,
            module.hidden_size,
            num_layers=module.num_layers,
            bias=module.bias,
            batch_first=module.batch_first,
            dropout=module.dropout,
            bidirectional=module.bidirectional,
            impl=impl,
            device="meta",
            dtype=p.dtype,
        )
        new.weight_ih_l0 = module.weight_ih_l0
        new.weight_hh_l0 = module.weight_hh_l0
        if module.bias:
            new.bias_ih_l0 = module.bias_ih_l0
            new.bias_hh_l0 = module.bias_hh_l0
        new.train(module.training)
        return new

    def forward(self, input: Tensor, hx: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if isinstance(input, PackedSequence):
            raise TypeError("FusedGRU: PackedSequence input is not supported; pass a padded tensor")
        if input.dim() not in (2, 3):
            raise ValueError(
                f"FusedGRU: input must be (B, T, I) or unbatched (T, I), got {tuple(input.shape)}"
            )
        batched = input.dim() == 3
        x = input if batched else input.unsqueeze(0)
        B, H = x.shape[0], self.hidden_size
        if x.shape[-1] != self.input_size:
            raise ValueError(
                f"FusedGRU: input has {x.shape[-1]} features, expected input_size={self.input_size}"
            )
        h0 = None
        if hx is not None:
            want = (1, B, H) if batched else (1, H)
            if tuple(hx.shape) != want:
                raise ValueError(f"FusedGRU: hx must have shape {want}, got {tuple(hx.shape)}")
            h0 = hx.reshape(B, H)
        w = self.weight_ih_l0
        if torch.is_autocast_enabled(x.device.type) and x.dtype != w.dtype:
            x = x.to(w.dtype)
            h0 = None if h0 is None else h0.to(w.dtype)
        out, h_last = gru(
            x, h0, w, self.weight_hh_l0, self.bias_ih_l0, self.bias_hh_l0, impl=self.impl
        )
        if not batched:
            return out.squeeze(0), h_last
        return out, h_last.unsqueeze(0)

    def extra_repr(self) -> str:
        extra = "" if self.bias else ", bias=False"
        return f"{self.input_size}, {self.hidden_size}, batch_first=True{extra}, impl={self.impl!r}"


@register_fuser("gru")
def _fuse(module: nn.Module) -> nn.Module | None:
    """Replace an exact ``nn.GRU(batch_first=True)`` with one layer and one direction."""
    if (
        type(module) is nn.GRU
        and module.batch_first
        and module.num_layers == 1
        and not module.bidirectional
        and not getattr(module, "proj_size", 0)
    ):
        return FusedGRU.from_gru(module)
    return None
