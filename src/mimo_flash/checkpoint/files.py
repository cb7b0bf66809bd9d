"""The safetensors file format, read through a memory map and written tensor by tensor.

A safetensors file is: 8 bytes (little-endian u64) header length N, N bytes of JSON header
`{name: {"dtype": "BF16", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}}`,
then the data section, offsets relative to its start.

Reading maps the whole file (private, read-only use) and hands out tensors that are views of the
map; `release` drops a tensor's pages from this process's resident set once it has been copied, so
loading never holds more than about one tensor of file pages. Writing streams: the header is
computed from names, dtypes and shapes up front, then each tensor is produced, written and dropped.

Also here: the temporary directories checkpoints are written into, and the removal of those that killed
writers left behind.
"""

from __future__ import annotations

import ctypes
import errno
import json
import math
import mmap
import os
import shutil
import socket
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from .errors import CheckpointError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
}
CODES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024  # the format's own limit
PAGE = mmap.PAGESIZE


def nbytes_of(dtype: torch.dtype, shape: Iterable[int]) -> int:
    return math.prod(shape) * dtype.itemsize


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: `file`, its dtype and shape, absolute byte range [start, end)."""
    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int = 0
    end: int = 0

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class SafetensorsFile:
    """One safetensors file: header parsed and checked on open, data memory-mapped on first use."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._mm: mmap.mmap | None = None
        self._raw: torch.Tensor | None = None  # uint8 view of the whole map
        self.infos, self.metadata = self._parse_header()

    def _corrupt(self, why: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: not a valid safetensors file: {why}")

    def _parse_header(self) -> tuple[dict[str, TensorInfo], dict]:
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise self._corrupt(f"it is {size} bytes long, too short for a header (truncated?)")
                n = int.from_bytes(head, "little")
                if n > MAX_HEADER or n > size - 8:
                    raise self._corrupt(f"header length {n} does not fit in a file of {size} bytes "
                                        "(truncated or not safetensors)")
                text = f.read(n)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read ({e.strerror or e})") from None
        try:
            header = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._corrupt(f"header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise self._corrupt("header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        data_start, data_size = 8 + n, size - 8 - n
        infos: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            try:
                code, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
                shape = tuple(int(s) for s in shape)
                begin, end = int(begin), int(end)
            except (KeyError, TypeError, ValueError):
                raise self._corrupt(f"header entry of tensor {name} is malformed: {entry!r}") from None
            if code not in DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name} has unsupported dtype {code!r}")
            dtype = DTYPES[code]
            if any(s < 0 for s in shape) or not 0 <= begin <= end:
                raise self._corrupt(f"tensor {name} has shape {list(shape)} and offsets {[begin, end]}")
            if end - begin != nbytes_of(dtype, shape):
                raise self._corrupt(f"tensor {name} ({code} {list(shape)}) needs {nbytes_of(dtype, shape)} bytes, "
                                    f"its offsets span {end - begin}")
            if end > data_size:
                raise CheckpointError(f"{self.path}: file is truncated: tensor {name} ends at byte {data_start + end} "
                                      f"of a file of {size} bytes")
            infos[name] = TensorInfo(name, self.path, dtype, shape, data_start + begin, data_start + end)
        return infos, metadata

    def _map(self) -> torch.Tensor:
        if self._raw is None:
            with open(self.path, "rb") as f:
                # ACCESS_COPY: private map, so that no write can ever reach the file
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            self._raw = torch.frombuffer(self._mm, dtype=torch.uint8)
        return self._raw

    def get(self, name: str) -> torch.Tensor:
        """The tensor `name` as a view of the map (copy it before `release`/`close`)."""
        info = self.infos[name]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        t = self._map()[info.start: info.end]
        if info.start % info.dtype.itemsize:
            t = t.clone()  # misaligned for its dtype: copy to an aligned buffer
        return t.view(info.dtype).view(info.shape)

    def release(self, name: str) -> None:
        """Drop the pages of tensor `name` from this process (they stay in the OS page cache)."""
        info = self.infos[name]
        if self._mm is None or info.nbytes == 0 or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = info.start // PAGE * PAGE
        try:
            self._mm.madvise(mmap.MADV_DONTNEED, start, info.end - start)
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        self._raw = None
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a caller still holds a view; the map goes when that does
                pass
            self._mm = None


@dataclass
class Entry:
    """A tensor to write: `produce()` returns it (any device, any layout) with this dtype and shape."""
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.dtype, self.shape)


def write_safetensors(path: str | os.PathLike, entries: list[Entry], metadata: dict[str, str] | None = None,
                      on_bytes: Callable[[int], None] | None = None) -> None:
    """Write `entries` to a safetensors file, producing one tensor at a time; fsync at the end."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": CODES[e.dtype], "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for e in entries:
            t = e.produce()
            if t.dtype != e.dtype or tuple(t.shape) != tuple(e.shape):
                raise RuntimeError(f"internal: {e.name} produced {t.dtype} {tuple(t.shape)}, "
                                   f"announced {e.dtype} {e.shape}")
            _write_tensor(f, t)
            del t
            if on_bytes is not None:
                on_bytes(e.nbytes)
        f.flush()
        os.fsync(f.fileno())


def _write_tensor(f, t: torch.Tensor, chunk: int = 64 << 20) -> None:
    t = t.detach().to("cpu").contiguous()
    n = t.numel() * t.element_size()
    if n == 0:
        return
    buf = (ctypes.c_ubyte * n).from_address(t.data_ptr())
    view = memoryview(buf).cast("B")
    for i in range(0, n, chunk):
        f.write(view[i: i + chunk])


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory's entries (new / renamed files) to disk; a no-op where the OS does not allow it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- temporary directories
# A checkpoint is written into `.DST.tmp-XXXXXXXX` beside DST, then renamed. A process killed on the way
# (SIGKILL, power) leaves that directory behind; the next write into the same parent removes it when it
# is certainly ours and certainly abandoned: its name has our pattern, it holds our marker file, and the
# process the marker names ran on this host and no longer exists.
MARKER = ".mimo-flash-writing"


def temp_dir_for(path: Path) -> Path:
    """A new empty temporary directory beside `path` for writing it, with the marker of this process
    (remove it with `unmark` before the rename). Stale ones of earlier runs are removed first."""
    remove_stale_temp_dirs(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    (tmp / MARKER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n")
    return tmp


def unmark(tmp: Path) -> None:
    """Drop the marker of a finished temporary directory (it must not end up in the checkpoint)."""
    (tmp / MARKER).unlink(missing_ok=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno != errno.ESRCH  # EPERM: it exists, owned by someone else
    return True


def remove_stale_temp_dirs(path: Path) -> list[Path]:
    """Remove the temporary directories of writes of `path` whose writer is gone; returns them."""
    removed = []
    for d in sorted(path.parent.glob(f".{path.name}.tmp-*")):
        try:
            owner = json.loads((d / MARKER).read_text())
            pid, host = int(owner["pid"]), owner["host"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # no readable marker: not ours, or ours and still being set up
        if host != socket.gethostname() or pid == os.getpid() or _process_exists(pid):
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
        warnings.warn(f"removed {d}: the temporary directory of an interrupted write (process {pid} is gone)")
    return removed
