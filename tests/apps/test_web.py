"""apps/web (the static page on onnxruntime-web): its JavaScript core under Node against the Python side (tokens =
CLIPTokenizer's, every scheduler = runtimes/schedulers.py's on the same network outputs and noise, the generator =
torch's), and the page itself end to end in headless Chromium on the mini ONNX exports: the image of the Python
runtime pipeline for the same noise (PSNR >= 35 dB), per-stage timings, a screenshot. Skipped, with the reason,
without node, chromium, or onnxruntime-web (npm)."""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("torch_one_thread")

ROOT = Path(__file__).resolve().parents[2]
WEB = ROOT / "apps" / "web"
SCHEDULERS = ("ddim", "pndm", "euler", "euler-ancestral", "dpmpp-2m", "dpmpp-2m-karras", "lcm")
PROMPT = "a small red circle on a blue background, top left"


@functools.cache
def node_cmd() -> list[str] | None:
    """node with a global WebSocket (Node 20 needs --experimental-websocket), or None."""
    node = shutil.which("node")
    if node is None:
        return None
    for cmd in ([node], [node, "--experimental-websocket"]):
        p = subprocess.run([*cmd, "-e", "process.exit(typeof WebSocket === 'undefined' ? 1 : 0)"], capture_output=True)
        if p.returncode == 0:
            return cmd
    return [node]


def need_node() -> list[str]:
    if node_cmd() is None:
        pytest.skip("node is not installed (Debian: apt-get install nodejs)")
    return node_cmd()


def run_node(script: str, data: dict, tmp_path: Path) -> dict:
    (tmp_path / "harness.mjs").write_text(script)
    (tmp_path / "in.json").write_text(json.dumps(data))
    cmd = [*need_node(), str(tmp_path / "harness.mjs"), str(tmp_path / "in.json")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout)


HARNESS = """
import { readFileSync } from "node:fs";
const input = JSON.parse(readFileSync(process.argv[2], "utf8"));
const pf = await import(input.pf);
const out = {};
if (input.tokenizer) {
  const t = input.tokenizer, rd = (f) => { try { return readFileSync(t.dir + "/" + f, "utf8"); } catch { return null; } };
  const js = (f) => (rd(f) ? JSON.parse(rd(f)) : null);
  const tok = new pf.ClipTokenizer(js("vocab.json"), rd("merges.txt"), js("special_tokens_map.json"), js("tokenizer_config.json"));
  out.ids = t.prompts.map((p) => tok.encode(p, t.max_length));
}
if (input.randn) out.randn = input.randn.map(([seed, n]) => Array.from(new pf.TorchGenerator(seed).randn(n)));
if (input.cases) out.cases = input.cases.map((c) => {
  const s = pf.makeScheduler(c.config, c.name);
  s.reset();
  const ts = s.timesteps(c.steps), sig = s.initNoiseSigma(c.steps);
  let x = Float32Array.from(c.x0, (v) => v * sig), k = 0;
  for (let i = 0; i < ts.length; i++) {
    const inp = s.scaleModelInput(x, i, c.steps);
    const o = Float32Array.from(inp, (v, j) => 0.3 * v + c.bias[j]);
    x = s.step(o, i, x, c.steps, s.stochastic && i < ts.length - 1 ? Float32Array.from(c.noise[k++]) : null);
  }
  return { timesteps: Array.from(ts, Number), x: Array.from(x) };
});
console.log(JSON.stringify(out));
"""


def test_tokenizer_and_generator_match_python(mini_onnx_export, tmp_path):
    import torch
    from transformers import CLIPTokenizer

    tok_dir = mini_onnx_export / "tokenizer"
    tok = CLIPTokenizer.from_pretrained(str(tok_dir))
    prompts = [PROMPT, "A Large  WHITE triangle,on a green background!!", "", "circles' 3 big-red squares? (north) #1",
               "a small red circle on a blue background, top left and a large green square on a white background", "tab\there\nnewline"]
    res = run_node(HARNESS, {"pf": (WEB / "pf.js").as_uri(), "tokenizer": {"dir": str(tok_dir), "prompts": prompts, "max_length": 16},
                             "randn": [[0, 256], [7, 37], [2**32 + 5, 16]]}, tmp_path)
    for prompt, ids in zip(prompts, res["ids"]):
        assert ids == tok([prompt], padding="max_length", max_length=16, truncation=True).input_ids[0], prompt
    for (seed, n), got in zip([[0, 256], [7, 37], [2**32 + 5, 16]], res["randn"]):
        want = torch.randn(n, generator=torch.Generator().manual_seed(seed)).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_schedulers_match_runtime_schedulers(tmp_path, prediction):
    """Every scheduler of the page = runtimes/schedulers.py on the same network outputs (a fixed affine 'network') and
    the same noise: timesteps and final latents."""
    from pocketfusion.demo import configs
    from pocketfusion.runtimes.schedulers import from_config

    rng = np.random.default_rng(0)
    shape = (1, 4, 4, 4)
    cases, want = [], []
    for name in SCHEDULERS:
        for steps in (1, 4, 7):
            config = dict(configs.SCHEDULER, prediction_type=prediction)
            if name == "pndm" and steps == 1:
                continue
            x0 = rng.standard_normal(shape).astype(np.float32)
            bias = (0.1 * rng.standard_normal(shape)).astype(np.float32)
            noise = [rng.standard_normal(shape).astype(np.float32) for _ in range(steps)]
            s = from_config(config, name)
            s.reset()
            ts = s.timesteps(steps)
            x, k = x0 * s.init_noise_sigma(steps), 0
            for i, t in enumerate(ts):
                out = 0.3 * s.scale_model_input(x, t, steps) + bias
                nz = None
                if s.stochastic and i < len(ts) - 1:
                    nz, k = noise[k], k + 1
                x = s.step(out, t, x, steps, noise=nz)
            want.append((name, steps, ts, x))
            cases.append({"config": config, "name": name, "steps": steps, "x0": x0.ravel().tolist(), "bias": bias.ravel().tolist(),
                          "noise": [n.ravel().tolist() for n in noise]})
    res = run_node(HARNESS, {"pf": (WEB / "pf.js").as_uri(), "cases": cases}, tmp_path)
    for (name, steps, ts, x), got in zip(want, res["cases"]):
        np.testing.assert_allclose(got["timesteps"], np.asarray(ts, dtype=np.float64), rtol=1e-6, atol=1e-3, err_msg=f"{name} {steps}")
        np.testing.assert_allclose(np.asarray(got["x"]).reshape(shape), x, rtol=1e-4, atol=1e-4, err_msg=f"{name} {steps}")


# ------------------------------------------------------------------------------------------------ the page in Chromium


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        pytest.skip("no headless Chromium (Debian: apt-get install chromium)")
    return exe


@pytest.fixture(scope="module")
def ort_web_dist():
    from pocketfusion import app_build
    from pocketfusion.errors import UserError

    try:
        return app_build.ort_web_dist()
    except UserError as e:
        pytest.skip(str(e))


class Server:
    """The page folder over HTTP on 127.0.0.1 (a thread of this process)."""

    def __init__(self, folder: Path):
        handler = functools.partial(_QuietHandler, directory=str(folder))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def run_page(page: Path, query: str, tmp_path: Path, screenshot: Path | None = None) -> dict:
    server = Server(page)
    try:
        cmd = [*need_node(), str(WEB / "tools" / "headless.mjs"), f"{server.url}?{query}", "--chromium", chromium(),
               "--out", str(tmp_path / "result.json"), "--timeout", "300"]
        if screenshot:
            cmd += ["--screenshot", str(screenshot)]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    finally:
        server.close()
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    return json.loads((tmp_path / "result.json").read_text())


def page_image(res: dict) -> np.ndarray:
    return np.asarray(res["rgb"], dtype=np.uint8).reshape(res["height"], res["width"], 3)


def noise_for(pipe, steps: int, seed: int) -> np.ndarray:
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tuple(pipe.sampler.latent_shape), generator=g).numpy()
    extra = [torch.randn(x.shape, generator=g).numpy() for _ in range(steps - 1)] if pipe.scheduler.stochastic else []
    return np.stack([x, *extra]).astype(np.float32)


def test_page_student_matches_the_runtime_pipeline(mini_student_onnx_export, ort_web_dist, tmp_path):
    """The guidance-embedded LCM student in headless Chromium: the same noise (passed as .npy) gives the Python runtime
    pipeline's image; the timings are there; the screenshot is written."""
    from urllib.parse import urlencode

    from pocketfusion import app_build
    from pocketfusion.metrics import psnr
    from pocketfusion.runtimes.pipeline import RuntimePipeline

    chromium()
    page = tmp_path / "page"
    info = app_build.build_web(page, export=mini_student_onnx_export, ort_web=ort_web_dist)
    assert info["files"]["vendor/ort-wasm-simd-threaded.wasm"] > 0 and "export/manifest.json" in info["files"]
    pipe = RuntimePipeline(mini_student_onnx_export, "onnxruntime", threads=1)
    ref = pipe(PROMPT, steps=4, seed=3, guidance=6.0)
    np.save(page / "noise.npy", noise_for(pipe, 4, 3))
    q = urlencode({"prompt": PROMPT, "steps": 4, "guidance": 6.0, "seed": 99, "noise": "noise.npy", "run": 1})
    res = run_page(page, q, tmp_path, screenshot=tmp_path / "page.png")
    assert res["ok"], res
    img = page_image(res)
    assert img.shape == ref.shape and ref.std() > 1
    assert psnr(img, ref) >= 35, psnr(img, ref)
    t = res["timings"]
    assert t["scheduler"] == "lcm" and t["steps"] == 4 and t["calls"] == {"text_encoder": 1, "unet": 4, "vae_decoder": 1}
    assert t["total_ms"] > 0 and t["networks_ms"]["unet"] > 0
    assert (tmp_path / "page.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


SLOW_SCHEDULERS = ("euler-ancestral", "dpmpp-2m-karras", "pndm")


@pytest.mark.parametrize("scheduler", [None, *(pytest.param(s, marks=pytest.mark.slow) for s in SLOW_SCHEDULERS)])
def test_page_cfg_schedulers_match_the_runtime_pipeline(mini_onnx_export, ort_web_dist, scheduler, tmp_path):
    """The classifier-free-guided teacher (batch-2 U-Net) with the export's own scheduler (DDIM) and others: the same
    noise gives the same image; DDIM also from the seed alone (the page's generator is torch's)."""
    from urllib.parse import urlencode

    from pocketfusion import app_build
    from pocketfusion.metrics import psnr
    from pocketfusion.runtimes.pipeline import RuntimePipeline

    chromium()
    page = tmp_path / "page"
    app_build.build_web(page, export=mini_onnx_export, ort_web=ort_web_dist)
    pipe = RuntimePipeline(mini_onnx_export, "onnxruntime", threads=1, scheduler=scheduler)
    steps, seed = 6, 7
    ref = pipe(PROMPT, steps=steps, seed=seed, guidance=3.0)
    np.save(page / "noise.npy", noise_for(pipe, steps, seed))
    params = {"prompt": PROMPT, "steps": steps, "guidance": 3.0, "seed": seed, "run": 1, **({"scheduler": scheduler} if scheduler else {})}
    if scheduler is not None:
        params["noise"] = "noise.npy"
    res = run_page(page, urlencode(params), tmp_path)
    assert res["ok"], res
    assert res["timings"]["calls"]["unet"] == len(pipe.scheduler.timesteps(steps))
    assert psnr(page_image(res), ref) >= 35, (scheduler, psnr(page_image(res), ref))


def test_page_errors_are_shown(mini_onnx_export, ort_web_dist, tmp_path):
    """An unknown scheduler is the page's error line, not a hang."""
    from pocketfusion import app_build

    chromium()
    page = tmp_path / "page"
    app_build.build_web(page, export=mini_onnx_export, ort_web=ort_web_dist)
    server = Server(page)
    try:
        cmd = [*need_node(), str(WEB / "tools" / "headless.mjs"), f"{server.url}?scheduler=heun&run=1", "--chromium", chromium(),
               "--out", str(tmp_path / "r.json"), "--timeout", "120"]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=200)
    finally:
        server.close()
    res = json.loads((tmp_path / "r.json").read_text())
    assert p.returncode == 1 and not res["ok"] and "unknown scheduler heun" in res["error"]


def test_app_build_web_errors(tmp_path):
    from pocketfusion import app_build
    from pocketfusion.errors import UserError

    with pytest.raises(UserError, match="no ort.wasm.min.mjs"):
        app_build.build_web(tmp_path / "p", ort_web=tmp_path)
    assert not (tmp_path / "p").exists()
