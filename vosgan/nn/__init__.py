"""Drop-in modules: each loads the ``state_dict`` of the plain PyTorch module(s) it replaces.

:func:`fuse_modules` swaps them into any model in place.
"""

from vosgan.nn.composite import MaskComposite
from vosgan.nn.conv3d_block import (
    FusedConv3dBlock,
    FusedConvTranspose3dBlock,
    SubpixelConv3d,
    SubpixelConvTranspose3d,
)
from vosgan.nn.flow_warp import FlowWarpLoss
from vosgan.nn.fuse import fuse_modules, register_fuser
from vosgan.nn.gru import FusedGRU

__all__ = [
    "FlowWarpLoss",
    "FusedConv3dBlock",
    "FusedConvTranspose3dBlock",
    "FusedGRU",
    "MaskComposite",
    "SubpixelConv3d",
    "SubpixelConvTranspose3d",
    "fuse_modules",
    "register_fuser",
]
