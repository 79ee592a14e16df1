"""The artifact manifest: the one contract between stages.

Every stage writes a directory holding its files and a ``manifest.json``::

    {
      "schema_version": 1,
      "stage": "export",                      # what made this directory
      "settings": {...},                      # the stage's configuration, as given
      "source": {"path": "...", "sha256": "..."} | null,   # what it was made from
      "files": {"unet/model.pte": {"size": 123, "sha256": "..."}, ...},
      "metrics": {...},                       # everything measured on the result
      "created": "2026-11-23T12:00:00+00:00",
      "tool": {"name": "pocketfusion", "version": "0.1.0"}
    }

A directory is written under a temporary name next to its destination and renamed into place
only when complete (``staged_dir``), so an interrupted run never leaves a directory that looks
finished. ``load_manifest`` verifies every checksum and rejects unknown schema versions.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pocketfusion.errors import ManifestError, UserError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _walk(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def content_hash(root: str | Path) -> str:
    """A hash of a file or of a directory tree (relative paths and file hashes; manifest excluded)."""
    root = Path(root)
    if root.is_file():
        return sha256_file(root)
    h = hashlib.sha256()
    for p in _walk(root):
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + sha256_file(p).encode() + b"\n")
    return h.hexdigest()


@dataclass(frozen=True)
class Manifest:
    schema_version: int
    stage: str
    settings: Mapping[str, Any]
    source: Mapping[str, Any] | None
    files: Mapping[str, Mapping[str, Any]]
    metrics: Mapping[str, Any] = field(default_factory=dict)
    created: str = ""
    tool: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "stage": self.stage,
            "settings": dict(self.settings),
            "source": dict(self.source) if self.source is not None else None,
            "files": {k: dict(v) for k, v in self.files.items()},
            "metrics": dict(self.metrics),
            "created": self.created,
            "tool": dict(self.tool),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Manifest:
        if not isinstance(d, Mapping):
            raise ManifestError("manifest is not a JSON object")
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ManifestError(f"manifest schema_version {version!r} is not supported (this pocketfusion reads {SCHEMA_VERSION})")
        missing = [k for k in ("stage", "settings", "source", "files") if k not in d]
        if missing:
            raise ManifestError(f"manifest lacks {', '.join(missing)}")
        return cls(
            schema_version=version,
            stage=d["stage"],
            settings=d["settings"],
            source=d["source"],
            files=d["files"],
            metrics=d.get("metrics", {}),
            created=d.get("created", ""),
            tool=d.get("tool", {}),
        )


def source_ref(path: str | Path) -> dict[str, str]:
    """Reference to a stage's input: its path and content hash."""
    p = Path(path).resolve()
    return {"path": str(p), "sha256": content_hash(p)}


def write_manifest(
    directory: str | Path,
    *,
    stage: str,
    settings: Mapping[str, Any],
    source: Mapping[str, Any] | None,
    metrics: Mapping[str, Any] | None = None,
) -> Manifest:
    """Checksum every file under ``directory`` and write its manifest.json (atomically)."""
    from pocketfusion import __version__

    root = Path(directory)
    files = {p.relative_to(root).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in _walk(root)}
    m = Manifest(
        schema_version=SCHEMA_VERSION,
        stage=stage,
        settings=dict(settings),
        source=dict(source) if source is not None else None,
        files=files,
        metrics=dict(metrics or {}),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        tool={"name": "pocketfusion", "version": __version__},
    )
    atomic_write_text(root / MANIFEST, json.dumps(m.to_dict(), indent=2, sort_keys=False) + "\n")
    return m


def load_manifest(directory: str | Path, *, verify: bool = True) -> Manifest:
    """Read ``directory/manifest.json``; with ``verify`` check every listed file's size and sha256.

    Raises:
        ManifestError: missing or malformed manifest, unknown schema version, a missing file or a
            checksum mismatch (naming the file).
    """
    root = Path(directory)
    path = root / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{root} has no {MANIFEST}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path} is not valid JSON: {e}") from None
    m = Manifest.from_dict(data)
    if verify:
        for rel, info in m.files.items():
            p = root / rel
            if not p.is_file():
                raise ManifestError(f"{root}: file {rel} listed in the manifest is missing")
            if p.stat().st_size != info.get("size"):
                raise ManifestError(f"{root}: {rel} has {p.stat().st_size} bytes, manifest says {info.get('size')}")
            if sha256_file(p) != info.get("sha256"):
                raise ManifestError(f"{root}: checksum mismatch for {rel} (file changed or corrupt)")
    return m


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``path``, fsync, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


@contextlib.contextmanager
def staged_dir(dest: str | Path, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory next to ``dest``; rename it to ``dest`` only on success.

    On any exception (KeyboardInterrupt included) the temporary directory is removed and ``dest``
    is left as it was. An existing ``dest`` is replaced only after the new one is complete.
    """
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise UserError(f"output {dest} exists and is not a directory")
    if dest.exists() and not overwrite:
        raise UserError(f"output {dest} exists (pass --overwrite to replace it)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        yield tmp
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def golden_path(directory: str | Path, component: str) -> Path:
    return Path(directory) / "golden" / f"{component}.safetensors"


def write_golden(path: str | Path, sets: list[tuple[Mapping[str, Any], Mapping[str, Any]]]) -> None:
    """Store golden (inputs, outputs) sets as ``{i}.in.{name}`` / ``{i}.out.{name}`` arrays."""
    import numpy as np
    from safetensors.numpy import save_file

    tensors = {}
    for i, (ins, outs) in enumerate(sets):
        tensors.update({f"{i}.in.{k}": np.ascontiguousarray(v) for k, v in ins.items()})
        tensors.update({f"{i}.out.{k}": np.ascontiguousarray(v) for k, v in outs.items()})
    save_file(tensors, str(path))


def read_golden(directory: str | Path, component: str, index: int = 0) -> tuple[dict, dict]:
    """(inputs, outputs) of golden set ``index`` of an export directory's ``component``."""
    from safetensors.numpy import load_file

    g = load_file(str(golden_path(directory, component)))
    ins = {k.split(".in.", 1)[1]: v for k, v in g.items() if k.startswith(f"{index}.in.")}
    outs = {k.split(".out.", 1)[1]: v for k, v in g.items() if k.startswith(f"{index}.out.")}
    if not ins:
        raise ManifestError(f"{golden_path(directory, component)} has no golden set {index}")
    return ins, outs
