import Foundation
import Synchronization

/// An HTTP/1.1 server on POSIX sockets and one epoll event loop. Connections are parsed on the loop
/// (an idle or slow connection holds no thread); each request's handler runs in its own task.
///
///     let server = HTTPServer(configuration: configuration, router: router)
///     let address = try server.start()     // bound and serving
///     await server.run()                   // returns after shutdown()
public final class HTTPServer: Sendable {
    public let configuration: HTTPServerConfiguration
    private let router: Router

    private struct State {
        var loop: EventLoop?
        var core: LoopBound<ServerCore>?
        var address: HTTPServerAddress?
        var stopped = false
        var waiters: [CheckedContinuation<Void, Never>] = []
    }

    // Shared between the caller's threads and the loop thread that reports the stop.
    private let state = Mutex(State())

    public init(configuration: HTTPServerConfiguration, router: Router) {
        self.configuration = configuration
        self.router = router
    }

    /// Binds the listening socket and starts the event loop; returns the address bound.
    @discardableResult
    public func start() throws -> HTTPServerAddress {
        // A peer that closes early must surface as EPIPE from writev, not kill the process.
        signal(SIGPIPE, SIG_IGN)
        let listener = try ListeningSocket(host: configuration.host, port: configuration.port, backlog: configuration.backlog)
        let loop = try EventLoop()
        let core = ServerCore(loop: loop, configuration: configuration, router: router, listener: listener)
        let bound = LoopBound(core)
        state.withLock {
            $0.loop = loop
            $0.core = bound
            $0.address = listener.address
        }
        let thread = Thread { [self] in
            bound.value.start()
            loop.run()
            let waiters = state.withLock { state in
                state.stopped = true
                state.core = nil
                defer { state.waiters.removeAll() }
                return state.waiters
            }
            for waiter in waiters { waiter.resume() }
        }
        thread.name = "http-event-loop"
        thread.start()
        return listener.address
    }

    public var address: HTTPServerAddress? { state.withLock { $0.address } }

    /// Waits until the server has stopped.
    public func run() async {
        await withCheckedContinuation { continuation in
            let alreadyStopped = state.withLock { state in
                if state.stopped || state.loop == nil { return true }
                state.waiters.append(continuation)
                return false
            }
            if alreadyStopped { continuation.resume() }
        }
    }

    /// How many client connections are open, as the event loop sees them (0 once stopped).
    public func openConnectionCount() async -> Int {
        let (loop, core) = state.withLock { ($0.loop, $0.core) }
        guard let loop, let core else { return 0 }
        return await withCheckedContinuation { continuation in
            guard loop.execute({ continuation.resume(returning: core.value.connectionCount) }) else {
                continuation.resume(returning: 0)
                return
            }
        }
    }

    /// Graceful shutdown: stop accepting, close idle connections, let requests in flight finish
    /// within `shutdownGracePeriod`, then stop. Safe from any thread; `run()` returns afterwards.
    public func shutdown() {
        let (loop, core) = state.withLock { ($0.loop, $0.core) }
        guard let loop, let core else { return }
        loop.execute { core.value.beginShutdown() }
    }
}
