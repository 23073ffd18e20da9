"""Datasets: the built-in procedural video with exact ground truth (:mod:`.synthetic`)."""

from vosgan.data.synthetic import SPLITS, Clip, SyntheticVideos, clips_to_tensors, render_clip

__all__ = ["SPLITS", "Clip", "SyntheticVideos", "clips_to_tensors", "render_clip"]
