import LoRAAdapters

/// A round in the database as the aggregation engine's source: one tensor name across all clients
/// at a time, in client-id byte order (SQLite's BINARY collation, and the "C" collation PostgreSQL's
/// schema gives ids, so both feed the engine alike), each blob read into one reused buffer, and its
/// base as one more row per tensor. Used inside a transaction, so the round cannot change underneath.
struct StoreAdapterSource: AdapterSource {
    let connection: any StoreConnection
    let federation: FederationID
    let round: RoundNumber
    /// False to read the base alone, as a round without uploads.
    var includesUploads = true

    func participants() throws -> [RoundParticipant] {
        guard includesUploads else { return [] }
        let statement = try connection.statement(
            "SELECT client, weight, \(AdapterConfig.storedColumns) FROM uploads WHERE federation = ?1 AND round = ?2")
        try statement.bind(.id(federation), .round(round))
        return try statement.rows { RoundParticipant(clientID: $0.text(0), weight: $0.real(1), config: try AdapterConfig(storedRow: $0, from: 2)) }
    }

    func holdings() throws -> [TensorHolding] {
        guard includesUploads else { return [] }
        let statement = try connection.statement(
            """
            SELECT u.client, t.name, t.dtype, t.shape FROM uploads u JOIN tensors t ON t.upload_id = u.id
            WHERE u.federation = ?1 AND u.round = ?2
            """)
        try statement.bind(.id(federation), .round(round))
        return try statement.rows { TensorHolding(name: $0.text(1), clientID: $0.text(0), dtype: try Self.dtype($0.text(2)), shape: Self.shape($0.text(3))) }
    }

    func forEachContribution(toTensor tensorName: String, _ body: (TensorContribution) throws -> Void) throws {
        guard includesUploads else { return }
        let statement = try connection.statement(Self.holdersOfTensor)
        try statement.bind(.id(federation), .round(round), .text(tensorName))
        try connection.withBlobReader(table: "tensors", column: "data") { blobs in
            while try statement.step() {
                let contribution = (client: statement.text(0), dtype: try Self.dtype(statement.text(1)), shape: Self.shape(statement.text(2)))
                try blobs.withBlob(rowID: statement.integer(3)) { bytes in
                    try body(TensorContribution(clientID: contribution.client, dtype: contribution.dtype, shape: contribution.shape, bytes: bytes))
                }
            }
        }
    }

    /// Each holder's blob readable in parts (SQLite reads each part from the mapped file into the
    /// caller's scratch, the cache the engine sums from; PostgreSQL fetches the blobs first).
    func withContributionReader(toTensor tensorName: String, _ body: ([ContributionInfo], any ContributionReader) throws -> Void) throws {
        guard includesUploads else { return try body([], InPlaceContributionReader([])) }
        let statement = try connection.statement(Self.holdersOfTensor)
        try statement.bind(.id(federation), .round(round), .text(tensorName))
        let rows = try statement.rows {
            (
                info: ContributionInfo(clientID: $0.text(0), dtype: try Self.dtype($0.text(1)), shape: Self.shape($0.text(2)), byteCount: Int($0.integer(4))),
                rowID: $0.integer(3)
            )
        }
        try connection.withBlobParts(table: "tensors", column: "data", rowIDs: rows.map(\.rowID)) { try body(rows.map(\.info), $0) }
    }

    /// The holders of tensor ?3 in client-id order: client, dtype, shape, blob row id, blob size.
    private static let holdersOfTensor = """
        SELECT u.client, t.dtype, t.shape, t.rowid, length(t.data) FROM uploads u JOIN tensors t ON t.upload_id = u.id AND t.name = ?3
        WHERE u.federation = ?1 AND u.round = ?2 ORDER BY u.client
        """

    func baseTensors() throws -> [BaseTensor] {
        let statement = try connection.statement(
            "SELECT t.name, t.dtype, t.shape FROM bases b JOIN base_tensors t ON t.base_id = b.id WHERE b.federation = ?1 AND b.round = ?2")
        try statement.bind(.id(federation), .round(round))
        return try statement.rows { BaseTensor(name: $0.text(0), dtype: try Self.dtype($0.text(1)), shape: Self.shape($0.text(2))) }
    }

    func withBaseTensor(named tensorName: String, _ body: (TensorContribution) throws -> Void) throws {
        let statement = try connection.statement(
            """
            SELECT t.dtype, t.shape, t.rowid FROM bases b JOIN base_tensors t ON t.base_id = b.id AND t.name = ?3
            WHERE b.federation = ?1 AND b.round = ?2
            """)
        try statement.bind(.id(federation), .round(round), .text(tensorName))
        guard try statement.step() else { return }
        let (dtype, shape) = (try Self.dtype(statement.text(0)), Self.shape(statement.text(1)))
        try connection.withBlobReader(table: "base_tensors", column: "data") { blobs in
            try blobs.withBlob(rowID: statement.integer(2)) { try body(TensorContribution(clientID: "", dtype: dtype, shape: shape, bytes: $0)) }
        }
    }

    static func dtype(_ text: String) throws(StoreError) -> DType {
        guard let dtype = DType(rawValue: text) else { throw StoreError(.database, "a stored tensor has an unknown dtype", detail: text) }
        return dtype
    }

    /// Shapes are stored as JSON arrays of integers: "[16,4096]".
    static func shape(_ text: String) -> [Int] {
        text.dropFirst().dropLast().split(separator: ",").compactMap { Int($0) }
    }

    static func shapeText(_ shape: [Int]) -> String { "[" + shape.map(String.init).joined(separator: ",") + "]" }
}
