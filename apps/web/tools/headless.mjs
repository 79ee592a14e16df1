// Run the page in headless Chromium and read its result over the DevTools protocol (no npm packages: Node's
// WebSocket, `node --experimental-websocket` on Node 20):
//
//   node --experimental-websocket apps/web/tools/headless.mjs URL [--out result.json] [--screenshot page.png]
//        [--chromium PATH] [--timeout SECONDS] [--size 1000,700]
//
// URL is the page with its query (e.g. http://127.0.0.1:8000/?prompt=...&run=1); the script waits for the page's
// window.pfResult (the first image: pixels, per-stage timings), writes it as JSON, then a screenshot of the page.
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const args = process.argv.slice(2);
const opt = (name, def) => { const i = args.indexOf(name); return i >= 0 ? args.splice(i, 2)[1] : def; };
const out = opt("--out", null), shot = opt("--screenshot", null), chromium = opt("--chromium", "chromium");
const timeout = Number(opt("--timeout", "600")) * 1000, size = opt("--size", "1000,700");
const url = args[0];
if (!url || typeof WebSocket === "undefined") {
  console.error(url ? "error: this Node has no WebSocket (Node 20: run with --experimental-websocket)" : "usage: headless.mjs URL [--out F] [--screenshot F]");
  process.exit(2);
}

const profile = mkdtempSync(join(tmpdir(), "pf-chromium-"));
const browser = spawn(chromium, ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run", "--disable-extensions",
  "--remote-debugging-port=0", `--user-data-dir=${profile}`, `--window-size=${size}`, "about:blank"], { stdio: ["ignore", "ignore", "pipe"] });
const cleanup = () => { try { browser.kill("SIGKILL"); } catch {} try { rmSync(profile, { recursive: true, force: true }); } catch {} };
const fail = (msg) => { console.error(`error: ${msg}`); cleanup(); process.exit(1); };
const timer = setTimeout(() => fail(`no result within ${timeout / 1000} s`), timeout);
browser.on("error", (e) => fail(`cannot start ${chromium}: ${e.message}`));

const endpoint = await new Promise((resolve) => {
  let err = "";
  browser.stderr.on("data", (d) => {
    err += d;
    const m = err.match(/DevTools listening on (ws:\/\/\S+)/);
    if (m) resolve(m[1]);
  });
  browser.on("exit", (code) => fail(`chromium exited (${code}): ${err.trim().split("\n").slice(-3).join(" | ")}`));
});

const ws = new WebSocket(endpoint);
await new Promise((r, j) => { ws.onopen = r; ws.onerror = () => j(new Error("DevTools connection failed")); });
let nextId = 1;
const pending = new Map();
ws.onmessage = (ev) => {
  const msg = JSON.parse(ev.data);
  if (msg.id && pending.has(msg.id)) {
    const { resolve, reject } = pending.get(msg.id);
    pending.delete(msg.id);
    msg.error ? reject(new Error(msg.error.message)) : resolve(msg.result);
  } else if (msg.method === "Runtime.exceptionThrown") {
    console.error("page exception:", msg.params.exceptionDetails.exception?.description || msg.params.exceptionDetails.text);
  } else if (msg.method === "Runtime.consoleAPICalled" && ["error", "warning"].includes(msg.params.type)) {
    console.error(`page ${msg.params.type}:`, msg.params.args.map((a) => a.value ?? a.description).join(" "));
  }
};
const send = (method, params = {}, sessionId) => new Promise((resolve, reject) => {
  const id = nextId++;
  pending.set(id, { resolve, reject });
  ws.send(JSON.stringify({ id, method, params, ...(sessionId ? { sessionId } : {}) }));
});

try {
  const { targetId } = await send("Target.createTarget", { url: "about:blank" });
  const { sessionId } = await send("Target.attachToTarget", { targetId, flatten: true });
  await send("Runtime.enable", {}, sessionId);
  await send("Page.enable", {}, sessionId);
  const t0 = Date.now();
  await send("Page.navigate", { url }, sessionId);
  const wait = `new Promise((r) => { const w = () => (window.pfResult ? window.pfResult.then(r) : setTimeout(w, 50)); w(); })`;
  const res = await send("Runtime.evaluate", { expression: wait, awaitPromise: true, returnByValue: true }, sessionId);
  const result = { ...res.result.value, page_wall_ms: Date.now() - t0, user_agent: (await send("Browser.getVersion")).product };
  if (out) writeFileSync(out, JSON.stringify(result));
  if (shot) {
    const png = await send("Page.captureScreenshot", { format: "png" }, sessionId);
    writeFileSync(shot, Buffer.from(png.data, "base64"));
  }
  const { rgb, ...summary } = result;
  console.log(JSON.stringify(summary));
  clearTimeout(timer);
  ws.close();
  cleanup();
  process.exit(result.ok ? 0 : 1);
} catch (e) {
  fail(e.message);
}
