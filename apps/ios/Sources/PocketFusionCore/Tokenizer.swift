import Foundation

/// CLIP BPE over an export's tokenizer/ (vocab.json, merges.txt): transformers' CLIPTokenizer without ftfy, as
/// apps/web/pf.js and apps/native/src/tokenizer.cpp. Never built or run.
public final class ClipTokenizer {
    let vocab: [String: Int]
    let ranks: [String: Int]
    let bos: Int, eos: Int, pad: Int, unk: Int
    private var cache: [String: [String]] = [:]
    private let byteMap: [Character]
    private let pattern = try! NSRegularExpression(
        pattern: #"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"#)

    public init(folder: URL) throws {
        let v = try JSONSerialization.jsonObject(with: Data(contentsOf: folder.appendingPathComponent("vocab.json"))) as! [String: Int]
        vocab = v
        var r: [String: Int] = [:]
        let merges = try String(contentsOf: folder.appendingPathComponent("merges.txt"), encoding: .utf8)
        for (i, line) in merges.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let l = line.trimmingCharacters(in: .init(charactersIn: "\r"))
            if (i == 0 && l.hasPrefix("#version")) || !l.contains(" ") { continue }
            r[l] = r.count
        }
        ranks = r
        func id(_ t: String) throws -> Int {
            guard let i = v[t] else { throw PipelineError.bad("the tokenizer has no token \(t)") }
            return i
        }
        bos = try id("<|startoftext|>")
        eos = try id("<|endoftext|>")
        pad = eos
        unk = eos
        var bs: [Int] = Array(33...126) + Array(0xA1...0xAC) + Array(0xAE...0xFF)
        var map = [Character](repeating: " ", count: 256)
        var n = 0
        for b in 0..<256 {
            if bs.contains(b) { map[b] = Character(UnicodeScalar(b)!) } else { map[b] = Character(UnicodeScalar(256 + n)!); n += 1 }
        }
        bs.removeAll()
        byteMap = map
    }

    func bpe(_ token: String) -> [String] {
        if let hit = cache[token] { return hit }
        var word = token.map { String($0) }
        word[word.count - 1] += "</w>"
        while word.count > 1 {
            var best = Int.max, at = -1
            for i in 0..<(word.count - 1) {
                if let r = ranks[word[i] + " " + word[i + 1]], r < best { best = r; at = i }
            }
            if at < 0 { break }
            let a = word[at], b = word[at + 1]
            var merged: [String] = []
            var i = 0
            while i < word.count {
                if i + 1 < word.count && word[i] == a && word[i + 1] == b { merged.append(a + b); i += 2 } else { merged.append(word[i]); i += 1 }
            }
            word = merged
        }
        cache[token] = word
        return word
    }

    public func encode(_ text: String, maxLength: Int) -> [Int32] {
        let clean = text.unicodeScalars.filter { !CharacterSet.controlCharacters.contains($0) || $0 == "\t" || $0 == "\n" || $0 == "\r" }
        let s = String(String.UnicodeScalarView(clean)).components(separatedBy: .whitespacesAndNewlines)
            .filter { !$0.isEmpty }.joined(separator: " ").lowercased()
        var ids: [Int32] = [Int32(bos)]
        let ns = s as NSString
        outer: for m in pattern.matches(in: s, range: NSRange(location: 0, length: ns.length)) {
            let piece = ns.substring(with: m.range)
            let encoded = String(piece.utf8.map { byteMap[Int($0)] })
            for t in bpe(encoded) {
                if ids.count >= maxLength - 1 { break outer }
                ids.append(Int32(vocab[t] ?? unk))
            }
        }
        ids.append(Int32(eos))
        while ids.count < maxLength { ids.append(Int32(pad)) }
        return ids
    }
}
