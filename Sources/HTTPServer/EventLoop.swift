import CLinux
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// Something the event loop watches: a listening socket or a connection.
protocol EventSource: AnyObject {
    func handle(events: UInt32)
}

/// One thread, one epoll instance. Sockets are registered with the objects that handle them; work
/// from other threads arrives through `execute`, which wakes the loop through an eventfd. All
/// registered objects are confined to the loop thread.
final class EventLoop: @unchecked Sendable {
    // @unchecked: `sources`, `running` and `tick` are only touched on the loop thread; the only
    // state shared with other threads is `pendingWork`, behind its mutex.
    private let epollDescriptor: Int32
    private let wakeDescriptor: Int32
    private let pendingWork = Mutex(PendingWork())
    private struct PendingWork {
        var queue: [@Sendable () -> Void] = []
        /// Set once `run` has returned: work queued after that would never run.
        var closed = false
    }
    private var sources: [Int32: any EventSource] = [:]
    private var running = true
    private let tickInterval: Duration = .milliseconds(100)
    /// Called on the loop thread about every 100 ms (timeouts, shutdown progress).
    var tick: (() -> Void)?

    init() throws {
        epollDescriptor = epoll_create1(Int32(EPOLL_CLOEXEC))
        guard epollDescriptor >= 0 else { throw SocketError("epoll_create1") }
        wakeDescriptor = eventfd(0, Int32(EFD_NONBLOCK) | Int32(EFD_CLOEXEC))
        guard wakeDescriptor >= 0 else { throw SocketError("eventfd") }
        var event = epoll_event(events: EPOLLIN.rawValue, data: epoll_data_t(fd: wakeDescriptor))
        epoll_ctl(epollDescriptor, EPOLL_CTL_ADD, wakeDescriptor, &event)
    }

    deinit {
        close(wakeDescriptor)
        close(epollDescriptor)
    }

    /// Runs `work` on the loop thread soon; false, and `work` never runs, once the loop has stopped.
    /// Safe from any thread.
    @discardableResult
    func execute(_ work: @escaping @Sendable () -> Void) -> Bool {
        let (accepted, wasEmpty) = pendingWork.withLock { pending in
            guard !pending.closed else { return (false, false) }
            pending.queue.append(work)
            return (true, pending.queue.count == 1)
        }
        // One wake-up per batch: later callers find the queue non-empty and the loop already woken.
        if wasEmpty {
            var one: UInt64 = 1
            _ = write(wakeDescriptor, &one, 8)
        }
        return accepted
    }

    func register(_ descriptor: Int32, events: UInt32, source: any EventSource) {
        sources[descriptor] = source
        var event = epoll_event(events: events, data: epoll_data_t(fd: descriptor))
        epoll_ctl(epollDescriptor, EPOLL_CTL_ADD, descriptor, &event)
    }

    func modify(_ descriptor: Int32, events: UInt32) {
        var event = epoll_event(events: events, data: epoll_data_t(fd: descriptor))
        epoll_ctl(epollDescriptor, EPOLL_CTL_MOD, descriptor, &event)
    }

    func unregister(_ descriptor: Int32) {
        sources[descriptor] = nil
        epoll_ctl(epollDescriptor, EPOLL_CTL_DEL, descriptor, nil)
    }

    /// Makes `run` return after the current iteration. Loop thread only.
    func stop() { running = false }

    /// Runs the loop on the calling thread until `stop`.
    func run() {
        let clock = ContinuousClock()
        var nextTick = clock.now.advanced(by: tickInterval)
        var events = [epoll_event](repeating: epoll_event(), count: 256)
        while running {
            let timeout = max(0, Int32((nextTick - clock.now) / .milliseconds(1)) + 1)
            let count = events.withUnsafeMutableBufferPointer { epoll_wait(epollDescriptor, $0.baseAddress, Int32($0.count), timeout) }
            for index in 0..<max(0, Int(count)) {
                let descriptor = events[index].data.fd
                if descriptor == wakeDescriptor {
                    var value: UInt64 = 0
                    _ = read(wakeDescriptor, &value, 8)
                    continue
                }
                sources[descriptor]?.handle(events: events[index].events)
            }
            runPendingWork(closingAfter: false)
            if clock.now >= nextTick {
                nextTick = clock.now.advanced(by: tickInterval)
                tick?()
            }
        }
        runPendingWork(closingAfter: true)
    }

    /// Runs queued work until the queue is empty; with `closingAfter`, refuses any more from then on.
    private func runPendingWork(closingAfter closing: Bool) {
        while true {
            let batch = pendingWork.withLock { pending in
                if pending.queue.isEmpty && closing { pending.closed = true }
                defer { pending.queue.removeAll(keepingCapacity: true) }
                return pending.queue
            }
            if batch.isEmpty { return }
            for work in batch { work() }
        }
    }
}

/// Carries a loop-confined value through `@Sendable` closures; it may only be unwrapped on its loop
/// (the closures that unwrap it run through `EventLoop.execute`).
struct LoopBound<Value>: @unchecked Sendable {
    private let wrapped: Value
    init(_ value: Value) { wrapped = value }
    var value: Value { wrapped }
}

/// Like `LoopBound`, for two objects held weakly: nil once either is gone.
struct WeakLoopBound<First: AnyObject, Second: AnyObject>: @unchecked Sendable {
    private weak var first: First?
    private weak var second: Second?
    init(_ first: First, _ second: Second) {
        self.first = first
        self.second = second
    }
    var values: (First, Second)? {
        guard let first, let second else { return nil }
        return (first, second)
    }
}
