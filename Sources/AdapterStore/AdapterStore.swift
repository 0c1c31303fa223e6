import LoRAAdapters
import Synchronization

/// Uploads and rounds in one SQLite file (WAL, `synchronous=FULL`: a returned
/// write is on disk). Every call runs on one of two serial queues, one per connection: a writer and
/// a reader, so SQLite's blocking calls never run on Swift's cooperative pool and an aggregation
/// (a long read transaction) does not stop uploads. Several processes may share one file; SQLite's
/// locks and the busy timeout keep them correct. Computed aggregates are cached in memory.
public final class AdapterStore: Sendable {
    let writer: ConnectionQueue
    let reader: ConnectionQueue
    let cache: AggregateCache
    private let checkpointer: ConnectionQueue
    /// True while a checkpoint is queued, so a burst of writes queues one.
    private let checkpointQueued = Mutex(false)

    /// - Parameter aggregateCacheBytes: memory kept for recently computed aggregates.
    public init(path: String, aggregateCacheBytes: Int = 1 << 30) throws {
        cache = AggregateCache(capacityBytes: aggregateCacheBytes)
        let writerConnection = try SQLiteConnection(path: path)
        // Tensors are large blobs: 64 KiB pages (the largest; it applies only to a new file, before
        // WAL) make a 1 MB tensor 16 overflow pages instead of 256, and reads go through a memory
        // map instead of a read() per page.
        // Checkpoints (copying the WAL into the database) are not needed for durability, since each
        // commit syncs the WAL, so they run from their own connection after writes instead of
        // inside whichever upload's commit crosses the threshold (which halved ingest).
        try writerConnection.execute(
            "PRAGMA page_size = 65536; PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; PRAGMA wal_autocheckpoint = 0;")
        try writerConnection.execute(Self.readTuning)
        try Schema.migrate(writerConnection)
        let readerConnection = try SQLiteConnection(path: path)
        try readerConnection.execute("PRAGMA foreign_keys = ON; PRAGMA query_only = ON;")
        try readerConnection.execute(Self.readTuning)
        writer = ConnectionQueue(writerConnection, label: "lora-aggregator.store.writer")
        reader = ConnectionQueue(readerConnection, label: "lora-aggregator.store.reader")
        // A short busy timeout: the checkpointer gives way to writers and long readers, and retries.
        checkpointer = ConnectionQueue(try SQLiteConnection(path: path, busyTimeoutMilliseconds: 50), label: "lora-aggregator.store.checkpoint")
    }

    private static let readTuning = "PRAGMA mmap_size = 2147418112; PRAGMA cache_size = -65536;"

    /// Queues a checkpoint unless one is queued. A passive one first (it never blocks writers or
    /// readers); then, if no write came in meanwhile, a truncating one, which empties the WAL so that
    /// reads come from the memory-mapped file again instead of WAL frames. If readers hold the WAL,
    /// it tries again a second later.
    func scheduleCheckpoint(after delay: Double = 0, attempts: Int = 30) {
        guard
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
