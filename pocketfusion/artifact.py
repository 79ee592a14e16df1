"""The artifact manifest: the one contract between stages (schema version 2).

Every stage writes a directory holding its files and a ``manifest.json``::

    {
      "schema_version": 2,
      "stage": "export",                       # what made this directory
      "settings": {...},                       # the stage config's to_dict()
      "source": {"path": "...", "sha256": "..."} | null,    # what it was made from (relative: to this folder)
      "components": [                          # typed: where each component is, what it takes
        {"name": "unet", "path": "onnx/unet.onnx", "format": "onnx", "target": "onnx",
         "inputs": [{"name": "sample", "shape": [2, 4, 8, 8], "dtype": "float32"}, ...],
         "outputs": [...], "grid": {"path": "unet", "scheme": "w8", "method": "gptq"} | absent,
         "layer_map": {"down_blocks.0.resnets.0.conv1": "<name in the file>", ...} | absent}, ...],
      "calibration": {"path": "calibration", "sha256": "..."} | null,
      "sampler": {"scheduler": "scheduler", "latent_shape": [1, 4, 8, 8], "scaling_factor": ...,
                  "max_length": 16, "guidance": "cfg", "default_steps": 50, "tokenizer": "tokenizer",
                  SDXL only: "tokenizer_2": "tokenizer_2", "time_ids": [64, 64, 0, 0, 64, 64],
                  "zero_negative": true} | null,
      "files": {"unet/model.pte": {"size": 123, "sha256": "..."}, ...},
      "metrics": {...},                        # everything measured on the result (per component: by key)
      "notes": [...],
      "created": "2026-12-01T12:00:00+00:00",
      "tool": {"name": "pocketfusion", "version": "0.2.0"}
    }

No stage finds another's output by a file-name convention: it reads these fields. A directory is
written under a temporary name next to its destination and renamed into place only when complete
(``staged_dir``), so an interrupted run never leaves a directory that looks finished. A path a manifest
records (source, calibration, grid, component) that lies inside the same folder being staged (a run's
``export-w8`` made from its own ``compressed``) is written relative to the manifest's folder
(``portable_path``): it stays valid when the staging folder is renamed into place and when the finished
folder is moved; ``load_manifest`` reads a relative source back as an absolute path.
``load_manifest`` verifies every checksum and rejects other schema versions with one line naming
the version.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pocketfusion.errors import ManifestError, UserError

SCHEMA_VERSION = 2
MANIFEST = "manifest.json"
_CHUNK = 1 << 20
_STAGING: list[Path] = []  # the folders ``staged_dir`` is filling now, resolved, outermost first (``portable_path``)


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
class TensorSpec:
    """One named input or output of a component: static shape and numpy dtype name."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TensorSpec:
        return cls(str(d["name"]), tuple(int(s) for s in d["shape"]), str(d["dtype"]))


@dataclass(frozen=True)
class GridRef:
    """Where a component's quantization grid lies (``compress``): a folder, relative to the manifest,
    holding ``quantization.json`` + ``quantization.safetensors``; read with ``pocketfusion.compress.quant.grid``."""

    path: str
    scheme: str
    method: str

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "scheme": self.scheme, "method": self.method}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GridRef:
        return cls(str(d["path"]), str(d["scheme"]), str(d["method"]))


@dataclass(frozen=True)
class CalibrationRef:
    """A calibration set (``calibrate``) an artifact was made with: a directory relative to the manifest
    (or absolute) and its content hash, checked when it is opened."""

    path: str
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CalibrationRef:
        return cls(str(d["path"]), str(d["sha256"]))


@dataclass(frozen=True)
class SourceRef:
    """What a stage's output was made from: the input's path and content hash. The path is absolute, or
    relative to the manifest's folder when the input lies in the same staged folder (``portable_path``);
    ``load_manifest`` gives it back absolute."""

    path: str
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SourceRef:
        return cls(str(d["path"]), str(d["sha256"]))


# What a component's path holds.
FORMATS = ("diffusers", "transformers", "tokenizer", "scheduler", "onnx", "pte", "tflite", "mlpackage")


@dataclass(frozen=True)
class Component:
    """One component of an artifact: where it is, what it takes and gives, how it was quantized.

    ``name`` is the pipeline slot (``text_encoder``, ``unet``, ``vae_decoder``, ``tokenizer``, ...);
    ``target`` the export target for an exported file (None for PyTorch weights). ``layer_map``
    maps PyTorch module names to the tensor/node names in the written file (recorded at export
    time; the quantized exporters read the integers back through it).
    """

    name: str
    path: str
    format: str
    target: str | None = None
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    grid: GridRef | None = None
    layer_map: Mapping[str, str] = field(default_factory=dict)
    golden: str | None = None  # safetensors of golden (inputs, outputs) sets (``write_golden``), relative to the manifest

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ManifestError(f"component {self.name}: unknown format {self.format!r} (known: {', '.join(FORMATS)})")

    @property
    def key(self) -> str:
        """``target/name`` for an exported component, ``name`` otherwise (the key of its metrics)."""
        return f"{self.target}/{self.name}" if self.target else self.name

    def input(self, name: str) -> TensorSpec | None:
        return next((s for s in self.inputs if s.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "path": self.path, "format": self.format}
        if self.target is not None:
            d["target"] = self.target
        if self.inputs or self.outputs:
            d["inputs"] = [s.to_dict() for s in self.inputs]
            d["outputs"] = [s.to_dict() for s in self.outputs]
        if self.grid is not None:
            d["grid"] = self.grid.to_dict()
        if self.layer_map:
            d["layer_map"] = dict(self.layer_map)
        if self.golden is not None:
            d["golden"] = self.golden
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Component:
        return cls(
            name=str(d["name"]), path=str(d["path"]), format=str(d["format"]), target=d.get("target"),
            inputs=tuple(TensorSpec.from_dict(s) for s in d.get("inputs", ())),
            outputs=tuple(TensorSpec.from_dict(s) for s in d.get("outputs", ())),
            grid=GridRef.from_dict(d["grid"]) if d.get("grid") else None,
            layer_map=dict(d.get("layer_map", {})), golden=d.get("golden"),
        )


@dataclass(frozen=True)
class Sampler:
    """How the runtime pipeline samples an artifact's components (export) or a model (source).

    ``guidance`` says how the U-Net is guided: ``"cfg"`` (a batch-2 call per step, unconditional +
    conditional halves), ``"embedded"`` (a batch-1 call with the guidance scale as an input, a
    distilled student) or ``"none"``. ``scheduler`` is the scheduler config folder, relative to
    the manifest; ``default_steps`` the step count the model was made for.

    SDXL (optional fields, absent for SD 1.x/2.x): ``tokenizer_2`` is the second tokenizer's folder
    (the context is both encoders' penultimate hidden states, concatenated; the pooled embedding the
    second encoder's ``text_embeds``); ``time_ids`` the U-Net's added time ids (original height and width,
    crop top and left, target height and width, as diffusers' ``_get_add_time_ids`` makes them at the
    native size); ``zero_negative`` says that the unconditional half of a CFG pair is all zeros
    (diffusers' ``force_zeros_for_empty_prompt``) rather than the empty prompt's encoding.
    """

    scheduler: str
    latent_shape: tuple[int, ...]
    scaling_factor: float
    max_length: int
    guidance: str = "cfg"
    default_steps: int = 50
    tokenizer: str = "tokenizer"
    tokenizer_2: str | None = None
    time_ids: tuple[float, ...] | None = None
    zero_negative: bool = False

    def __post_init__(self) -> None:
        if self.guidance not in ("cfg", "embedded", "none"):
            raise ManifestError(f"sampler guidance {self.guidance!r} is not one of cfg, embedded, none")
        if self.time_ids is not None:
            object.__setattr__(self, "time_ids", tuple(float(v) for v in self.time_ids))
            if len(self.time_ids) != 6:
                raise ManifestError(f"sampler time_ids must hold 6 numbers (original size, crop top-left, target size), "
                                    f"got {len(self.time_ids)}")

    @property
    def unet_batch(self) -> int:
        return 2 if self.guidance == "cfg" else 1

    @property
    def sdxl(self) -> bool:
        """Whether the U-Net takes SDXL's added conditions (pooled text embedding, time ids)."""
        return self.time_ids is not None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["latent_shape"] = list(self.latent_shape)
        # the SDXL fields are written only when set: an SD 1.x/2.x sampler reads as before
        for k, default in (("tokenizer_2", None), ("time_ids", None), ("zero_negative", False)):
            if d[k] == default:
                del d[k]
        if self.time_ids is not None:
            d["time_ids"] = list(self.time_ids)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Sampler:
        kw = {k: d[k] for k in ("scheduler", "scaling_factor", "max_length", "guidance", "default_steps", "tokenizer",
                                "tokenizer_2", "zero_negative") if k in d}
        if d.get("time_ids") is not None:
            kw["time_ids"] = tuple(float(v) for v in d["time_ids"])
        return cls(latent_shape=tuple(int(s) for s in d["latent_shape"]), **kw)


@dataclass(frozen=True)
class Manifest:
    """``manifest.json`` of an artifact directory (schema version 2).

    Typed fields are the contract a later stage reads; ``metrics`` holds what was measured (keyed by
    ``Component.key`` where it is per component) and is never needed to find a file.
    """

    schema_version: int
    stage: str
    settings: Mapping[str, Any]
    source: SourceRef | None
    files: Mapping[str, Mapping[str, Any]]
    components: tuple[Component, ...] = ()
    calibration: CalibrationRef | None = None
    sampler: Sampler | None = None
    metrics: Mapping[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    created: str = ""
    tool: Mapping[str, Any] = field(default_factory=dict)

    def component(self, name: str, target: str | None = None) -> Component:
        """The component ``name`` (of ``target``, for an export).

        Raises:
            ManifestError: no such component; the message lists those present.
        """
        for c in self.components:
            if c.name == name and c.target == target:
                return c
        have = ", ".join(c.key for c in self.components) or "none"
        want = f"{target}/{name}" if target else name
        raise ManifestError(f"artifact ({self.stage}) has no component {want} (it has: {have})")

    def find(self, name: str, target: str | None = None) -> Component | None:
        return next((c for c in self.components if c.name == name and c.target == target), None)

    def targets(self) -> tuple[str, ...]:
        """Export targets present, in first-seen order."""
        return tuple(dict.fromkeys(c.target for c in self.components if c.target))

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "stage": self.stage,
            "settings": dict(self.settings),
            "source": self.source.to_dict() if self.source is not None else None,
            "components": [c.to_dict() for c in self.components],
            "calibration": self.calibration.to_dict() if self.calibration is not None else None,
            "sampler": self.sampler.to_dict() if self.sampler is not None else None,
            "files": {k: dict(v) for k, v in self.files.items()},
            "metrics": dict(self.metrics),
            "notes": list(self.notes),
            "created": self.created,
            "tool": dict(self.tool),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Manifest:
        if not isinstance(d, Mapping):
            raise ManifestError("manifest is not a JSON object")
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            hint = " (written by pocketfusion 0.1: re-run the stage that made it)" if version == 1 else ""
            raise ManifestError(
                f"manifest schema_version {version!r} is not supported{hint}; this pocketfusion reads version {SCHEMA_VERSION}"
            )
        missing = [k for k in ("stage", "settings", "source", "files") if k not in d]
        if missing:
            raise ManifestError(f"manifest lacks {', '.join(missing)}")
        try:
            return cls(
                schema_version=version, stage=d["stage"], settings=d["settings"],
                source=SourceRef.from_dict(d["source"]) if d["source"] else None,
                files=d["files"],
                components=tuple(Component.from_dict(c) for c in d.get("components", ())),
                calibration=CalibrationRef.from_dict(d["calibration"]) if d.get("calibration") else None,
                sampler=Sampler.from_dict(d["sampler"]) if d.get("sampler") else None,
                metrics=d.get("metrics", {}), notes=tuple(d.get("notes", ())),
                created=d.get("created", ""), tool=d.get("tool", {}),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestError(f"manifest field malformed: {type(e).__name__}: {e}") from None


def source_ref(path: str | Path) -> SourceRef:
    """Reference to a stage's input: its path and content hash."""
    p = Path(path).resolve()
    return SourceRef(str(p), content_hash(p))


def write_manifest(
    directory: str | Path,
    *,
    stage: str,
    settings: Mapping[str, Any],
    source: SourceRef | None,
    components: Sequence[Component] = (),
    calibration: CalibrationRef | None = None,
    sampler: Sampler | None = None,
    metrics: Mapping[str, Any] | None = None,
    notes: Sequence[str] = (),
) -> Manifest:
    """Checksum every file under ``directory`` and write its manifest.json (atomically).

    Raises:
        ManifestError: a component's path does not exist under ``directory``.
    """
    from pocketfusion import __version__

    root = Path(directory)
    for c in components:
        if not (root / c.path).exists():
            raise ManifestError(f"component {c.key}: {c.path} does not exist in {root}")
    components = [_portable_component(c, root) for c in components]
    if source is not None:
        source = SourceRef(portable_path(source.path, root), source.sha256)
    if calibration is not None:
        calibration = CalibrationRef(portable_path(calibration.path, root), calibration.sha256)
    files = {p.relative_to(root).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in _walk(root)}
    m = Manifest(
        schema_version=SCHEMA_VERSION,
        stage=stage,
        settings=dict(settings),
        source=source,
        files=files,
        components=tuple(components),
        calibration=calibration,
        sampler=sampler,
        metrics=dict(metrics or {}),
        notes=tuple(notes),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        tool={"name": "pocketfusion", "version": __version__},
    )
    atomic_write_text(root / MANIFEST, json.dumps(m.to_dict(), indent=2, sort_keys=False) + "\n")
    return m


def portable_path(path: str, directory: str | Path) -> str:
    """``path`` as a manifest in ``directory`` records it: relative to ``directory`` when both lie inside a folder
    ``staged_dir`` is filling now (the path then moves with the manifest: ``../compressed`` from a run's
    ``export-w8``, valid after the run folder is renamed into place or moved), else unchanged."""
    p = Path(path)
    if not p.is_absolute() or not _STAGING:
        return path
    p, root = p.resolve(), Path(directory).resolve()
    for staging in _STAGING:
        if p.is_relative_to(staging) and root.is_relative_to(staging):
            return Path(os.path.relpath(p, root)).as_posix()
    return path


def _portable_component(c: Component, root: Path) -> Component:
    grid = None if c.grid is None else dataclasses.replace(c.grid, path=portable_path(c.grid.path, root))
    golden = None if c.golden is None else portable_path(c.golden, root)
    return dataclasses.replace(c, path=portable_path(c.path, root), grid=grid, golden=golden)


def resolve_path(directory: str | Path, rel: str) -> Path:
    """A manifest path (relative to its directory, or absolute) as a filesystem path."""
    p = Path(rel)
    return p if p.is_absolute() else Path(directory) / p


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
    if m.source is not None and not Path(m.source.path).is_absolute():  # inside the same folder (``portable_path``)
        m = dataclasses.replace(m, source=SourceRef(str((root / m.source.path).resolve()), m.source.sha256))
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


def copy_components(src: str | Path, dest: str | Path, *, skip: tuple[str, ...] = ()) -> None:
    """Copy every component folder a pipeline's ``model_index.json`` names from ``src`` to ``dest``, but ``skip``
    (the components a stage writes anew)."""
    src, dest = Path(src), Path(dest)
    for name in json.loads((src / "model_index.json").read_text()):
        if not name.startswith("_") and name not in skip and (src / name).is_dir():
            shutil.copytree(src / name, dest / name)


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
    staging = tmp.resolve()
    _STAGING.append(staging)
    try:
        try:
            yield tmp
        finally:
            _STAGING.remove(staging)
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


def write_golden(path: str | Path, sets: list[tuple[Mapping[str, Any], Mapping[str, Any]]]) -> None:
    """Store golden (inputs, outputs) sets as ``{i}.in.{name}`` / ``{i}.out.{name}`` arrays."""
    import numpy as np
    from safetensors.numpy import save_file

    tensors = {}
    for i, (ins, outs) in enumerate(sets):
        tensors.update({f"{i}.in.{k}": np.ascontiguousarray(v) for k, v in ins.items()})
        tensors.update({f"{i}.out.{k}": np.ascontiguousarray(v) for k, v in outs.items()})
    save_file(tensors, str(path))


def read_golden(path: str | Path, index: int = 0) -> tuple[dict, dict]:
    """(inputs, outputs) of golden set ``index`` of a golden file (``Component.golden``, resolved)."""
    from safetensors.numpy import load_file

    g = load_file(str(path))
    ins = {k.split(".in.", 1)[1]: v for k, v in g.items() if k.startswith(f"{index}.in.")}
    outs = {k.split(".out.", 1)[1]: v for k, v in g.items() if k.startswith(f"{index}.out.")}
    if not ins:
        raise ManifestError(f"{path} has no golden set {index}")
    return ins, outs
