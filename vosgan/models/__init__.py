"""The VOS-GAN generator and discriminator (plain PyTorch; ``fuse_modules`` swaps fused ops in)."""

from vosgan.models.discriminator import DiscOutput, Discriminator
from vosgan.models.generator import Generator, GenOutput, interpolate_trajectory

__all__ = ["DiscOutput", "Discriminator", "GenOutput", "Generator", "interpolate_trajectory"]
