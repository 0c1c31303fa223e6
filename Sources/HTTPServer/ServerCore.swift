import CLinux

#if canImport(Glibc)
    import Glibc
#endif

/// The server's state on its event loop: the listener, the open connections, the cached `Date`,
/// timeouts and the progress of a graceful shutdown. Confined to the loop thread.
final class ServerCore: EventSource {
    let loop: EventLoop
    let configuration: HTTPServerConfiguration
    let router: Router
    private var listener: ListeningSocket?
    private var accepting = false
    private var connections: [Int32: HTTPConnection] = [:]
    private var readBuffer = [UInt8](repeating: 0, count: 64 * 1024)
    private let clock = ContinuousClock()
    private(set) var isShuttingDown = false
    private var shutdownDeadline: ContinuousClock.Instant?
    private var cachedDate: (second: Int, text: String) = (-1, "")

    init(loop: EventLoop, configuration: HTTPServerConfiguration, router: Router, listener: ListeningSocket) {
        self.loop = loop
        self.configuration = configuration
        self.router = router
        self.listener = listener
    }

    var now: ContinuousClock.Instant { clock.now }

    func start() {
        resumeAccepting()
        loop.tick = { [unowned self] in self.tick() }
    }

    func withReadBuffer<Result>(_ body: (UnsafeMutableRawBufferPointer) -> Result) -> Result {
        readBuffer.withUnsafeMutableBytes(body)
    }

    // MARK: Accepting

    /// The listener is readable: accept every waiting connection, up to the connection limit.
    func handle(events: UInt32) {
        guard let listener else { return }
        while connections.count < configuration.maxConnections, let descriptor = listener.accept() {
            let connection = HTTPConnection(descriptor: descriptor, server: self)
            connections[descriptor] = connection
            connection.start()
        }
        if connections.count >= configuration.maxConnections { pauseAccepting() }
    }

    private func resumeAccepting() {
        guard let listener, !accepting, !isShuttingDown else { return }
        accepting = true
        loop.register(listener.descriptor, events: EPOLLIN.rawValue, source: self)
    }

    private func pauseAccepting() {
        guard let listener, accepting else { return }
        accepting = false
        loop.unregister(listener.descriptor)
    }

    var connectionCount: Int { connections.count }

    private var lingeringCount = 0

    /// Counts a connection that starts lingering; false past the limit or while shutting down.
    func beginLingering() -> Bool {
        guard !isShuttingDown, lingeringCount < configuration.lingeringClose.maxConnections else { return false }
        lingeringCount += 1
        return true
    }

    func endLingering() { lingeringCount -= 1 }

    func connectionClosed(_ connection: HTTPConnection) {
        connections[connection.descriptor] = nil
        if connections.count < configuration.maxConnections { resumeAccepting() }
        if isShuttingDown && connections.isEmpty { loop.stop() }
    }

    // MARK: Time

    private func tick() {
        let now = self.now
        for connection in Array(connections.values) { connection.checkTimeouts(now: now) }
        if let shutdownDeadline, now >= shutdownDeadline {
            for connection in Array(connections.values) { connection.close() }
            loop.stop()
        }
    }

    /// The current time as an IMF-fixdate (RFC 9110 §5.6.7), recomputed once a second.
    var httpDate: String {
        var seconds = time(nil)
        if seconds != cachedDate.second {
            var parts = tm()
            gmtime_r(&seconds, &parts)
            let days = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"]
            let months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
            func twoDigits(_ value: Int32) -> String { value < 10 ? "0\(value)" : "\(value)" }
            let text =
                "\(days[Int(parts.tm_wday)]), \(twoDigits(parts.tm_mday)) \(months[Int(parts.tm_mon)]) \(parts.tm_year + 1900) \(twoDigits(parts.tm_hour)):\(twoDigits(parts.tm_min)):\(twoDigits(parts.tm_sec)) GMT"
            cachedDate = (seconds, text)
        }
        return cachedDate.text
    }

    // MARK: Shutdown

    /// Stops accepting, closes idle connections, lets exchanges in flight finish within the grace
    /// period, then stops the loop.
    func beginShutdown() {
        guard !isShuttingDown else { return }
        pauseAccepting()
        isShuttingDown = true
        listener = nil
        shutdownDeadline = now.advanced(by: configuration.shutdownGracePeriod)
        for connection in Array(connections.values) { connection.beginShutdown() }
        if connections.isEmpty { loop.stop() }
    }
}
