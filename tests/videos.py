"""Tiny videos the tests write themselves: a square moving left to right over a dark background."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def moving_square(index: int, frames: int, size: int) -> np.ndarray:
    """Frame `index` of `frames`: an RGB uint8 array with a red square at x = index * size / frames."""
    array = np.full((size, size, 3), (20, 30, 40), np.uint8)
    x = index * size // frames
    array[size // 4 : size // 4 + size // 4, x : x + size // 4] = (250, 20, 20)
    return array


def write_video(path: Path, frames: int = 8, size: int = 64, fps: int = 4) -> Path:
    """An MPEG-4 file of `frames` frames of the moving square at `fps`."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for index in range(frames):
            frame = av.VideoFrame.from_ndarray(moving_square(index, frames, size), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_frame_folder(path: Path, frames: int = 4, size: int = 48) -> Path:
    """A folder of `frames` PNG frames of the moving square, named in order."""
    path.mkdir(parents=True, exist_ok=True)
    for index in range(frames):
        Image.fromarray(moving_square(index, frames, size)).save(path / f"frame_{index:03d}.png")
    return path
