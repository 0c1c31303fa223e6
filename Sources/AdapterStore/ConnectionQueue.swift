import Dispatch

/// A connection confined to its serial queue. `read` and `write` own the transaction, as GRDB's
/// `dbQueue.write { db in … }` does: the store's call sites never begin or commit by hand.
final class ConnectionQueue: @unchecked Sendable {
    // @unchecked: `connection` is only ever used inside blocks on `queue`, which is serial.
    private let connection: SQLiteConnection
    private let queue: DispatchQueue

    init(_ connection: SQLiteConnection, label: String) {
        self.connection = connection
        self.queue = DispatchQueue(label: label)
    }

    /// Runs `work` in a deferred transaction: it reads one snapshot and takes no write lock.
    func read<Value: Sendable>(_ work: @escaping @Sendable (SQLiteConnection) throws -> Value) async throws -> Value {
        try await run(immediate: false, work)
    }

    /// Runs `work` in an immediate transaction, which takes the write lock at the start, so it never
    /// fails half-way for want of it.
    func write<Value: Sendable>(_ work: @escaping @Sendable (SQLiteConnection) throws -> Value) async throws -> Value {
        try await run(immediate: true, work)
    }

    /// Like `read`, but `work` hands its result over (exactly once) and may go on working on the
    /// queue afterwards, inside the same transaction: how an aggregate streams while it is computed.
    func read<Value: Sendable>(
        handingOver work: @escaping @Sendable (SQLiteConnection, _ handOver: @escaping (Value) -> Void) throws -> Void
    ) async throws -> Value {
        try await withCheckedThrowingContinuation { continuation in
            queue.async {
                var waiting: CheckedContinuation<Value, any Error>? = continuation
                let handOver = { (value: Value) in
                    waiting?.resume(returning: value)
                    waiting = nil
                }
                do {
                    try self.connection.transaction(immediate: false) { try work(self.connection, handOver) }
                    waiting?.resume(throwing: StoreError(.database, "the store gave no answer"))
                } catch {
                    waiting?.resume(throwing: error)
                }
            }
        }
    }

    /// Runs `work` in an immediate transaction once the queue gets to it, without waiting for it;
    /// for writes whose loss costs nothing but work later, so a failure is dropped.
    func writeDetached(_ work: @escaping @Sendable (SQLiteConnection) throws -> Void) {
        runDetached(after: 0) { connection in try? connection.transaction(immediate: true) { try work(connection) } }
    }

    /// Runs `work` on the queue after `delay` seconds, outside any transaction (a checkpoint cannot
    /// run inside one), without waiting for it.
    func runDetached(after delay: Double, _ work: @escaping @Sendable (SQLiteConnection) -> Void) {
        queue.asyncAfter(deadline: .now() + delay) { work(self.connection) }
    }

    private func run<Value: Sendable>(immediate: Bool, _ work: @escaping @Sendable (SQLiteConnection) throws -> Value) async throws -> Value {
        try await withCheckedThrowingContinuation { continuation in
            queue.async {
                continuation.resume(with: Swift.Result { try self.connection.transaction(immediate: immediate) { try work(self.connection) } })
            }
        }
    }
}
