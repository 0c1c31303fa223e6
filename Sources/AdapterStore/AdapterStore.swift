import Dispatch
import LoRAAdapters
import Synchronization

/// Uploads and rounds in one SQLite file (WAL, `synchronous=FULL`: a returned
/// write is on disk). Every call runs on one of two serial queues, one per connection: a writer and
/// a reader, so SQLite's blocking calls never run on Swift's cooperative pool and an aggregation
/// (a long read transaction) does not stop uploads. Several processes may share one file; SQLite's
/// locks and the busy timeout keep them correct. Computed aggregates are cached in memory.
public final class AdapterStore: Sendable {
    private let writer: ConnectionQueue
    private let reader: ConnectionQueue
    private let cache: AggregateCache
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
        try writerConnection.execute("PRAGMA page_size = 65536; PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; PRAGMA wal_autocheckpoint = 0;")
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

    // MARK: Uploads

    /// Stores `upload` in one transaction, replacing the client's earlier upload; returns its record
    /// and whether it is new. Throws `roundSealed`, or `shapeMismatch` when a tensor disagrees with
    /// the round's other uploads apart from the rank axis; nothing is written then.
    public func put(_ upload: NewUpload) async throws -> (record: UploadRecord, created: Bool) {
        defer { scheduleCheckpoint() }
        return try await writer.run { connection in
            try connection.transaction(immediate: true) {
                try Self.ensureRoundOpen(connection, upload.federation, upload.round)
                try Self.checkShapes(of: upload, against: connection)
                let existing = try connection.statement("DELETE FROM uploads WHERE federation = ?1 AND round = ?2 AND client = ?3")
                try existing.bind(.text(upload.federation), .integer(upload.round), .text(upload.client)).run()
                let replaced = connection.changes > 0

                let headerLength = 8 + Int(upload.file.bytes.withUnsafeBytes { $0.loadUnaligned(as: UInt64.self) })
                try connection.statement("""
                    INSERT INTO uploads (federation, round, client, rank, weight, bytes, sha256, uploaded_at, header)
                    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), ?8)
                    """).bind(.text(upload.federation), .integer(upload.round), .text(upload.client), .integer(Int64(upload.rank)),
                              .real(upload.weight), .integer(Int64(upload.file.bytes.count)), .text(upload.sha256),
                              .blob(Array(upload.file.bytes[0..<headerLength]))).run()
                let uploadID = connection.lastInsertedRowID
                let insertTensor = try connection.statement("INSERT INTO tensors (upload_id, name, dtype, shape, data_offset, data) VALUES (?1, ?2, ?3, ?4, ?5, ?6)")
                for tensor in upload.file.tensors {
                    try upload.file.withBytes(of: tensor) { data in
                        insertTensor.reset()
                        try insertTensor.bind(.integer(uploadID), .text(tensor.name), .text(tensor.dtype.rawValue), .text(SQLiteAdapterSource.shapeText(tensor.shape)),
                                              .integer(Int64(tensor.byteRange.lowerBound)), .borrowedBlob(data)).run()
                    }
                }
                try Self.roundChanged(connection, upload.federation, upload.round)
                let record = try Self.uploadRecords(connection, upload.federation, upload.round, client: upload.client)[0]
                return (record, !replaced)
            }
        }
    }

    /// The client's stored file, byte for byte as uploaded (decompressed), with its record.
    public func upload(federation: String, round: Int64, client: String) async throws -> (record: UploadRecord, file: [UInt8])? {
        try await reader.run { connection in
            try connection.transaction(immediate: false) {
                guard let record = try Self.uploadRecords(connection, federation, round, client: client).first else { return nil }
                let header = try connection.statement("SELECT id, header FROM uploads WHERE federation = ?1 AND round = ?2 AND client = ?3")
                try header.bind(.text(federation), .integer(round), .text(client))
                guard try header.step() else { return nil }
                var file = header.blob(1)
                file.reserveCapacity(record.bytes)
                let tensors = try connection.statement("SELECT data FROM tensors WHERE upload_id = ?1 ORDER BY data_offset")
                try tensors.bind(.integer(header.integer(0)))
                while try tensors.step() { tensors.withBlob(0) { file.append(contentsOf: $0) } }
                return (record, file)
            }
        }
    }

    /// Deletes the client's upload; false when there was none. Throws `roundSealed`.
    public func deleteUpload(federation: String, round: Int64, client: String) async throws -> Bool {
        defer { scheduleCheckpoint() }
        return try await writer.run { connection in
            try connection.transaction(immediate: true) {
                try Self.ensureRoundOpen(connection, federation, round)
                try connection.statement("DELETE FROM uploads WHERE federation = ?1 AND round = ?2 AND client = ?3")
                    .bind(.text(federation), .integer(round), .text(client)).run()
                guard connection.changes > 0 else { return false }
                try Self.roundChanged(connection, federation, round)
                return true
            }
        }
    }

    /// Queues a checkpoint unless one is queued. A passive one first (it never blocks writers or
    /// readers); then, if no write came in meanwhile, a truncating one, which empties the WAL so that
    /// reads come from the memory-mapped file again instead of WAL frames. If readers hold the WAL,
    /// it tries again a second later.
    private func scheduleCheckpoint(after delay: Double = 0, attempts: Int = 30) {
        guard checkpointQueued.withLock({ queued in defer { queued = true }; return !queued }) else { return }
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

    // MARK: Rounds

    /// The round with its uploads; nil when it has none and is not sealed.
    public func round(federation: String, round: Int64) async throws -> RoundRecord? {
        try await reader.run { connection in
            try connection.transaction(immediate: false) { try Self.roundRecord(connection, federation, round) }
        }
    }

    public func rounds(federation: String) async throws -> [RoundSummary] {
        try await reader.run { connection in try connection.transaction(immediate: false) {
            let statement = try connection.statement("""
                SELECT r.round, r.sealed, count(u.id), coalesce(max(u.rank), 0) FROM rounds r
                LEFT JOIN uploads u ON u.federation = r.federation AND u.round = r.round
                WHERE r.federation = ?1 GROUP BY r.round HAVING count(u.id) > 0 OR r.sealed ORDER BY r.round
                """)
            try statement.bind(.text(federation))
            var summaries: [RoundSummary] = []
            while try statement.step() {
                summaries.append(RoundSummary(round: statement.integer(0), sealed: statement.integer(1) != 0, uploads: Int(statement.integer(2)), maxRank: Int(statement.integer(3))))
            }
            return summaries
        } }
    }

    /// Seals the round (idempotent; an empty round can be sealed too) and returns it.
    public func seal(federation: String, round: Int64) async throws -> RoundRecord {
        try await writer.run { connection in
            try connection.transaction(immediate: true) {
                try connection.statement("INSERT INTO rounds (federation, round, sealed) VALUES (?1, ?2, 1) ON CONFLICT DO UPDATE SET sealed = 1")
                    .bind(.text(federation), .integer(round)).run()
                return try Self.roundRecord(connection, federation, round)!
            }
        }
    }

    // MARK: Aggregates

    /// The aggregate of the round (or, with `client`, truncated to that client's rank), from the
    /// cache when the round has not changed since it was computed. Nil when the round has no
    /// uploads, or `client` has none in it. Throws `rankOutOfRange` for a rank past the global one.
    public func aggregate(
        federation: String, round: Int64, client: String?, strategy: AggregationStrategy, rank: Int?, dtype: DType
    ) async throws -> StoredAggregate? {
        let outcome = try await aggregate(federation: federation, round: round, client: client, strategy: strategy, rank: rank, dtype: dtype) { _ in .compute }
        guard case .complete(let aggregate)? = outcome else { return nil }
        return aggregate
    }

    /// The same, except when the aggregate is not in memory but was computed before (in this
    /// process or another on the same file) for the round as it is now: then its digest is on
    /// record and `plan` decides whether to compute it at all, and whether to stream it.
    public func aggregate(
        federation: String, round: Int64, client: String?, strategy: AggregationStrategy, rank requestedRank: Int?, dtype: DType,
        whenDigestKnown plan: @escaping @Sendable (AggregateDigest) -> KnownDigestPlan
    ) async throws -> AggregateOutcome? {
        return try await reader.run { [self] (connection, handOver: (AggregateOutcome?) -> Void) in
            try connection.transaction(immediate: false) {
                guard let key = try Self.aggregateKey(connection, federation, round, client, strategy, requestedRank, dtype) else { return handOver(nil) }
                if let cached = cache.value(for: key) {
                    return handOver(.complete(StoredAggregate(bytes: cached.bytes, sha256: cached.sha256, rank: cached.rank, fromCache: true)))
                }
                let source = SQLiteAdapterSource(connection: connection, federation: federation, round: round)
                let options = AggregationOptions(strategy: strategy, rank: key.rank, dtype: dtype, metadata: ["federation": federation, "round": String(round)])
                let recorded = try Self.recordedDigest(connection, key)
                let planned = recorded.map { ($0, plan($0)) }
                if case let (digest, .digestOnly)? = planned { return handOver(.digestOnly(digest)) }
                if let wider = cache.wider(than: key) {
                    return handOver(.complete(try cut(wider, for: key, recorded: recorded)))
                }
                switch planned {
                case let (digest, .stream)?:
                    let (pieces, continuation) = AsyncThrowingStream<[UInt8], any Error>.makeStream()
                    handOver(.streaming(digest, pieces))
                    try stream(source, options, matching: digest, for: key, into: DigestCheckedStream(continuation))
                default:
                    handOver(.complete(try compute(source, options, for: key, recorded: recorded)))
                }
            }
        }
    }

    /// Computes and hashes the aggregate, caches it, and records its digest unless it is on record.
    private func compute(_ source: SQLiteAdapterSource, _ options: AggregationOptions, for key: AggregateCache.Key, recorded: AggregateDigest?) throws -> StoredAggregate {
        let digest = BackgroundDigest(sha256: true)
        let result = try AdapterAggregator.aggregate(source, options: options, observer: digest)
        let digests = digest.digests()
        return remember(result.bytes, sha256: digests.sha256!, crc32: digests.crc32, for: key, recorded: recorded)
    }

    /// Cuts the aggregate from a cached one of the same round at a higher rank, reading no upload.
    private func cut(_ wider: StoredAggregate, for key: AggregateCache.Key, recorded: AggregateDigest?) throws -> StoredAggregate {
        let bytes = try AdapterAggregator.truncate(try SafetensorsFile(bytes: wider.bytes), toRank: key.rank)
        let crc32 = bytes.withUnsafeBytes { ContentDigest.crc32($0) }
        return remember(bytes, sha256: ContentDigest.sha256Hex(bytes), crc32: crc32, for: key, recorded: recorded)
    }

    /// Caches a new aggregate and records its digest unless that is on record already.
    private func remember(_ bytes: [UInt8], sha256: String, crc32: UInt32, for key: AggregateCache.Key, recorded: AggregateDigest?) -> StoredAggregate {
        let aggregate = StoredAggregate(bytes: bytes, sha256: sha256, rank: key.rank, fromCache: false)
        cache.insert(aggregate, for: key)
        let digest = AggregateDigest(sha256: sha256, byteCount: bytes.count, rank: key.rank, crc32: crc32)
        if digest != recorded { recordDigest(digest, for: key) }
        return aggregate
    }

    /// Computes the aggregate into `stream` as it goes, checked against the digest on record: a
    /// match is cached, a mismatch fails the stream and drops the record. The pieces are copies,
    /// so a slow client holds them (at most one aggregate) but not the store's reader.
    private func stream(_ source: SQLiteAdapterSource, _ options: AggregationOptions, matching recorded: AggregateDigest,
                        for key: AggregateCache.Key, into stream: DigestCheckedStream) throws {
        let digest = BackgroundDigest(sha256: false, forward: stream.forward)
        do {
            let result = try AdapterAggregator.aggregate(source, options: options, observer: digest)
            let crc32 = digest.digests().crc32
            stream.finish(crc32: crc32, expected: recorded.crc32)
            if crc32 == recorded.crc32 {
                cache.insert(StoredAggregate(bytes: result.bytes, sha256: recorded.sha256, rank: result.rank, fromCache: false), for: key)
            } else {
                forgetDigest(for: key)
            }
        } catch {
            stream.fail(error)
            throw error
        }
    }

    /// The cache key of a request against the round as it is now; nil when the round has no
    /// uploads or `client` has none in it.
    private static func aggregateKey(
        _ connection: SQLiteConnection, _ federation: String, _ round: Int64, _ client: String?,
        _ strategy: AggregationStrategy, _ requestedRank: Int?, _ dtype: DType
    ) throws -> AggregateCache.Key? {
        let participants = try SQLiteAdapterSource(connection: connection, federation: federation, round: round).participants()
        guard !participants.isEmpty else { return nil }
        var rank = requestedRank
        if let client {
            guard let participant = participants.first(where: { $0.clientID == client }) else { return nil }
            rank = participant.rank
        }
        let revision = try connection.statement("SELECT revision FROM rounds WHERE federation = ?1 AND round = ?2")
        try revision.bind(.text(federation), .integer(round))
        _ = try revision.step()
        return AggregateCache.Key(federation: federation, round: round, revision: revision.integer(0), strategy: strategy,
                                  rank: rank ?? participants.map(\.rank).max()!, dtype: dtype)
    }

    private static func recordedDigest(_ connection: SQLiteConnection, _ key: AggregateCache.Key) throws -> AggregateDigest? {
        let statement = try connection.statement("SELECT sha256, bytes, crc32 FROM aggregate_digests WHERE \(digestKeyColumns)")
        try statement.bind(digestKey(key))
        guard try statement.step() else { return nil }
        return AggregateDigest(sha256: statement.text(0), byteCount: Int(statement.integer(1)), rank: key.rank, crc32: UInt32(truncatingIfNeeded: statement.integer(2)))
    }

    /// The primary key of `aggregate_digests` (bound as ?1...?7) and its values for `key`, in column
    /// order: digests of this engine version only.
    private static let digestKeyColumns =
        "federation = ?1 AND round = ?2 AND revision = ?3 AND strategy = ?4 AND rank = ?5 AND dtype = ?6 AND engine_version = ?7"
    private static func digestKey(_ key: AggregateCache.Key) -> [SQLiteValue] {
        [.text(key.federation), .integer(key.round), .integer(key.revision), .text(key.strategy.rawValue),
         .integer(Int64(key.rank)), .text(key.dtype.rawValue), .integer(Int64(AdapterAggregator.outputVersion))]
    }

    /// Records an aggregate's digest after the request is answered: losing it costs only a
    /// streamed answer later. A row for a revision that has moved on meanwhile is never matched.
    private func recordDigest(_ digest: AggregateDigest, for key: AggregateCache.Key) {
        writer.runDetached(after: 0) { connection in
            try? connection.transaction(immediate: true) {
                try connection.statement("""
                    INSERT OR REPLACE INTO aggregate_digests (federation, round, revision, strategy, rank, dtype, engine_version, sha256, crc32, bytes)
                    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                    """).bind(Self.digestKey(key) + [.text(digest.sha256), .integer(Int64(digest.crc32)), .integer(Int64(digest.byteCount))]).run()
            }
        }
    }

    /// Drops a recorded digest the bytes no longer match, so the next request computes afresh.
    private func forgetDigest(for key: AggregateCache.Key) {
        writer.runDetached(after: 0) { connection in
            try? connection.transaction(immediate: true) {
                try connection.statement("DELETE FROM aggregate_digests WHERE \(Self.digestKeyColumns)").bind(Self.digestKey(key)).run()
            }
        }
    }

    // MARK: Client tokens

    /// Records a token for the client, by its hash only.
    public func addClientToken(hash: String, federation: String, client: String) async throws {
        try await writer.run { connection in
            try connection.transaction(immediate: true) {
                try connection.statement("INSERT INTO client_tokens (token_hash, federation, client, created_at) VALUES (?1, ?2, ?3, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))")
                    .bind(.text(hash), .text(federation), .text(client)).run()
            }
        }
    }

    /// Revokes every token of the client; returns how many there were.
    @discardableResult
    public func revokeClientTokens(federation: String, client: String) async throws -> Int {
        try await writer.run { connection in
            try connection.transaction(immediate: true) {
                try connection.statement("DELETE FROM client_tokens WHERE federation = ?1 AND client = ?2").bind(.text(federation), .text(client)).run()
                return connection.changes
            }
        }
    }

    /// The federation and client a token hash belongs to, or nil.
    public func clientToken(hash: String) async throws -> (federation: String, client: String)? {
        try await reader.run { connection in
            try connection.transaction(immediate: false) {
                let statement = try connection.statement("SELECT federation, client FROM client_tokens WHERE token_hash = ?1")
                try statement.bind(.text(hash))
                return try statement.step() ? (statement.text(0), statement.text(1)) : nil
            }
        }
    }

    // MARK: Helpers (inside a transaction)

    private static func ensureRoundOpen(_ connection: SQLiteConnection, _ federation: String, _ round: Int64) throws {
        try connection.statement("INSERT INTO rounds (federation, round) VALUES (?1, ?2) ON CONFLICT DO NOTHING")
            .bind(.text(federation), .integer(round)).run()
        let sealed = try connection.statement("SELECT sealed FROM rounds WHERE federation = ?1 AND round = ?2")
        try sealed.bind(.text(federation), .integer(round))
        if try sealed.step(), sealed.integer(0) != 0 {
            throw StoreError(.roundSealed, "round \(round) of federation '\(federation)' is sealed")
        }
    }

    /// Every tensor of `upload` against the same name in the round's other uploads.
    private static func checkShapes(of upload: NewUpload, against connection: SQLiteConnection) throws {
        let statement = try connection.statement("""
            SELECT t.name, t.shape FROM uploads u JOIN tensors t ON t.upload_id = u.id
            WHERE u.federation = ?1 AND u.round = ?2 AND u.client != ?3 GROUP BY t.name
            """)
        try statement.bind(.text(upload.federation), .integer(upload.round), .text(upload.client))
        while try statement.step() {
            guard let tensor = upload.file.tensor(named: statement.text(0)) else { continue }
            try RoundShapeCheck.check(name: tensor.name, shape: tensor.shape, against: SQLiteAdapterSource.shape(statement.text(1)))
        }
    }

    /// A change to a round's uploads: a new revision, so no cached aggregate or recorded digest of
    /// it matches any more (and the recorded ones can go).
    private static func roundChanged(_ connection: SQLiteConnection, _ federation: String, _ round: Int64) throws {
        try connection.statement("UPDATE rounds SET revision = revision + 1 WHERE federation = ?1 AND round = ?2")
            .bind(.text(federation), .integer(round)).run()
        try connection.statement("DELETE FROM aggregate_digests WHERE federation = ?1 AND round = ?2")
            .bind(.text(federation), .integer(round)).run()
    }

    private static func uploadRecords(_ connection: SQLiteConnection, _ federation: String, _ round: Int64, client: String? = nil) throws -> [UploadRecord] {
        let statement = try connection.statement("""
            SELECT client, rank, weight, bytes, sha256, uploaded_at FROM uploads
            WHERE federation = ?1 AND round = ?2 AND (?3 IS NULL OR client = ?3) ORDER BY client
            """)
        try statement.bind(.text(federation), .integer(round), client.map { .text($0) } ?? .null)
        var records: [UploadRecord] = []
        while try statement.step() {
            records.append(UploadRecord(client: statement.text(0), rank: Int(statement.integer(1)), weight: statement.real(2),
                                        bytes: Int(statement.integer(3)), sha256: statement.text(4), uploadedAt: statement.text(5)))
        }
        return records
    }

    private static func roundRecord(_ connection: SQLiteConnection, _ federation: String, _ round: Int64) throws -> RoundRecord? {
        let statement = try connection.statement("SELECT sealed FROM rounds WHERE federation = ?1 AND round = ?2")
        try statement.bind(.text(federation), .integer(round))
        let sealed = try statement.step() && statement.integer(0) != 0
        let uploads = try uploadRecords(connection, federation, round)
        guard sealed || !uploads.isEmpty else { return nil }
        return RoundRecord(federation: federation, round: round, sealed: sealed, uploads: uploads)
    }
}

/// A connection confined to its serial queue.
private final class ConnectionQueue: @unchecked Sendable {
    // @unchecked: `connection` is only ever used inside blocks on `queue`, which is serial.
    private let connection: SQLiteConnection
    private let queue: DispatchQueue

    init(_ connection: SQLiteConnection, label: String) {
        self.connection = connection
        self.queue = DispatchQueue(label: label)
    }

    func run<Value: Sendable>(_ work: @escaping @Sendable (SQLiteConnection) throws -> Value) async throws -> Value {
        try await withCheckedThrowingContinuation { continuation in
            queue.async { continuation.resume(with: Swift.Result { try work(self.connection) }) }
        }
    }

    /// Like `run`, but `work` hands its result over (exactly once) and may go on working on the
    /// queue afterwards, inside the same transaction: how an aggregate streams while it is computed.
    func run<Value: Sendable>(_ work: @escaping @Sendable (SQLiteConnection, _ handOver: (Value) -> Void) throws -> Void) async throws -> Value {
        try await withCheckedThrowingContinuation { continuation in
            queue.async {
                var waiting: CheckedContinuation<Value, any Error>? = continuation
                let handOver = { (value: Value) in
                    waiting?.resume(returning: value)
                    waiting = nil
                }
                do {
                    try work(self.connection, handOver)
                    waiting?.resume(throwing: StoreError(.database, "the store gave no answer"))
                } catch {
                    waiting?.resume(throwing: error)
                }
            }
        }
    }

    /// Runs `work` on the queue after `delay` seconds, without waiting for it.
    func runDetached(after delay: Double, _ work: @escaping @Sendable (SQLiteConnection) -> Void) {
        queue.asyncAfter(deadline: .now() + delay) { work(self.connection) }
    }
}
