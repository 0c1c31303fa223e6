import Foundation
import LoRAAdapters
import TestSupport
import Testing

@testable import AdapterStore

/// A streamed first computation shared by the requests that arrive while it runs: every subscriber
/// gets the whole file, in order, and the same ending.
@Suite struct StreamedComputationTests {
    /// A file of `count` bytes, forwarded as regions of `region` bytes of one buffer, as the engine does.
    private struct Output {
        let bytes: [UInt8]
        let buffer: UnsafeMutableRawBufferPointer
        init(count: Int) {
            var generator = SeededGenerator(seed: UInt64(count))
            bytes = (0..<count).map { _ in UInt8(truncatingIfNeeded: generator.next()) }
            buffer = .allocate(byteCount: count, alignment: 8)
            bytes.withUnsafeBytes { buffer.copyMemory(from: $0) }
        }
        func region(_ range: Range<Int>) -> UnsafeRawBufferPointer { UnsafeRawBufferPointer(rebasing: buffer[range]) }
    }

    /// A computation of `output` with its first subscriber, laid out, nothing forwarded yet.
    private func laidOut(_ output: Output) -> (first: StreamedComputation.Pieces, computation: StreamedComputation) {
        let (first, continuation) = StreamedComputation.Pieces.makeStream()
        let computation = StreamedComputation(continuation, checkedSHA256: nil)
        computation.began(byteCount: output.bytes.count)
        return (first, computation)
    }

    private func collected(_ pieces: StreamedComputation.Pieces) async -> (bytes: [UInt8], failed: Bool) {
        var bytes: [UInt8] = []
        do { for try await piece in pieces { bytes += piece } } catch { return (bytes, true) }
        return (bytes, false)
    }

    @Test func aJoinerGetsWhatWasSentThenTheRestLikeTheFirst() async throws {
        let output = Output(count: 10_000)
        defer { output.buffer.deallocate() }
        let (first, computation) = laidOut(output)
        let before = try #require(computation.join(), "joined after the file was laid out, before its first region")
        computation.forward(output.region(0..<1_000))
        computation.forward(output.region(1_000..<4_000))
        let early = try #require(computation.join())
        #expect(early.byteCount == 10_000)
        computation.forward(output.region(4_000..<9_000))
        let late = try #require(computation.join())
        computation.forward(output.region(9_000..<10_000))
        computation.outputReleased()
        #expect(computation.join() == nil, "joined after the engine let go of its buffer")
        computation.finish()
        for pieces in [first, before.pieces, early.pieces, late.pieces] {
            let result = await collected(pieces)
            #expect(!result.failed && result.bytes == output.bytes)
        }
    }

    /// A joiner that comes before the file is laid out waits for its size; one that comes to a
    /// computation that failed before then gets nil.
    @Test func aJoinerWaitsForTheLayout() async throws {
        let (_, continuation) = StreamedComputation.Pieces.makeStream()
        let computation = StreamedComputation(continuation, checkedSHA256: "abc")
        let joined = Gate()
        let joining = Task {
            await onOwnThread {
                defer { joined.open() }
                return computation.join()?.byteCount
            }
        }
        #expect(!joined.isOpen)
        computation.began(byteCount: 42)
        #expect(await joining.value == 42)

        let (_, other) = StreamedComputation.Pieces.makeStream()
        let failed = StreamedComputation(other, checkedSHA256: nil)
        let failedJoin = Task { await onOwnThread { failed.join() == nil } }
        failed.fail(TestDatabaseError("failed before its layout"))
        #expect(await failedJoin.value)
    }

    @Test func aMismatchedChecksumFailsEverySubscriberBeforeTheLastPiece() async throws {
        let output = Output(count: 3_000)
        defer { output.buffer.deallocate() }
        let (first, computation) = laidOut(output)
        computation.forward(output.region(0..<1_000))
        let joined = try #require(computation.join()).pieces
        computation.forward(output.region(1_000..<3_000))
        computation.outputReleased()
        computation.finish(crc32: 1, expected: 2)
        for pieces in [first, joined] {
            let result = await collected(pieces)
            #expect(result.failed && result.bytes == Array(output.bytes.prefix(1_000)))
        }
    }

    @Test func regionsThatDoNotFollowEachOtherCannotBeJoined() async throws {
        let output = Output(count: 3_000)
        defer { output.buffer.deallocate() }
        let (first, computation) = laidOut(output)
        computation.forward(output.region(0..<1_000))
        computation.forward(output.region(2_000..<3_000))
        #expect(computation.join() == nil)
        computation.forward(output.region(1_000..<2_000))
        #expect(computation.join() == nil)
        computation.finish()
        let result = await collected(first)
        #expect(result.bytes == Array(output.bytes[0..<1_000] + output.bytes[2_000..<3_000] + output.bytes[1_000..<2_000]))
    }

    /// Through the store: a stream asked for while the same aggregate is being streamed joins that
    /// computation (here one the test drives, holding the aggregate's real bytes), and reads nothing.
    @Test func aStoreRequestJoinsAComputationUnderWay() async throws {
        let path = try DatabaseBackend.sqlite.makeDatabase()
        let store = try AdapterStore(database: path, aggregateCacheBytes: 0)
        for item in try [upload("alice", rank: 2, weight: 3, seed: 4), upload("bob", rank: 8, weight: 1, seed: 5)] { _ = try await store.put(item) }
        let expected = try #require(try await store.aggregate(federation: "fed", round: 0, client: nil, strategy: .zeroPadding, rank: nil, dtype: .f16))
        let connection = try SQLiteConnection(path: path)
        let revision = try connection.statement("SELECT revision FROM rounds")
        #expect(try revision.step())
        let key = AggregateCache.Key(
            federation: "fed", round: RoundNumber(rawValue: 0)!, revision: revision.integer(0), strategy: .zeroPadding, rank: 8, dtype: .f16,
            scaling: AdapterStore.unitScalingKey)

        let bytes = UnsafeMutableRawBufferPointer.allocate(byteCount: expected.bytes.count, alignment: 8)
        defer { bytes.deallocate() }
        expected.bytes.withUnsafeBytes { bytes.copyMemory(from: $0) }
        let (_, continuation) = StreamedComputation.Pieces.makeStream()
        // A computation with no digest on record to check against (this request's snapshot has one:
        // the joiner must not announce a digest nobody checks).
        let computation = StreamedComputation(continuation, checkedSHA256: nil)
        let (quarter, half) = (expected.bytes.count / 4, expected.bytes.count / 2)
        store.inFlight.offer(computation, for: key)
        computation.began(byteCount: expected.bytes.count)
        computation.forward(UnsafeRawBufferPointer(rebasing: bytes[0..<quarter]))
        computation.forward(UnsafeRawBufferPointer(rebasing: bytes[quarter..<half]))

        let outcome = try await store.aggregate(federation: "fed", round: 0, client: nil, strategy: .zeroPadding, rank: nil, dtype: .f16) { _, _ in .stream }
        guard case .streaming(expected.tag, expected.bytes.count, nil, let pieces, true)? = outcome else {
            Issue.record("did not join the computation under way, without its snapshot's digest: \(String(describing: outcome))")
            return
        }
        computation.forward(UnsafeRawBufferPointer(rebasing: bytes[half...]))
        computation.outputReleased()
        computation.finish()
        let result = await collected(pieces)
        #expect(!result.failed && result.bytes == expected.bytes)

        // Once it can no longer be joined, a request computes its own (and offers it in its place).
        #expect(!computation.isJoinable)
        let own = try await store.aggregate(federation: "fed", round: 0, client: nil, strategy: .zeroPadding, rank: nil, dtype: .f16) { _, _ in .stream }
        guard case .streaming(_, _, _, let ownPieces, false)? = own else {
            Issue.record("did not compute: \(String(describing: own))")
            return
        }
        #expect(await collected(ownPieces).bytes == expected.bytes)
    }
}
