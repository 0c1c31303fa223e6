import Digests
import Dispatch
import Foundation
import LoRAAdapters
import Synchronization
import TestSupport
import Testing

@testable import AdapterStore

/// A PEFT-style adapter of `rank` with two modules and a dense head; values depend on `seed`.
func makeAdapter(rank: Int, seed: Int, width: Int = 6, dtype: DType = .f32) throws -> SafetensorsFile {
    func values(_ count: Int, _ salt: Int) -> [Double] { (0..<count).map { Double(($0 * 7 + seed * 13 + salt) % 17 - 8) / 16 } }
    let records = [
        TensorRecord(name: "base_model.model.q.lora_A.weight", dtype: dtype, shape: [rank, width], data: dtype.encode(values(rank * width, 1))),
        TensorRecord(name: "base_model.model.q.lora_B.weight", dtype: dtype, shape: [width + 1, rank], data: dtype.encode(values((width + 1) * rank, 2))),
        TensorRecord(name: "base_model.model.v.lora_A.weight", dtype: dtype, shape: [rank, width], data: dtype.encode(values(rank * width, 3))),
        TensorRecord(name: "base_model.model.v.lora_B.weight", dtype: dtype, shape: [width, rank], data: dtype.encode(values(width * rank, 4))),
        TensorRecord(name: "base_model.model.head.weight", dtype: dtype, shape: [3], data: dtype.encode(values(3, 5))),
    ]
    return try SafetensorsFile(bytes: SafetensorsWriter.write(records, metadata: ["format": "pt"]))
}

/// Runs `sql` behind the store's back: on SQLite through its own connection, on PostgreSQL through psql.
func tamper(_ database: String, _ backend: DatabaseBackend, sqlite: String, postgresql: String) throws {
    switch backend {
    case .sqlite: try SQLiteConnection(path: database).execute(sqlite)
    case .postgresql: try DatabaseBackend.psql(database, postgresql)
    }
}

func upload(_ client: String, rank: Int, weight: Double = 1, round: Int64 = 0, seed: Int = 0, file: SafetensorsFile? = nil) throws -> NewUpload {
    let file = try file ?? makeAdapter(rank: rank, seed: seed)
    return NewUpload(
        federation: "fed", round: RoundNumber(rawValue: round)!, client: ClientID(rawValue: client)!, rank: rank, weight: weight, file: file,
        sha256: ContentDigest.sha256Hex(file.bytes))
}

@Suite struct AdapterStoreTests {
    @Test(arguments: DatabaseBackend.available) func storesAndReturnsTheExactFile(_ backend: DatabaseBackend) async throws {
        let store = try AdapterStore(database: try backend.makeDatabase())
        let first = try upload("alice", rank: 4, weight: 3)
        let (record, created, _) = try await store.put(first)
        #expect(created)
        #expect(record.client == "alice" && record.rank == 4 && record.weight == 3 && record.bytes == first.file.bytes.count)
        #expect(record.uploadedAt.hasSuffix("Z"))
        let stored = try #require(try await store.upload(federation: "fed", round: 0, client: "alice"))
        #expect(stored.file == first.file.bytes)
        #expect(try await store.upload(federation: "fed", round: 0, client: "bob") == nil)
        #expect(try await store.upload(federation: "other", round: 0, client: "alice") == nil)
    }

    @Test(arguments: DatabaseBackend.available) func replacingAnUploadKeepsOnlyTheNewOne(_ backend: DatabaseBackend) async throws {
        let store = try AdapterStore(database: try backend.makeDatabase())
        _ = try await store.put(upload("alice", rank: 4, seed: 1))
        let replacement = try upload("alice", rank: 2, seed: 2)
        let (_, created, _) = try await store.put(replacement)
        #expect(!created)
        #expect(try await store.upload(federation: "fed", round: 0, client: "alice")?.file == replacement.file.bytes)
        let round = try #require(try await store.round(federation: "fed", round: 0))
        #expect(round.uploads.map(\.rank) == [2])
    }

    @Test(arguments: DatabaseBackend.available) func aSealedRoundRefusesUploadsAndDeletes(_ backend: DatabaseBackend) async throws {
        let store = try AdapterStore(database: try backend.makeDatabase())
        _ = try await store.put(upload("alice", rank: 4))
        let (sealed, sealedNow) = try await store.seal(federation: "fed", round: 0)
        #expect(sealed.sealed && sealed.sealedBy == .request && sealed.uploads.count == 1 && sealedNow)
        let again = try await store.seal(federation: "fed", round: 0)
        #expect(again.record == sealed && !again.sealedNow, "sealing is idempotent")
        await #expect { _ = try await store.put(upload("bob", rank: 2)) } throws: { ($0 as? StoreError)?.code == .roundSealed }
        await #expect { _ = try await store.deleteUpload(federation: "fed", round: 0, client: "alice") } throws: { ($0 as? StoreError)?.code == .roundSealed }
        // An empty round can be sealed and then shows up.
        let empty = try await store.seal(federation: "fed", round: 5).record
        #expect(empty.sealed && empty.uploads.isEmpty)
        #expect(try await store.rounds(federation: "fed").map(\.round) == [0, 5])
    }

    @Test(arguments: DatabaseBackend.available) func aShapeConflictWritesNothingAndKeepsTheEarlierUpload(_ backend: DatabaseBackend) async throws {
        let store = try AdapterStore(database: try backend.makeDatabase())
        _ = try await store.put(upload("alice", rank: 4))
        let bobFirst = try upload("bob", rank: 2, seed: 3)
        _ = try await store.put(bobFirst)
        let wrongWidth = try upload("bob", rank: 2, file: makeAdapter(rank: 2, seed: 9, width: 5))
        await #expect { _ = try await store.put(wrongWidth) } throws: { error in
            let error = error as? AdapterError
            return error?.code == .shapeMismatch && error?.tensor?.hasPrefix("base_model.model.") == true
        }
        #expect(try await store.upload(federation: "fed", round: 0, client: "bob")?.file == bobFirst.file.bytes)
    }

    @Test(arguments: DatabaseBackend.available) func deleteRemovesAndAnEmptyRoundDisappears(_ backend: DatabaseBackend) async throws {
        let store = try AdapterStore(database: try backend.makeDatabase())
        _ = try await store.put(upload("alice", rank: 4))
        #expect(try await store.deleteUpload(federation: "fed", round: 0, client: "alice"))
        #expect(try await !store.deleteUpload(federation: "fed", round: 0, client: "alice"))
        #expect(try await store.round(federation: "fed", round: 0) == nil)
        #expect(try await store.rounds(federation: "fed").isEmpty)
    }

    @Test(arguments: DatabaseBackend.available) func aggregatesEqualTheInMemoryEngineAndAreCachedUntilTheRoundChanges(_ backend: DatabaseBackend) async throws {
        let store = try AdapterStore(database: try backend.makeDatabase())
        let uploads = try [
            upload("carol", rank: 8, weight: 2, seed: 1), upload("alice", rank: 2, weight: 5, seed: 2), upload("bob", rank: 4, weight: 1, seed: 3),
        ]
        for item in uploads { _ = try await store.put(item) }
        let memory = InMemoryAdapterSource(uploads.map { ClientAdapter(clientID: $0.client.rawValue, rank: $0.rank, weight: $0.weight, file: $0.file) })

        for strategy in AggregationStrategy.allCases {
            let expected = try AdapterAggregator.aggregate(memory, options: .init(strategy: strategy, rank: 8, metadata: ["federation": "fed", "round": "0"]))
            let fresh = try #require(try await store.aggregate(federation: "fed", round: 0, client: nil, strategy: strategy, rank: nil, dtype: .f32))
            #expect(!fresh.fromCache && fresh.bytes == expected.bytes && fresh.rank == 8)
            #expect(fresh.sha256 == ContentDigest.sha256Hex(expected.bytes), "the digest hashed alongside the engine is the whole file's")
            let again = try #require(try await store.aggregate(federation: "fed", round: 0, client: nil, strategy: strategy, rank: nil, dtype: .f32))
            #expect(again.fromCache && again.bytes == fresh.bytes && again.sha256 == fresh.sha256)
        }
        let bobs = try #require(try await store.aggregate(federation: "fed", round: 0, client: "bob", strategy: .replication, rank: nil, dtype: .bf16))
        let expectedBob = try AdapterAggregator.aggregate(memory, options: .init(rank: 4, dtype: .bf16, metadata: ["federation": "fed", "round": "0"]))
        #expect(bobs.rank == 4 && bobs.bytes == expectedBob.bytes)
        #expect(try await store.aggregate(federation: "fed", round: 0, client: "nobody", strategy: .replication, rank: nil, dtype: .f32) == nil)
        #expect(try await store.aggregate(federation: "fed", round: 1, client: nil, strategy: .replication, rank: nil, dtype: .f32) == nil)
        await #expect { _ = try await store.aggregate(federation: "fed", round: 0, client: nil, strategy: .replication, rank: 9, dtype: .f32) } throws: {
            ($0 as? AdapterError)?.code == .rankOutOfRange
        }

        // A new upload changes the round: the next aggregate is computed afresh and differs.
        let before = try #require(try await store.aggregate(federation: "fed", round: 0, client: nil, strategy: .replication, rank: nil, dtype: .f32))
        _ = try await store.put(upload("dave", rank: 8, weight: 4, seed: 7))
        let after = try #require(try await store.aggregate(federation: "fed", round: 0, client: nil, strategy: .replication, rank: nil, dtype: .f32))
        #expect(!after.fromCache && after.bytes != before.bytes)
    }

    /// A lower rank of a cached aggregate is cut from it: equal to the engine's, and without reading
    /// the uploads (overwritten here behind the store's back, which a recomputation would show).
    @Test(arguments: DatabaseBackend.available) func aLowerRankIsCutFromTheCachedAggregateWithoutReadingTheUploads(_ backend: DatabaseBackend) async throws {
        let path = try backend.makeDatabase()
        let store = try AdapterStore(database: path)
        let uploads = try [
            upload("alice", rank: 2, weight: 3, seed: 4), upload("bob", rank: 8, weight: 1, seed: 5), upload("carol", rank: 4, weight: 2, seed: 6),
        ]
        for item in uploads { _ = try await store.put(item) }
        let memory = InMemoryAdapterSource(uploads.map { ClientAdapter(clientID: $0.client.rawValue, rank: $0.rank, weight: $0.weight, file: $0.file) })
        func expected(rank: Int, dtype: DType) throws -> [UInt8] {
            try AdapterAggregator.aggregate(
                memory, options: .init(strategy: .zeroPadding, rank: rank, dtype: dtype, metadata: ["federation": "fed", "round": "0"])
            ).bytes
        }
        _ = try #require(try await store.aggregate(federation: "fed", round: 0, client: nil, strategy: .zeroPadding, rank: nil, dtype: .f16))
        try tamper(
            path, backend, sqlite: "UPDATE tensors SET data = zeroblob(length(data))",
            postgresql: "UPDATE tensors SET data = decode(repeat('00', length(data)), 'hex')")

        for (client, rank) in [("alice", 2), ("carol", 4)] as [(ClientID, Int)] {
            let cut = try #require(try await store.aggregate(federation: "fed", round: 0, client: client, strategy: .zeroPadding, rank: nil, dtype: .f16))
            let direct = try expected(rank: rank, dtype: .f16)
            #expect(cut.rank == rank && cut.bytes == direct && cut.sha256 == ContentDigest.sha256Hex(direct))
        }
        let byRank = try #require(try await store.aggregate(federation: "fed", round: 0, client: nil, strategy: .zeroPadding, rank: 3, dtype: .f16))
        let directAtThree = try expected(rank: 3, dtype: .f16)
        #expect(byRank.bytes == directAtThree)
        // Another dtype has nothing to cut from: computed, from the overwritten uploads.
        let computed = try #require(try await store.aggregate(federation: "fed", round: 0, client: "alice", strategy: .zeroPadding, rank: nil, dtype: .f32))
        let original = try expected(rank: 2, dtype: .f32)
        #expect(computed.bytes != original)
    }

    /// An aggregate's tag is known before its bytes; once computed, its digest is on record in the
    /// file: a store without it in memory (another process, or after a restart) gives the tag and
    /// digest without computing, or streams the same bytes; bytes that disagree with the record lose
    /// their last piece and the record. A first computation streams too, announced by its size.
    @Test(arguments: DatabaseBackend.available) func aggregatesStreamAndARecordedDigestIsCheckedAgainstWhatIsStreamed(_ backend: DatabaseBackend) async throws {
        let path = try backend.makeDatabase()
        let store = try AdapterStore(database: path, aggregateCacheBytes: 0)
        let uploads = try [upload("alice", rank: 2, weight: 3, seed: 4), upload("bob", rank: 8, weight: 1, seed: 5)]
        for item in uploads { _ = try await store.put(item) }

        func outcome(_ store: AdapterStore, _ plan: AggregatePlan) async throws -> AggregateOutcome? {
            try await store.aggregate(federation: "fed", round: 0, client: nil, strategy: .zeroPadding, rank: nil, dtype: .f16) { _, _ in plan }
        }
        func streamed(_ pieces: AsyncThrowingStream<[UInt8], any Error>) async -> (bytes: [UInt8], failed: Bool) {
            var bytes: [UInt8] = []
            do { for try await piece in pieces { bytes += piece } } catch { return (bytes, true) }
            return (bytes, false)
        }
        guard case .streaming(let tag, let byteCount, nil, let firstPieces, false)? = try await outcome(store, .stream) else {
            Issue.record("a first computation is streamed, with no digest yet")
            return
        }
        let first = await streamed(firstPieces)
        #expect(!first.failed && first.bytes.count == byteCount)
        // Its digest is recorded once hashed after streaming: not later, over what follows.
        await onOwnThread { store.afterStreaming.sync {} }
        let computed = try #require(try await store.aggregate(federation: "fed", round: 0, client: nil, strategy: .zeroPadding, rank: nil, dtype: .f16))
        #expect(computed.bytes == first.bytes && computed.tag == tag)

        // Recorded just after the answer, on the writer's queue.
        var recorded: AggregateDigest?
        #expect(
            try await eventually {
                if case .bodiless(tag, let digest?)? = try await outcome(store, .bodiless) { recorded = digest }
                return recorded != nil
            })
        #expect(recorded?.sha256 == computed.sha256 && recorded?.byteCount == computed.bytes.count && recorded?.rank == 8)

        let restarted = try AdapterStore(database: path)
        guard case .streaming(tag, computed.bytes.count, computed.sha256, let pieces, false)? = try await outcome(restarted, .stream) else {
            Issue.record("not streamed under the same tag and the recorded digest")
            return
        }
        let whole = await streamed(pieces)
        #expect(!whole.failed && whole.bytes == computed.bytes)
        guard case .complete(let cached)? = try await outcome(restarted, .stream) else {
            Issue.record("not cached after streaming")
            return
        }
        #expect(cached.fromCache && cached.sha256 == computed.sha256 && cached.tag == tag)

        // A record the bytes do not match: the stream fails before its last piece and the record goes.
        let nextCRC = "UPDATE aggregate_digests SET crc32 = (crc32 + 1) % 4294967296"
        try tamper(path, backend, sqlite: nextCRC, postgresql: nextCRC)
        guard case .streaming(_, _, _, let mismatched, false)? = try await outcome(store, .stream) else {
            Issue.record("not streamed")
            return
        }
        let cut = await streamed(mismatched)
        #expect(cut.failed && cut.bytes.count < computed.bytes.count && Array(computed.bytes.prefix(cut.bytes.count)) == cut.bytes)
        let forgotten = try await eventually {
            if case .bodiless(_, nil)? = try await outcome(store, .bodiless) { return true }
            return false
        }
        #expect(forgotten, "the record is gone")

        // A change to the round: a new tag, and nothing on record for it.
        _ = try await store.put(upload("carol", rank: 4, seed: 6))
        guard case .bodiless(let changedTag, nil)? = try await outcome(restarted, .bodiless) else {
            Issue.record("a stale digest was used")
            return
        }
        #expect(changedTag != tag)
    }

    /// Streamed first computations are hashed and recorded after their last byte on one queue; when
    /// that queue is full (here: stuck), a reader hashes its own instead of queueing more aggregates,
    /// and no digest is lost either way.
    @Test func streamedComputationsAreHashedByTheReaderWhenTheHashingQueueIsFull() async throws {
        let store = try AdapterStore(database: try DatabaseBackend.sqlite.makeDatabase(), aggregateCacheBytes: 0)
        for item in try [upload("alice", rank: 2, weight: 3, seed: 4), upload("bob", rank: 8, weight: 1, seed: 5)] { _ = try await store.put(item) }
        func outcome(rank: Int, _ plan: AggregatePlan) async throws -> AggregateOutcome? {
            try await store.aggregate(federation: "fed", round: 0, client: nil, strategy: .zeroPadding, rank: rank, dtype: .f16) { _, _ in plan }
        }
        func recorded(rank: Int) async throws -> AggregateDigest? {
            guard case .bodiless(_, let digest)? = try await outcome(rank: rank, .bodiless) else { return nil }
            return digest
        }
        let stuck = DispatchSemaphore(value: 0)
        store.afterStreaming.async { stuck.wait() }
        // Freed whatever happens here (the queue's thread is the process's).
        let unstick = Mutex(Optional(stuck))
        defer { unstick.withLock { $0.take() }?.signal() }
        var streamed: [Int: [UInt8]] = [:]
        for rank in 1...3 {
            guard case .streaming(_, _, nil, let pieces, false)? = try await outcome(rank: rank, .stream) else {
                Issue.record("rank \(rank) was not streamed as a first computation")
                return
            }
            streamed[rank] = try await pieces.reduce(into: []) { $0 += $1 }
        }
        // At most two wait behind the stuck queue: the third at least was hashed by the reader.
        let someRecorded = try await eventually {
            for rank in 1...3 where try await recorded(rank: rank) != nil { return true }
            return false
        }
        unstick.withLock { $0.take() }?.signal()
        #expect(someRecorded, "every digest waited behind a stuck queue")
        for rank in 1...3 {
            var digest: AggregateDigest?
            #expect(
                try await eventually {
                    digest = try await recorded(rank: rank)
                    return digest != nil
                })
            #expect(digest?.sha256 == ContentDigest.sha256Hex(streamed[rank]!) && digest?.byteCount == streamed[rank]!.count)
        }
    }

    /// The tag names what determines the bytes, not the database: the same uploads in another file
    /// give the same tag, and any change to an upload's bytes, weight or scale gives another.
    @Test(arguments: DatabaseBackend.available) func theTagFollowsTheInputsAcrossDatabases(_ backend: DatabaseBackend) async throws {
        func tag(_ uploads: [NewUpload], strategy: AggregationStrategy = .replication, dtype: DType = .f32) async throws -> String {
            let store = try AdapterStore(database: try backend.makeDatabase())
            for item in uploads { _ = try await store.put(item) }
            guard
                case .bodiless(let tag, _)? = try await store.aggregate(
                    federation: "fed", round: 0, client: nil, strategy: strategy, rank: nil, dtype: dtype, plan: { _, _ in .bodiless })
            else { throw StoreError(.database, "no tag") }
            return tag
        }
        let uploads = try [upload("alice", rank: 2, weight: 3, seed: 4), upload("bob", rank: 8, weight: 1, seed: 5)]
        let reference = try await tag(uploads)
        #expect(try await tag(uploads.reversed()) == reference, "upload order does not matter")
        #expect(try await tag(uploads, strategy: .svd) != reference)
        #expect(try await tag(uploads, dtype: .bf16) != reference)
        #expect(try await tag([uploads[0], try upload("bob", rank: 8, weight: 2, seed: 5)]) != reference)
        #expect(try await tag([uploads[0], try upload("bob", rank: 8, weight: 1, seed: 6)]) != reference)
    }

    /// Two clients whose downloads are the same bytes, and the global aggregate at their rank, share
    /// a cache entry, but each keeps its own tag: the one it gets when nothing is cached.
    @Test func clientsSharingACachedDownloadKeepTheirOwnTags() async throws {
        let path = try DatabaseBackend.sqlite.makeDatabase()
        let store = try AdapterStore(database: path)
        for item in try [upload("alice", rank: 2, seed: 4), upload("carol", rank: 2, seed: 6), upload("bob", rank: 8, seed: 5)] {
            _ = try await store.put(item)
        }
        func download(_ store: AdapterStore, _ client: ClientID?) async throws -> StoredAggregate {
            let rank = client == nil ? 2 : nil
            return try #require(try await store.aggregate(federation: "fed", round: 0, client: client, strategy: .replication, rank: rank, dtype: .f32))
        }
        let alice = try await download(store, "alice")
        let uncachedStore = try AdapterStore(database: path, aggregateCacheBytes: 0)
        for other in ["carol", nil] as [ClientID?] {
            let cached = try await download(store, other)
            let uncached = try await download(uncachedStore, other)
            #expect(cached.fromCache && cached.bytes == alice.bytes && !uncached.fromCache)
            #expect(cached.tag == uncached.tag && cached.tag != alice.tag, "\(other?.rawValue ?? "the global aggregate") at rank 2")
        }
    }

    /// On PostgreSQL, a write that waits too long for another process's write fails with `busy`,
    /// and its connection is not left inside the failed transaction: once the other write is gone,
    /// the next one succeeds.
    @Test(.enabled(if: DatabaseBackend.available.contains(.postgresql)))
    func aWriteLockNotGrantedInTimeIsBusyAndTheNextWriteSucceeds() async throws {
        let database = try DatabaseBackend.postgresql.makeDatabase()
        let store = try AdapterStore(database: database, writeLockTimeoutSeconds: 0.2)
        // Another process's write holds the lock (a connection of the test's own, in a transaction).
        let other = try PostgresConnection(uri: database)
        try other.execute("BEGIN; SELECT \(PostgresConnection.writeLock)")
        for attempt in 1...2 {
            do {
                _ = try await store.put(upload("alice", rank: 2))
                Issue.record("write \(attempt) went through while the other held the lock")
            } catch let error as StoreError {
                #expect(error.code == .busy, "write \(attempt) is refused for the lock, not for a failed transaction")
            }
        }
        try other.execute("ROLLBACK")
        _ = try await store.put(upload("bob", rank: 4))
        #expect(try await store.round(federation: "fed", round: 0)?.uploads.map(\.client.rawValue) == ["bob"])
    }

    /// SQLite and PostgreSQL give the same aggregate bytes under the same tag, for every strategy and
    /// for a client's own download: both feed the engine clients in byte order of their ids (ids
    /// chosen here to sort otherwise in a language-aware collation).
    @Test(.enabled(if: DatabaseBackend.available.contains(.postgresql)), arguments: AggregationStrategy.allCases)
    func bothDatabasesGiveTheSameBytesUnderTheSameTag(strategy: AggregationStrategy) async throws {
        let uploads = try [
            upload("alice", rank: 2, weight: 3, seed: 4), upload("Zed", rank: 8, weight: 1, seed: 5), upload("_x", rank: 4, weight: 2, seed: 6),
            upload("B-2", rank: 3, weight: 0.5, seed: 7),
        ]
        var answers: [[String]] = []
        for backend in [DatabaseBackend.sqlite, .postgresql] {
            let store = try AdapterStore(database: try backend.makeDatabase(), aggregateCacheBytes: 0)
            for item in uploads.shuffled() { _ = try await store.put(item) }
            var answer: [String] = []
            for client in [nil, "B-2"] as [ClientID?] {
                let aggregate = try #require(
                    try await store.aggregate(federation: "fed", round: 0, client: client, strategy: strategy, rank: nil, dtype: .bf16))
                answer += [aggregate.tag, ContentDigest.sha256Hex(aggregate.bytes)]
            }
            answers.append(answer)
        }
        #expect(answers[0] == answers[1])
    }

    /// The store's reader of blob parts, from two cores at once on large tensors, gives the bytes the
    /// engine gives from the same files in memory.
    @Test(arguments: DatabaseBackend.available, [AggregationStrategy.replication, .zeroPadding, .hetlora])
    func largeTensorsAggregateFromTheStoreAsFromMemory(_ backend: DatabaseBackend, strategy: AggregationStrategy) async throws {
        let store = try AdapterStore(database: try backend.makeDatabase(), aggregateCacheBytes: 0)
        var adapters: [ClientAdapter] = []
        for (index, (rank, dtype)) in [(64, DType.f32), (8, .bf16), (33, .f16)].enumerated() {
            let item = try upload(
                "client-\(index)", rank: rank, weight: Double(index + 1), seed: index, file: try makeAdapter(rank: rank, seed: index, width: 4099, dtype: dtype)
            )
            _ = try await store.put(item)
            adapters.append(ClientAdapter(clientID: "client-\(index)", rank: rank, weight: Double(index + 1), file: item.file))
        }
        // Rank 1 reads one element in 64 of a rank-64 B tensor: the spans must be cut to the scratch.
        for rank in [nil, 1, 5] as [Int?] {
            let stored = try #require(try await store.aggregate(federation: "fed", round: 0, client: nil, strategy: strategy, rank: rank, dtype: .bf16))
            let options = AggregationOptions(strategy: strategy, rank: rank, dtype: .bf16, metadata: ["federation": "fed", "round": "0"])
            #expect(stored.bytes == (try AdapterAggregator.aggregate(InMemoryAdapterSource(adapters), options: options)).bytes, "rank \(rank ?? 64)")
        }
    }

    /// A read that takes long (an aggregation of a large round) holds one connection: other reads
    /// (token checks, round states, other aggregates) go on on the others, SQLite's as PostgreSQL's.
    @Test(arguments: DatabaseBackend.available) func aLongReadDoesNotHoldUpOtherReads(_ backend: DatabaseBackend) async throws {
        let store = try AdapterStore(database: try backend.makeDatabase(), readConnections: 2)
        _ = try await store.put(upload("alice", rank: 2, seed: 4))
        let (reading, release) = (Gate(), DispatchSemaphore(value: 0))
        let long = Task {
            try await store.reader.read { _ in
                reading.open()
                release.wait()
            }
        }
        await reading.wait()
        let answer = Gate()
        let other = Task {
            defer { answer.open() }
            return try await store.settings(federation: "fed")
        }
        let answered = try await eventually { answer.isOpen }
        release.signal()
        #expect(answered, "a read waited for another one's connection")
        _ = try await other.value
        try await long.value
    }

    @Test(arguments: DatabaseBackend.available) func twoStoresOnOneFileStayConsistentUnderConcurrentWrites(_ backend: DatabaseBackend) async throws {
        let path = try backend.makeDatabase()
        let first = try AdapterStore(database: path)
        let second = try AdapterStore(database: path)
        try await withThrowingTaskGroup(of: Void.self) { group in
            for index in 0..<40 {
                let store = index % 2 == 0 ? first : second
                let item = try upload("client-\(index % 10)", rank: [2, 4, 8][index % 3], seed: index)
                group.addTask { _ = try await store.put(item) }
            }
            try await group.waitForAll()
        }
        let round = try #require(try await first.round(federation: "fed", round: 0))
        #expect(round.uploads.map(\.client.rawValue) == (0..<10).map { "client-\($0)" })
        for record in round.uploads {
            let stored = try #require(try await second.upload(federation: "fed", round: 0, client: record.client))
            #expect(ContentDigest.sha256Hex(stored.file) == record.sha256, "every stored file is whole and matches its digest")
        }
    }

    @Test func aReadOnlyDatabaseIsAClearError() throws {
        try withReadOnlyDirectory(
            prepare: { directory in
                _ = try AdapterStore(database: directory + "/db.sqlite")
            },
            check: { directory in
                #expect { _ = try AdapterStore(database: directory + "/db.sqlite") } throws: { ($0 as? StoreError)?.code == .readOnly }
            })
    }
}

/// Runs `prepare` in a new directory, makes it and its files read-only, then runs `check`. Root
/// writes through file permissions, so as root (as CI runs) the directory is a tmpfs that is
/// remounted read-only instead; a failure to mount fails the test rather than skipping it.
func withReadOnlyDirectory(prepare: (String) throws -> Void, check: (String) throws -> Void) throws {
    let manager = FileManager.default
    let directory = manager.temporaryDirectory.appendingPathComponent("readonly-\(UUID().uuidString)").path
    try manager.createDirectory(atPath: directory, withIntermediateDirectories: true)
    defer { try? manager.removeItem(atPath: directory) }
    if getuid() == 0 {
        try runTool("/bin/mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", directory)
        defer { try? runTool("/bin/umount", directory) }
        try prepare(directory)
        try runTool("/bin/mount", "-o", "remount,ro", directory)
        try check(directory)
    } else {
        try prepare(directory)
        for file in try manager.contentsOfDirectory(atPath: directory) {
            try manager.setAttributes([.posixPermissions: 0o444], ofItemAtPath: directory + "/" + file)
        }
        try manager.setAttributes([.posixPermissions: 0o555], ofItemAtPath: directory)
        defer { try? manager.setAttributes([.posixPermissions: 0o755], ofItemAtPath: directory) }
        try check(directory)
    }
}

private struct ToolFailed: Error {
    let command: [String]
    let status: Int32
}

private func runTool(_ executable: String, _ arguments: String...) throws {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: executable)
    process.arguments = arguments
    try process.run()
    process.waitUntilExit()
    guard process.terminationStatus == 0 else { throw ToolFailed(command: [executable] + arguments, status: process.terminationStatus) }
}
