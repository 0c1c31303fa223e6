import Digests
import Foundation
import LoRAAdapters

/// A federation as `GET /v1/federations/{federation}` shows it.
public struct FederationRecord: Sendable, Equatable {
    public let settings: FederationSettings
    /// One past the highest sealed round (0 when none is sealed): where clients upload next.
    public let currentRound: RoundNumber
    /// Rounds with uploads, a base, or sealed.
    public let rounds: Int
}

extension AdapterStore {
    /// Stores the federation's settings; true when it had none before.
    public func putSettings(_ settings: FederationSettings, federation: FederationID) async throws -> Bool {
        try await writer.write { connection in
            let existing = try connection.statement("SELECT 1 FROM federations WHERE federation = ?1")
            try existing.bind(.id(federation))
            let created = try !existing.step()
            try connection.statement(
                """
                INSERT INTO federations (federation, settings, updated_at) VALUES (?1, ?2, ?3)
                ON CONFLICT (federation) DO UPDATE SET settings = excluded.settings, updated_at = excluded.updated_at
                """
            ).bind(.id(federation), .text(settings.encoded()), .now).run()
            return created
        }
    }

    /// The federation's settings alone (the defaults if it was never configured).
    public func settings(federation: FederationID) async throws -> FederationSettings {
        try await reader.read { connection in try Self.settings(connection, federation) }
    }

    public func federation(_ federation: FederationID) async throws -> FederationRecord {
        try await reader.read { connection in
            let rounds = try connection.statement(
                """
                SELECT coalesce(max(CASE WHEN r.sealed <> 0 THEN r.round END) + 1, 0),
                       count(CASE WHEN r.sealed <> 0 OR EXISTS (SELECT 1 FROM uploads u WHERE u.federation = r.federation AND u.round = r.round)
                                  OR EXISTS (SELECT 1 FROM bases b WHERE b.federation = r.federation AND b.round = r.round) THEN 1 END)
                FROM rounds r WHERE r.federation = ?1
                """)
            try rounds.bind(.id(federation))
            _ = try rounds.step()
            return FederationRecord(
                settings: try Self.settings(connection, federation), currentRound: RoundNumber(stored: rounds.integer(0)), rounds: Int(rounds.integer(1)))
        }
    }

    /// Seals the round (idempotent; an empty round can be sealed too) and returns it, with the reason
    /// when this call sealed it.
    public func seal(federation: FederationID, round: RoundNumber) async throws -> (record: RoundRecord, sealedNow: Bool) {
        try await writer.write { connection in
            let sealedNow = try Self.seal(connection, federation, round, by: .request)
            return (try Self.roundRecord(connection, federation, round)!, sealedNow)
        }
    }

    /// The earliest deadline of any federation, in unix seconds; nil when none is set.
    public func nextDeadline() async throws -> Double? {
        try await reader.read { connection in
            let statement = try connection.statement("SELECT min(due_at) FROM deadlines")
            _ = try statement.step()
            return statement.isNull(0) ? nil : statement.real(0)
        }
    }

    /// Fires every deadline due by now, each in its own transaction; returns why each round it sealed
    /// was sealed. Safe with several processes: a deadline is fired by whichever gets the write lock
    /// first, and its row is gone for the others. A deadline whose firing fails is logged and tried
    /// again a minute later, so it neither blocks the others nor wakes the timer in a loop.
    public func fireDueDeadlines() async throws -> [SealReason] {
        let due = try await reader.read { connection in
            let statement = try connection.statement("SELECT federation, round, reason FROM deadlines WHERE due_at <= ?1 ORDER BY due_at")
            try statement.bind(.real(Date().timeIntervalSince1970))
            return try statement.rows { (FederationID(stored: $0.text(0)), RoundNumber(stored: $0.integer(1)), $0.text(2)) }
        }
        var sealed: [SealReason] = []
        for (federation, round, reason) in due {
            do {
                if let reason = try await writer.write({ connection in try Self.fire(reason, federation, round, due: Date().timeIntervalSince1970, connection) }
                ) {
                    sealed.append(reason)
                }
            } catch {
                try? FileHandle.standardError.write(
                    contentsOf: Data(
                        "lora-aggregator: the \(reason) deadline of round \(round) of '\(federation)' failed: \(error); retrying in a minute\n".utf8))
                _ = try? await writer.write { connection in
                    try connection.statement("UPDATE deadlines SET due_at = ?4 WHERE federation = ?1 AND round = ?2 AND reason = ?3")
                        .bind(.id(federation), .round(round), .text(reason), .real(Date().timeIntervalSince1970 + 60)).run()
                }
            }
        }
        return sealed
    }

    /// Fires one deadline if it is still on record and due by `now` (another process may have fired
    /// it, and a new one for the same reason set since); returns the reason when it sealed the
    /// round. A deadline whose setting was removed since is dropped.
    private static func fire(_ reason: String, _ federation: FederationID, _ round: RoundNumber, due now: Double, _ connection: any StoreConnection) throws
        -> SealReason?
    {
        try connection.statement("DELETE FROM deadlines WHERE federation = ?1 AND round = ?2 AND reason = ?3 AND due_at <= ?4")
            .bind(.id(federation), .round(round), .text(reason), .real(now)).run()
        guard connection.changes > 0 else { return nil }
        let settings = try settings(connection, federation)
        let uploads = try uploadCount(connection, federation, round)
        switch SealReason(rawValue: reason) {
        case .quorum?:
            guard let minUploads = settings.quorum?.minUploads else { return nil }
            if uploads >= minUploads { return try seal(connection, federation, round, by: .quorum) ? .quorum : nil }
            // Uploads were deleted during the grace period: the quorum is to be reached again.
            try connection.statement("UPDATE rounds SET quorum_at = NULL WHERE federation = ?1 AND round = ?2").bind(.id(federation), .round(round)).run()
        case .timeout?:
            guard settings.roundTimeoutSeconds != nil else { return nil }
            if uploads >= settings.uploadsToSealOnTimeout { return try seal(connection, federation, round, by: .timeout) ? .timeout : nil }
            try connection.statement("UPDATE rounds SET deadline_missed = 1 WHERE federation = ?1 AND round = ?2 AND sealed = 0")
                .bind(.id(federation), .round(round)).run()
        default:
            break
        }
        return nil
    }

    /// Seals the round unless it is sealed; with the federation's `chain` on, stores its aggregate
    /// as the next round's base in the same transaction. True when this call sealed it. A chain that
    /// cannot be stored (the next round's uploads disagree with it in shape) is logged and skipped:
    /// the seal stands.
    static func seal(_ connection: any StoreConnection, _ federation: FederationID, _ round: RoundNumber, by reason: SealReason) throws -> Bool {
        try ensureRoundRow(connection, federation, round)
        try connection.statement("UPDATE rounds SET sealed = 1, sealed_by = ?3, deadline_missed = 0 WHERE federation = ?1 AND round = ?2 AND sealed = 0")
            .bind(.id(federation), .round(round), .text(reason.rawValue)).run()
        guard connection.changes > 0 else { return false }
        try connection.statement("DELETE FROM deadlines WHERE federation = ?1 AND round = ?2").bind(.id(federation), .round(round)).run()
        let settings = try settings(connection, federation)
        guard settings.chain else { return true }
        do {
            try connection.savepoint { try chain(connection, federation, from: round, strategy: settings.strategy) }
        } catch let error as AdapterError {
            try? FileHandle.standardError.write(contentsOf: Data("lora-aggregator: round \(round) of '\(federation)' sealed without chaining: \(error)\n".utf8))
        }
        return true
    }

    /// Round t's global aggregate (the strategy, F32, scale 1) becomes round t+1's base, unless that
    /// round has one or is sealed. A round without uploads passes its own base on as it is (its
    /// aggregate would be zeros under every strategy but replication); one with neither, nothing.
    private static func chain(_ connection: any StoreConnection, _ federation: FederationID, from round: RoundNumber, strategy: AggregationStrategy) throws {
        guard let next = RoundNumber(rawValue: round.rawValue + 1) else { return }
        let source = StoreAdapterSource(connection: connection, federation: federation, round: round)
        let hasUploads = try !source.participants().isEmpty
        guard try hasUploads || !source.baseTensors().isEmpty else { return }
        try ensureRoundRow(connection, federation, next)
        let state = try connection.statement("SELECT sealed FROM rounds WHERE federation = ?1 AND round = ?2")
        try state.bind(.id(federation), .round(next))
        _ = try state.step()
        guard state.integer(0) == 0, try baseRecord(connection, federation, next) == nil else { return }
        let file: SafetensorsFile
        if hasUploads {
            // The bytes a GET of round t's aggregate with this strategy answers, byte for byte.
            let options = AggregationOptions(strategy: strategy, dtype: .f32, metadata: ["federation": federation.rawValue, "round": round.description])
            file = try SafetensorsFile(bytes: AdapterAggregator.aggregate(source, options: options).bytes)
        } else {
            file = try SafetensorsFile(bytes: storedBaseFile(connection, federation, round)!.file)
        }
        _ = try storeBase(file, sha256: ContentDigest.sha256Hex(file.bytes), source: .chain, federation, next, connection)
        try roundChanged(connection, federation, next)
    }

    /// After an upload was stored: the round's first upload starts its timeout; reaching
    /// `min_uploads` starts the grace period (sealing at once without one); `max_uploads` seals.
    /// Returns the reason when the upload sealed the round.
    static func roundReceivedUpload(_ connection: any StoreConnection, _ federation: FederationID, _ round: RoundNumber) throws -> SealReason? {
        let settings = try settings(connection, federation)
        guard settings.quorum != nil || settings.roundTimeoutSeconds != nil else { return nil }
        let now = Date().timeIntervalSince1970
        let state = try connection.statement("SELECT first_upload_at, quorum_at FROM rounds WHERE federation = ?1 AND round = ?2")
        try state.bind(.id(federation), .round(round))
        _ = try state.step()
        let (firstUpload, quorumReached) = (state.isNull(0) ? nil : state.real(0), !state.isNull(1))
        state.reset()
        if firstUpload == nil {
            try connection.statement("UPDATE rounds SET first_upload_at = ?3 WHERE federation = ?1 AND round = ?2")
                .bind(.id(federation), .round(round), .real(now)).run()
            if let timeout = settings.roundTimeoutSeconds { try setDeadline(connection, federation, round, .timeout, at: now + timeout) }
        }
        guard let quorum = settings.quorum else { return nil }
        let uploads = try uploadCount(connection, federation, round)
        if let maxUploads = quorum.maxUploads, uploads >= maxUploads {
            return try seal(connection, federation, round, by: .maxUploads) ? .maxUploads : nil
        }
        if let minUploads = quorum.minUploads, uploads >= minUploads, !quorumReached {
            try connection.statement("UPDATE rounds SET quorum_at = ?3 WHERE federation = ?1 AND round = ?2")
                .bind(.id(federation), .round(round), .real(now)).run()
            if quorum.graceSeconds == 0 { return try seal(connection, federation, round, by: .quorum) ? .quorum : nil }
            try setDeadline(connection, federation, round, .quorum, at: now + quorum.graceSeconds)
        }
        return nil
    }

    private static func setDeadline(_ connection: any StoreConnection, _ federation: FederationID, _ round: RoundNumber, _ reason: SealReason, at due: Double)
        throws
    {
        try connection.statement(
            """
            INSERT INTO deadlines (federation, round, reason, due_at) VALUES (?1, ?2, ?3, ?4)
            ON CONFLICT (federation, round, reason) DO UPDATE SET due_at = excluded.due_at
            """
        )
        .bind(.id(federation), .round(round), .text(reason.rawValue), .real(due)).run()
    }

    static func settings(_ connection: any StoreConnection, _ federation: FederationID) throws -> FederationSettings {
        let statement = try connection.statement("SELECT settings FROM federations WHERE federation = ?1")
        try statement.bind(.id(federation))
        guard try statement.step() else { return FederationSettings() }
        do {
            return try FederationSettings.decode(statement.text(0))
        } catch {
            throw StoreError(.database, "a federation's stored settings cannot be read", detail: "\(error)")
        }
    }

    private static func uploadCount(_ connection: any StoreConnection, _ federation: FederationID, _ round: RoundNumber) throws -> Int {
        let statement = try connection.statement("SELECT count(*) FROM uploads WHERE federation = ?1 AND round = ?2")
        try statement.bind(.id(federation), .round(round))
        _ = try statement.step()
        return Int(statement.integer(0))
    }
}
