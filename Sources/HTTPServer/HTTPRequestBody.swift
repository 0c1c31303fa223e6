import Synchronization

/// The request body as an asynchronous sequence of byte chunks, fed by the connection as bytes
/// arrive. Nothing is read from the socket (and no `100 Continue` is sent) until the handler asks
/// for the first chunk, so a handler that refuses a request early never receives its body. When
/// more than `highWatermark` bytes wait unread, the connection stops reading the socket until the
/// handler catches up, so a fast client cannot make the server buffer an upload in memory.
public final class HTTPRequestBody: AsyncSequence, Sendable {
    public typealias Element = [UInt8]

    static let highWatermark = 1 << 20

    private struct State {
        var chunks: [[UInt8]] = []
        var nextChunk = 0
        var bufferedBytes = 0
        var finished = false
        var failure: HTTPServerError?
        var waiter: CheckedContinuation<[UInt8]?, any Error>?
        var demanded = false
        /// The producer stopped reading because the buffer was full; the consumer must wake it.
        var producerPaused = false
    }

    // Shared between the connection's event-loop thread (producer) and the handler's task (consumer).
    private let state = Mutex(State())
    /// Called (from the consumer's thread) when the consumer first wants data, and whenever it has
    /// drained a buffer that had paused the producer.
    private let onDemand: @Sendable () -> Void

    init(onDemand: @escaping @Sendable () -> Void) {
        self.onDemand = onDemand
    }

    /// A body that is already complete (requests without one).
    static func empty() -> HTTPRequestBody {
        let body = HTTPRequestBody(onDemand: {})
        body.finish()
        return body
    }

    public struct AsyncIterator: AsyncIteratorProtocol {
        let body: HTTPRequestBody
        public mutating func next() async throws -> [UInt8]? { try await body.nextChunk() }
    }

    public func makeAsyncIterator() -> AsyncIterator { AsyncIterator(body: self) }

    /// The whole body, refusing with 413 once it exceeds `limit` bytes.
    public func collect(upTo limit: Int) async throws -> [UInt8] {
        var bytes: [UInt8] = []
        for try await chunk in self {
            guard bytes.count + chunk.count <= limit else {
                throw HTTPServerError(.contentTooLarge, "the request body exceeds \(limit) bytes")
            }
            bytes.append(contentsOf: chunk)
        }
        return bytes
    }

    private func nextChunk() async throws -> [UInt8]? {
        try await withCheckedThrowingContinuation { continuation in
            var wake = false
            let ready: Result<[UInt8]?, any Error>? = state.withLock { state in
                if !state.demanded {
                    state.demanded = true
                    wake = true
                }
                if state.nextChunk < state.chunks.count {
                    let chunk = state.chunks[state.nextChunk]
                    state.nextChunk += 1
                    state.bufferedBytes -= chunk.count
                    if state.nextChunk == state.chunks.count {
                        state.chunks.removeAll(keepingCapacity: true)
                        state.nextChunk = 0
                    }
                    if state.producerPaused && state.bufferedBytes < Self.highWatermark / 2 {
                        state.producerPaused = false
                        wake = true
                    }
                    return .success(chunk)
                }
                if let failure = state.failure { return .failure(failure) }
                if state.finished { return .success(nil) }
                if state.producerPaused {
                    state.producerPaused = false
                    wake = true
                }
                state.waiter = continuation
                return nil
            }
            if wake { onDemand() }
            if let ready { continuation.resume(with: ready) }
        }
    }

    // MARK: Producer side (the connection)

    var wasDemanded: Bool { state.withLock { $0.demanded } }

    /// Adds bytes; returns true when the producer should stop reading until `onDemand` is called.
    @discardableResult
    func append(_ bytes: [UInt8]) -> Bool {
        guard !bytes.isEmpty else { return false }
        let (waiter, pause): (CheckedContinuation<[UInt8]?, any Error>?, Bool) = state.withLock { state in
            if let waiter = state.waiter {
                state.waiter = nil
                return (waiter, false)
            }
            state.chunks.append(bytes)
            state.bufferedBytes += bytes.count
            state.producerPaused = state.bufferedBytes >= Self.highWatermark
            return (nil, state.producerPaused)
        }
        waiter?.resume(returning: bytes)
        return pause
    }

    func finish() {
        let waiter = state.withLock { state in
            state.finished = true
            defer { state.waiter = nil }
            return state.waiter
        }
        waiter?.resume(returning: nil)
    }

    func fail(_ error: HTTPServerError) {
        let waiter = state.withLock { state in
            if state.failure == nil && !state.finished { state.failure = error }
            defer { state.waiter = nil }
            return state.waiter
        }
        waiter?.resume(throwing: error)
    }
}
