"""Drop-in modules: each loads the ``state_dict`` of the plain PyTorch module(s) it replaces.

:func:`fuse_modules` swaps them into any model in place.
"""

from vosgan.nn.composite import MaskComposite
from vosgan.nn.flow_warp import FlowWarpLoss
from vosgan.nn.fuse import fuse_modules, register_fuser

__all__ = ["FlowWarpLoss", "MaskComposite", "fuse_modules", "register_fuser"]
