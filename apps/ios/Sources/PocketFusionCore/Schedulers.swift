import Foundation

/// The schedulers of runtimes/schedulers.py that the iOS app carries: ddim, euler, euler-ancestral, lcm (the others
/// are refused by name). Built from a diffusers scheduler_config.json, driven by step index. Never built or run.
public final class Scheduler {
    public let name: String
    public let stochastic: Bool
    let o: [String: Any]
    let ac: [Double]
    let T: Int
    let prediction: String

    public init(config: [String: Any], name requested: String? = nil) throws {
        let classes = ["DDIMScheduler": "ddim", "EulerDiscreteScheduler": "euler", "EulerAncestralDiscreteScheduler": "euler-ancestral",
                       "LCMScheduler": "lcm"]
        let own = classes[config["_class_name"] as? String ?? "DDIMScheduler"]
        guard let n = requested ?? own, ["ddim", "euler", "euler-ancestral", "lcm"].contains(n) else {
            throw PipelineError.bad("scheduler \(requested ?? (config["_class_name"] as? String ?? "?")) is not in the iOS app (ddim, euler, euler-ancestral, lcm)")
        }
        name = n
        stochastic = n == "euler-ancestral" || n == "lcm"
        var d: [String: Any] = ["num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                                "prediction_type": "epsilon", "timestep_spacing": n.hasPrefix("euler") ? "linspace" : "leading",
                                "steps_offset": 0, "clip_sample": n == "ddim", "clip_sample_range": 1.0, "set_alpha_to_one": true,
                                "original_inference_steps": 50, "timestep_scaling": 10.0]
        if n == "lcm" { d["beta_start"] = 0.00085; d["beta_end"] = 0.012; d["beta_schedule"] = "scaled_linear" }
        for (k, v) in config where d[k] != nil { d[k] = v }
        for k in ["thresholding", "use_karras_sigmas", "rescale_betas_zero_snr"] where (config[k] as? Bool) == true {
            throw PipelineError.bad("\(k)=true is not supported by the iOS app's \(n) scheduler")
        }
        o = d
        T = d["num_train_timesteps"] as! Int
        prediction = d["prediction_type"] as! String
        let b0 = (d["beta_start"] as! NSNumber).doubleValue, b1 = (d["beta_end"] as! NSNumber).doubleValue
        var betas: [Double]
        switch d["beta_schedule"] as! String {
        case "scaled_linear": betas = Scheduler.linspace(b0.squareRoot(), b1.squareRoot(), T).map { Double(Float($0 * $0)) }
        case "linear": betas = Scheduler.linspace(b0, b1, T)
        default: throw PipelineError.bad("beta_schedule \(d["beta_schedule"]!) is not supported by the iOS app")
        }
        var p = 1.0
        ac = betas.map { p *= Double(Float(1 - $0)); return Double(Float(p)) }
    }

    static func linspace(_ a: Double, _ b: Double, _ n: Int) -> [Double] {
        (0..<n).map { n == 1 ? a : a + (b - a) * Double($0) / Double(n - 1) }
    }

    public func timesteps(_ steps: Int) -> [Double] {
        let offset = (o["steps_offset"] as? Int) ?? 0
        if name == "lcm" {
            let orig = o["original_inference_steps"] as! Int, k = T / orig
            let origin = (1...orig).map { $0 * k - 1 }.reversed().map { Double($0) }
            return (0..<steps).map { origin[($0 * orig) / steps] }
        }
        switch o["timestep_spacing"] as! String {
        case "linspace":
            return Scheduler.linspace(0, Double(T - 1), steps).map { name == "ddim" ? $0.rounded(.toNearestOrEven) : Double(Float($0)) }.reversed()
        case "trailing":
            return stride(from: Double(T), to: 0, by: -Double(T) / Double(steps)).map { $0.rounded(.toNearestOrEven) - 1 }
        default:
            return (0..<steps).map { Double($0 * (T / steps) + offset) }.reversed()
        }
    }

    func sigmas(_ steps: Int) -> [Double] {
        let full = ac.map { ((1 - $0) / $0).squareRoot() }
        return timesteps(steps).map { t in
            let i = Int(t), w = t - Double(i)
            return i + 1 < full.count ? full[i] + (full[i + 1] - full[i]) * w : full[full.count - 1]
        } + [0]
    }

    public func initNoiseSigma(_ steps: Int) -> Double {
        guard name.hasPrefix("euler") else { return 1 }
        let top = sigmas(steps).max()!
        return ["linspace", "trailing"].contains(o["timestep_spacing"] as! String) ? top : (top * top + 1).squareRoot()
    }

    public func scaleModelInput(_ x: [Float], _ i: Int, _ steps: Int) -> [Float] {
        guard name.hasPrefix("euler") else { return x }
        let s = sigmas(steps)[i], c = Float((s * s + 1).squareRoot())
        return x.map { $0 / c }
    }

    func x0(_ out: [Float], _ x: [Float], _ a: Double) -> [Float] {
        let sa = Float(a.squareRoot()), sb = Float((1 - a).squareRoot())
        return zip(out, x).map { e, v in prediction == "epsilon" ? (v - sb * e) / sa : prediction == "v_prediction" ? sa * v - sb * e : e }
    }

    public func step(_ out: [Float], _ i: Int, _ x: [Float], _ steps: Int, noise: [Float]?) -> [Float] {
        let ts = timesteps(steps)
        switch name {
        case "ddim":
            let t = Int(ts[i]), prev = t - T / steps
            let a = ac[t], ap = prev >= 0 ? ac[prev] : ((o["set_alpha_to_one"] as? Bool ?? true) ? 1 : ac[0])
            let clip = (o["clip_sample"] as? Bool ?? false) ? Float((o["clip_sample_range"] as! NSNumber).doubleValue) : nil
            let x0s = x0(out, x, a)
            return (0..<x.count).map { k in
                let eps = prediction == "epsilon" ? out[k] : prediction == "v_prediction"
                    ? Float(a.squareRoot()) * out[k] + Float((1 - a).squareRoot()) * x[k] : (x[k] - Float(a.squareRoot()) * x0s[k]) / Float((1 - a).squareRoot())
                let c = clip.map { min(max(x0s[k], -$0), $0) } ?? x0s[k]
                return Float(ap.squareRoot()) * c + Float((1 - ap).squareRoot()) * eps
            }
        case "lcm":
            let t = Int(ts[i]), x0s = x0(out, x, ac[t])
            let s = Double(Float(Double(t) * (o["timestep_scaling"] as! NSNumber).doubleValue))
            let cSkip = Float(0.25 / (s * s + 0.25)), cOut = Float(s / (s * s + 0.25).squareRoot())
            let denoised = (0..<x.count).map { cOut * x0s[$0] + cSkip * x[$0] }
            if i == ts.count - 1 { return denoised }
            let ap = ac[Int(ts[i + 1])]
            return (0..<x.count).map { Float(ap.squareRoot()) * denoised[$0] + Float((1 - ap).squareRoot()) * noise![$0] }
        default:  // euler, euler-ancestral (epsilon / v_prediction)
            let sg = sigmas(steps), s = Float(sg[i]), nx = Float(sg[i + 1])
            let x0s = (0..<x.count).map { k in prediction == "epsilon" ? x[k] - s * out[k] : out[k] * (-s / (s * s + 1).squareRoot()) + x[k] / (s * s + 1) }
            if name == "euler" { return (0..<x.count).map { x[$0] + (x[$0] - x0s[$0]) / s * (nx - s) } }
            let up = (nx * nx * (s * s - nx * nx) / (s * s)).squareRoot(), down = (nx * nx - up * up).squareRoot()
            return (0..<x.count).map { k in x[k] + (x[k] - x0s[k]) / s * (down - s) + (up != 0 ? noise![k] * up : 0) }
        }
    }
}
