import Dispatch
import Synchronization

/// A first computation of an aggregate, streamed while the engine writes it: copies of its regions
/// go to every subscriber one behind, so that when its digest is on record the last one goes out
/// only if the whole file has the CRC-32 on record (a client never receives a complete body under a
/// wrong digest). A request for the same aggregate that arrives meanwhile joins it rather than
/// computing it again: it first gets one copy of what was already sent, taken from the engine's
/// output while that is still being written, then the same pieces as everyone else. Nothing is kept
/// for joiners that never come; the pieces are copies, so a slow client holds them, not the engine.
final class StreamedComputation: Sendable {
    typealias Pieces = AsyncThrowingStream<[UInt8], any Error>

    private struct State {
        var subscribers: [Pieces.Continuation]
        /// The last region, not yet sent.
        var held: [UInt8]?
        /// The address of the output's first byte and how many bytes of it have been forwarded
        /// (held included): what a joiner is given. Nil before the first region.
        var output: (start: UInt, forwarded: Int)?
        /// False for good once the engine is done with its buffer, the stream ended, or a region
        /// did not follow the one before.
        var joinable = true
        /// The file's size, once the engine has laid it out.
        var byteCount: Int?
        var sizeSettled = false
    }

    // Mutex: `forward` runs on the digest's queue, joins on other requests' readers.
    private let state: Mutex<State>
    /// Left once the size is known or the computation ended without one: joiners wait for it.
    private let sized = DispatchGroup()

    /// The SHA-256 on record that the bytes are checked against (by their CRC-32), if any: all a
    /// joiner may announce as `Repr-Digest`.
    let checkedSHA256: String?

    init(_ first: Pieces.Continuation, checkedSHA256: String?) {
        state = Mutex(State(subscribers: [first]))
        self.checkedSHA256 = checkedSHA256
        sized.enter()
    }

    /// Whether a request may still join (it may have to wait for the layout).
    var isJoinable: Bool { state.withLock { $0.joinable } }

    /// The engine has laid out the file (before reading any upload).
    func began(byteCount: Int) {
        settleSize { $0.byteCount = byteCount }
    }

    private func settleSize(_ update: (inout State) -> Void = { _ in }) {
        let first = state.withLock { state in
            update(&state)
            defer { state.sizeSettled = true }
            return !state.sizeSettled
        }
        if first { sized.leave() }
    }

    /// Region by region, in file order, while the engine writes them (the `BackgroundDigest` queue).
    func forward(_ region: UnsafeRawBufferPointer) {
        let copy = Array(region)
        let start = UInt(bitPattern: region.baseAddress)
        state.withLock { state in
            if let held = state.held { for subscriber in state.subscribers { subscriber.yield(held) } }
            state.held = copy
            guard state.joinable, start != 0 else { return }
            if let output = state.output {
                if output.start + UInt(output.forwarded) == start {
                    state.output?.forwarded += region.count
                } else {
                    state.output = nil
                    state.joinable = false
                }
            } else {
                state.output = (start, region.count)
            }
        }
    }

    /// The whole file for one more client and its size, or nil when it can no longer be joined.
    /// Waits (on the caller's thread) while the computation has not laid the file out yet.
    func join() -> (pieces: Pieces, byteCount: Int)? {
        sized.wait()
        return state.withLock { state in
            guard state.joinable, let byteCount = state.byteCount else { return nil }
            let (pieces, continuation) = Pieces.makeStream()
            // Under the lock: the engine's buffer is valid until `outputReleased`, which takes it.
            if let output = state.output, output.forwarded > state.held?.count ?? 0 {
                let sent = output.forwarded - (state.held?.count ?? 0)
                continuation.yield(Array(UnsafeRawBufferPointer(start: UnsafeRawPointer(bitPattern: output.start), count: sent)))
            }
            state.subscribers.append(continuation)
            return (pieces, byteCount)
        }
    }

    /// The engine is done with its output buffer: no one joins from here on.
    func outputReleased() {
        state.withLock { state in
            state.output = nil
            state.joinable = false
        }
    }

    /// Sends the last region and ends every subscriber's stream when the checksums agree; fails
    /// them otherwise.
    func finish(crc32: UInt32, expected: UInt32) {
        guard crc32 == expected else {
            return fail(StoreError(.database, "an aggregate did not match its recorded digest", detail: "CRC-32 recorded \(expected), computed \(crc32)"))
        }
        finish()
    }

    /// Sends the last region and ends every subscriber's stream (nothing on record to check against).
    func finish() {
        let (subscribers, held) = end()
        for subscriber in subscribers {
            if let held { subscriber.yield(held) }
            subscriber.finish()
        }
    }

    func fail(_ error: any Error) {
        for subscriber in end().subscribers { subscriber.finish(throwing: error) }
    }

    /// Closes the stream to joiners and hands over its subscribers and last region, once.
    private func end() -> (subscribers: [Pieces.Continuation], held: [UInt8]?) {
        defer { settleSize() }
        return state.withLock { state in
            state.output = nil
            state.joinable = false
            defer { (state.subscribers, state.held) = ([], nil) }
            return (state.subscribers, state.held)
        }
    }
}

/// The first computations being streamed, by aggregate, for requests of the same aggregate to join
/// (a burst of clients asking for a round's aggregate as it closes computes it once per process).
final class ComputationsInFlight: Sendable {
    private let computations = Mutex<[AggregateCache.Key: StreamedComputation]>([:])

    /// Offers `computation` to joiners as soon as it is decided on, before it has read anything,
    /// unless another computation of the same aggregate still can be joined (two that raced both go
    /// on).
    func offer(_ computation: StreamedComputation, for key: AggregateCache.Key) {
        computations.withLock { computations in
            if let offered = computations[key], offered.isJoinable { return }
            computations[key] = computation
        }
    }

    /// The aggregate's pieces and size from a computation under way, with the digest it is checked
    /// against; nil when there is none to join. May wait for that computation to lay its file out
    /// (it reads only the uploads' headers for that).
    func join(_ key: AggregateCache.Key) -> (pieces: StreamedComputation.Pieces, byteCount: Int, checkedSHA256: String?)? {
        guard let computation = computations.withLock({ $0[key] }), let (pieces, byteCount) = computation.join() else { return nil }
        return (pieces, byteCount, computation.checkedSHA256)
    }

    func remove(_ computation: StreamedComputation, for key: AggregateCache.Key) {
        computations.withLock { if $0[key] === computation { $0[key] = nil } }
    }
}
