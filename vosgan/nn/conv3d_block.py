"""Fused spatio-temporal conv blocks: ``FusedConv3dBlock`` and ``FusedConvTranspose3dBlock``.

Both subclass ``nn.Sequential`` and keep the children of the block they replace, names included
(``0`` conv, ``1`` ``BatchNorm3d``, ``2`` ``LeakyReLU``/``ReLU`` for a plain ``nn.Sequential``;
whatever names an ``OrderedDict`` gave them), so their ``state_dict`` is the one of
``nn.Sequential(Conv3d|ConvTranspose3d, BatchNorm3d, LeakyReLU|ReLU)``. BN + activation run as
one fused op, :func:`vosgan.ops.conv3d_block.bn_act`. The conv runs as torch's own (cuDNN,
oneDNN), except on CUDA with cudnn.benchmark off, where a stride-2, kernel-4 transposed conv runs
in sub-pixel form (:func:`vosgan.ops.conv3d_forms.cuda_form` says why).

``SubpixelConv3d`` / ``SubpixelConvTranspose3d``: ``nn.Conv3d`` / ``nn.ConvTranspose3d`` (same
parameters, same ``state_dict``) whose stride-2, kernel-4 case with a narrow side (VOS-GAN's
dense heads and D's first stage) runs the sub-pixel CPU path of
:func:`vosgan.ops.conv3d_subpixel.subpixel_conv3d`; anything else runs the parent's forward.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vosgan import backend
from vosgan.nn.fuse import register_fuser
from vosgan.ops.conv3d_block import IMPLS, bn_act, bn_act_reference, resolve_impl
from vosgan.ops.conv3d_forms import cuda_conv, narrow_cuda_conv
from vosgan.ops.conv3d_subpixel import SUBPIXEL_MAX_CHANNELS, subpixel_blocker, subpixel_conv3d

_ACTS = (nn.LeakyReLU, nn.ReLU)


class _FusedBlock(nn.Sequential):
    _conv_type: type[nn.Module] = nn.Conv3d

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 4,
        stride: int = 2,
        padding: int = 1,
        *,
        act: str = "lrelu",
        negative_slope: float = 0.2,
        impl: str = "auto",
    ) -> None:
        if act not in ("lrelu", "relu"):
            raise ValueError(f"act must be 'lrelu' or 'relu', got {act!r}")
        conv = self._conv_type(in_channels, out_channels, kernel_size, stride, padding, bias=False)
        activation = nn.LeakyReLU(negative_slope) if act == "lrelu" else nn.ReLU()
        super().__init__(conv, nn.BatchNorm3d(out_channels), activation)
        self._check(impl)
        self.impl = impl

    def _check(self, impl: str) -> None:
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        name = self._conv_type.__name__
        if len(self) != 3:
            raise ValueError(
                f"{type(self).__name__} takes exactly 3 children ({name}, BatchNorm3d, "
                f"LeakyReLU|ReLU), got {len(self)}: {[type(m).__name__ for m in self]}"
            )
        if not isinstance(self[0], self._conv_type):
            raise TypeError(f"child 0 must be a {name}, got {type(self[0]).__name__}")
        if type(self[1]) is not nn.BatchNorm3d or not self[1].affine:
            raise TypeError(f"child 1 must be an affine nn.BatchNorm3d, got {self[1]}")
        if self[1].num_features != self[0].out_channels:
            raise ValueError(
                f"child 1 (BatchNorm3d) has num_features={self[1].num_features} but child 0 "
                f"({name}) has out_channels={self[0].out_channels}"
            )
        if type(self[2]) not in _ACTS:
            raise TypeError(
                f"child 2 must be nn.LeakyReLU or nn.ReLU, got {type(self[2]).__name__}"
            )
        if self.negative_slope < 0:
            raise ValueError(f"negative_slope must be >= 0, got {self.negative_slope}")

    @classmethod
    def from_sequential(cls, seq: nn.Sequential, impl: str = "auto") -> _FusedBlock:
        """Wrap the children of ``seq`` (shared, not copied) into a fused block.

        ``seq`` must be ``nn.Sequential(conv, nn.BatchNorm3d(conv.out_channels, affine=True),
        nn.LeakyReLU|nn.ReLU)`` exactly, the conv of the block's type; anything else raises.
        """
        if not isinstance(seq, nn.Sequential):
            raise TypeError(
                f"{cls.__name__}.from_sequential: expected nn.Sequential, got {type(seq).__name__}"
            )
        block = cls.__new__(cls)
        # the children under their own names (state_dict keys), and seq's mode and hooks
        block.__dict__.update(seq.__dict__)
        block._modules = dict(seq._modules)
        block._check(impl)
        block.impl = impl
        return block

    @property
    def negative_slope(self) -> float:
        act = list(self._modules.values())[2]
        return float(act.negative_slope) if isinstance(act, nn.LeakyReLU) else 0.0

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """``x (B, C_in, T, H, W)`` -> ``act(bn(conv(x)) [+ residual]) (B, C_out, T', H', W')``."""
        # not self[i]: nn.Sequential's indexing costs ~0.4 us a child
        conv, bn, act = self._modules.values()
        if type(bn) is not nn.BatchNorm3d or type(act) not in _ACTS:
            return self._unfused_forward(x, residual, bn, act)
        y = cuda_conv(x, conv) if x.is_cuda else conv(x)
        # nn.BatchNorm3d.forward's bookkeeping, step for step
        factor = 0.0 if bn.momentum is None else bn.momentum
        if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:  # cumulative moving average
                factor = 1.0 / float(bn.num_batches_tracked)
        batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
        use_buffers = not bn.training or bn.track_running_stats
        impl = resolve_impl(self.impl, y)
        # Where BN + activation run PyTorch's own ops (on CPU, always), they run straight, as
        # nn.BatchNorm3d and the activation module would, their errors included: bn_act's
        # argument checks, for its own callers, cost 5-10 us a block (a few % of a cpu-small
        # block's forward + backward). A residual keeps them: add_ would broadcast a wrong shape.
        run = bn_act_reference if impl == "reference" and residual is None else bn_act
        extra = {} if run is bn_act_reference else {"residual": residual, "impl": impl}
        return run(
            y,
            bn.weight,
            bn.bias,
            bn.running_mean if use_buffers else None,
            bn.running_var if use_buffers else None,
            training=batch_stats,
            momentum=factor,
            eps=bn.eps,
            negative_slope=float(act.negative_slope) if type(act) is nn.LeakyReLU else 0.0,
            **extra,
        )

    def _unfused_forward(
        self, x: Tensor, residual: Tensor | None, bn: nn.Module, act: nn.Module
    ) -> Tensor:
        """A child swapped after fusing (e.g. ``convert_sync_batchnorm`` made child 1 a
        ``SyncBatchNorm``) runs as the plain ``nn.Sequential`` would, its own forward included."""
        name = type(self).__name__
        if residual is not None:
            raise TypeError(
                f"{name}: residual needs child 1 nn.BatchNorm3d and child 2 LeakyReLU|ReLU, "
                f"got {type(bn).__name__} and {type(act).__name__}"
            )
        backend.warn_once(
            f"{name}-unfused-{type(bn).__name__}-{type(act).__name__}",
            f"{name}: children {type(bn).__name__}, {type(act).__name__} were set after fusing; "
            "running them as nn.Sequential does (BN + activation unfused)",
        )
        return nn.Sequential.forward(self, x)

    def extra_repr(self) -> str:
        return f"impl={self.impl!r}"


class FusedConv3dBlock(_FusedBlock):
    """``Conv3d`` + ``BatchNorm3d`` + ``LeakyReLU|ReLU`` with fused BN + activation.

    Args:
        in_channels, out_channels, kernel_size, stride, padding: of the ``Conv3d`` (no bias).
        act: ``"lrelu"`` (slope ``negative_slope``) or ``"relu"``.
        impl: ``"auto"`` (Triton on CUDA, reference ops on CPU), ``"reference"`` or ``"triton"``.

    Shapes: ``x (B, C_in, T, H, W)`` -> ``(B, C_out, T', H', W')``; optional ``residual`` of the
    output's shape is added before the activation. Double backward is supported.
    """

    _conv_type = nn.Conv3d


class FusedConvTranspose3dBlock(_FusedBlock):
    """``ConvTranspose3d`` + ``BatchNorm3d`` + ``LeakyReLU|ReLU``; see :class:`FusedConv3dBlock`."""

    _conv_type = nn.ConvTranspose3d


def _match(module: nn.Module) -> type[_FusedBlock] | str | None:
    """The fused block class for ``module``; a reason (``str``) for a conv + BatchNorm
    ``nn.Sequential`` that cannot be fused; ``None`` for anything else."""
    if type(module) is not nn.Sequential or len(module) < 2:
        return None
    conv, bn = module[0], module[1]
    if isinstance(conv, nn.ConvTranspose3d):
        cls = FusedConvTranspose3dBlock
    elif isinstance(conv, nn.Conv3d):
        cls = FusedConv3dBlock
    else:
        return None
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        return None
    if len(module) != 3:
        return f"{len(module)} children (a block is conv, BatchNorm3d, LeakyReLU|ReLU)"
    act = module[2]
    if type(bn) is not nn.BatchNorm3d:
        return f"child 1 is {type(bn).__name__}, not nn.BatchNorm3d"
    if not bn.affine:
        return "BatchNorm3d has affine=False"
    if bn.num_features != conv.out_channels:
        return (
            f"BatchNorm3d num_features={bn.num_features} != conv out_channels={conv.out_channels}"
        )
    if type(act) not in _ACTS:
        return f"activation {type(act).__name__} (only LeakyReLU or ReLU)"
    if isinstance(act, nn.LeakyReLU) and act.negative_slope < 0:
        return f"LeakyReLU negative_slope={act.negative_slope} < 0"
    hooked = [name for name, child in (("BatchNorm3d", bn), ("activation", act)) if _hooks(child)]
    if hooked:  # the fused op never calls these children: their hooks would not run
        return f"{' and '.join(hooked)} {'has' if len(hooked) == 1 else 'have'} hooks"
    return cls


def _hooks(module: nn.Module) -> bool:
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return any(getattr(module, key) for key in kinds)


def _why_not_block(module: nn.Module) -> str | None:
    match = _match(module)
    return match if isinstance(match, str) else None


@register_fuser("conv3d_block", why_not=_why_not_block)
def _fuse(module: nn.Module) -> nn.Module | None:
    """Exactly ``nn.Sequential(Conv3d|ConvTranspose3d, BatchNorm3d(affine), LeakyReLU|ReLU)``
    becomes a fused block sharing its children; anything else (already fused included): ``None``
    (``_why_not_block`` says why for another conv + BatchNorm ``nn.Sequential``).
    """
    cls = _match(module)
    return cls.from_sequential(module) if isinstance(cls, type) else None


class _SubpixelMixin:
    """``impl``: ``"auto"`` (the sub-pixel path where ``conv3d_block`` picks it on the input's
    device; on CUDA the narrow form of :func:`vosgan.ops.conv3d_forms.narrow_cuda_conv`, torch's
    own by default), ``"subpixel"`` (on any CPU input) or ``"reference"`` (torch's own forward).
    A CPU input the sub-pixel path cannot take (:func:`subpixel_blocker`) runs torch's forward
    and warns once with the reason."""

    impl: str = "auto"

    def _narrow_on_cuda(self, x: Tensor) -> bool:
        return x.is_cuda and self.impl == "auto" and _fused_on_cuda()

    def _use_subpixel(self, x: Tensor) -> bool:
        if self.impl not in ("auto", "subpixel", "reference"):
            raise ValueError(f"impl must be 'auto', 'subpixel' or 'reference', got {self.impl!r}")
        if self.impl == "reference" or x.device.type != "cpu":  # CUDA: cuDNN is fine
            return False
        if self.impl == "auto" and not _subpixel_auto(x.device.type):
            return False
        if x.dim() in (4, 5) and x.shape[-4] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__}: input {tuple(x.shape)} has {x.shape[-4]} channels, "
                f"expected in_channels={self.in_channels}"
            )
        why = subpixel_blocker(x, self)
        if why is not None:
            name = type(self).__name__
            backend.warn_once(f"{name}-{why}", f"{name}: {why}; running torch's own forward")
        return why is None


@torch.compiler.assume_constant_result
def _subpixel_auto(device_type: str) -> bool:
    return backend.choose("conv3d_block", device_type).impl == "subpixel"


@torch.compiler.assume_constant_result
def _fused_on_cuda() -> bool:
    return backend.choose("conv3d_block", "cuda").fused


class SubpixelConv3d(_SubpixelMixin, nn.Conv3d):
    """``nn.Conv3d``; with stride 2, kernel 4, padding 1 and ``in_channels <= 4`` on CPU the
    input gradient runs as a sub-pixel transposed conv (forward and weight gradient: oneDNN).
    ``x (B, C_in, T, H, W)`` with even T, H, W -> ``(B, C_out, T/2, H/2, W/2)``."""

    def forward(self, x: Tensor) -> Tensor:
        if self._narrow_on_cuda(x):
            return narrow_cuda_conv(x, self)
        if self._use_subpixel(x):
            return subpixel_conv3d(x, self.weight, self.bias, transposed=False)
        return super().forward(x)


class SubpixelConvTranspose3d(_SubpixelMixin, nn.ConvTranspose3d):
    """``nn.ConvTranspose3d``; with stride 2, kernel 4, padding 1 and ``out_channels <= 4`` on
    CPU the forward runs in sub-pixel form (backward: oneDNN).
    ``x (B, C_in, T, H, W)`` -> ``(B, C_out, 2T, 2H, 2W)``."""

    def forward(self, x: Tensor, output_size: list[int] | None = None) -> Tensor:
        if output_size is None and self._narrow_on_cuda(x):
            return narrow_cuda_conv(x, self)
        if output_size is None and self._use_subpixel(x):
            return subpixel_conv3d(x, self.weight, self.bias, transposed=True)
        return super().forward(x, output_size)


def _subpixel_match(module: nn.Module) -> type[nn.Module] | str | None:
    """The ``Subpixel`` class for ``module``; a reason (``str``) for a plain stride-2 conv with a
    narrow side but another geometry; ``None`` for anything else (wide convs included)."""
    if type(module) is nn.Conv3d:
        cls, narrow = SubpixelConv3d, module.in_channels
    elif type(module) is nn.ConvTranspose3d:
        cls, narrow = SubpixelConvTranspose3d, module.out_channels
    else:
        return None
    if module.stride != (2,) * 3 or narrow > SUBPIXEL_MAX_CHANNELS:
        return None
    want = {
        "kernel_size": (4,) * 3,
        "padding": (1,) * 3,
        "dilation": (1,) * 3,
        "output_padding": (0,) * 3,
        "groups": 1,
        "padding_mode": "zeros",
    }
    wrong = [f"{k}={getattr(module, k)!r}" for k, v in want.items() if getattr(module, k) != v]
    if wrong:
        return f"{', '.join(wrong)} (the sub-pixel path takes kernel 4, padding 1, stride 2 only)"
    return cls


def _why_not_subpixel(module: nn.Module) -> str | None:
    match = _subpixel_match(module)
    return match if isinstance(match, str) else None


@register_fuser("conv3d_block", why_not=_why_not_subpixel)
def _fuse_subpixel(module: nn.Module) -> nn.Module | None:
    """A plain ``nn.Conv3d`` / ``nn.ConvTranspose3d`` of the sub-pixel geometry (stride 2, kernel
    4, padding 1, narrow side <= ``SUBPIXEL_MAX_CHANNELS``) becomes its ``Subpixel`` subclass,
    sharing the parameters (same ``state_dict``); anything else: ``None``."""
    cls = _subpixel_match(module)
    if not isinstance(cls, type):
        return None
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)  # shares the parameter and buffer dicts
    new.impl = "auto"
    return new
