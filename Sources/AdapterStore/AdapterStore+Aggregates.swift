import Crypto
import Digests
import Dispatch
import LoRAAdapters
import Synchronization

extension AdapterStore {
    /// The aggregate of the round unfolded to `scaling` (or, with `client`, truncated to that client's
    /// module ranks and unfolded to its scales, whatever `scaling` says), from the cache when the
    /// round has not changed since it was computed. Nil when the round has no uploads, or `client`
    /// has none in it. Throws `rankOutOfRange` for a rank past the global one.
    public func aggregate(
        federation: FederationID, round: RoundNumber, client: ClientID?, strategy: AggregationStrategy, rank: Int?, dtype: DType,
        scaling: TargetScaling = .unit
    ) async throws -> StoredAggregate? {
        let outcome = try await aggregate(
            federation: federation, round: round, client: client, strategy: strategy, rank: rank, dtype: dtype, scaling: scaling
        ) { _, _ in .compute }
        guard case .complete(let aggregate)? = outcome else { return nil }
        return aggregate
    }

    /// The same, except when the aggregate is not in memory: `plan` is given its tag and the digest
    /// on record (computed before, in this process or another on the same file, for the round as it
    /// is now) and decides whether to compute it at all, and whether to stream it. A stream is
    /// handed over as soon as the file's size is known, before the heavy work; a stream asked for
    /// while the same aggregate is being streamed joins that computation instead.
    public func aggregate(
        federation: FederationID, round: RoundNumber, client: ClientID?, strategy: AggregationStrategy, rank requestedRank: Int?, dtype: DType,
        scaling requestedScaling: TargetScaling = .unit, plan: @escaping @Sendable (_ tag: String, _ recorded: AggregateDigest?) -> AggregatePlan
    ) async throws -> AggregateOutcome? {
        try await reader.read { [self] (connection, handOver: @escaping (AggregateOutcome?) -> Void) in
            guard let (key, scaling) = try Self.aggregateKey(connection, federation, round, client, strategy, requestedRank, dtype, requestedScaling) else {
                return handOver(nil)
            }
            // Requests whose answers are the same bytes (a client's download and the global
            // aggregate at its rank) share a cache entry, each under its own tag.
            let tag = try Self.aggregateTag(connection, key, client: client)
            let cached = { [cache] () -> StoredAggregate? in
                guard var cached = cache.value(for: key)?.asCached else { return nil }
                cached.tag = tag
                return cached
            }
            if let hit = cached() { return handOver(.complete(hit)) }
            let recorded = try Self.recordedDigest(connection, key)
            let planned = plan(tag, recorded)
            if planned == .bodiless { return handOver(.bodiless(tag: tag, recorded: recorded)) }
            if let wider = cache.wider(than: key) {
                return handOver(.complete(try cut(wider, tag: tag, for: key, recorded: recorded)))
            }
            if planned == .stream, let joined = inFlight.join(key) {
                // The digest the computation checks its bytes against, not this request's snapshot.
                return handOver(.streaming(tag: tag, byteCount: joined.byteCount, sha256: joined.checkedSHA256, pieces: joined.pieces, joined: true))
            }
            // A computation that ended just now may have left its result in the cache.
            if let hit = cached() { return handOver(.complete(hit)) }
            let source = StoreAdapterSource(connection: connection, federation: federation, round: round)
            let options = AggregationOptions(
                strategy: strategy, rank: key.rank, dtype: dtype, scaling: scaling, metadata: ["federation": federation.rawValue, "round": round.description])
            guard planned == .stream else { return handOver(.complete(try compute(source, options, tag: tag, for: key, recorded: recorded))) }
            let (pieces, continuation) = StreamedComputation.Pieces.makeStream()
            let computation = StreamedComputation(continuation, checkedSHA256: recorded?.sha256)
            inFlight.offer(computation, for: key)
            defer { inFlight.remove(computation, for: key) }
            try stream(source, options, tag: tag, for: key, recorded: recorded, into: computation) { byteCount in
                computation.began(byteCount: byteCount)
                handOver(.streaming(tag: tag, byteCount: byteCount, sha256: recorded?.sha256, pieces: pieces, joined: false))
            }
        }
    }

    /// Computes and hashes the aggregate, caches it, and records its digest unless it is on record.
    private func compute(
        _ source: StoreAdapterSource, _ options: AggregationOptions, tag: String, for key: AggregateCache.Key, recorded: AggregateDigest?
    ) throws -> StoredAggregate {
        let digest = BackgroundDigest(sha256: true, crc32: true)
        let result = try AdapterAggregator.aggregate(source, options: options, observer: digest)
        let digests = digest.digests()
        return remember(result.bytes, tag: tag, sha256: digests.sha256!, crc32: digests.crc32!, for: key, recorded: recorded)
    }

    /// Cuts the aggregate from a cached one of the same round at a higher rank, reading no upload.
    private func cut(_ wider: StoredAggregate, tag: String, for key: AggregateCache.Key, recorded: AggregateDigest?) throws -> StoredAggregate {
        let bytes = try AdapterAggregator.truncate(try SafetensorsFile(bytes: wider.bytes), toRank: key.rank)
        let digests = ContentDigest.sha256HexAndCRC32(bytes)
        return remember(bytes, tag: tag, sha256: digests.sha256, crc32: digests.crc32, for: key, recorded: recorded)
    }

    /// Caches a new aggregate and records its digest unless that is on record already.
    private func remember(
        _ bytes: [UInt8], tag: String, sha256: String, crc32: UInt32, for key: AggregateCache.Key, recorded: AggregateDigest?
    ) -> StoredAggregate {
        let aggregate = StoredAggregate(bytes: bytes, tag: tag, sha256: sha256, rank: key.rank, fromCache: false)
        cache.insert(aggregate, for: key)
        let digest = AggregateDigest(sha256: sha256, byteCount: bytes.count, rank: key.rank, crc32: crc32)
        if digest != recorded { recordDigest(digest, for: key) }
        return aggregate
    }

    /// Computes the aggregate into `stream` as it goes, `begin` told its size before the first
    /// byte. Without a record, the result is cached, and hashed once it is all handed to the stream
    /// (the client does not wait for it), then recorded; with one, its CRC-32 is computed meanwhile,
    /// and a match is cached, a mismatch fails the stream and drops the record. The pieces are
    /// copies, so a slow client holds them (at most one aggregate) but not the store's reader.
    private func stream(
        _ source: StoreAdapterSource, _ options: AggregationOptions, tag: String, for key: AggregateCache.Key, recorded: AggregateDigest?,
        into stream: StreamedComputation, begin: @escaping (Int) -> Void
    ) throws {
        let digest = BackgroundDigest(sha256: false, crc32: recorded != nil, begin: begin, stream: stream)
        do {
            let result = try AdapterAggregator.aggregate(source, options: options, observer: digest)
            let crc32 = digest.digests().crc32
            guard let recorded, let crc32 else {
                // Cached before the last piece goes out: whoever has the whole body finds it cached.
                let bytes = result.bytes
                cache.insert(StoredAggregate(bytes: bytes, tag: tag, sha256: nil, rank: key.rank, fromCache: false), for: key)
                stream.finish()
                let hashAndRecord: @Sendable () -> Void = { [self] in
                    let digests = ContentDigest.sha256HexAndCRC32(bytes)
                    cache.setSHA256(digests.sha256, for: key)
                    recordDigest(AggregateDigest(sha256: digests.sha256, byteCount: bytes.count, rank: key.rank, crc32: digests.crc32), for: key)
                }
                let queued = afterStreamingBacklog.withLock { waiting in
                    guard waiting < Self.afterStreamingLimit else { return false }
                    waiting += 1
                    return true
                }
                // Back-pressure: with the queue full, the reader hashes this one before taking more work.
                guard queued else { return hashAndRecord() }
                afterStreaming.async { [self] in
                    hashAndRecord()
                    afterStreamingBacklog.withLock { $0 -= 1 }
                }
                return
            }
            if crc32 == recorded.crc32 {
                cache.insert(StoredAggregate(bytes: result.bytes, tag: tag, sha256: recorded.sha256, rank: result.rank, fromCache: false), for: key)
            } else {
                forgetDigest(for: key)
            }
            stream.finish(crc32: crc32, expected: recorded.crc32)
        } catch {
            stream.fail(error)
            throw error
        }
    }

    /// How many streamed first computations may wait for `afterStreaming` (each holds its
    /// aggregate until hashed, the cache may have dropped it): past that, a reader hashes its own
    /// before it takes more work, so memory stays bounded when aggregates finish faster than one
    /// core hashes them (PostgreSQL's or SQLite's reader pool on a many-core host).
    private static let afterStreamingLimit = 2

    /// The aggregate's strong ETag (API.md, "Aggregate"), derived from everything that determines
    /// its bytes: the engine's output version, the request's options, and the round's uploads (by
    /// SHA-256, weight, rank and scale) and base. The engine is deterministic, so equal tags mean
    /// equal bytes, and a first computation can send its tag before the body exists. Unlike the
    /// round's revision, it also holds across databases.
    private static func aggregateTag(_ connection: any StoreConnection, _ key: AggregateCache.Key, client: ClientID?) throws -> String {
        var hasher = SHA256()
        func add(_ bytes: some Collection<UInt8>) {
            withUnsafeBytes(of: UInt64(bytes.count).littleEndian) { hasher.update(bufferPointer: $0) }
            hasher.update(data: Array(bytes))
        }
        func add(_ text: String) { add(Array(text.utf8)) }
        add("lora-aggregator aggregate \(AdapterAggregator.outputVersion(of: key.strategy))")
        for option in [key.federation.rawValue, key.round.description, key.strategy.rawValue, String(key.rank), key.dtype.rawValue, key.scaling] {
            add(option)
        }
        add(client?.rawValue ?? "")
        let uploads = try connection.statement(
            "SELECT client, weight, sha256, rank, lora_alpha, use_rslora, config FROM uploads WHERE federation = ?1 AND round = ?2 ORDER BY client")
        try uploads.bind(.id(key.federation), .round(key.round))
        while try uploads.step() {
            add(uploads.text(0))
            add(String(uploads.real(1).bitPattern, radix: 16))
            add(uploads.text(2))
            add(String(uploads.integer(3)))
            add(uploads.isNull(4) ? "" : String(uploads.real(4).bitPattern, radix: 16))
            add(String(uploads.integer(5)))
            add(uploads.isNull(6) ? [] : uploads.blob(6))
        }
        let base = try connection.statement("SELECT sha256, rank FROM bases WHERE federation = ?1 AND round = ?2")
        try base.bind(.id(key.federation), .round(key.round))
        add(try base.step() ? "base \(base.text(0)) \(base.integer(1))" : "no base")
        return ContentDigest.hex(hasher.finalize())
    }

    /// The cache key of a request against the round as it is now, and the scaling to compute it
    /// with; nil when the round has no uploads or `client` has none in it. A client whose modules all
    /// have scale 1 and one rank gets the scale-1 aggregate at its rank (which a wider one can be cut
    /// to); any other client gets its own ranks and scales.
    private static func aggregateKey(
        _ connection: any StoreConnection, _ federation: FederationID, _ round: RoundNumber, _ client: ClientID?,
        _ strategy: AggregationStrategy, _ requestedRank: Int?, _ dtype: DType, _ requestedScaling: TargetScaling
    ) throws -> (AggregateCache.Key, TargetScaling)? {
        let source = StoreAdapterSource(connection: connection, federation: federation, round: round)
        let participants = try source.participants()
        guard !participants.isEmpty else { return nil }
        var rank = requestedRank
        var scaling = requestedScaling
        if let client {
            guard let participant = participants.first(where: { $0.clientID == client.rawValue }) else { return nil }
            rank = participant.rank
            scaling = participant.config.isUnscaled ? .unit : .client(participant.config)
        }
        let stored = try connection.statement("SELECT revision, max_rank FROM rounds WHERE federation = ?1 AND round = ?2")
        try stored.bind(.id(federation), .round(round))
        _ = try stored.step()
        let key = AggregateCache.Key(
            federation: federation, round: round, revision: stored.integer(0), strategy: strategy,
            rank: rank ?? Int(stored.integer(1)), dtype: dtype, scaling: scalingKey(scaling, client: client))
        return (key, scaling)
    }

    static let unitScalingKey = "unit"

    /// What part of an aggregate's key the scale is: a client's own scales are its own (the round's
    /// revision pins its config).
    static func scalingKey(_ scaling: TargetScaling, client: ClientID?) -> String {
        switch scaling {
        case .unit: unitScalingKey
        case .uniform(let loraAlpha, let useRSLoRA): "lora_alpha=\(loraAlpha);use_rslora=\(useRSLoRA)"
        case .client: "client=\(client?.rawValue ?? "")"
        }
    }

    private static func recordedDigest(_ connection: any StoreConnection, _ key: AggregateCache.Key) throws -> AggregateDigest? {
        let statement = try connection.statement("SELECT \(AggregateDigest.columns) FROM aggregate_digests WHERE \(digestKeyColumns)")
        try statement.bind(digestKey(key))
        guard try statement.step() else { return nil }
        return AggregateDigest(row: statement, rank: key.rank)
    }

    /// The primary key of `aggregate_digests` (bound as ?1...?8) and its values for `key`, in column
    /// order: digests of this engine version only.
    private static let digestKeyColumns =
        "federation = ?1 AND round = ?2 AND revision = ?3 AND strategy = ?4 AND rank = ?5 AND dtype = ?6 AND scaling = ?7 AND engine_version = ?8"
    private static func digestKey(_ key: AggregateCache.Key) -> [StoreValue] {
        [
            .id(key.federation), .round(key.round), .integer(key.revision), .text(key.strategy.rawValue),
            .integer(Int64(key.rank)), .text(key.dtype.rawValue), .text(key.scaling), .integer(AdapterAggregator.outputVersion(of: key.strategy)),
        ]
    }

    /// Records an aggregate's digest after the request is answered: losing it costs only a
    /// streamed answer later. A row for a revision that has moved on meanwhile is never matched.
    private func recordDigest(_ digest: AggregateDigest, for key: AggregateCache.Key) {
        writer.writeDetached { connection in
            try connection.statement(
                """
                INSERT INTO aggregate_digests (federation, round, revision, strategy, rank, dtype, scaling, engine_version, sha256, crc32, bytes)
                VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
                ON CONFLICT (federation, round, revision, strategy, rank, dtype, scaling, engine_version)
                DO UPDATE SET sha256 = excluded.sha256, crc32 = excluded.crc32, bytes = excluded.bytes
                """
            ).bind(Self.digestKey(key) + [.text(digest.sha256), .integer(Int64(digest.crc32)), .integer(Int64(digest.byteCount))]).run()
        }
    }

    /// Drops a recorded digest the bytes no longer match, so the next request computes afresh.
    private func forgetDigest(for key: AggregateCache.Key) {
        writer.writeDetached { connection in
            try connection.statement("DELETE FROM aggregate_digests WHERE \(Self.digestKeyColumns)").bind(Self.digestKey(key)).run()
        }
    }
}
