"""Uploaded trace files: kept on disk for the simulator, checked at once for readable errors.

The simulator loads traces by path (``workload.trace``), so an upload is written to a private
temporary directory under its own name (its suffix tells a gzip or Parquet file apart for humans;
the loaders detect formats by content). It is loaded immediately with the same loader a run would
use, so a bad file is reported when it is dropped on the page, not after a click on Run. Error
messages name the uploaded file, not the temporary path.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sim.errors import FleetsimError, TraceError

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_UPLOAD_BYTES = 200 * 1024 * 1024


@dataclass(frozen=True)
class Upload:
    name: str  # as the user named it
    path: Path  # where the simulator reads it
    requests: int
    duration_s: float
    format: str

    def describe(self) -> str:
        rate = f", {self.requests / self.duration_s:.3g} req/s" if self.duration_s > 0 else ""
        return f"{self.requests:,} requests over {self.duration_s:,.0f} s{rate} (format: {self.format})"


def store(name: str, data: bytes, root: Path | None = None) -> Path:
    """Write ``data`` under a content-addressed folder (same bytes -> same path, so reruns of the
    page and the scenario YAML stay stable)."""
    if len(data) > MAX_UPLOAD_BYTES:
        raise TraceError(f"{name}: file is larger than {MAX_UPLOAD_BYTES >> 20} MiB")
    digest = hashlib.sha256(data).hexdigest()[:16]
    base = Path(root) if root is not None else Path(tempfile.gettempdir()) / "fleetsim-uploads"
    folder = base / digest
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (_SAFE.sub("_", Path(name).name) or "trace")
    if not path.exists():
        path.write_bytes(data)
    return path


def readable(e: BaseException, path: Path | str, name: str) -> str:
    """The error's one line with the temporary path replaced by the uploaded file's name."""
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return msg.replace(str(path), name)


def check(name: str, data: bytes, fmt: str = "auto", *, skip_invalid: bool = False,
          root: Path | None = None) -> Upload:
    """Store and load an uploaded trace; raises :class:`FleetsimError` with a readable message."""
    if not data.strip():
        raise TraceError(f"{name}: file is empty")
    path = store(name, data, root)
    try:
        from traces.formats import detect, load_file

        used = detect(path) if fmt == "auto" else fmt
        w = load_file(path, fmt, skip_invalid=skip_invalid)
    except FleetsimError as e:
        raise TraceError(readable(e, path, name)) from None
    except (UnicodeDecodeError, ValueError, OSError) as e:  # a loader's unanticipated complaint
        raise TraceError(f"{name}: not a readable trace ({type(e).__name__}: {readable(e, path, name)})") from None
    df = w.df
    dur = float(df["arrival_s"].max() - df["arrival_s"].min()) if len(df) else 0.0
    return Upload(name=name, path=path, requests=len(df), duration_s=dur, format=used)
