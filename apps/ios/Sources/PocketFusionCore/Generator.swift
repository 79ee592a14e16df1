import Foundation

/// torch.randn(n, generator=torch.Generator().manual_seed(seed)) for n >= 16: MT19937, 24-bit uniforms, Box-Muller over
/// blocks of 16 (apps/native/src/rng.cpp). Never built or run.
public struct TorchGenerator {
    private var mt = [UInt32](repeating: 0, count: 624)
    private var index = 624

    public init(seed: UInt64) {
        mt[0] = UInt32(truncatingIfNeeded: seed)
        for i in 1..<624 { mt[i] = 1812433253 &* (mt[i - 1] ^ (mt[i - 1] >> 30)) &+ UInt32(i) }
    }

    mutating func next() -> UInt32 {
        if index >= 624 {
            for k in 0..<624 {
                let y = (mt[k] & 0x8000_0000) | (mt[(k + 1) % 624] & 0x7fff_ffff)
                mt[k] = mt[(k + 397) % 624] ^ (y >> 1) ^ ((y & 1) != 0 ? 0x9908_b0df : 0)
            }
            index = 0
        }
        var y = mt[index]
        index += 1
        y ^= y >> 11
        y ^= (y << 7) & 0x9d2c_5680
        y ^= (y << 15) & 0xefc6_0000
        y ^= y >> 18
        return y
    }

    mutating func uniform() -> Float { Float(next() & 0xFFFFFF) / 16777216 }

    static func fill16(_ d: inout [Float], _ o: Int) {
        for j in 0..<8 {
            let u1 = 1 - d[o + j], u2 = d[o + j + 8]
            let radius = (-2 * logf(u1)).squareRoot(), theta = Float(2.0 * Double.pi) * u2
            d[o + j] = radius * cosf(theta)
            d[o + j + 8] = radius * sinf(theta)
        }
    }

    public mutating func randn(_ n: Int) -> [Float] {
        precondition(n >= 16)
        var d = (0..<n).map { _ in uniform() }
        var i = 0
        while i + 15 < n { TorchGenerator.fill16(&d, i); i += 16 }
        if n % 16 != 0 {
            for k in 0..<16 { d[n - 16 + k] = uniform() }
            TorchGenerator.fill16(&d, n - 16)
        }
        return d
    }
}
