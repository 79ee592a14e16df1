import PocketFusionCore
import SwiftUI

/// Prompt in, image out, per-stage timings shown; generation off the main thread.
struct ContentView: View {
    @State private var prompt = "a large red circle on a blue background, center"
    @State private var seed = "0"
    @State private var image: CGImage?
    @State private var status = "ready"
    @State private var busy = false
    @State private var pipeline: Pipeline?

    var body: some View {
        VStack(alignment: .leading, spacing: 12) {
            TextField("prompt", text: $prompt).textFieldStyle(.roundedBorder)
            TextField("seed", text: $seed).textFieldStyle(.roundedBorder).keyboardType(.numberPad)
            Button(busy ? "generating…" : "Generate") { generate() }.disabled(busy)
            if let image { Image(decorative: image, scale: 1).interpolation(.none).resizable().frame(width: 256, height: 256) }
            Text(status).font(.system(.footnote, design: .monospaced))
            Spacer()
        }.padding()
    }

    func generate() {
        busy = true
        let p = prompt, s = UInt64(seed) ?? 0
        Task.detached {
            do {
                let pipe = try await MainActor.run { pipeline } ?? Pipeline(exportDir: Bundle.main.url(forResource: "export", withExtension: nil)!)
                let r = try pipe.generate(prompt: p, seed: s)
                let provider = CGDataProvider(data: Data(r.rgba) as CFData)!
                let img = CGImage(width: r.width, height: r.height, bitsPerComponent: 8, bitsPerPixel: 32, bytesPerRow: r.width * 4,
                                  space: CGColorSpaceCreateDeviceRGB(), bitmapInfo: CGBitmapInfo(rawValue: CGImageAlphaInfo.noneSkipLast.rawValue),
                                  provider: provider, decode: nil, shouldInterpolate: false, intent: .defaultIntent)
                let t = r.timings
                await MainActor.run {
                    pipeline = pipe
                    image = img
                    status = String(format: "text encoder %.1f ms\nU-Net %.1f ms (%d calls)\nVAE decoder %.1f ms\ntotal %.0f ms",
                                    t.textMs, t.unetMs, t.unetCalls, t.vaeMs, t.totalMs)
                    busy = false
                }
            } catch {
                await MainActor.run { status = "error: \(error)"; busy = false }
            }
        }
    }
}
