"""``FusedGRU``: a drop-in for ``nn.GRU(batch_first=True)`` (one layer, one direction)."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from vosgan.nn.fuse import register_fuser
from vosgan.ops.gru import _IMPLS, gru, gru_reference


class FusedGRU(nn.Module):
    """Single-layer unidirectional batch-first GRU running the fused op (:mod:`vosgan.ops.gru`).

    Parameters, their names, shapes, initialisation and the ``state_dict`` are those of
    ``nn.GRU(input_size, hidden_size, batch_first=True)``: ``weight_ih_l0 (3H, I)``,
    ``weight_hh_l0 (3H, H)``, ``bias_ih_l0 (3H,)``, ``bias_hh_l0 (3H,)``.

    Args:
        input_size: ``I``. hidden_size: ``H``.
        num_layers, batch_first, bidirectional: only ``1``, ``True``, ``False`` are supported;
            anything else raises ``ValueError``.
        bias: as ``nn.GRU``. dropout: a number in [0, 1], accepted for signature
            compatibility; like ``nn.GRU`` with one layer, it has no effect.
        impl: ``"auto"`` (fused where available, else the reference with a one-time warning),
            ``"reference"``, ``"cpp"`` or ``"cuda"``.

    Shapes: ``input (B, T, I)`` or unbatched ``(T, I)``; ``hx (1, B, H)`` / ``(1, H)`` or
    ``None``. Returns ``(output (B, T, H), h_n (1, B, H))`` (unbatched: ``(T, H)``, ``(1, H)``);
    ``h_n`` has its own storage, as with ``nn.GRU``. ``B = 0`` gives empty outputs, as ``nn.GRU``.

    Under autocast the GRU computes in float32 (the layer is tiny) and returns the input's
    dtype, as ``nn.GRU`` does on CPU (on CUDA, ``nn.GRU`` returns the autocast dtype). Double
    backward is not supported (see :mod:`vosgan.ops.gru`).
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
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"FusedGRU: {name} must be an int, got {type(value).__name__}")
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
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real):
            raise TypeError(f"FusedGRU: dropout must be a number in [0, 1], got {dropout!r}")
        if not 0 <= dropout <= 1:
            raise ValueError(f"FusedGRU: dropout must be in [0, 1], got {dropout}")
        if impl not in _IMPLS:
            raise ValueError(f"FusedGRU: impl must be one of {_IMPLS}, got {impl!r}")
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
        for key, hooks in vars(module).items():  # forward/backward/state_dict hooks carry over
            if "hook" in key:
                new.__dict__[key] = hooks
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
        autocast = torch.is_autocast_enabled(x.device.type)
        if autocast and x.dtype != w.dtype:
            x = x.to(w.dtype)
            h0 = None if h0 is None else h0.to(w.dtype)
        for name, t in (("input", x), ("hx", h0)):  # the module's names, not the op's
            if t is not None and (t.dtype != w.dtype or t.device != w.device):
                raise TypeError(
                    f"FusedGRU: {name} is {t.dtype} on {t.device} but the weights are "
                    f"{w.dtype} on {w.device}"
                )
        if B == 0 and x.shape[1] > 0:  # nothing to run: the reference gives empty outputs
            h0 = x.new_zeros(0, H) if h0 is None else h0
            out, h_last = gru_reference(
                x, h0, w, self.weight_hh_l0, self.bias_ih_l0, self.bias_hh_l0
            )
        else:
            out, h_last = gru(
                x, h0, w, self.weight_hh_l0, self.bias_ih_l0, self.bias_hh_l0, impl=self.impl
            )
        if autocast and out.dtype != input.dtype:  # the op's autocast kernel runs in float32
            out, h_last = out.to(input.dtype), h_last.to(input.dtype)
        h_last = h_last.clone()  # fused impls give a view of out; nn.GRU's h_n has its own storage
        if not batched:
            return out.squeeze(0), h_last
        return out, h_last.unsqueeze(0)

    def extra_repr(self) -> str:
        extra = "" if self.bias else ", bias=False"
        return f"{self.input_size}, {self.hidden_size}, batch_first=True{extra}, impl={self.impl!r}"


def _why_not(module: nn.Module) -> str | None:
    """Why an ``nn.GRU`` cannot become a ``FusedGRU``; ``None`` if it can or is no ``nn.GRU``."""
    if not isinstance(module, nn.GRU):
        return None
    if type(module) is not nn.GRU:
        return f"a subclass of nn.GRU ({type(module).__name__}) may change its forward"
    if not module.batch_first:
        return "batch_first=False (FusedGRU is batch-first only)"
    if module.num_layers != 1:
        return f"num_layers={module.num_layers} (FusedGRU has one layer)"
    if module.bidirectional:
        return "bidirectional=True (FusedGRU runs one direction)"
    if getattr(module, "proj_size", 0):
        return f"proj_size={module.proj_size} (not supported)"
    return None


@register_fuser("gru", why_not=_why_not)
def _fuse(module: nn.Module) -> nn.Module | None:
    """Replace an exact ``nn.GRU(batch_first=True)`` with one layer and one direction."""
    if type(module) is nn.GRU and _why_not(module) is None:
        return FusedGRU.from_gru(module)
    return None
