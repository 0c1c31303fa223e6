import Dispatch
import Synchronization

/// A connection confined to its serial queue. `read` and `write` own the transaction, as GRDB's
/// `dbQueue.write { db in … }` does: the store's call sites never begin or commit by hand.
final class ConnectionQueue: @unchecked Sendable {
    // @unchecked: `connection` is only ever used inside blocks on `queue`, which is serial.
    private let connection: any StoreConnection
    private let queue: DispatchQueue
    /// Blocks queued or running, so a pool can pick the least busy connection.
    fileprivate let pending = Atomic<Int>(0)

    init(_ connection: any StoreConnection, label: String) {
        self.connection = connection
        self.queue = DispatchQueue(label: label)
    }

    /// Runs `work` in a read transaction: it reads one snapshot.
    func read<Value: Sendable>(_ work: @escaping @Sendable (any StoreConnection) throws -> Value) async throws -> Value {
        try await run(.read, work)
    }

    /// Runs `work` in a write transaction, which takes the write lock at the start, so it never
    /// fails half-way for want of it.
    func write<Value: Sendable>(_ work: @escaping @Sendable (any StoreConnection) throws -> Value) async throws -> Value {
        try await run(.write, work)
    }

    /// Like `read`, but `work` hands its result over (exactly once) and may go on working on the
    /// queue afterwards, inside the same transaction: how an aggregate streams while it is computed.
    func read<Value: Sendable>(
        handingOver work: @escaping @Sendable (any StoreConnection, _ handOver: @escaping (Value) -> Void) throws -> Void
    ) async throws -> Value {
        try await withCheckedThrowingContinuation { continuation in
            enqueue {
                var waiting: CheckedContinuation<Value, any Error>? = continuation
                let handOver = { (value: Value) in
                    waiting?.resume(returning: value)
                    waiting = nil
                }
                do {
                    try self.connection.transaction(.read) { try work(self.connection, handOver) }
                    waiting?.resume(throwing: StoreError(.database, "the store gave no answer"))
                } catch {
                    waiting?.resume(throwing: error)
                }
            }
        }
    }

    /// Runs `work` in a write transaction once the queue gets to it, without waiting for it; for
    /// writes whose loss costs nothing but work later, so a failure is dropped.
    func writeDetached(_ work: @escaping @Sendable (any StoreConnection) throws -> Void) {
        enqueue { _ = try? self.connection.transaction(.write) { try work(self.connection) } }
    }

    /// Runs `work` on the queue after `delay` seconds, outside any transaction (a checkpoint cannot
    /// run inside one), without waiting for it.
    func runDetached(after delay: Double, _ work: @escaping @Sendable (any StoreConnection) -> Void) {
        queue.asyncAfter(deadline: .now() + delay) { work(self.connection) }
    }

    private func run<Value: Sendable>(_ kind: TransactionKind, _ work: @escaping @Sendable (any StoreConnection) throws -> Value) async throws -> Value {
        try await withCheckedThrowingContinuation { continuation in
            enqueue { continuation.resume(with: Swift.Result { try self.connection.transaction(kind) { try work(self.connection) } }) }
        }
    }

    private func enqueue(_ block: @escaping @Sendable () -> Void) {
        pending.add(1, ordering: .relaxed)
        queue.async {
            block()
            self.pending.subtract(1, ordering: .relaxed)
        }
    }
}

/// Connections of one kind (readers or writers), each on its own queue; work goes to the least
/// busy. A store has one writer and as many readers as it is configured for.
final class ConnectionPool: Sendable {
    private let queues: [ConnectionQueue]

    init(_ queues: [ConnectionQueue]) {
        precondition(!queues.isEmpty)
        self.queues = queues
    }

    private var leastBusy: ConnectionQueue { queues.min { $0.pending.load(ordering: .relaxed) < $1.pending.load(ordering: .relaxed) }! }

    func read<Value: Sendable>(_ work: @escaping @Sendable (any StoreConnection) throws -> Value) async throws -> Value {
        try await leastBusy.read(work)
    }

    func write<Value: Sendable>(_ work: @escaping @Sendable (any StoreConnection) throws -> Value) async throws -> Value {
        try await leastBusy.write(work)
    }

    func read<Value: Sendable>(
        handingOver work: @escaping @Sendable (any StoreConnection, _ handOver: @escaping (Value) -> Void) throws -> Void
    ) async throws -> Value {
        try await leastBusy.read(handingOver: work)
    }

    func writeDetached(_ work: @escaping @Sendable (any StoreConnection) throws -> Void) {
        leastBusy.writeDetached(work)
    }
}
