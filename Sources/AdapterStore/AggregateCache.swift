import LoRAAdapters
import Synchronization

/// Recently computed aggregates in memory, least recently used first out, bounded in bytes. Keys
/// carry the round's revision from the database, so an entry can never outlive a change to the
/// round, in this process or another one sharing the file; a sealed round's revision never moves.
/// (Kept in memory because writing a large aggregate into SQLite with a synced commit costs more
/// than computing it again: docs/benchmarks.md.)
final class AggregateCache: Sendable {
    struct Key: Hashable {
        let federation: FederationID
        let round: RoundNumber
        let revision: Int64
        let strategy: AggregationStrategy
        let rank: Int
        let dtype: DType
        /// The scale it was unfolded to: `AdapterStore.scalingKey`. Only scale-1 aggregates are cut
        /// to lower ranks.
        let scaling: String
    }

    private struct State {
        var entries: [Key: (aggregate: StoredAggregate, lastUse: UInt64)] = [:]
        var bytes = 0
        var clock: UInt64 = 0
    }

    let capacityBytes: Int
    // Shared by the store's queues and the handlers' tasks.
    private let state = Mutex(State())

    init(capacityBytes: Int) { self.capacityBytes = capacityBytes }

    func value(for key: Key) -> StoredAggregate? {
        state.withLock { state in
            guard let entry = state.entries[key] else { return nil }
            state.clock += 1
            state.entries[key] = (entry.aggregate, state.clock)
            return entry.aggregate
        }
    }

    /// A cached aggregate of the same round, strategy and dtype at a higher rank than `key`'s (the
    /// lowest such rank): the requested one can be cut from it.
    func wider(than key: Key) -> StoredAggregate? {
        state.withLock { state in
            let candidates = state.entries.filter { candidate, _ in
                candidate.federation == key.federation && candidate.round == key.round && candidate.revision == key.revision
                    && candidate.strategy == key.strategy && candidate.dtype == key.dtype && candidate.rank > key.rank
                    && key.scaling == AdapterStore.unitScalingKey && candidate.scaling == AdapterStore.unitScalingKey
            }
            guard let (widerKey, entry) = candidates.min(by: { $0.key.rank < $1.key.rank }) else { return nil }
            state.clock += 1
            state.entries[widerKey] = (entry.aggregate, state.clock)
            return entry.aggregate
        }
    }

    /// Fills in the SHA-256 of an entry cached before it was known (a streamed first computation),
    /// if the entry is still there.
    func setSHA256(_ sha256: String, for key: Key) {
        state.withLock { $0.entries[key]?.aggregate.sha256 = sha256 }
    }

    func insert(_ aggregate: StoredAggregate, for key: Key) {
        guard aggregate.bytes.count <= capacityBytes else { return }
        state.withLock { state in
            // Older revisions of the same round can never be asked for again.
            for stale in state.entries.keys where stale.federation == key.federation && stale.round == key.round && stale.revision < key.revision {
                state.bytes -= state.entries.removeValue(forKey: stale)!.aggregate.bytes.count
            }
            while state.bytes + aggregate.bytes.count > capacityBytes, let oldest = state.entries.min(by: { $0.value.lastUse < $1.value.lastUse })?.key {
                state.bytes -= state.entries.removeValue(forKey: oldest)!.aggregate.bytes.count
            }
            state.clock += 1
            if let replaced = state.entries.updateValue((aggregate, state.clock), forKey: key) { state.bytes -= replaced.aggregate.bytes.count }
            state.bytes += aggregate.bytes.count
        }
    }
}
