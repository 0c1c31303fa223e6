/// One request/response exchange on a connection: the request, how far its body has arrived, and
/// whether it has been answered. Confined to the event loop.
final class Exchange {
    /// Where the request body stands on the wire.
    enum IncomingBody {
        /// Read whole, or there is none: the next bytes belong to the next request.
        case complete
        /// Content-Length framing, with this many bytes still to come.
        case remaining(Int)
        /// Chunked framing, decoded as it arrives.
        case chunked(ChunkedDecoder)
        /// Broken framing or an abandoned body: nothing more is read, and the connection's next
        /// bytes cannot be trusted.
        case failed
    }

    /// The interim `100 Continue`: sent the first time the handler asks for the body.
    enum InterimResponse {
        case notExpected
        case expected
        case sent
    }

    let request: HTTPRequest
    let startedAt: ContinuousClock.Instant
    var incoming = IncomingBody.complete
    var body: HTTPRequestBody?
    /// The handler's buffer is full: bytes wait in the kernel until it asks for more.
    var isPaused = false
    var interim = InterimResponse.notExpected
    var lastBodyActivity: ContinuousClock.Instant
    var responded = false
    var routePattern: String?
    var receivedBodyBytes = 0

    init(request: HTTPRequest, now: ContinuousClock.Instant) {
        self.request = request
        self.startedAt = now
        self.lastBodyActivity = now
    }

    var bodyIsComplete: Bool { if case .complete = incoming { true } else { false } }

    /// More body bytes are expected on the wire.
    var isReceiving: Bool {
        switch incoming {
        case .remaining, .chunked: true
        case .complete, .failed: false
        }
    }

    /// Stops reading the body and fails it with `error` (the handler answers with it).
    func failBody(_ error: HTTPServerError) {
        body?.fail(error)
        incoming = .failed
    }
}
