import Dispatch
import LoRAAdapters
import Synchronization

/// Uploads and rounds in a database: one SQLite file (the embedded default), or PostgreSQL, which
/// any number of processes on any machines may share. Every call runs on a serial queue of one
/// connection, so the databases' blocking calls never run on Swift's cooperative pool: writes on a
/// writer, reads on a reader, so an aggregation (a long read transaction) does not stop uploads.
/// Writes run one at a time across all processes on the database (SQLite's write lock, a PostgreSQL
/// advisory lock), so a seal, its chaining and a deadline firing are never done twice. Computed
/// aggregates are cached in memory, keyed by the round's revision in the database.
public final class AdapterStore: Sendable {
    let writer: ConnectionPool
    let reader: ConnectionPool
    let cache: AggregateCache
    let inFlight = ComputationsInFlight()
    /// Where streamed first computations are hashed and recorded, off the store's readers and one
    /// at a time, with how many wait there (`afterStreamingLimit`).
    let afterStreaming = DispatchQueue(label: "lora-aggregator.store.after-streaming")
    let afterStreamingBacklog = Mutex(0)
    /// SQLite's WAL checkpoints; nil for PostgreSQL, which checkpoints by itself.
    private let checkpointer: ConnectionQueue?
    /// True while a checkpoint is queued, so a burst of writes queues one.
    private let checkpointQueued = Mutex(false)

    /// - Parameters:
    ///   - database: a SQLite file's path, or a `postgresql://` (or `postgres://`) URI.
    ///   - aggregateCacheBytes: memory kept for recently computed aggregates.
    ///   - readConnections: connections for reads: PostgreSQL's, or SQLite's on the one file (WAL
    ///     lets them read side by side and beside the writer), so one long aggregation does not
    ///     hold up every other read (token checks, round states, other aggregates).
    ///   - writeLockTimeoutSeconds: PostgreSQL: how long a write waits for another process's write.
    public init(database: String, aggregateCacheBytes: Int = 1 << 30, readConnections: Int = 8, writeLockTimeoutSeconds: Double = 30) throws {
        cache = AggregateCache(capacityBytes: aggregateCacheBytes)
        if PostgresConnection.accepts(database) {
            let writerConnection = try PostgresConnection(uri: database, lockTimeoutSeconds: writeLockTimeoutSeconds)
            try PostgresSchema.migrate(writerConnection)
            writer = ConnectionPool([ConnectionQueue(writerConnection, label: "lora-aggregator.store.writer")])
            reader = ConnectionPool(
                try (0..<max(1, readConnections)).map { index in
                    ConnectionQueue(try PostgresConnection(uri: database), label: "lora-aggregator.store.reader.\(index)")
                })
            checkpointer = nil
            return
        }
        let path = database
        let writerConnection = try SQLiteConnection(path: path)
        // Tensors are large blobs: 64 KiB pages (the largest; it applies only to a new file, before
        // WAL) make a 1 MB tensor 16 overflow pages instead of 256, and reads go through a memory
        // map instead of a read() per page.
        // Checkpoints (copying the WAL into the database) are not needed for durability, since each
        // commit syncs the WAL, so they run from their own connection after writes instead of
        // inside whichever upload's commit crosses the threshold (which halved ingest).
        try writerConnection.execute(
            "PRAGMA page_size = 65536; PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; PRAGMA wal_autocheckpoint = 0;")
        try writerConnection.execute("PRAGMA mmap_size = \(Self.mmapBytes); PRAGMA cache_size = -65536;")
        try Schema.migrate(writerConnection)
        writer = ConnectionPool([ConnectionQueue(writerConnection, label: "lora-aggregator.store.writer")])
        reader = ConnectionPool(
            try (0..<max(1, readConnections)).map { index in
                let connection = try SQLiteConnection(path: path)
                // A reader's page cache holds what the memory map does not (pages still in the
                // WAL): a quarter of the writer's, so eight readers stay within 128 MB.
                try connection.execute("PRAGMA foreign_keys = ON; PRAGMA query_only = ON; PRAGMA mmap_size = \(Self.mmapBytes); PRAGMA cache_size = -16384;")
                return ConnectionQueue(connection, label: "lora-aggregator.store.reader.\(index)")
            })
        // A short busy timeout: the checkpointer gives way to writers and long readers, and retries.
        checkpointer = ConnectionQueue(try SQLiteConnection(path: path, busyTimeoutMilliseconds: 50), label: "lora-aggregator.store.checkpoint")
    }

    private static let mmapBytes = 2_147_418_112

    /// Queues a checkpoint unless one is queued. A passive one first (it never blocks writers or
    /// readers); then, if no write came in meanwhile, a truncating one, which empties the WAL so that
    /// reads come from the memory-mapped file again instead of WAL frames. If readers hold the WAL,
    /// it tries again a second later.
    func scheduleCheckpoint(after delay: Double = 0, attempts: Int = 30) {
        guard let checkpointer,
            checkpointQueued.withLock({ queued in
                defer { queued = true }
                return !queued
            })
        else { return }
        checkpointer.runDetached(after: delay) { [self] connection in
            checkpointQueued.withLock { $0 = false }
            try? connection.execute("PRAGMA wal_checkpoint(PASSIVE)")
            guard !checkpointQueued.withLock({ $0 }) else { return }  // more writes: they will come back here
            let truncate = try? connection.statement("PRAGMA wal_checkpoint(TRUNCATE)")
            let blocked = (try? truncate?.step()) == true && truncate?.integer(0) != 0
            truncate?.reset()
            if blocked && attempts > 1 { scheduleCheckpoint(after: 1, attempts: attempts - 1) }
        }
    }
}
