"""Datasets: the built-in procedural video with exact ground truth (:mod:`.synthetic`), and
real video: frame folders (:mod:`.frames`), decoders (:mod:`.decode`, :mod:`.pyav`,
:mod:`.dali`), clip datasets (:mod:`.video`), the uint8 clip cache (:mod:`.cache`,
:mod:`.prepare`) and :func:`make_dataset` (:mod:`.build`), which picks the dataset
``data.source`` names."""

from vosgan.data.build import make_dataset
from vosgan.data.decode import VideoError, VideoInfo, make_decoder, probe, read_video
from vosgan.data.frames import Sequence, find_sequences, load_frames, load_masks
from vosgan.data.synthetic import SPLITS, Clip, SyntheticVideos, clips_to_tensors, render_clip
from vosgan.data.video import ClipDataset

__all__ = [
    "SPLITS",
    "Clip",
    "SyntheticVideos",
    "clips_to_tensors",
    "render_clip",
    "Sequence",
    "find_sequences",
    "load_frames",
    "load_masks",
    "VideoError",
    "VideoInfo",
    "make_decoder",
    "probe",
    "read_video",
    "ClipDataset",
    "make_dataset",
]
