import CoreML
import Foundation

public enum PipelineError: Error, CustomStringConvertible {
    case bad(String)
    public var description: String { if case let .bad(m) = self { return m }; return "error" }
}

/// Text -> image over an export directory's Core ML networks (coreml/text_encoder, unet, vae_decoder .mlpackage), the
/// loop of runtimes/pipeline.py: CFG (a batch-2 U-Net, the empty prompt encoded once) or a student's embedded guidance
/// (the scale as the U-Net's `guidance` input). Reads manifest.json only. Never built or run (no Xcode here).
public final class Pipeline {
    public struct Timings { public var textMs = 0.0, unetMs = 0.0, vaeMs = 0.0, totalMs = 0.0, unetCalls = 0 }

    let sampler: [String: Any]
    let models: [String: MLModel]
    let unetInputs: [String: [Int]]
    let tokenizer: ClipTokenizer
    let schedulerConfig: [String: Any]
    var negative: [Float]?

    public init(exportDir: URL, computeUnits: MLComputeUnits = .all) throws {
        let manifest = try JSONSerialization.jsonObject(with: Data(contentsOf: exportDir.appendingPathComponent("manifest.json"))) as! [String: Any]
        guard let s = manifest["sampler"] as? [String: Any] else { throw PipelineError.bad("the export records no sampler") }
        if s["time_ids"] != nil { throw PipelineError.bad("SDXL exports are not supported by the iOS app") }
        sampler = s
        let comps = (manifest["components"] as! [[String: Any]]).filter { ($0["target"] as? String) == "coreml" }
        let config = MLModelConfiguration()
        config.computeUnits = computeUnits
        var m: [String: MLModel] = [:]
        var unet: [String: [Int]] = [:]
        for name in ["text_encoder", "unet", "vae_decoder"] {
            guard let c = comps.first(where: { ($0["name"] as? String) == name }) else {
                throw PipelineError.bad("the export has no Core ML \(name) (pocketfusion export MODEL --target coreml)")
            }
            let compiled = try MLModel.compileModel(at: exportDir.appendingPathComponent(c["path"] as! String))
            m[name] = try MLModel(contentsOf: compiled, configuration: config)
            if name == "unet" {
                for i in c["inputs"] as! [[String: Any]] { unet[i["name"] as! String] = i["shape"] as? [Int] }
            }
        }
        models = m
        unetInputs = unet
        tokenizer = try ClipTokenizer(folder: exportDir.appendingPathComponent(s["tokenizer"] as? String ?? "tokenizer"))
        let sched = exportDir.appendingPathComponent(s["scheduler"] as? String ?? "scheduler").appendingPathComponent("scheduler_config.json")
        schedulerConfig = try JSONSerialization.jsonObject(with: Data(contentsOf: sched), options: [.json5Allowed]) as! [String: Any]
    }

    static func array(_ v: [Float], _ shape: [Int]) throws -> MLMultiArray {
        let a = try MLMultiArray(shape: shape.map { NSNumber(value: $0) }, dataType: .float32)
        let p = a.dataPointer.bindMemory(to: Float.self, capacity: v.count)
        for i in 0..<v.count { p[i] = v[i] }
        return a
    }

    static func floats(_ a: MLMultiArray) -> [Float] {
        if a.dataType == .float32 {
            let p = a.dataPointer.bindMemory(to: Float.self, capacity: a.count)
            return Array(UnsafeBufferPointer(start: p, count: a.count))
        }
        return (0..<a.count).map { a[$0].floatValue }
    }

    func run(_ name: String, _ feeds: [String: MLMultiArray], _ output: String) throws -> [Float] {
        let provider = try MLDictionaryFeatureProvider(dictionary: feeds.mapValues { MLFeatureValue(multiArray: $0) })
        let out = try models[name]!.prediction(from: provider)
        guard let a = out.featureValue(for: output)?.multiArrayValue else { throw PipelineError.bad("\(name) has no output \(output)") }
        return Pipeline.floats(a)
    }

    func encode(_ prompt: String) throws -> [Float] {
        let L = sampler["max_length"] as? Int ?? 77
        let ids = tokenizer.encode(prompt, maxLength: L)
        let a = try MLMultiArray(shape: [1, NSNumber(value: L)], dataType: .int32)
        for (i, v) in ids.enumerated() { a[i] = NSNumber(value: v) }
        return try run("text_encoder", ["input_ids": a], "last_hidden_state")
    }

    /// One image as RGBA bytes (width x height x 4); steps nil: the export's own; noise: the initial latents then each
    /// stochastic step's noise (pf-run's --noise order), nil: torch.Generator(seed)'s draws.
    public func generate(prompt: String, steps: Int? = nil, guidance: Float = 4, seed: UInt64 = 0, scheduler: String? = nil,
                         noise: [Float]? = nil) throws -> (rgba: [UInt8], width: Int, height: Int, timings: Timings) {
        var tm = Timings()
        let t0 = Date()
        let n = sampler["default_steps"] as? Int ?? 50, steps = steps ?? n
        let sched = try Scheduler(config: schedulerConfig, name: scheduler)
        let shape = sampler["latent_shape"] as! [Int], numel = shape.reduce(1, *)
        let cfg = (sampler["guidance"] as? String ?? "cfg") == "cfg"
        var t = Date()
        let cond = try encode(prompt)
        if cfg && negative == nil { negative = try encode("") }
        tm.textMs = Date().timeIntervalSince(t) * 1e3
        var hShape = unetInputs["encoder_hidden_states"]!
        hShape[0] = cfg ? 2 : 1
        let hidden = try Pipeline.array(cfg ? negative! + cond : cond, hShape)
        var gen = TorchGenerator(seed: seed)
        var drawn = 0
        func draw() -> [Float] {
            if let nz = noise, (drawn + 1) * numel <= nz.count { drawn += 1; return Array(nz[(drawn - 1) * numel..<drawn * numel]) }
            return gen.randn(numel)
        }
        let ts = sched.timesteps(steps), sigma0 = Float(sched.initNoiseSigma(steps))
        var x = draw().map { $0 * sigma0 }
        let b = cfg ? 2 : 1
        var lat = shape
        lat[0] = b
        t = Date()
        for i in 0..<ts.count {
            let inp = sched.scaleModelInput(x, i, steps)
            var feeds = ["sample": try Pipeline.array(cfg ? inp + inp : inp, lat),
                         "timestep": try Pipeline.array([Float](repeating: Float(ts[i]), count: b), [b]),
                         "encoder_hidden_states": hidden]
            if !cfg && unetInputs["guidance"] != nil { feeds["guidance"] = try Pipeline.array([guidance], [1]) }
            let o = try run("unet", feeds, "noise_pred")
            let out = cfg ? (0..<numel).map { o[$0] + guidance * (o[numel + $0] - o[$0]) } : o
            x = sched.step(out, i, x, steps, noise: sched.stochastic && i < ts.count - 1 ? draw() : nil)
            tm.unetCalls += 1
        }
        tm.unetMs = Date().timeIntervalSince(t) * 1e3
        t = Date()
        let scale = Float((sampler["scaling_factor"] as! NSNumber).doubleValue)
        let img = try run("vae_decoder", ["latent": try Pipeline.array(x.map { $0 / scale }, shape)], "image")
        tm.vaeMs = Date().timeIntervalSince(t) * 1e3
        let H = shape[2] * 8, W = shape[3] * 8
        var rgba = [UInt8](repeating: 255, count: H * W * 4)
        for y in 0..<H { for xx in 0..<W { for c in 0..<3 {
            let v = min(max(img[(c * H + y) * W + xx] / 2 + 0.5, 0), 1)
            rgba[(y * W + xx) * 4 + c] = UInt8(v * 255 + 0.5)
        } } }
        tm.totalMs = Date().timeIntervalSince(t0) * 1e3
        return (rgba, W, H, tm)
    }
}
