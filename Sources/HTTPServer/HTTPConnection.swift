import CLinux

#if canImport(Glibc)
    import Glibc
#endif

/// A client connection, confined to the event loop. It parses request heads as bytes arrive (so a
/// slow client holds no thread), runs each request's handler in a task, feeds it the body on
/// demand, and writes responses in order; pipelined requests wait in the buffer for their turn.
final class HTTPConnection: EventSource {
    /// The connection's life, one state at a time.
    private enum State {
        /// Waiting for the next request head; `headStartedAt` once its first bytes arrived.
        case awaitingRequest(headStartedAt: ContinuousClock.Instant?)
        /// A request in progress; `then` says whether another may follow it.
        case exchanging(Exchange, then: AfterExchange)
        /// The last bytes are queued: nothing more is read, and the connection closes once they are written.
        case draining
        /// After an early refusal: the answer is queued (and the write side shut once it is written),
        /// and what the client still sends is read and discarded, within bounds, before closing.
        /// Closing with unread bytes would make the kernel send a reset, and a client still sending
        /// its body would see "connection reset" instead of the answer.
        case lingering(since: ContinuousClock.Instant, discarded: Int)
        case closed
    }

    private enum AfterExchange {
        case nextRequest
        /// Shutdown or an untrustworthy stream: answer this request, then close.
        case close
        /// The client closed its side: answer this request (it may still read), then close.
        case peerClosed
    }

    let descriptor: Int32
    private unowned let server: ServerCore
    private var loop: EventLoop { server.loop }
    private var configuration: HTTPServerConfiguration { server.configuration }

    private var state = State.awaitingRequest(headStartedAt: nil)
    private var input: [UInt8] = []
    private var inputStart = 0
    private var lastActivity: ContinuousClock.Instant
    private var writes = WriteQueue()
    private var lastWriteProgress: ContinuousClock.Instant
    private var registeredEvents: UInt32 = 0
    private var isProcessing = false

    init(descriptor: Int32, server: ServerCore) {
        self.descriptor = descriptor
        self.server = server
        self.lastActivity = server.now
        self.lastWriteProgress = server.now
    }

    private var isClosed: Bool { if case .closed = state { true } else { false } }

    func start() {
        registeredEvents = EPOLLIN.rawValue
        loop.register(descriptor, events: registeredEvents, source: self)
    }

    // MARK: Events

    func handle(events: UInt32) {
        if events & (EPOLLERR.rawValue | EPOLLHUP.rawValue) != 0 && events & EPOLLIN.rawValue == 0 {
            close()
            return
        }
        if events & EPOLLOUT.rawValue != 0 { flush() }
        if events & EPOLLIN.rawValue != 0 && !isClosed { readAvailable() }
    }

    private func readAvailable() {
        let count = server.withReadBuffer { read(descriptor, $0.baseAddress, $0.count) }
        if count > 0, case .lingering(let since, let discarded) = state {
            lastActivity = server.now
            if discarded + count > configuration.lingeringClose.maxBytes {
                close()
            } else {
                state = .lingering(since: since, discarded: discarded + count)
            }
        } else if count > 0 {
            server.withReadBuffer { input.append(contentsOf: UnsafeRawBufferPointer(rebasing: $0[0..<count])) }
            lastActivity = server.now
            process()
        } else if count == 0 {
            peerDidClose()
        } else if errno != EAGAIN && errno != EINTR {
            close()
        }
    }

    private func peerDidClose() {
        switch state {
        case .awaitingRequest, .lingering:
            close()
        case .exchanging(let exchange, _):
            if !exchange.bodyIsComplete {
                exchange.failBody(HTTPServerError(.badRequest, "the client closed the connection before the request body was complete"))
                close()
            } else {
                state = .exchanging(exchange, then: .peerClosed)
                updateInterest()  // half-closed: answer, then close
            }
        case .draining, .closed:
            break
        }
    }

    /// Shutdown: an idle connection closes now, one between requests once its writes are done, and
    /// one with a request in flight after answering it.
    func beginShutdown() {
        switch state {
        case .awaitingRequest(nil) where writes.isEmpty:
            close()
        case .awaitingRequest, .lingering:
            closeOnceWritten(thenLinger: false)
        case .exchanging(let exchange, .nextRequest):
            state = .exchanging(exchange, then: .close)
        case .exchanging, .draining, .closed:
            break
        }
    }

    // MARK: Requests

    private func process() {
        // A request answered at once (a 404, say) finishes inside this loop and asks to process the
        // next: the loop below does that, so pipelined requests never nest calls on the stack.
        guard !isProcessing else { return }
        isProcessing = true
        defer { isProcessing = false }
        while true {
            switch state {
            case .closed, .draining, .lingering:
                return
            case .exchanging(let exchange, _):
                if exchange.isReceiving { feedBody(exchange) }
                updateInterest()
                return
            case .awaitingRequest(let headStartedAt):
                compactInput()  // heads already parsed are dropped, however many bodiless requests come
                guard inputStart < input.count else {
                    updateInterest()
                    return
                }
                if headStartedAt == nil { state = .awaitingRequest(headStartedAt: server.now) }
                let result = input.withUnsafeBytes { bytes in
                    Result { () throws(HTTPServerError) in
                        try HTTPHeadParser.parse(UnsafeRawBufferPointer(rebasing: bytes[inputStart...]), limits: configuration.headLimits)
                    }
                }
                switch result {
                case .failure(let error):
                    refuseAndClose(error)
                    return
                case .success(.incomplete):
                    updateInterest()
                    return
                case .success(.complete(let request, let length)):
                    inputStart += length
                    begin(request)
                }
            }
        }
    }

    private func begin(_ request: HTTPRequest) {
        let exchange = Exchange(request: request, now: server.now)
        state = .exchanging(exchange, then: .nextRequest)
        // Framing and Host errors leave the next request's start in doubt: answer and close.
        let framing: BodyFraming
        do throws(HTTPServerError) {
            framing = try BodyFraming(request)
            if request.version == .http1_1 && request.headers.values(for: "host").count != 1 {
                throw HTTPServerError(.badRequest, "an HTTP/1.1 request needs exactly one Host header")
            }
        } catch {
            refuseAndClose(error, request: request)
            return
        }

        let route: Router.Route
        var routedRequest = request
        do throws(HTTPServerError) {
            switch server.router.resolve(method: request.method, path: request.path) {
            case .matched(let matched, let parameters):
                route = matched
                routedRequest.pathParameters = parameters
                exchange.routePattern = matched.pattern
            case .notFound:
                throw HTTPServerError(.notFound, "no resource at \(request.path)")
            case .methodNotAllowed(let allowed):
                throw HTTPServerError(.methodNotAllowed, "\(request.method) is not allowed here", headers: ["Allow": allowed.joined(separator: ", ")])
            case .badPath(let message):
                throw HTTPServerError(.badRequest, message)
            }
            if case .length(let length) = framing, length > route.maxBodyBytes {
                throw HTTPServerError(.contentTooLarge, "the request body of \(length) bytes exceeds the limit of \(route.maxBodyBytes) bytes")
            }
            let expectations = request.headers.tokens(for: "expect")
            if !expectations.isEmpty {
                guard expectations == ["100-continue"] else {
                    throw HTTPServerError(.expectationFailed, "the only supported expectation is 100-continue")
                }
                if request.version == .http1_1 && framing != .none { exchange.interim = .expected }
            }
        } catch {
            // Answered without reading the body; with one pending the connection closes afterwards.
            exchange.incoming = framing == .none ? .complete : .failed
            respond(configuration.errorResponder(error), to: exchange)
            return
        }

        switch framing {
        case .none:
            exchange.body = HTTPRequestBody.empty()
        case .length(let length):
            exchange.incoming = .remaining(length)
        case .chunked:
            exchange.incoming = .chunked(ChunkedDecoder(maxBodyBytes: route.maxBodyBytes, maxTrailerBytes: configuration.headLimits.maxHeaderBytes))
        }
        let target = LoopBound((self, exchange))
        let loop = self.loop
        if exchange.body == nil {
            // Weak: the exchange owns its body, so a strong capture here would be a cycle that
            // kept every connection that ever received a body alive.
            let weakTarget = WeakLoopBound(self, exchange)
            exchange.body = HTTPRequestBody(onDemand: {
                loop.execute {
                    guard let (connection, exchange) = weakTarget.values else { return }
                    connection.bodyDemanded(by: exchange)
                }
            })
        }
        let body = exchange.body!
        let handler = route.handler
        let errorResponder = configuration.errorResponder
        Task {
            let response: HTTPResponse
            do { response = try await handler(routedRequest, body) } catch { response = errorResponder(error) }
            loop.execute { target.value.0.respond(response, to: target.value.1) }
        }
    }

    private func bodyDemanded(by exchange: Exchange) {
        guard case .exchanging(let current, _) = state, current === exchange else { return }
        if exchange.interim == .expected && exchange.isReceiving {
            exchange.interim = .sent
            enqueue([HTTPResponseEncoder.continueResponse], then: nil)
        }
        exchange.isPaused = false
        exchange.lastBodyActivity = server.now
        process()
    }

    /// Moves buffered bytes into the request body, decoding the framing.
    private func feedBody(_ exchange: Exchange) {
        guard let body = exchange.body else { return }
        while !exchange.isPaused && inputStart < input.count {
            var chunk: [UInt8] = []
            switch exchange.incoming {
            case .complete, .failed:
                compactInput()
                return
            case .remaining(let remaining):
                let take = min(remaining, input.count - inputStart)
                chunk = Array(input[inputStart..<(inputStart + take)])
                inputStart += take
                exchange.incoming = take == remaining ? .complete : .remaining(remaining - take)
            case .chunked(var decoder):
                let decoded = input.withUnsafeBytes { bytes in
                    Result { () throws(HTTPServerError) in try decoder.decode(UnsafeRawBufferPointer(rebasing: bytes[inputStart...]), into: &chunk) }
                }
                switch decoded {
                case .success(let consumed):
                    inputStart += consumed
                    exchange.incoming = decoder.isDone ? .complete : .chunked(decoder)
                case .failure(let error):
                    // Nothing after this point can be trusted: the handler answers with this error,
                    // and the connection reads no more.
                    exchange.failBody(error)
                    return
                }
            }
            exchange.lastBodyActivity = server.now
            exchange.receivedBodyBytes += chunk.count
            if !chunk.isEmpty { exchange.isPaused = body.append(chunk) }
            if exchange.bodyIsComplete { body.finish() }
        }
        compactInput()
    }

    // MARK: Responses

    private func respond(_ response: HTTPResponse, to exchange: Exchange) {
        guard case .exchanging(let current, let then) = state, current === exchange, !exchange.responded else { return }
        exchange.responded = true
        let request = exchange.request
        // Keep the connection only if the next request's start is known: the body was read whole.
        var keepAlive = request.wantsKeepAlive && exchange.bodyIsComplete && then == .nextRequest
        if !exchange.bodyIsComplete {
            exchange.failBody(HTTPServerError(.badRequest, "the response was sent before the request body was read"))
        }
        switch response.body {
        case .bytes(let bytes):
            let framing = OutgoingBodyFraming(status: response.status, bodyLength: bytes.count, requestMethod: request.method, version: request.version)
            let head = encodeHead(response, framing: framing, version: request.version, keepAlive: keepAlive)
            let sent = framing == .sized(bytes.count) ? bytes : []
            enqueue([head, sent], then: nil)
            finish(exchange, status: response.status, bytesSent: sent.count, keepAlive: keepAlive)
        case .stream(let length, let write):
            let framing = OutgoingBodyFraming(status: response.status, bodyLength: length, requestMethod: request.method, version: request.version)
            keepAlive = keepAlive && framing.allowsKeepAlive
            enqueue([encodeHead(response, framing: framing, version: request.version, keepAlive: keepAlive)], then: nil)
            if case .omitted = framing {
                finish(exchange, status: response.status, bytesSent: 0, keepAlive: keepAlive)
            } else {
                streamBody(write, framing: framing, exchange: exchange, status: response.status, keepAlive: keepAlive)
            }
        }
    }

    private func encodeHead(_ response: HTTPResponse, framing: OutgoingBodyFraming, version: HTTPVersion, keepAlive: Bool) -> [UInt8] {
        HTTPResponseEncoder.head(
            status: response.status, headers: response.headers, framing: framing, version: version, keepAlive: keepAlive, date: server.httpDate)
    }

    private func streamBody(
        _ write: @escaping @Sendable (HTTPBodyWriter) async throws -> Void, framing: OutgoingBodyFraming,
        exchange: Exchange, status: HTTPStatus, keepAlive: Bool
    ) {
        let target = LoopBound((self, exchange))
        let loop = self.loop
        let progress = StreamProgress()
        let length: Int? = if case .sized(let length) = framing { length } else { nil }
        let writer = HTTPBodyWriter { bytes in
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
                let scheduled = loop.execute {
                    let connection = target.value.0
                    guard progress.add(bytes.count, limit: length) else {
                        connection.close()
                        continuation.resume(throwing: HTTPServerError(.internalServerError, "the response stream wrote more than its Content-Length"))
                        return
                    }
                    connection.enqueue(HTTPResponseEncoder.bodyPiece(bytes, framing: framing)) { sent in
                        if sent { continuation.resume() } else { continuation.resume(throwing: HTTPServerError(.badRequest, "the client went away")) }
                    }
                }
                if !scheduled { continuation.resume(throwing: HTTPServerError(.serviceUnavailable, "the server has stopped")) }
            }
        }
        Task {
            let succeeded = (try? await write(writer)) != nil
            loop.execute {
                let (connection, exchange) = target.value
                // A stream that failed or fell short cannot be repaired on the wire: close.
                guard succeeded, length == nil || progress.total == length else {
                    connection.finish(exchange, status: status, bytesSent: progress.total, keepAlive: false)
                    return
                }
                if framing == .chunked { connection.enqueue([HTTPResponseEncoder.lastChunk], then: nil) }
                connection.finish(exchange, status: status, bytesSent: progress.total, keepAlive: keepAlive)
            }
        }
    }

    private func finish(_ exchange: Exchange, status: HTTPStatus, bytesSent: Int, keepAlive: Bool) {
        guard case .exchanging(let current, let then) = state, current === exchange else { return }
        configuration.onRequestCompleted?(
            CompletedRequest(
                method: exchange.request.method, path: String(exchange.request.path), route: exchange.routePattern, status: status.code,
                requestBodyBytes: exchange.receivedBodyBytes, responseBodyBytes: bytesSent, duration: server.now - exchange.startedAt))
        lastActivity = server.now
        if keepAlive && then == .nextRequest {
            state = .awaitingRequest(headStartedAt: nil)
            process()
        } else {
            // Bytes after this exchange are not parsed. A body refused before it was read whole is
            // most likely still arriving: linger so that the client gets to read this answer.
            closeOnceWritten(thenLinger: !exchange.bodyIsComplete && then != .peerClosed)
        }
    }

    /// Answers a request whose framing is unknown or untrustworthy, then closes (lingering, unless
    /// the client is merely slow).
    private func refuseAndClose(_ error: HTTPServerError, request: HTTPRequest? = nil, thenLinger linger: Bool = true) {
        let response = configuration.errorResponder(error)
        // A streamed error body is dropped: the connection closes right after this answer.
        let bytes: [UInt8] = if case .bytes(let bytes) = response.body { bytes } else { [] }
        enqueue([encodeHead(response, framing: .sized(bytes.count), version: .http1_1, keepAlive: false), bytes], then: nil)
        closeOnceWritten(thenLinger: linger)
        configuration.onRequestCompleted?(
            CompletedRequest(
                method: request?.method ?? "-", path: request.map { String($0.path) } ?? "-", route: nil, status: error.status.code,
                requestBodyBytes: 0, responseBodyBytes: bytes.count, duration: .zero))
    }

    /// Parses nothing more; closes once everything queued is written, or, lingering, shuts the write
    /// side then and discards input until the client closes or a bound is reached. Past the
    /// server's limit of lingering connections it closes as if not asked to linger.
    private func closeOnceWritten(thenLinger linger: Bool) {
        input.removeAll()
        inputStart = 0
        guard linger, server.beginLingering() else {
            state = .draining
            updateInterest()
            enqueue([], then: { [weak self] _ in self?.close() })
            return
        }
        state = .lingering(since: server.now, discarded: 0)
        lastActivity = server.now
        updateInterest()
        enqueue(
            [],
            then: { [weak self] written in
                guard written, let self else { return }
                // The FIN tells the client the answer is complete while its body is still being read.
                _ = shutdown(self.descriptor, Int32(SHUT_WR))
            })
    }

    // MARK: Writing

    /// Queues `buffers` and writes what the socket takes; `completion` runs once everything queued
    /// so far is written (true) or the connection closed first (false).
    private func enqueue(_ buffers: [[UInt8]], then completion: ((Bool) -> Void)?) {
        // A response stream may write after the client went away: its descriptor is closed (and
        // may already belong to another connection), so nothing is written and the writer is told.
        guard !isClosed else {
            completion?(false)
            return
        }
        if writes.isEmpty { lastWriteProgress = server.now }
        writes.append(buffers, then: completion)
        flush()
    }

    private func flush() {
        while !writes.isEmpty {
            let written = writes.withIOVectors { vectors in writev(descriptor, vectors.baseAddress, Int32(vectors.count)) }
            if written < 0 {
                if errno == EINTR { continue }
                if errno == EAGAIN {
                    updateInterest()
                    return
                }
                close()
                return
            }
            lastWriteProgress = server.now
            writes.consume(written)
        }
        updateInterest()
        for completion in writes.takeCompletions() { completion(true) }
    }

    private func updateInterest() {
        guard !isClosed else { return }
        var events: UInt32 = 0
        if wantsToRead { events |= EPOLLIN.rawValue }
        if !writes.isEmpty { events |= EPOLLOUT.rawValue }
        if events != registeredEvents {
            registeredEvents = events
            loop.modify(descriptor, events: events)
        }
    }

    private var wantsToRead: Bool {
        switch state {
        case .closed, .draining, .exchanging(_, then: .peerClosed):
            return false
        case .awaitingRequest, .lingering:
            return true
        case .exchanging(let exchange, _):
            // While the handler runs, read the body as demanded; pipelined bytes beyond one head's
            // worth wait in the kernel until this response is done.
            if exchange.isReceiving { return !exchange.isPaused }
            return exchange.bodyIsComplete && input.count - inputStart < configuration.headLimits.maxHeaderBytes
        }
    }

    private func compactInput() {
        if inputStart == input.count {
            input.removeAll(keepingCapacity: input.capacity <= 1 << 20)
            inputStart = 0
        } else if inputStart > 1 << 16 {
            input.removeFirst(inputStart)
            inputStart = 0
        }
    }

    // MARK: Lifecycle

    /// Enforces the timeouts; called on every loop tick.
    func checkTimeouts(now: ContinuousClock.Instant) {
        if !writes.isEmpty && now - lastWriteProgress > configuration.writeTimeout {
            close()
            return
        }
        switch state {
        case .awaitingRequest(let headStartedAt?):
            if now - headStartedAt > configuration.headerTimeout {
                refuseAndClose(HTTPServerError(.requestTimeout, "the request head took longer than \(configuration.headerTimeout)"), thenLinger: false)
            }
        case .awaitingRequest(nil):
            if writes.isEmpty && now - lastActivity > configuration.keepAliveTimeout { close() }
        case .exchanging(let exchange, _):
            if exchange.isReceiving && !exchange.isPaused && exchange.body?.wasDemanded == true
                && now - exchange.lastBodyActivity > configuration.bodyIdleTimeout
            {
                exchange.failBody(HTTPServerError(.requestTimeout, "no request body bytes arrived for \(configuration.bodyIdleTimeout)"))
                updateInterest()
            }
        case .lingering(let since, _):
            if now - since > configuration.lingeringClose.maxDuration || now - lastActivity > configuration.lingeringClose.idleTimeout { close() }
        case .draining, .closed:
            break
        }
    }

    func close() {
        if case .exchanging(let exchange, _) = state, !exchange.bodyIsComplete {
            exchange.failBody(HTTPServerError(.badRequest, "the connection closed before the request body was complete"))
        }
        guard !isClosed else { return }
        if case .lingering = state { server.endLingering() }
        state = .closed
        loop.unregister(descriptor)
        Glibc.close(descriptor)
        for completion in writes.abandon() { completion(false) }
        server.connectionClosed(self)
    }
}

/// Bytes written so far by a response stream; only touched on the event loop.
private final class StreamProgress: @unchecked Sendable {
    // @unchecked: read and written only inside closures run by EventLoop.execute.
    var total = 0
    func add(_ count: Int, limit: Int?) -> Bool {
        total += count
        return limit.map { total <= $0 } ?? true
    }
}
