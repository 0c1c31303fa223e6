#if canImport(Glibc)
import Glibc
#endif
import CLinux

/// One request/response exchange on a connection.
final class Exchange {
    let request: HTTPRequest
    let startedAt: ContinuousClock.Instant
    var framing = BodyFraming.none
    var body: HTTPRequestBody?
    var remainingLength = 0
    var chunkedDecoder: ChunkedDecoder?
    var bodyComplete = true
    var bodyPaused = false
    var expectsContinue = false
    var sentContinue = false
    var lastBodyActivity: ContinuousClock.Instant
    var responded = false
    var routePattern: String?
    var receivedBodyBytes = 0

    init(request: HTTPRequest, now: ContinuousClock.Instant) {
        self.request = request
        self.startedAt = now
        self.lastBodyActivity = now
    }
}

/// A client connection, confined to the event loop. It parses request heads as bytes arrive (so a
/// slow client holds no thread), runs each request's handler in a task, feeds it the body on
/// demand, and writes responses in order; pipelined requests wait in the buffer for their turn.
final class HTTPConnection: EventSource {
    private enum Phase {
        case awaitingRequest
        case exchanging(Exchange)
        case closed
    }

    let descriptor: Int32
    private unowned let server: ServerCore
    private var loop: EventLoop { server.loop }
    private var configuration: HTTPServerConfiguration { server.configuration }

    private var phase = Phase.awaitingRequest
    private var input: [UInt8] = []
    private var inputStart = 0
    private var headStartedAt: ContinuousClock.Instant?
    private var lastActivity: ContinuousClock.Instant
    private var peerClosed = false
    /// Set by shutdown: finish the exchange in progress, then close.
    var closeWhenIdle = false

    private var pendingWrites: [[UInt8]] = []
    private var pendingOffset = 0
    private var flushCompletions: [(Bool) -> Void] = []
    private var lastWriteProgress: ContinuousClock.Instant
    private var registeredEvents: UInt32 = 0
    /// `registeredEvents` once the descriptor is closed.
    private static let closedMarker = UInt32.max

    init(descriptor: Int32, server: ServerCore) {
        self.descriptor = descriptor
        self.server = server
        self.lastActivity = server.now
        self.lastWriteProgress = server.now
    }

    var isIdle: Bool {
        if case .awaitingRequest = phase { return inputStart == input.count && pendingWrites.isEmpty }
        return false
    }

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
        if events & EPOLLIN.rawValue != 0 && registeredEvents != Self.closedMarker { readAvailable() }
    }

    private func readAvailable() {
        let count = server.withReadBuffer { read(descriptor, $0.baseAddress, $0.count) }
        if count > 0 {
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
        peerClosed = true
        switch phase {
        case .awaitingRequest:
            close()
        case .exchanging(let exchange):
            if !exchange.bodyComplete {
                exchange.body?.fail(HTTPServerError(.badRequest, "the client closed the connection before the request body was complete"))
                close()
            } else {
                updateInterest()  // half-closed: answer, then close
            }
        case .closed:
            break
        }
    }

    // MARK: Requests

    private func process() {
        while true {
            switch phase {
            case .closed:
                return
            case .exchanging(let exchange):
                if !exchange.bodyComplete { feedBody(exchange) }
                updateInterest()
                return
            case .awaitingRequest:
                guard inputStart < input.count, !closeWhenIdle else { updateInterest(); return }
                if headStartedAt == nil { headStartedAt = server.now }
                let result = input.withUnsafeBytes { bytes in
                    Result { () throws(HTTPServerError) in try HTTPHeadParser.parse(UnsafeRawBufferPointer(rebasing: bytes[inputStart...]), limits: configuration.headLimits) }
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
                    headStartedAt = nil
                    begin(request)
                }
            }
        }
    }

    private func begin(_ request: HTTPRequest) {
        let exchange = Exchange(request: request, now: server.now)
        phase = .exchanging(exchange)
        // Framing and Host errors leave the next request's start in doubt: answer and close.
        do throws(HTTPServerError) {
            exchange.framing = try BodyFraming(request)
            if request.version == .http1_1 && request.headers.values(for: "host").count != 1 {
                throw HTTPServerError(.badRequest, "an HTTP/1.1 request needs exactly one Host header")
            }
        } catch {
            refuseAndClose(error, request: request)
            return
        }
        exchange.bodyComplete = exchange.framing == .none

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
            if case .length(let length) = exchange.framing, length > route.maxBodyBytes {
                throw HTTPServerError(.contentTooLarge, "the request body of \(length) bytes exceeds the limit of \(route.maxBodyBytes) bytes")
            }
            let expectations = request.headers.tokens(for: "expect")
            if !expectations.isEmpty {
                guard expectations == ["100-continue"] else {
                    throw HTTPServerError(.expectationFailed, "the only supported expectation is 100-continue")
                }
                exchange.expectsContinue = request.version == .http1_1 && exchange.framing != .none
            }
        } catch {
            // Answered without reading the body; with one pending the connection closes afterwards.
            respond(configuration.errorResponder(error), to: exchange)
            return
        }

        switch exchange.framing {
        case .none:
            exchange.body = HTTPRequestBody.empty()
        case .length(let length):
            exchange.remainingLength = length
        case .chunked:
            exchange.chunkedDecoder = ChunkedDecoder(maxBodyBytes: route.maxBodyBytes, maxTrailerBytes: configuration.headLimits.maxHeaderBytes)
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
        guard case .exchanging(let current) = phase, current === exchange else { return }
        if exchange.expectsContinue && !exchange.sentContinue && !exchange.bodyComplete {
            exchange.sentContinue = true
            enqueue([Array("HTTP/1.1 100 Continue\r\n\r\n".utf8)], then: nil)
        }
        exchange.bodyPaused = false
        exchange.lastBodyActivity = server.now
        process()
    }

    /// Moves buffered bytes into the request body, decoding the framing.
    private func feedBody(_ exchange: Exchange) {
        guard let body = exchange.body else { return }
        while !exchange.bodyComplete && !exchange.bodyPaused && inputStart < input.count {
            var chunk: [UInt8] = []
            do throws(HTTPServerError) {
                if exchange.chunkedDecoder != nil {
                    let consumed = try input.withUnsafeBytes { bytes in
                        Result { () throws(HTTPServerError) in try exchange.chunkedDecoder!.decode(UnsafeRawBufferPointer(rebasing: bytes[inputStart...]), into: &chunk) }
                    }.get()
                    inputStart += consumed
                    exchange.bodyComplete = exchange.chunkedDecoder!.isDone
                } else {
                    let take = min(exchange.remainingLength, input.count - inputStart)
                    chunk = Array(input[inputStart..<(inputStart + take)])
                    inputStart += take
                    exchange.remainingLength -= take
                    exchange.bodyComplete = exchange.remainingLength == 0
                }
            } catch {
                // The framing is broken, so nothing after this point can be trusted: fail the body
                // (the handler answers with this error) and read no more.
                body.fail(error)
                exchange.bodyPaused = true
                closeWhenIdle = true
                return
            }
            exchange.lastBodyActivity = server.now
            exchange.receivedBodyBytes += chunk.count
            if !chunk.isEmpty { exchange.bodyPaused = body.append(chunk) }
            if exchange.bodyComplete { body.finish() }
        }
        compactInput()
    }

    // MARK: Responses

    private func respond(_ response: HTTPResponse, to exchange: Exchange) {
        guard case .exchanging(let current) = phase, current === exchange, !exchange.responded else { return }
        exchange.responded = true
        let request = exchange.request
        // Keep the connection only if the next request's start is known: the body was read whole.
        let keepAlive = request.wantsKeepAlive && exchange.bodyComplete && !closeWhenIdle && !server.isShuttingDown && !peerClosed
        if !exchange.bodyComplete {
            exchange.body?.fail(HTTPServerError(.badRequest, "the response was sent before the request body was read"))
        }
        let sendsBody = request.method != "HEAD" && !response.status.forbidsBody
        var headers = Self.withoutServerHeaders(response.headers)

        switch response.body {
        case .bytes(let bytes):
            if !response.status.forbidsBody { headers.add("Content-Length", String(bytes.count)) }
            let head = serializeHead(response.status, headers, version: request.version, keepAlive: keepAlive)
            enqueue(sendsBody && !bytes.isEmpty ? [head, bytes] : [head], then: nil)
            finish(exchange, status: response.status, bytesSent: sendsBody ? bytes.count : 0, keepAlive: keepAlive)
        case .stream(let length, let write):
            let chunked = length == nil && request.version == .http1_1
            let streamKeepAlive = keepAlive && (length != nil || chunked)
            if let length, !response.status.forbidsBody { headers.add("Content-Length", String(length)) }
            if chunked && sendsBody { headers.add("Transfer-Encoding", "chunked") }
            enqueue([serializeHead(response.status, headers, version: request.version, keepAlive: streamKeepAlive)], then: nil)
            guard sendsBody else {
                finish(exchange, status: response.status, bytesSent: 0, keepAlive: streamKeepAlive)
                return
            }
            streamBody(write, length: length, chunked: chunked, exchange: exchange, status: response.status, keepAlive: streamKeepAlive)
        }
    }

    private func streamBody(
        _ write: @escaping @Sendable (HTTPBodyWriter) async throws -> Void, length: Int?, chunked: Bool,
        exchange: Exchange, status: HTTPStatus, keepAlive: Bool
    ) {
        let target = LoopBound((self, exchange))
        let loop = self.loop
        let progress = StreamProgress()
        let writer = HTTPBodyWriter { bytes in
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
                loop.execute {
                    let connection = target.value.0
                    guard progress.add(bytes.count, limit: length) else {
                        connection.close()
                        continuation.resume(throwing: HTTPServerError(.internalServerError, "the response stream wrote more than its Content-Length"))
                        return
                    }
                    let framed = chunked ? [Array((String(bytes.count, radix: 16) + "\r\n").utf8), bytes, Array("\r\n".utf8)] : [bytes]
                    connection.enqueue(framed) { sent in
                        if sent { continuation.resume() } else { continuation.resume(throwing: HTTPServerError(.badRequest, "the client went away")) }
                    }
                }
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
                if chunked { connection.enqueue([Array("0\r\n\r\n".utf8)], then: nil) }
                connection.finish(exchange, status: status, bytesSent: progress.total, keepAlive: keepAlive)
            }
        }
    }

    private func finish(_ exchange: Exchange, status: HTTPStatus, bytesSent: Int, keepAlive: Bool) {
        guard case .exchanging(let current) = phase, current === exchange else { return }
        configuration.onRequestCompleted?(CompletedRequest(
            method: exchange.request.method, path: String(exchange.request.path), route: exchange.routePattern, status: status.code,
            requestBodyBytes: exchange.receivedBodyBytes, responseBodyBytes: bytesSent, duration: server.now - exchange.startedAt))
        phase = .awaitingRequest
        lastActivity = server.now
        if keepAlive && !closeWhenIdle {
            process()
        } else {
            closeWhenIdle = true  // bytes after this exchange are not parsed: its body may be unread
            updateInterest()
            enqueue([], then: { [weak self] _ in self?.close() })
        }
    }

    /// Answers a request whose framing is unknown or untrustworthy, then closes.
    private func refuseAndClose(_ error: HTTPServerError, request: HTTPRequest? = nil) {
        let response = configuration.errorResponder(error)
        // A streamed error body is dropped: the connection closes right after this answer.
        let bytes: [UInt8] = if case .bytes(let bytes) = response.body { bytes } else { [] }
        var headers = Self.withoutServerHeaders(response.headers)
        headers.add("Content-Length", String(bytes.count))
        closeWhenIdle = true  // read and parse nothing more
        updateInterest()
        enqueue([serializeHead(response.status, headers, version: .http1_1, keepAlive: false), bytes]) { [weak self] _ in self?.close() }
        configuration.onRequestCompleted?(CompletedRequest(
            method: request?.method ?? "-", path: request.map { String($0.path) } ?? "-", route: nil, status: error.status.code,
            requestBodyBytes: 0, responseBodyBytes: bytes.count, duration: .zero))
    }

    /// `headers` without the fields the server sets itself (framing, connection, date).
    private static func withoutServerHeaders(_ headers: HTTPHeaders) -> HTTPHeaders {
        var headers = headers
        for name in ["Content-Length", "Transfer-Encoding", "Connection", "Date"] { headers.remove(name) }
        return headers
    }

    private func serializeHead(_ status: HTTPStatus, _ headers: HTTPHeaders, version: HTTPVersion, keepAlive: Bool) -> [UInt8] {
        var head = "\(version.text) \(status.code) \(status.reasonPhrase)\r\n"
        for (name, value) in headers { head += "\(name): \(value)\r\n" }
        head += "Date: \(server.httpDate)\r\n"
        if !keepAlive {
            head += "Connection: close\r\n"
        } else if version == .http1_0 {
            head += "Connection: keep-alive\r\n"
        }
        head += "\r\n"
        return Array(head.utf8)
    }

    // MARK: Writing

    /// Queues `buffers` and writes what the socket takes; `completion` runs once everything queued
    /// so far is written (true) or the connection closed first (false).
    private func enqueue(_ buffers: [[UInt8]], then completion: ((Bool) -> Void)?) {
        if pendingWrites.isEmpty { lastWriteProgress = server.now }
        pendingWrites.append(contentsOf: buffers.filter { !$0.isEmpty })
        if let completion { flushCompletions.append(completion) }
        flush()
    }

    private func flush() {
        while !pendingWrites.isEmpty {
            let written = withIOVectors(pendingWrites.prefix(64), firstOffset: pendingOffset) { vectors in
                writev(descriptor, vectors.baseAddress, Int32(vectors.count))
            }
            if written < 0 {
                if errno == EINTR { continue }
                if errno == EAGAIN { updateInterest(); return }
                close()
                return
            }
            lastWriteProgress = server.now
            var remaining = written
            while remaining > 0 {
                let available = pendingWrites[0].count - pendingOffset
                if remaining >= available {
                    remaining -= available
                    pendingWrites.removeFirst()
                    pendingOffset = 0
                } else {
                    pendingOffset += remaining
                    remaining = 0
                }
            }
        }
        updateInterest()
        let completions = flushCompletions
        flushCompletions.removeAll()
        for completion in completions { completion(true) }
    }

    private func updateInterest() {
        guard registeredEvents != Self.closedMarker else { return }
        var events: UInt32 = 0
        if wantsToRead { events |= EPOLLIN.rawValue }
        if !pendingWrites.isEmpty { events |= EPOLLOUT.rawValue }
        if events != registeredEvents {
            registeredEvents = events
            loop.modify(descriptor, events: events)
        }
    }

    private var wantsToRead: Bool {
        if peerClosed { return false }
        switch phase {
        case .closed: return false
        case .awaitingRequest: return !closeWhenIdle
        case .exchanging(let exchange):
            // While the handler runs, read the body as demanded; pipelined bytes beyond one head's
            // worth wait in the kernel until this response is done.
            if !exchange.bodyComplete { return !exchange.bodyPaused }
            return input.count - inputStart < configuration.headLimits.maxHeaderBytes
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
        if !pendingWrites.isEmpty && now - lastWriteProgress > configuration.writeTimeout {
            close()
            return
        }
        switch phase {
        case .awaitingRequest:
            if let headStartedAt, now - headStartedAt > configuration.headerTimeout {
                refuseAndClose(HTTPServerError(.requestTimeout, "the request head took longer than \(configuration.headerTimeout)"))
            } else if headStartedAt == nil && pendingWrites.isEmpty && now - lastActivity > configuration.keepAliveTimeout {
                close()
            }
        case .exchanging(let exchange):
            if !exchange.bodyComplete && !exchange.bodyPaused && exchange.body?.wasDemanded == true
                && now - exchange.lastBodyActivity > configuration.bodyIdleTimeout {
                exchange.body?.fail(HTTPServerError(.requestTimeout, "no request body bytes arrived for \(configuration.bodyIdleTimeout)"))
                exchange.bodyPaused = true
                closeWhenIdle = true
                updateInterest()
            }
        case .closed:
            break
        }
    }

    func close() {
        if case .exchanging(let exchange) = phase, !exchange.bodyComplete {
            exchange.body?.fail(HTTPServerError(.badRequest, "the connection closed before the request body was complete"))
        }
        guard registeredEvents != Self.closedMarker else { return }
        registeredEvents = Self.closedMarker
        phase = .closed
        loop.unregister(descriptor)
        Glibc.close(descriptor)
        pendingWrites.removeAll()
        let completions = flushCompletions
        flushCompletions.removeAll()
        for completion in completions { completion(false) }
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

/// Calls `body` with iovecs over `buffers` (the first starting at `firstOffset`).
private func withIOVectors<Result>(_ buffers: ArraySlice<[UInt8]>, firstOffset: Int, _ body: (UnsafeBufferPointer<iovec>) -> Result) -> Result {
    var vectors: [iovec] = []
    vectors.reserveCapacity(buffers.count)
    func gather(_ index: Int) -> Result {
        guard index < buffers.endIndex else { return vectors.withUnsafeBufferPointer(body) }
        return buffers[index].withUnsafeBytes { raw in
            let offset = index == buffers.startIndex ? firstOffset : 0
            vectors.append(iovec(iov_base: UnsafeMutableRawPointer(mutating: raw.baseAddress! + offset), iov_len: raw.count - offset))
            return gather(index + 1)
        }
    }
    return gather(buffers.startIndex)
}
