"""Read and write `.safetensors` files one tensor at a time, so no more than one tensor is ever held.

`safetensors.torch.save_file` takes the whole state dict at once. The format is simple (an 8-byte
little-endian header length, a JSON header of dtype/shape/byte offsets, then the raw bytes), so the
bytes go to a side file as they come and the header is written in front of them at the end.

Reading uses plain file reads rather than safetensors' memory map: the pages of a mapped file that were
read stay mapped into the process, and count as its resident memory, until the file is closed, so
walking a 5 GB UNet through one `safe_open` handle ends with 5 GB resident.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}

_TORCH_DTYPES = {name: dtype for dtype, name in _DTYPES.items()}


def read_header(path: Path) -> dict[str, dict[str, Any]]:
    """Tensor name -> {"dtype", "shape", "data_offsets"} of a `.safetensors` file (no tensor is read)."""
    with open(path, "rb") as file:
        header, _ = _read_header(file)
    return header


def read_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Each tensor of a `.safetensors` file, in file order, read into memory of its own (see the module
    docstring): only the tensor the caller holds is in memory."""
    with open(path, "rb") as file:
        header, data_start = _read_header(file)
        for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            begin, end = entry["data_offsets"]
            dtype = _TORCH_DTYPES[entry["dtype"]]
            if end == begin:
                yield name, torch.empty(entry["shape"], dtype=dtype)
                continue
            file.seek(data_start + begin)
            raw = bytearray(end - begin)
            if file.readinto(raw) != len(raw):
                raise OSError(f"{path} is truncated: tensor {name} ends past the end of the file")
            yield name, torch.frombuffer(raw, dtype=dtype).reshape(entry["shape"])


def _read_header(file) -> tuple[dict[str, dict[str, Any]], int]:
    (length,) = struct.unpack("<Q", file.read(8))
    header = json.loads(file.read(length))
    header.pop("__metadata__", None)
    return header, 8 + length


class SafetensorsStreamWriter:
    """`with SafetensorsStreamWriter(path, metadata) as out: out.add(name, tensor)`; written at exit."""

    def __init__(self, path: Path, metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self._data_path = self.path.with_name(f".{self.path.name}.data")
        self._metadata = dict(metadata or {})
        self._header: dict[str, dict] = {}
        self._offset = 0
        self._data = open(self._data_path, "wb")  # noqa: SIM115 - closed in __exit__

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._header:
            raise ValueError(f"tensor {name} written twice")
        tensor = tensor.detach().to("cpu").contiguous()
        raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        self._data.write(raw)
        self._header[name] = {
            "dtype": _DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [self._offset, self._offset + len(raw)],
        }
        self._offset += len(raw)

    def __enter__(self) -> SafetensorsStreamWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._data.close()
        try:
            if kind is None:
                self._assemble()
        finally:
            self._data_path.unlink(missing_ok=True)

    def _assemble(self) -> None:
        header = dict(self._header)
        if self._metadata:
            header["__metadata__"] = self._metadata
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
        with open(self.path, "wb") as out, open(self._data_path, "rb") as data:
            out.write(struct.pack("<Q", len(encoded)))
            out.write(encoded)
            shutil.copyfileobj(data, out, length=64 << 20)
            out.flush()
            os.fsync(out.fileno())
