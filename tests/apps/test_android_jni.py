"""The Android app's JNI glue (apps/android/app/src/main/cpp/pf_jni.cpp + org.pocketfusion.PfNative) compiled for this
host (apps/native's CMake option PF_JNI: libpfjni.so on the executorch wheel's libraries) and run on a desktop JVM:
tokens = CLIPTokenizer's, images = the Python runtime pipeline's for the same noise (CFG teacher and the
guidance-embedded student), Java exceptions with pf-run's one-line messages. Skipped, with the reason, without a JDK
(javac, java, jni.h), CMake >= 3.28 or a compiler."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("torch_one_thread")

ROOT = Path(__file__).resolve().parents[2]
JAVA_SRC = ROOT / "apps" / "android" / "app" / "src" / "main" / "java" / "org" / "pocketfusion" / "PfNative.java"
PROMPT = "a small red circle on a blue background, top left"

HARNESS = r"""
import org.pocketfusion.PfNative;
import java.io.*;

public class Harness {
    public static void main(String[] a) throws Exception {
        // generate EXPORT SCHEDULER PROMPT STEPS GUIDANCE SEED NOISE OUT | tokenize EXPORT PROMPT | error EXPORT SCHEDULER
        String mode = a[0];
        try {
            if (mode.equals("version")) { System.out.println(PfNative.version()); return; }
            try (PfNative pf = new PfNative(a[1], mode.equals("tokenize") ? null : a[2], 1)) {
                if (mode.equals("tokenize")) {
                    StringBuilder b = new StringBuilder();
                    for (int id : pf.tokenize(a[2])) b.append(b.length() > 0 ? " " : "").append(id);
                    System.out.println(b);
                    return;
                }
                PfNative.Image img = pf.generate(a[3], Integer.parseInt(a[4]), Float.parseFloat(a[5]), Long.parseLong(a[6]), a[7]);
                try (DataOutputStream o = new DataOutputStream(new BufferedOutputStream(new FileOutputStream(a[8])))) {
                    for (int p : img.argb) o.writeInt(p);
                }
                System.out.println("{\"width\": " + img.width + ", \"height\": " + img.height + ", \"total_ms\": " + img.totalMs
                                   + ", \"unet_ms\": " + img.unetMs + ", \"unet_calls\": " + img.unetCalls + "}");
                pf.close();
                try { pf.tokenize("x"); } catch (IllegalStateException e) { System.out.println("closed: " + e.getMessage()); }
            }
        } catch (IllegalArgumentException e) {
            System.out.println("IllegalArgumentException: " + e.getMessage());
            System.exit(2);
        }
    }
}
"""


@pytest.fixture(scope="session")
def jni(tmp_path_factory):
    """(java command prefix, classpath, library dir): libpfjni.so built once per session, PfNative + the harness compiled."""
    from pocketfusion import app_build
    from pocketfusion.errors import UserError

    javac, java = shutil.which("javac"), shutil.which("java")
    if javac is None or java is None:
        pytest.skip("no JDK (Debian: apt-get install default-jdk-headless)")
    try:
        cmake, _ = app_build.find_cmake()
        compiler = app_build.find_compiler(app_build.host_arch())
        et = app_build.installed_executorch()
    except UserError as e:
        pytest.skip(str(e))
    root = tmp_path_factory.mktemp("jni")
    build = root / "build"
    p = subprocess.run([cmake, "-S", str(ROOT / "apps" / "native"), "-B", str(build), f"-DEXECUTORCH_ROOT={et}", "-DPF_JNI=ON",
                        "-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_CXX_COMPILER={compiler}"], capture_output=True, text=True)
    if p.returncode != 0 and "JNI" in (p.stdout + p.stderr):
        pytest.skip("CMake finds no JNI (jni.h) in this JDK")
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    p = subprocess.run([cmake, "--build", str(build), "--target", "pfjni", "-j", "1"], capture_output=True, text=True)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    (root / "Harness.java").write_text(HARNESS)
    classes = root / "classes"
    p = subprocess.run([javac, "-d", str(classes), str(JAVA_SRC), str(root / "Harness.java")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return [java, f"-Djava.library.path={build}", "-cp", str(classes), "Harness"]


def harness(jni, *args) -> subprocess.CompletedProcess:
    return subprocess.run([*jni, *[str(a) for a in args]], capture_output=True, text=True, timeout=600)


def argb_image(path: Path, width: int, height: int) -> np.ndarray:
    px = np.frombuffer(path.read_bytes(), dtype=">u4").reshape(height, width)
    assert (px >> 24 == 0xFF).all()
    return np.stack([(px >> 16) & 0xFF, (px >> 8) & 0xFF, px & 0xFF], axis=-1).astype(np.uint8)


def noise_for(pipe, steps: int, seed: int) -> np.ndarray:
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tuple(pipe.sampler.latent_shape), generator=g).numpy()
    extra = [torch.randn(x.shape, generator=g).numpy() for _ in range(steps - 1)] if pipe.scheduler.stochastic else []
    return np.stack([x, *extra]).astype(np.float32)


def test_version_and_tokens(jni, mini_et_export):
    from transformers import CLIPTokenizer

    p = harness(jni, "version")
    assert p.returncode == 0 and p.stdout.startswith("pf-jni ") and "executorch" in p.stdout, p.stderr
    tok = CLIPTokenizer.from_pretrained(str(mini_et_export / "tokenizer"))
    for prompt in (PROMPT, "A Large  WHITE triangle,on a green background!!", ""):
        p = harness(jni, "tokenize", mini_et_export, prompt)
        assert p.returncode == 0, p.stderr
        assert [int(v) for v in p.stdout.split()] == tok([prompt], padding="max_length", max_length=16).input_ids[0]


@pytest.mark.parametrize("scheduler", ["", "euler-ancestral"])
def test_generate_matches_the_runtime_pipeline(jni, mini_et_export, scheduler, tmp_path):
    from pocketfusion.metrics import psnr
    from pocketfusion.runtimes.pipeline import RuntimePipeline

    pipe = RuntimePipeline(mini_et_export, "executorch", threads=1, scheduler=scheduler or None)
    ref = pipe(PROMPT, steps=5, seed=3, guidance=3.0)
    np.save(tmp_path / "noise.npy", noise_for(pipe, 5, 3))
    for noise, seed in ((tmp_path / "noise.npy", 99), ("", 3)):  # the same noise from a file, and from the seed
        p = harness(jni, "generate", mini_et_export, scheduler, PROMPT, 5, 3.0, seed, noise, tmp_path / "img.bin")
        assert p.returncode == 0, p.stdout + p.stderr
        info = json.loads(p.stdout.splitlines()[0])
        assert info["unet_calls"] == 5 and info["total_ms"] > 0
        assert p.stdout.splitlines()[1] == "closed: PfNative is closed"
        img = argb_image(tmp_path / "img.bin", info["width"], info["height"])
        assert img.shape == ref.shape and psnr(img, ref) >= 35, psnr(img, ref)


def test_generate_student_embedded_guidance(jni, mini_student_et_export, tmp_path):
    from pocketfusion.metrics import psnr
    from pocketfusion.runtimes.pipeline import RuntimePipeline

    pipe = RuntimePipeline(mini_student_et_export, "executorch", threads=1)
    ref = pipe(PROMPT, seed=1, guidance=6.0)  # the export's own steps
    p = harness(jni, "generate", mini_student_et_export, "", PROMPT, 0, 6.0, 1, "", tmp_path / "img.bin")  # 0: its own steps
    assert p.returncode == 0, p.stdout + p.stderr
    info = json.loads(p.stdout.splitlines()[0])
    assert info["unet_calls"] == pipe.sampler.default_steps
    assert psnr(argb_image(tmp_path / "img.bin", info["width"], info["height"]), ref) >= 35


def test_bad_input_is_an_illegal_argument_exception(jni, mini_et_export, tmp_path):
    p = harness(jni, "generate", tmp_path / "nowhere", "", PROMPT, 2, 3.0, 0, "", tmp_path / "x.bin")
    assert p.returncode == 2 and p.stdout.startswith("IllegalArgumentException: ") and len(p.stdout.strip().splitlines()) == 1
    p = harness(jni, "generate", mini_et_export, "heun", PROMPT, 2, 3.0, 0, "", tmp_path / "x.bin")
    assert p.returncode == 2 and "heun" in p.stdout
    np.save(tmp_path / "n.npy", np.zeros((3, 5), dtype=np.float32))
    p = harness(jni, "generate", mini_et_export, "", PROMPT, 2, 3.0, 0, tmp_path / "n.npy", tmp_path / "x.bin")
    assert p.returncode == 2 and p.stdout.startswith("IllegalArgumentException: "), p.stdout + p.stderr
