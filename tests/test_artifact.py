import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from pocketfusion import artifact
from pocketfusion.errors import ManifestError


def _make(tmp_path, name="out"):
    dest = tmp_path / name
    with artifact.staged_dir(dest) as d:
        (d / "a.bin").write_bytes(b"hello")
        (d / "sub").mkdir()
        (d / "sub" / "b.txt").write_text("world")
        artifact.write_manifest(d, stage="test", settings={"x": 1}, source=artifact.SourceRef("/src", "0" * 64),
                                components=(artifact.Component("a", "a.bin", "onnx", target="onnx",
                                                               inputs=(artifact.TensorSpec("x", (2, 4), "float32"),),
                                                               outputs=(artifact.TensorSpec("y", (2, 4), "float32"),),
                                                               layer_map={"conv": "onnx::Conv_3"}),
                                            artifact.Component("unet", "sub", "diffusers", grid=artifact.GridRef("sub", "w8", "gptq"))),
                                calibration=artifact.CalibrationRef("sub", "1" * 64),
                                sampler=artifact.Sampler("scheduler", (1, 4, 8, 8), 0.18, 77), metrics={"err": 0.5})
    return dest


def test_manifest_round_trip(tmp_path):
    dest = _make(tmp_path)
    m = artifact.load_manifest(dest)
    assert m.stage == "test" and m.settings == {"x": 1} and m.metrics == {"err": 0.5}
    assert set(m.files) == {"a.bin", "sub/b.txt"}
    assert m.files["a.bin"]["size"] == 5
    assert m.files["a.bin"]["sha256"] == "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    again = artifact.Manifest.from_dict(json.loads((dest / "manifest.json").read_text()))
    assert again == m
    assert artifact.Manifest.from_dict(m.to_dict()) == m


def test_typed_fields(tmp_path):
    m = artifact.load_manifest(_make(tmp_path))
    a = m.component("a", "onnx")
    assert a.key == "onnx/a" and a.inputs[0].shape == (2, 4) and a.layer_map == {"conv": "onnx::Conv_3"}
    assert m.component("unet").grid == artifact.GridRef("sub", "w8", "gptq") and m.targets() == ("onnx",)
    assert m.calibration.sha256 == "1" * 64 and m.sampler.unet_batch == 2 and m.sampler.latent_shape == (1, 4, 8, 8)
    with pytest.raises(ManifestError, match=r"no component tflite/a \(it has: onnx/a, unet\)"):
        m.component("a", "tflite")


def test_component_paths_must_exist(tmp_path):
    with pytest.raises(ManifestError, match="component onnx/x: x.onnx does not exist"):
        artifact.write_manifest(
            tmp_path, stage="t", settings={}, source=None, components=(artifact.Component("x", "x.onnx", "onnx", "onnx"),)
        )
    with pytest.raises(ManifestError, match="unknown format 'zip'"):
        artifact.Component("x", "x.zip", "zip")
    with pytest.raises(ManifestError, match="guidance 'half'"):
        artifact.Sampler("s", (1, 4, 8, 8), 1.0, 16, guidance="half")


def test_version_1_refused_with_its_version(tmp_path):
    dest = _make(tmp_path)
    data = json.loads((dest / "manifest.json").read_text())
    data["schema_version"] = 1
    (dest / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=r"schema_version 1 is not supported \(written by pocketfusion 0.1"):
        artifact.load_manifest(dest)


def test_checksum_failure_names_file(tmp_path):
    dest = _make(tmp_path)
    (dest / "sub" / "b.txt").write_text("wurld")  # same size, different bytes
    with pytest.raises(ManifestError, match=r"checksum mismatch for sub/b.txt"):
        artifact.load_manifest(dest)
    artifact.load_manifest(dest, verify=False)  # explicit opt-out still reads it


def test_missing_and_resized_files(tmp_path):
    dest = _make(tmp_path)
    (dest / "a.bin").write_bytes(b"hello!")
    with pytest.raises(ManifestError, match="a.bin has 6 bytes"):
        artifact.load_manifest(dest)
    (dest / "a.bin").unlink()
    with pytest.raises(ManifestError, match="a.bin listed in the manifest is missing"):
        artifact.load_manifest(dest)


def test_unknown_schema_version_rejected(tmp_path):
    dest = _make(tmp_path)
    data = json.loads((dest / "manifest.json").read_text())
    data["schema_version"] = 99
    (dest / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="schema_version 99 is not supported"):
        artifact.load_manifest(dest)
    (dest / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        artifact.load_manifest(dest)


def test_exception_leaves_nothing_behind(tmp_path):
    dest = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with artifact.staged_dir(dest) as d:
            (d / "half.bin").write_bytes(b"x" * 100)
            raise RuntimeError("boom")
    assert not dest.exists()
    assert list(tmp_path.iterdir()) == []


def test_interrupt_keeps_previous_result(tmp_path):
    dest = _make(tmp_path)
    before = artifact.load_manifest(dest)
    with pytest.raises(KeyboardInterrupt):
        with artifact.staged_dir(dest) as d:
            (d / "new.bin").write_bytes(b"new")
            raise KeyboardInterrupt
    assert artifact.load_manifest(dest) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_killed_process_never_leaves_finished_looking_dir(tmp_path):
    # A writer killed with SIGKILL mid-stage (no cleanup can run) leaves at most a hidden
    # ".out.*.partial" directory, never "out" itself.
    code = textwrap.dedent(f"""
        import time, pathlib
        from pocketfusion import artifact
        with artifact.staged_dir(pathlib.Path({str(tmp_path / 'out')!r})) as d:
            (d / "part.bin").write_bytes(b"x" * 1000)
            print("writing", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    names = [p.name for p in tmp_path.iterdir()]
    assert "out" not in names
    assert all(n.startswith(".out.") and n.endswith(".partial") for n in names)


def test_atomic_write_text_replaces(tmp_path):
    p = tmp_path / "r.json"
    artifact.atomic_write_text(p, "1")
    artifact.atomic_write_text(p, "2")
    assert p.read_text() == "2" and [x.name for x in tmp_path.iterdir()] == ["r.json"]


def test_content_hash_changes_with_content(tmp_path):
    dest = _make(tmp_path)
    h = artifact.content_hash(dest)
    assert h == artifact.content_hash(dest)
    (dest / "a.bin").write_bytes(b"hellO")
    assert artifact.content_hash(dest) != h


def test_paths_inside_the_staged_folder_are_recorded_relative(tmp_path):
    """A manifest made inside a staged folder from something in that folder (a run's ``export-w8`` from its own
    ``compressed``) records it relative to itself: valid once renamed into place and after the folder is moved.
    A source outside stays absolute."""
    outside = tmp_path / "model"
    outside.mkdir()
    (outside / "w.bin").write_bytes(b"w")
    with artifact.staged_dir(tmp_path / "run") as run:
        (run / "compressed" / "unet").mkdir(parents=True)
        (run / "compressed" / "unet" / "w.bin").write_bytes(b"q")
        (run / "compressed" / "cal").mkdir()
        artifact.write_manifest(run / "compressed", stage="compress", settings={}, source=artifact.source_ref(outside))
        with artifact.staged_dir(run / "export-w8") as exp:
            (exp / "a.onnx").write_bytes(b"x")
            grid = artifact.GridRef(str((run / "compressed" / "unet").resolve()), "w8", "gptq")
            artifact.write_manifest(exp, stage="export", settings={}, source=artifact.source_ref(run / "compressed"),
                                    components=[artifact.Component("unet", "a.onnx", "onnx", target="onnx", grid=grid)],
                                    calibration=artifact.CalibrationRef(str((run / "compressed" / "cal").resolve()), "1" * 64))
        assert artifact.load_manifest(run / "export-w8").source.path == str((run / "compressed").resolve())
    assert artifact._STAGING == []
    raw = json.loads((tmp_path / "run" / "export-w8" / "manifest.json").read_text())
    assert raw["source"]["path"] == "../compressed" and raw["components"][0]["grid"]["path"] == "../compressed/unet"
    assert raw["calibration"]["path"] == "../compressed/cal"
    assert json.loads((tmp_path / "run" / "compressed" / "manifest.json").read_text())["source"]["path"] == str(outside.resolve())
    moved = tmp_path / "else" / "where"
    moved.parent.mkdir()
    os.replace(tmp_path / "run", moved)
    m = artifact.load_manifest(moved / "export-w8")
    assert m.source.path == str((moved / "compressed").resolve()) and m.source.sha256 == artifact.content_hash(moved / "compressed")
    assert artifact.resolve_path(moved / "export-w8", m.components[0].grid.path).resolve() == (moved / "compressed" / "unet").resolve()
    assert artifact.portable_path(str(outside), moved) == str(outside)  # nothing staged now: unchanged
