import Digests
import Foundation
import LoRAAdapters
import TestSupport
import Testing

@testable import AdapterStore

/// Sealing, chaining and deadlines in the store, where their edge cases can be set up exactly.
@Suite struct FederationStoreTests {
    /// Waits until the wall clock has passed `time` (deadlines are wall-clock times in the database).
    private func waitUntilPast(_ time: Double) async throws {
        while Date().timeIntervalSince1970 <= time { try await Task.sleep(for: .milliseconds(5)) }
    }

    @Test(arguments: DatabaseBackend.available) func aRoundWithOnlyABasePassesItOnAsItIs(_ backend: DatabaseBackend) async throws {
        let store = try AdapterStore(database: try backend.makeDatabase())
        _ = try await store.putSettings(FederationSettings(strategy: .svd, chain: true), federation: "fed")
        let base = try makeAdapter(rank: 4, seed: 9)
        _ = try await store.putBase(federation: "fed", round: 0, file: base, sha256: ContentDigest.sha256Hex(base.bytes))
        #expect(try await store.seal(federation: "fed", round: 0).sealedNow)
        // Under svd a round without uploads aggregates to zeros; its base goes on instead.
        let carried = try #require(try await store.storedBase(federation: "fed", round: 1))
        #expect(carried.file == base.bytes && carried.record.source == .chain)
    }

    @Test(arguments: DatabaseBackend.available) func aChainThatCannotBeStoredLeavesTheSealStanding(_ backend: DatabaseBackend) async throws {
        let store = try AdapterStore(database: try backend.makeDatabase())
        _ = try await store.putSettings(FederationSettings(chain: true), federation: "fed")
        _ = try await store.put(upload("a", rank: 4))
        // Round 1 already has an upload whose tensors are wider: round 0's aggregate cannot be its base.
        _ = try await store.put(upload("b", rank: 4, round: 1, file: try makeAdapter(rank: 4, seed: 1, width: 8)))
        let (record, sealedNow) = try await store.seal(federation: "fed", round: 0)
        #expect(sealedNow && record.sealedBy == .request)
        #expect(try await store.storedBase(federation: "fed", round: 1) == nil)
        #expect(try await store.round(federation: "fed", round: 1)?.uploads.count == 1, "round 1 is untouched")
    }

    @Test(arguments: DatabaseBackend.available) func aDeadlineWhoseSettingWasRemovedIsDropped(_ backend: DatabaseBackend) async throws {
        let store = try AdapterStore(database: try backend.makeDatabase())
        _ = try await store.putSettings(FederationSettings(roundTimeoutSeconds: 0.05), federation: "fed")
        let before = Date().timeIntervalSince1970
        _ = try await store.put(upload("a", rank: 4))
        let due = try #require(try await store.nextDeadline())
        #expect(due >= before + 0.05)
        _ = try await store.putSettings(FederationSettings(), federation: "fed")
        try await waitUntilPast(due)
        #expect(try await store.fireDueDeadlines().isEmpty)
        #expect(try await store.round(federation: "fed", round: 0)?.sealed == false)
        #expect(try await store.nextDeadline() == nil, "fired once, gone")
    }

    @Test(arguments: DatabaseBackend.available) func aTimeoutSealsAndChainsOnceWhateverTheNumberOfFirings(_ backend: DatabaseBackend) async throws {
        let path = try backend.makeDatabase()
        let (one, other) = (try AdapterStore(database: path), try AdapterStore(database: path))
        _ = try await one.putSettings(FederationSettings(chain: true, roundTimeoutSeconds: 0.05), federation: "fed")
        _ = try await one.put(upload("a", rank: 4))
        try await waitUntilPast(try #require(try await one.nextDeadline()))
        async let first = one.fireDueDeadlines()
        async let second = other.fireDueDeadlines()
        let fired = try await first + second
        #expect(fired == [.timeout])
        #expect(try await one.round(federation: "fed", round: 0)?.sealedBy == .timeout)
        #expect(try await one.storedBase(federation: "fed", round: 1)?.record.source == .chain)
    }
}
