import Crypto
import Dispatch
import LoRAAdapters

/// SHA-256 in lowercase hex: an upload's `sha256` and a download's ETag.
public enum ContentDigest {
    public static func sha256Hex(_ bytes: [UInt8]) -> String { hex(SHA256.hash(data: bytes)) }

    static func hex(_ digest: SHA256.Digest) -> String {
        let digits = Array("0123456789abcdef".utf8)
        var text: [UInt8] = []
        text.reserveCapacity(2 * SHA256.byteCount)
        for byte in digest {
            text.append(digits[Int(byte >> 4)])
            text.append(digits[Int(byte & 0x0F)])
        }
        return String(decoding: text, as: UTF8.self)
    }
}

/// Hashes an aggregate on another core while the engine is still writing it, so a cold aggregate
/// costs the engine's time rather than the engine's plus the hash's (about 60 ms per 134 MB here).
final class BackgroundSHA256: AggregationOutputObserver, @unchecked Sendable {
    // @unchecked: `hasher` is used only on `queue`, which is serial; regions stay valid until
    // `outputComplete` has drained the queue (the observer contract).
    private var hasher = SHA256()
    private let queue = DispatchQueue(label: "lora-aggregator.store.digest")

    func regionFinished(_ bytes: UnsafeRawBufferPointer) {
        nonisolated(unsafe) let region = bytes
        queue.async { self.hasher.update(bufferPointer: region) }
    }

    func outputComplete() { queue.sync {} }

    /// The digest of every region so far; call after `outputComplete`.
    func hexDigest() -> String { queue.sync { ContentDigest.hex(hasher.finalize()) } }
}
