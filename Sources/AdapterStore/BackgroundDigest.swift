import Crypto
import Digests
import Dispatch
import LoRAAdapters

/// The digests of an aggregate, computed on another core while the engine is still writing it, so
/// a cold aggregate costs the engine's time rather than the engine's plus the hashing. The SHA-256
/// (about 90 ms per 134 MB here) is asked for only when nothing is streamed; the CRC-32 (about 12 ms)
/// is what a recomputation is checked against. With `stream`, each region goes on to it, on the
/// same queue, before it is digested: the client's bytes do not wait for the hashing.
final class BackgroundDigest: AggregationOutputObserver, @unchecked Sendable {
    // @unchecked: the digests are used only on `queue`, which is serial; regions stay valid until
    // `outputComplete` has drained the queue (the observer contract).
    private var sha256: SHA256?
    private var crc32: UInt32?
    private let queue = DispatchQueue(label: "lora-aggregator.store.digest")
    private let stream: StreamedComputation?
    private let begin: ((Int) -> Void)?

    /// `begin` is told the file's size on the engine's thread, before the first region.
    init(sha256: Bool, crc32: Bool, begin: ((Int) -> Void)? = nil, stream: StreamedComputation? = nil) {
        self.sha256 = sha256 ? SHA256() : nil
        self.crc32 = crc32 ? 0 : nil
        self.begin = begin
        self.stream = stream
    }

    func outputWillBegin(byteCount: Int) { begin?(byteCount) }

    func regionFinished(_ bytes: UnsafeRawBufferPointer) {
        nonisolated(unsafe) let region = bytes
        queue.async {
            self.stream?.forward(region)
            self.sha256?.update(bufferPointer: region)
            self.crc32 = self.crc32.map { ContentDigest.crc32(region, continuing: $0) }
        }
    }

    func outputComplete() {
        queue.sync {}
        stream?.outputReleased()
    }

    /// The digests asked for of every region so far (the SHA-256 in hex); call after `outputComplete`.
    func digests() -> (sha256: String?, crc32: UInt32?) {
        queue.sync { (sha256.map { ContentDigest.hex($0.finalize()) }, crc32) }
    }
}
