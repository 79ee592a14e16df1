// pocketfusion in the browser: an ONNX export directory's text encoder, U-Net and VAE decoder in onnxruntime-web,
// everything between them here: CLIP BPE (the export's tokenizer/), the export's scheduler (runtimes/schedulers.py:
// ddim, pndm (PLMS), euler, euler-ancestral, dpmpp-2m, dpmpp-2m-karras, lcm), classifier-free guidance (batch-2 U-Net)
// or a student's embedded guidance (the scale as the U-Net's `guidance` input), torch's generator for the noise.
// It reads manifest.json only (component paths, tensor names and shapes, the sampler), as apps/native does.

// ------------------------------------------------------------------------------------------------ CLIP BPE tokenizer

function bytesToUnicode() {
  const bs = [];
  for (let b = 33; b <= 126; b++) bs.push(b);
  for (let b = 0xa1; b <= 0xac; b++) bs.push(b);
  for (let b = 0xae; b <= 0xff; b++) bs.push(b);
  const map = new Array(256);
  let n = 0;
  for (let b = 0; b < 256; b++) map[b] = String.fromCodePoint(bs.includes(b) ? b : 256 + n++);
  return map;
}

function special(map, config, key, fallback) {
  for (const j of [map, config]) {
    const v = j && j[key];
    if (typeof v === "string") return v;
    if (v && typeof v.content === "string") return v.content;
  }
  return fallback;
}

export class ClipTokenizer {
  // transformers' CLIPTokenizer without ftfy: control characters dropped, whitespace collapsed, lower-cased, CLIP's
  // pre-tokenizer regex, GPT-2's byte-to-unicode map, BPE by merge rank. (CJK characters are not split one by one.)
  constructor(vocab, merges, map, config) {
    this.vocab = new Map(Object.entries(vocab));
    this.ranks = new Map();
    merges.split(/\r?\n/).forEach((line, i) => {
      if ((i === 0 && line.startsWith("#version")) || !line.includes(" ")) return;
      this.ranks.set(line, this.ranks.size);
    });
    for (const [id, tok] of Object.entries((config && config.added_tokens_decoder) || {})) {
      if (tok && typeof tok.content === "string" && !this.vocab.has(tok.content)) this.vocab.set(tok.content, Number(id));
    }
    const need = (tok) => {
      if (!this.vocab.has(tok)) throw new Error(`the tokenizer has no token ${tok}`);
      return this.vocab.get(tok);
    };
    this.bos = need(special(map, config, "bos_token", "<|startoftext|>"));
    this.eos = need(special(map, config, "eos_token", "<|endoftext|>"));
    this.unk = need(special(map, config, "unk_token", "<|endoftext|>"));
    this.pad = need(special(map, config, "pad_token", "<|endoftext|>"));
    this.byteMap = bytesToUnicode();
    this.cache = new Map();
    this.pattern = /<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+/gu;
  }

  static async load(base) {
    const get = async (name, json) => {
      const r = await fetch(new URL(name, base));
      if (!r.ok) return null;
      return json ? r.json() : r.text();
    };
    const [vocab, merges, map, config] = await Promise.all([get("vocab.json", true), get("merges.txt", false),
      get("special_tokens_map.json", true), get("tokenizer_config.json", true)]);
    if (!vocab || merges === null) throw new Error(`no CLIP tokenizer at ${base} (vocab.json, merges.txt)`);
    return new ClipTokenizer(vocab, merges, map, config);
  }

  bpe(token) {
    if (this.cache.has(token)) return this.cache.get(token);
    let word = Array.from(token);
    word[word.length - 1] += "</w>";
    while (word.length > 1) {
      let best = Infinity, at = -1;
      for (let i = 0; i + 1 < word.length; i++) {
        const r = this.ranks.get(word[i] + " " + word[i + 1]);
        if (r !== undefined && r < best) { best = r; at = i; }
      }
      if (at < 0) break;
      const a = word[at], b = word[at + 1], merged = [];
      for (let i = 0; i < word.length;) {
        if (i + 1 < word.length && word[i] === a && word[i + 1] === b) { merged.push(a + b); i += 2; } else { merged.push(word[i]); i += 1; }
      }
      word = merged;
    }
    this.cache.set(token, word);
    return word;
  }

  tokenize(text) {
    let clean = "";
    for (const ch of text) {
      const c = ch.codePointAt(0);
      if (c === 0 || c === 0xfffd) continue;
      if (ch === "\t" || ch === "\n" || ch === "\r") clean += " ";
      else if (c < 0x20 || c === 0x7f || /\p{Cc}|\p{Cf}/u.test(ch)) continue;
      else clean += ch;
    }
    clean = clean.replace(/\s+/gu, " ").trim().toLowerCase();
    const out = [];
    const enc = new TextEncoder();
    for (const m of clean.matchAll(this.pattern)) {
      const bytes = enc.encode(m[0]);
      let s = "";
      for (const b of bytes) s += this.byteMap[b];
      out.push(...this.bpe(s));
    }
    return out;
  }

  encode(text, maxLength) {
    const ids = [this.bos];
    for (const t of this.tokenize(text)) {
      if (ids.length >= maxLength - 1) break;
      ids.push(this.vocab.has(t) ? this.vocab.get(t) : this.unk);
    }
    ids.push(this.eos);
    while (ids.length < maxLength) ids.push(this.pad);
    return ids;
  }
}

// ------------------------------------------------------------------------------------------------ torch's generator

// torch.randn(n, generator=torch.Generator().manual_seed(seed)) for n >= 16 (float32): MT19937, 24-bit uniforms,
// Box-Muller over blocks of 16 (the last block of a size not a multiple of 16 redrawn); as apps/native/src/rng.cpp.
export class TorchGenerator {
  constructor(seed) {
    this.mt = new Uint32Array(624);
    this.mt[0] = Number(BigInt(seed) & 0xffffffffn);
    for (let i = 1; i < 624; i++) {
      const p = this.mt[i - 1] ^ (this.mt[i - 1] >>> 30);
      this.mt[i] = (Math.imul(1812433253, p) + i) >>> 0;
    }
    this.i = 624;
  }

  next() {
    const mt = this.mt;
    if (this.i >= 624) {
      for (let k = 0; k < 624; k++) {
        const y = (mt[k] & 0x80000000) | (mt[(k + 1) % 624] & 0x7fffffff);
        mt[k] = mt[(k + 397) % 624] ^ (y >>> 1) ^ (y & 1 ? 0x9908b0df : 0);
      }
      this.i = 0;
    }
    let y = mt[this.i++];
    y ^= y >>> 11;
    y ^= (y << 7) & 0x9d2c5680;
    y ^= (y << 15) & 0xefc60000;
    y ^= y >>> 18;
    return y >>> 0;
  }

  uniform() { return Math.fround((this.next() & 0xffffff) / 16777216); }

  static fill16(d, o) {
    for (let j = 0; j < 8; j++) {
      const u1 = Math.fround(1 - d[o + j]), u2 = d[o + j + 8];
      const radius = Math.fround(Math.sqrt(Math.fround(-2 * Math.fround(Math.log(u1)))));
      const theta = Math.fround(2 * Math.PI * u2);
      d[o + j] = radius * Math.fround(Math.cos(theta));
      d[o + j + 8] = radius * Math.fround(Math.sin(theta));
    }
  }

  randn(n) {
    if (n < 16) throw new Error("TorchGenerator.randn needs at least 16 elements");
    const d = new Float32Array(n);
    for (let i = 0; i < n; i++) d[i] = this.uniform();
    for (let i = 0; i + 15 < n; i += 16) TorchGenerator.fill16(d, i);
    if (n % 16) {
      for (let k = 0; k < 16; k++) d[n - 16 + k] = this.uniform();
      TorchGenerator.fill16(d, n - 16);
    }
    return d;
  }
}

// ------------------------------------------------------------------------------------------------ schedulers

const f32 = Math.fround;
const COMMON = { num_train_timesteps: 1000, beta_start: 0.0001, beta_end: 0.02, beta_schedule: "linear", trained_betas: null };
// name -> [diffusers class, values the name forces, values it assumes] (pocketfusion/scheduler_names.py)
const NAMES = {
  ddim: ["DDIMScheduler", {}, {}],
  pndm: ["PNDMScheduler", {}, { skip_prk_steps: true }],
  euler: ["EulerDiscreteScheduler", {}, {}],
  "euler-ancestral": ["EulerAncestralDiscreteScheduler", {}, {}],
  "dpmpp-2m": ["DPMSolverMultistepScheduler", { algorithm_type: "dpmsolver++", solver_order: 2, use_karras_sigmas: false }, {}],
  "dpmpp-2m-karras": ["DPMSolverMultistepScheduler", { algorithm_type: "dpmsolver++", solver_order: 2, use_karras_sigmas: true }, {}],
  lcm: ["LCMScheduler", {}, {}],
};
const CLASS_NAMES = { DDIMScheduler: "ddim", PNDMScheduler: "pndm", EulerDiscreteScheduler: "euler",
  EulerAncestralDiscreteScheduler: "euler-ancestral", DPMSolverMultistepScheduler: "dpmpp-2m", LCMScheduler: "lcm" };
const DEFAULTS = {
  ddim: { ...COMMON, clip_sample: true, set_alpha_to_one: true, steps_offset: 0, prediction_type: "epsilon", thresholding: false,
    clip_sample_range: 1.0, timestep_spacing: "leading", rescale_betas_zero_snr: false },
  pndm: { ...COMMON, skip_prk_steps: false, set_alpha_to_one: false, prediction_type: "epsilon", timestep_spacing: "leading", steps_offset: 0 },
  euler: { ...COMMON, prediction_type: "epsilon", interpolation_type: "linear", use_karras_sigmas: false, use_exponential_sigmas: false,
    use_beta_sigmas: false, sigma_min: null, sigma_max: null, timestep_spacing: "linspace", timestep_type: "discrete", steps_offset: 0,
    rescale_betas_zero_snr: false, final_sigmas_type: "zero" },
  "euler-ancestral": { ...COMMON, prediction_type: "epsilon", timestep_spacing: "linspace", steps_offset: 0, rescale_betas_zero_snr: false },
  "dpmpp-2m": { ...COMMON, solver_order: 2, prediction_type: "epsilon", thresholding: false, algorithm_type: "dpmsolver++",
    solver_type: "midpoint", lower_order_final: true, euler_at_final: false, use_karras_sigmas: false, use_exponential_sigmas: false,
    use_beta_sigmas: false, use_lu_lambdas: false, use_flow_sigmas: false, final_sigmas_type: "zero", lambda_min_clipped: -Infinity,
    variance_type: null, timestep_spacing: "linspace", steps_offset: 0, rescale_betas_zero_snr: false, use_dynamic_shifting: false },
  lcm: { ...COMMON, beta_start: 0.00085, beta_end: 0.012, beta_schedule: "scaled_linear", original_inference_steps: 50, clip_sample: false,
    clip_sample_range: 1.0, set_alpha_to_one: true, steps_offset: 0, prediction_type: "epsilon", thresholding: false,
    timestep_spacing: "leading", timestep_scaling: 10.0, rescale_betas_zero_snr: false },
};
DEFAULTS["dpmpp-2m-karras"] = DEFAULTS["dpmpp-2m"];
// option -> the only values honoured (anything else is refused, never substituted)
const REFUSED = {
  ddim: { thresholding: [false], rescale_betas_zero_snr: [false] },
  pndm: { skip_prk_steps: [true] },
  euler: { use_exponential_sigmas: [false], use_beta_sigmas: [false], interpolation_type: ["linear"], final_sigmas_type: ["zero", "sigma_min"],
    rescale_betas_zero_snr: [false], timestep_type: ["discrete"] },
  "euler-ancestral": { rescale_betas_zero_snr: [false] },
  "dpmpp-2m": { thresholding: [false], use_lu_lambdas: [false], use_flow_sigmas: [false], use_dynamic_shifting: [false], variance_type: [null],
    use_exponential_sigmas: [false], use_beta_sigmas: [false], final_sigmas_type: ["zero", "sigma_min"], rescale_betas_zero_snr: [false],
    solver_type: ["midpoint", "heun", "logrho", "bh1", "bh2"], algorithm_type: ["dpmsolver++"], solver_order: [2] },
  lcm: { thresholding: [false], rescale_betas_zero_snr: [false] },
};
REFUSED["dpmpp-2m-karras"] = REFUSED["dpmpp-2m"];

function torchLinspace(start, end, n) { // float32, as torch (diffusers builds its betas with it)
  const s = f32(start), e = f32(end), step = f32(e - s) / Math.max(n - 1, 1);
  const out = new Float64Array(n);
  for (let i = 0; i < n; i++) out[i] = f32(i < Math.floor(n / 2) ? s + step * i : e - step * (n - 1 - i));
  return out;
}

function alphasCumprod(o) {
  const T = o.num_train_timesteps;
  let betas;
  if (o.trained_betas) betas = Float64Array.from(o.trained_betas, f32);
  else if (o.beta_schedule === "scaled_linear") betas = torchLinspace(Math.sqrt(o.beta_start), Math.sqrt(o.beta_end), T).map((b) => f32(b * b));
  else if (o.beta_schedule === "linear") betas = torchLinspace(o.beta_start, o.beta_end, T);
  else if (o.beta_schedule === "squaredcos_cap_v2") {
    const ab = (t) => Math.cos(((t + 0.008) / 1.008) * Math.PI / 2) ** 2;
    betas = Float64Array.from({ length: T }, (_, i) => f32(Math.min(1 - ab((i + 1) / T) / ab(i / T), 0.999)));
  } else throw new Error(`beta_schedule ${o.beta_schedule} is not supported (linear, scaled_linear, squaredcos_cap_v2)`);
  const ac = new Float64Array(T);
  let p = 1;
  for (let i = 0; i < T; i++) { p *= f32(1 - betas[i]); ac[i] = f32(p); }
  return ac;
}

function linspace(a, b, n) { return Array.from({ length: n }, (_, i) => (n === 1 ? a : a + ((b - a) * i) / (n - 1))); }
const roundHalfEven = (v) => { const r = Math.round(v); return Math.abs(v % 1) === 0.5 && r % 2 ? r - 1 : r; };

function spacing(o, steps, round = true) { // descending timesteps of diffusers' timestep_spacing
  const T = o.num_train_timesteps;
  if (o.timestep_spacing === "linspace") return linspace(0, T - 1, steps).map((v) => (round ? roundHalfEven(v) : v)).reverse();
  if (o.timestep_spacing === "leading") return Array.from({ length: steps }, (_, i) => i * Math.floor(T / steps) + o.steps_offset).reverse();
  if (o.timestep_spacing === "trailing") {
    const out = [];
    for (let v = T; v > 0; v -= T / steps) out.push(roundHalfEven(v) - 1);
    return out;
  }
  throw new Error(`timestep_spacing ${o.timestep_spacing} is not supported (leading, trailing, linspace)`);
}

function interp(x, ys) { // np.interp(x, arange(len(ys)), ys)
  if (x <= 0) return ys[0];
  if (x >= ys.length - 1) return ys[ys.length - 1];
  const i = Math.floor(x), w = x - i;
  return ys[i] + (ys[i + 1] - ys[i]) * w;
}

function sigmaToT(sigma, logSigmas) {
  const ls = Math.log(Math.max(sigma, 1e-10));
  let low = -1;
  for (let i = 0; i < logSigmas.length; i++) if (ls - logSigmas[i] >= 0) low = i;
  low = Math.min(Math.max(low, 0), logSigmas.length - 2);
  // np.cumsum(dists >= 0).argmax(): the last index where dists >= 0 (log sigmas ascend)
  const w = Math.min(Math.max((logSigmas[low] - ls) / (logSigmas[low] - logSigmas[low + 1]), 0), 1);
  return (1 - w) * low + w * (low + 1);
}

function karras(lo, hi, steps) {
  const r = linspace(0, 1, steps);
  return r.map((v) => (hi ** (1 / 7) + v * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7);
}

// x0 from the network output at cumulative alpha a (per element)
function x0Of(prediction, out, x, a) {
  const r = new Float32Array(x.length), sa = Math.sqrt(a), sb = Math.sqrt(1 - a);
  for (let k = 0; k < x.length; k++) {
    r[k] = prediction === "epsilon" ? (x[k] - sb * out[k]) / sa : prediction === "v_prediction" ? sa * x[k] - sb * out[k] : out[k];
  }
  return r;
}

export function schedulerNameOf(config) {
  const cls = config._class_name || "DDIMScheduler";
  if (!(cls in CLASS_NAMES)) throw new Error(`no scheduler for ${cls} (supported: ${Object.keys(CLASS_NAMES).join(", ")})`);
  const name = CLASS_NAMES[cls];
  return name === "dpmpp-2m" && config.use_karras_sigmas ? "dpmpp-2m-karras" : name;
}

// The scheduler `name` (null: the config's own) built from a diffusers scheduler config. The loop drives it by
// step index: timesteps(steps), initNoiseSigma(steps), scaleModelInput(x, i), step(out, i, x, noise).
export function makeScheduler(config, name = null) {
  let values = { ...config };
  if (name === null || name === undefined || name === "") name = schedulerNameOf(config);
  else {
    if (!(name in NAMES)) throw new Error(`unknown scheduler ${name}; available: ${Object.keys(NAMES).join(", ")}`);
    values = { ...NAMES[name][2], ...config, ...NAMES[name][1] };
  }
  const o = { ...DEFAULTS[name] };
  for (const k of Object.keys(o)) if (k in values) o[k] = values[k];
  for (const [k, ok] of Object.entries(REFUSED[name])) {
    if (!ok.includes(o[k] === undefined ? null : o[k])) throw new Error(`${NAMES[name][0]} with ${k}=${JSON.stringify(o[k])} is not supported by the page's ${name} scheduler`);
  }
  const ac = alphasCumprod(o), T = o.num_train_timesteps;
  const S = { name, options: o, stochastic: name === "euler-ancestral" || name === "lcm", prediction: o.prediction_type };
  if (!["epsilon", "v_prediction", "sample"].includes(S.prediction)) throw new Error(`prediction_type ${S.prediction} is not supported`);
  S.initNoiseSigma = () => 1;
  S.scaleModelInput = (x) => x;

  if (name === "ddim") {
    const finalAlpha = o.set_alpha_to_one ? 1 : ac[0];
    S.timesteps = (steps) => spacing(o, steps);
    S.step = (out, i, x, steps) => {
      const t = S.timesteps(steps)[i], prev = t - Math.floor(T / steps);
      const a = ac[t], ap = prev >= 0 ? ac[prev] : finalAlpha;
      const x0 = x0Of(S.prediction, out, x, a), r = new Float32Array(x.length);
      for (let k = 0; k < x.length; k++) {
        const eps = S.prediction === "epsilon" ? out[k] : S.prediction === "v_prediction" ? Math.sqrt(a) * out[k] + Math.sqrt(1 - a) * x[k]
          : (x[k] - Math.sqrt(a) * x0[k]) / Math.sqrt(1 - a);
        const c = o.clip_sample ? Math.min(Math.max(x0[k], -o.clip_sample_range), o.clip_sample_range) : x0[k];
        r[k] = Math.sqrt(ap) * c + Math.sqrt(1 - ap) * eps;
      }
      return r;
    };
  } else if (name === "pndm") { // PLMS (skip_prk_steps)
    const finalAlpha = o.set_alpha_to_one ? 1 : ac[0];
    S.timesteps = (steps) => {
      const base = spacing(o, steps).reverse();
      return [...base.slice(0, -1), base[base.length - 2], base[base.length - 1]].reverse();
    };
    let ets = [], curSample = null;
    S.reset = () => { ets = []; curSample = null; };
    S.step = (out, counter, x, steps) => {
      let t = S.timesteps(steps)[counter], prev = t - Math.floor(T / steps), sample = x, e;
      if (counter !== 1) { ets = ets.slice(-3); ets.push(out); } else { prev = t; t = t + Math.floor(T / steps); }
      const n = ets.length, m = new Float32Array(x.length);
      for (let k = 0; k < x.length; k++) {
        if (n === 1 && counter === 0) e = ets[0][k];
        else if (n === 1 && counter === 1) e = (out[k] + ets[0][k]) / 2;
        else if (n === 2) e = (3 * ets[1][k] - ets[0][k]) / 2;
        else if (n === 3) e = (23 * ets[2][k] - 16 * ets[1][k] + 5 * ets[0][k]) / 12;
        else e = (55 * ets[3][k] - 59 * ets[2][k] + 37 * ets[1][k] - 9 * ets[0][k]) / 24;
        m[k] = e;
      }
      if (n === 1 && counter === 0) curSample = x;
      else if (n === 1 && counter === 1) { sample = curSample; curSample = null; }
      const a = ac[t], ap = prev >= 0 ? ac[prev] : finalAlpha, b = 1 - a, bp = 1 - ap;
      const denom = a * Math.sqrt(bp) + Math.sqrt(a * b * ap), r = new Float32Array(x.length);
      for (let k = 0; k < x.length; k++) {
        const eo = S.prediction === "v_prediction" ? Math.sqrt(a) * m[k] + Math.sqrt(b) * sample[k] : m[k];
        r[k] = Math.sqrt(ap / a) * sample[k] - ((ap - a) * eo) / denom;
      }
      return r;
    };
  } else if (name === "euler" || name === "euler-ancestral") {
    const full = Array.from(ac, (a) => Math.sqrt((1 - a) / a));
    const cache = new Map();
    const sched = (steps) => {
      if (!cache.has(steps)) {
        let ts = spacing(o, steps, false).map(f32);
        let sigmas = ts.map((t) => interp(t, full));
        if (o.use_karras_sigmas) {
          sigmas = karras(o.sigma_min ?? sigmas[sigmas.length - 1], o.sigma_max ?? sigmas[0], steps);
          const logs = full.map(Math.log);
          ts = sigmas.map((s) => f32(sigmaToT(s, logs)));
        }
        sigmas.push(o.final_sigmas_type === "sigma_min" ? Math.sqrt((1 - ac[0]) / ac[0]) : 0);
        cache.set(steps, { ts, sigmas: sigmas.map(f32) });
      }
      return cache.get(steps);
    };
    S.timesteps = (steps) => sched(steps).ts;
    S.initNoiseSigma = (steps) => {
      const top = Math.max(...sched(steps).sigmas);
      return ["linspace", "trailing"].includes(o.timestep_spacing) ? top : Math.sqrt(top * top + 1);
    };
    S.scaleModelInput = (x, i, steps) => { const s = sched(steps).sigmas[i], c = Math.sqrt(s * s + 1); return x.map((v) => v / c); };
    const x0s = (out, x, s, k) => (S.prediction === "epsilon" ? x[k] - s * out[k]
      : S.prediction === "v_prediction" ? out[k] * (-s / Math.sqrt(s * s + 1)) + x[k] / (s * s + 1) : out[k]);
    S.step = (out, i, x, steps, noise) => {
      const { sigmas } = sched(steps), s = sigmas[i], nx = sigmas[i + 1], r = new Float32Array(x.length);
      if (name === "euler") {
        for (let k = 0; k < x.length; k++) r[k] = x[k] + ((x[k] - x0s(out, x, s, k)) / s) * (nx - s);
        return r;
      }
      const up = Math.sqrt((nx * nx * (s * s - nx * nx)) / (s * s)), down = Math.sqrt(nx * nx - up * up);
      if (up !== 0 && !noise) throw new Error("euler-ancestral needs noise at every step but the last");
      for (let k = 0; k < x.length; k++) r[k] = x[k] + ((x[k] - x0s(out, x, s, k)) / s) * (down - s) + (up !== 0 ? noise[k] * up : 0);
      return r;
    };
  } else if (name === "dpmpp-2m" || name === "dpmpp-2m-karras") {
    const full = Array.from(ac, (a) => Math.sqrt((1 - a) / a));
    const cache = new Map();
    const sched = (steps) => {
      if (!cache.has(steps)) {
        const lam = Array.from(ac, (a) => Math.log(Math.sqrt(a)) - Math.log(Math.sqrt(1 - a)));
        const last = T - lam.slice().reverse().filter((l) => l < o.lambda_min_clipped).length;
        let ts;
        if (o.timestep_spacing === "linspace") ts = linspace(0, last - 1, steps + 1).map(roundHalfEven).reverse().slice(0, -1);
        else if (o.timestep_spacing === "leading") ts = Array.from({ length: steps + 1 }, (_, i) => i * Math.floor(last / (steps + 1))).reverse().slice(0, -1).map((v) => v + o.steps_offset);
        else if (o.timestep_spacing === "trailing") { ts = []; for (let v = last; v > 0; v -= T / steps) ts.push(roundHalfEven(v) - 1); }
        else throw new Error(`timestep_spacing ${o.timestep_spacing} is not supported`);
        let sigmas;
        if (o.use_karras_sigmas) {
          sigmas = karras(full[0], full[full.length - 1], steps);
          const logs = full.map(Math.log);
          ts = sigmas.map((s) => sigmaToT(s, logs));
          if (o.beta_schedule !== "squaredcos_cap_v2") ts = ts.map(roundHalfEven);
        } else sigmas = ts.map((t) => interp(t, full));
        sigmas.push(o.final_sigmas_type === "sigma_min" ? Math.sqrt((1 - ac[0]) / ac[0]) : 0);
        cache.set(steps, { ts, sigmas: sigmas.map(f32) });
      }
      return cache.get(steps);
    };
    const alphaSigma = (s) => { const a = 1 / Math.sqrt(s * s + 1), sg = s * a; return [a, sg, Math.log(a) - Math.log(sg)]; };
    let outputs = [];
    S.reset = () => { outputs = []; };
    S.timesteps = (steps) => sched(steps).ts;
    S.step = (out, i, x, steps) => {
      const { sigmas } = sched(steps), n = sigmas.length - 1;
      const finalFirst = i === n - 1 && (o.euler_at_final || (o.lower_order_final && n < 15) || o.final_sigmas_type === "zero");
      const [a0, s0, l0] = alphaSigma(sigmas[i]);
      const x0 = new Float32Array(x.length);
      for (let k = 0; k < x.length; k++) {
        x0[k] = S.prediction === "epsilon" ? (x[k] - s0 * out[k]) / a0 : S.prediction === "v_prediction" ? a0 * x[k] - s0 * out[k] : out[k];
      }
      outputs = [...outputs.slice(-1), x0];
      const [at, st, lt] = alphaSigma(sigmas[i + 1]);
      const h = lt - l0, em1 = Math.exp(-h) - 1, r = new Float32Array(x.length);
      if (outputs.length < 2 || finalFirst) {
        for (let k = 0; k < x.length; k++) r[k] = (st / s0) * x[k] - at * em1 * x0[k];
      } else {
        const l1 = alphaSigma(sigmas[i - 1])[2], r0 = (l0 - l1) / h, [m1, m0] = outputs;
        for (let k = 0; k < x.length; k++) {
          const d1 = (1 / r0) * (m0[k] - m1[k]);
          r[k] = (st / s0) * x[k] - at * em1 * m0[k] + (o.solver_type === "heun" ? at * (em1 / h + 1) * d1 : -0.5 * at * em1 * d1);
        }
      }
      return r;
    };
  } else if (name === "lcm") {
    const orig = o.original_inference_steps, k = Math.floor(T / orig);
    S.timesteps = (steps) => {
      if (steps < 1 || steps > orig) throw new Error(`the LCM scheduler takes 1..${orig} steps, got ${steps}`);
      const origin = Array.from({ length: orig }, (_, i) => (i + 1) * k - 1).reverse();
      return Array.from({ length: steps }, (_, i) => origin[Math.floor((i * orig) / steps)]);
    };
    S.step = (out, i, x, steps, noise) => {
      const ts = S.timesteps(steps), t = ts[i];
      const x0 = x0Of(S.prediction, out, x, ac[t]);
      const s = f32(t * o.timestep_scaling), sd2 = 0.25;
      const cSkip = sd2 / (s * s + sd2), cOut = s / Math.sqrt(s * s + sd2);
      const last = i === ts.length - 1, ap = last ? 0 : ac[ts[i + 1]], r = new Float32Array(x.length);
      if (!last && !noise) throw new Error("lcm needs noise at every step but the last");
      for (let q = 0; q < x.length; q++) {
        const c = o.clip_sample ? Math.min(Math.max(x0[q], -o.clip_sample_range), o.clip_sample_range) : x0[q];
        const d = cOut * c + cSkip * x[q];
        r[q] = last ? d : Math.sqrt(ap) * d + Math.sqrt(1 - ap) * noise[q];
      }
      return r;
    };
  }
  if (!S.reset) S.reset = () => {};
  return S;
}

// ------------------------------------------------------------------------------------------------ .npy

export function parseNpy(buffer) { // float32 little-endian, C order
  const u8 = new Uint8Array(buffer);
  if (u8[0] !== 0x93 || String.fromCharCode(...u8.slice(1, 6)) !== "NUMPY") throw new Error("not a .npy file");
  const major = u8[6], dv = new DataView(buffer);
  const hlen = major === 1 ? dv.getUint16(8, true) : dv.getUint32(8, true), start = major === 1 ? 10 : 12;
  const header = new TextDecoder().decode(u8.slice(start, start + hlen));
  if (!/'descr':\s*'<f4'/.test(header) || /'fortran_order':\s*True/.test(header)) throw new Error(`.npy must be float32 C-order: ${header}`);
  const shape = header.match(/'shape':\s*\(([^)]*)\)/)[1].split(",").filter((s) => s.trim()).map(Number);
  return { shape, data: new Float32Array(buffer.slice(start + hlen)) };
}

// ------------------------------------------------------------------------------------------------ the pipeline

const NETWORKS = ["text_encoder", "unet", "vae_decoder"];

export class Pipeline {
  static async load(ort, exportUrl, { onStatus = () => {} } = {}) {
    const base = new URL(exportUrl, location.href);
    if (!base.href.endsWith("/")) base.href += "/";
    const t0 = performance.now();
    const manifest = await (await fetch(new URL("manifest.json", base))).json();
    const sampler = manifest.sampler;
    if (!sampler) throw new Error("the export records no sampler (export a full pipeline)");
    if (sampler.time_ids || sampler.tokenizer_2) throw new Error("SDXL exports are not supported by the page");
    const comps = {};
    for (const n of NETWORKS) {
      comps[n] = manifest.components.find((c) => c.name === n && c.target === "onnx");
      if (!comps[n]) throw new Error(`the export has no ONNX ${n} (export with --target onnx)`);
    }
    const tokenizer = await ClipTokenizer.load(new URL((sampler.tokenizer || "tokenizer") + "/", base));
    // diffusers writes Infinity / NaN (not JSON) for some options, e.g. lambda_min_clipped
    const schedText = await (await fetch(new URL((sampler.scheduler || "scheduler") + "/scheduler_config.json", base))).text();
    const schedulerConfig = JSON.parse(schedText.replace(/\bNaN\b/g, "null").replace(/-Infinity\b/g, "-1e999").replace(/\bInfinity\b/g, "1e999"));
    const sessions = {}, loadMs = {};
    for (const n of NETWORKS) {
      onStatus(`loading ${n}`);
      const t = performance.now();
      const bytes = await (await fetch(new URL(comps[n].path, base))).arrayBuffer();
      sessions[n] = await ort.InferenceSession.create(bytes, { executionProviders: ["wasm"], graphOptimizationLevel: "all" });
      loadMs[n] = performance.now() - t;
    }
    return new Pipeline(ort, manifest, comps, tokenizer, schedulerConfig, sessions, { ...loadMs, total: performance.now() - t0 });
  }

  constructor(ort, manifest, comps, tokenizer, schedulerConfig, sessions, loadMs) {
    Object.assign(this, { ort, manifest, comps, tokenizer, schedulerConfig, sessions, loadMs, sampler: manifest.sampler });
    this.negative = null;
  }

  spec(component, name) { return this.comps[component].inputs.find((i) => i.name === name); }

  tensor(component, name, data, shape) {
    const s = this.spec(component, name), dtype = s ? s.dtype : "float32";
    if (dtype === "int32") return new this.ort.Tensor("int32", Int32Array.from(data), shape);
    if (dtype === "int64") return new this.ort.Tensor("int64", BigInt64Array.from(data, (v) => BigInt(v)), shape);
    return new this.ort.Tensor("float32", Float32Array.from(data), shape);
  }

  async run(name, feeds) {
    const t = performance.now();
    const out = await this.sessions[name].run(feeds);
    this.netMs[name] = (this.netMs[name] || 0) + performance.now() - t;
    this.calls[name] = (this.calls[name] || 0) + 1;
    return out;
  }

  async encode(prompt) {
    const L = this.sampler.max_length;
    const ids = this.tokenizer.encode(prompt, L);
    const out = await this.run("text_encoder", { [this.comps.text_encoder.inputs[0].name]: this.tensor("text_encoder", this.comps.text_encoder.inputs[0].name, ids, [1, L]) });
    return (out.last_hidden_state || Object.values(out)[0]).data;
  }

  // One image: {pixels (RGB bytes), width, height, timings}. noise: null (draw from seed as torch does) or a
  // Float32Array holding the initial latents then each stochastic step's noise (pf-run's --noise order).
  async generate({ prompt, steps = null, guidance = 4.0, seed = 0, scheduler = null, noise = null, onStep = () => {} }) {
    const tStart = performance.now();
    this.netMs = {};
    this.calls = {};
    const timings = {};
    steps = steps || this.sampler.default_steps;
    const sched = makeScheduler(this.schedulerConfig, scheduler);
    const shape = this.sampler.latent_shape, n = shape.reduce((a, b) => a * b, 1);
    const cfg = this.sampler.guidance === "cfg";
    let t = performance.now();
    const cond = await this.encode(prompt);
    if (cfg && !this.negative) this.negative = await this.encode("");
    timings.text_ms = performance.now() - t;
    const hidden = cfg ? Float32Array.from([...this.negative, ...cond]) : cond;
    const hShape = [...this.comps.unet.inputs.find((i) => i.name === "encoder_hidden_states").shape];
    hShape[0] = cfg ? 2 : 1;
    const b = cfg ? 2 : 1;
    const gen = new TorchGenerator(seed);
    let noiseAt = 0;
    const draw = () => {
      if (noise) {
        if ((noiseAt + 1) * n > noise.length) throw new Error(`the noise holds ${noise.length / n} latents; more are needed`);
        return noise.slice(noiseAt++ * n, noiseAt * n);
      }
      return gen.randn(n);
    };
    sched.reset();
    const ts = sched.timesteps(steps);
    const sigma0 = sched.initNoiseSigma(steps);
    let x = draw().map((v) => v * sigma0);
    const hasGuidance = !cfg && this.spec("unet", "guidance");
    t = performance.now();
    for (let i = 0; i < ts.length; i++) {
      const inp = sched.scaleModelInput(x, i, steps);
      const feeds = {
        sample: this.tensor("unet", "sample", cfg ? [...inp, ...inp] : inp, [b, ...shape.slice(1)]),
        timestep: this.tensor("unet", "timestep", new Array(b).fill(ts[i]), [b]),
        encoder_hidden_states: this.tensor("unet", "encoder_hidden_states", hidden, hShape),
      };
      if (hasGuidance) feeds.guidance = this.tensor("unet", "guidance", [guidance], [1]);
      const res = await this.run("unet", feeds);
      const o = (res.noise_pred || Object.values(res)[0]).data;
      let out = o;
      if (cfg) {
        out = new Float32Array(n);
        for (let k = 0; k < n; k++) out[k] = o[k] + guidance * (o[n + k] - o[k]);
      }
      const stepNoise = sched.stochastic && i < ts.length - 1 ? draw() : null;
      x = sched.step(out, i, x, steps, stepNoise);
      onStep(i + 1, ts.length);
    }
    timings.denoise_ms = performance.now() - t;
    t = performance.now();
    const lat = x.map((v) => v / this.sampler.scaling_factor);
    const img = await this.run("vae_decoder", { latent: this.tensor("vae_decoder", "latent", lat, shape) });
    const im = img.image || Object.values(img)[0];
    timings.decode_ms = performance.now() - t;
    const [, C, H, W] = im.dims, d = im.data, pixels = new Uint8ClampedArray(H * W * 4);
    for (let y = 0; y < H; y++) for (let xx = 0; xx < W; xx++) {
      for (let c = 0; c < 3; c++) {
        const v = Math.min(Math.max(f32(d[(c * H + y) * W + xx] / 2 + 0.5), 0), 1);
        pixels[(y * W + xx) * 4 + c] = Math.floor(f32(v * 255 + 0.5));
      }
      pixels[(y * W + xx) * 4 + 3] = 255;
      if (C < 3) throw new Error("the VAE decoder's image has fewer than 3 channels");
    }
    timings.total_ms = performance.now() - tStart;
    timings.networks_ms = { ...this.netMs };
    timings.calls = { ...this.calls };
    timings.outside_ms = timings.total_ms - Object.values(this.netMs).reduce((a, v) => a + v, 0);
    timings.steps = ts.length;
    timings.scheduler = sched.name;
    return { pixels, width: W, height: H, timings };
  }
}
