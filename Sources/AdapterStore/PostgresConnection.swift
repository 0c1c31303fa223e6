import CPostgres
import Foundation
import LoRAAdapters

/// One PostgreSQL connection through libpq, with its prepared statements. Not thread-safe: the
/// store confines each connection to one serial queue. Results come in binary (a tensor's bytes
/// as they are stored, no hex); parameters go as text, blobs as binary, their types inferred by
/// the server from the statement. A lost connection fails what was running with `unavailable`
/// (503) and is re-established when the next transaction starts.
final class PostgresConnection: StoreConnection {
    private let handle: OpaquePointer
    private var statements: [String: PostgresStatement] = [:]
    private var preparedCount = 0
    /// How many `withBlobParts` calls are running, one inside the other.
    private var blobPartsDepth = 0
    private(set) var changes = 0

    /// Whether `database` names a PostgreSQL database rather than a SQLite file: a `postgresql://`
    /// (or `postgres://`) URI, or libpq's `key=value` form (`host=db dbname=lora`).
    static func accepts(_ database: String) -> Bool {
        database.hasPrefix("postgresql://") || database.hasPrefix("postgres://") || database.firstMatch(of: /^\s*[a-z_]+\s*=/) != nil
    }

    /// Writes across every process on the schema take this transaction-scoped advisory lock first
    /// (with the schema's name as its second key, so deployments sharing a database in schemas of
    /// their own do not wait for each other), as SQLite writers take its write lock: they run one at
    /// a time and each sees all before it.
    static let writeLock = "pg_advisory_xact_lock(1819243105, hashtext(current_schema()))"

    /// Bounds on what a network can make a connection wait for, where the URI sets none: to connect,
    /// and (keepalives, unacknowledged data) to notice a server that is gone without closing.
    private static let networkDefaults = [
        ("connect_timeout", "10"), ("keepalives_idle", "30"), ("keepalives_interval", "10"), ("keepalives_count", "3"), ("tcp_user_timeout", "30000"),
    ]

    /// - Parameter lockTimeoutSeconds: how long a write waits for another process's write (SQLite's
    ///   busy timeout) before it fails with `busy` (503, Retry-After).
    init(uri: String, lockTimeoutSeconds: Double = 30) throws(StoreError) {
        self.lockTimeoutSeconds = lockTimeoutSeconds
        // Keywords later in the list win, so the URI (expanded from `dbname`) overrides the defaults.
        let keywords = Self.networkDefaults.map(\.0) + ["dbname"]
        let values = Self.networkDefaults.map(\.1) + [uri]
        let connection = withCStrings(keywords) { keywords in withCStrings(values) { values in PQconnectdbParams(keywords, values, 1) } }
        guard let handle = connection else { throw StoreError(.unavailable, "the database cannot be reached", detail: "libpq is out of memory") }
        guard PQstatus(handle) == CONNECTION_OK else {
            let detail = Self.message(PQerrorMessage(handle))
            PQfinish(handle)
            throw StoreError(.unavailable, "the database cannot be reached", detail: detail)
        }
        self.handle = handle
        try configure()
    }

    deinit {
        for statement in statements.values { statement.reset() }
        PQfinish(handle)
    }

    private let lockTimeoutSeconds: Double

    /// Session settings, again after every reconnection. A session left idle inside a transaction
    /// (its process hung or partitioned away) is ended by the server, so it cannot hold the write
    /// lock for long; the store's transactions never wait between statements that long.
    private func configure() throws(StoreError) {
        try execute(
            "SET lock_timeout = '\(Int(lockTimeoutSeconds * 1000))ms'; SET idle_in_transaction_session_timeout = '5min'; SET client_min_messages = warning")
    }

    func execute(_ sql: String) throws(StoreError) {
        let result = PQexec(handle, sql)
        defer { PQclear(result) }
        let status = PQresultStatus(result)
        guard result != nil, status == PGRES_COMMAND_OK || status == PGRES_TUPLES_OK else { throw failure(result) }
    }

    func statement(_ sql: String) throws(StoreError) -> any StoreStatement {
        if let statement = statements[sql] {
            statement.reset()
            return statement
        }
        preparedCount += 1
        let name = "lora_\(preparedCount)"
        let result = PQprepare(handle, name, Self.dollarParameters(sql), 0, nil)
        defer { PQclear(result) }
        guard result != nil, PQresultStatus(result) == PGRES_COMMAND_OK else { throw failure(result) }
        let statement = PostgresStatement(name: name, connection: self)
        statements[sql] = statement
        return statement
    }

    /// A read sees one snapshot (REPEATABLE READ, as a SQLite read transaction does). A write takes
    /// the write lock, then reads what is committed (READ COMMITTED: all writes before it, since
    /// they held the lock). A connection found lost is re-established before beginning, once. Any
    /// failure after BEGIN (the lock not granted in time included) rolls back, so the connection is
    /// never left inside a failed transaction.
    func transaction<Result>(_ kind: TransactionKind, _ body: () throws -> Result) throws -> Result {
        let begin = kind == .write ? "BEGIN" : "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
        if case .failure(let error) = Swift.Result(catching: { () throws(StoreError) in try beginOnce(begin) }) {
            // A server that restarted leaves the connection broken only once it is used.
            guard PQstatus(handle) != CONNECTION_OK else { throw error }
            try beginOnce(begin)
        }
        do {
            if kind == .write { try execute("SELECT \(Self.writeLock)") }
            let result = try body()
            resetStatements()
            try commit()
            return result
        } catch {
            resetStatements()
            if PQstatus(handle) == CONNECTION_OK { try? execute("ROLLBACK") }
            throw error
        }
    }

    private func beginOnce(_ begin: String) throws(StoreError) {
        try reconnectIfLost()
        // Never begin inside a transaction something left open.
        if PQtransactionStatus(handle) != PQTRANS_IDLE { try execute("ROLLBACK") }
        try execute(begin)
    }

    /// COMMIT of a transaction that failed answers success with the tag ROLLBACK: that is a failure.
    private func commit() throws(StoreError) {
        let result = PQexec(handle, "COMMIT")
        defer { PQclear(result) }
        guard result != nil, PQresultStatus(result) == PGRES_COMMAND_OK else { throw failure(result) }
        guard String(cString: PQcmdStatus(result)) == "COMMIT" else { throw StoreError(.database, "the transaction was rolled back") }
    }

    private func reconnectIfLost() throws(StoreError) {
        guard PQstatus(handle) != CONNECTION_OK else { return }
        // The server forgot the prepared statements with the session.
        for statement in statements.values { statement.reset() }
        statements = [:]
        PQreset(handle)
        guard PQstatus(handle) == CONNECTION_OK else {
            throw StoreError(.unavailable, "the database cannot be reached", detail: Self.message(PQerrorMessage(handle)))
        }
        try configure()
    }

    private func resetStatements() {
        for statement in statements.values { statement.reset() }
    }

    /// Runs a prepared statement; the result is the caller's to clear.
    fileprivate func run(_ name: String, _ parameters: [StoreValue]) throws(StoreError) -> OpaquePointer {
        let wire = try WireParameters(parameters)
        defer { wire.free() }
        let result = PQexecPrepared(handle, name, Int32(wire.values.count), wire.values, wire.lengths, wire.formats, 1)
        let status = PQresultStatus(result)
        guard let result, status == PGRES_TUPLES_OK || status == PGRES_COMMAND_OK else {
            let error = failure(result)
            PQclear(result)
            throw error
        }
        changes = Int(String(cString: PQcmdTuples(result))) ?? 0
        for column in 0..<PQnfields(result) where !PostgresStatement.readableTypes.contains(PQftype(result, column)) {
            let type = PQftype(result, column)
            PQclear(result)
            throw StoreError(.database, "a query returned a column of a type the store cannot read", detail: "type oid \(type)")
        }
        return result
    }

    func withBlobReader<Result>(table: String, column: String, _ body: (any BlobReader) throws -> Result) throws -> Result {
        try body(PostgresBlobReader(statement: try statement("SELECT \(column) FROM \(table) WHERE rowid = ?1")))
    }

    /// The blobs are fetched whole, in one query, and lent in place while `body` runs. A call inside
    /// another's `body` gets a statement of its own (the SQL names the depth), so that it does not
    /// clear the result whose blobs the outer one lends.
    func withBlobParts<Result>(table: String, column: String, rowIDs: [Int64], _ body: (any ContributionReader) throws -> Result) throws -> Result {
        blobPartsDepth += 1
        defer { blobPartsDepth -= 1 }
        let fetch = try statement("SELECT rowid, \(column) FROM \(table) WHERE rowid = ANY (?1) /* depth \(blobPartsDepth) */")
        try fetch.bind(.text("{" + rowIDs.map(String.init).joined(separator: ",") + "}"))
        defer { fetch.reset() }
        var blobs: [Int64: UnsafeRawBufferPointer] = [:]
        while try fetch.step() { blobs[fetch.integer(0)] = fetch.withBlob(1) { $0 } }
        let parts = try rowIDs.map { rowID in
            guard let bytes = blobs[rowID] else { throw StoreError(.database, "a stored tensor vanished during a read", detail: "rowid \(rowID)") }
            return bytes
        }
        return try body(InPlaceContributionReader(holders: parts))
    }

    /// What went wrong, by SQLSTATE: the connection (or the server) gone → `unavailable`; a full
    /// disk → `storageFull`; a lock not granted in time or a conflict → `busy`.
    private func failure(_ result: OpaquePointer?) -> StoreError {
        let detail =
            Self.message(result.flatMap { PQresultErrorMessage($0) }).isEmpty
            ? Self.message(PQerrorMessage(handle)) : Self.message(PQresultErrorMessage(result))
        let state = result.flatMap { PQresultErrorField($0, Int32(UInt8(ascii: "C"))) }.map { String(cString: $0) } ?? ""
        switch state {
        case _ where PQstatus(handle) != CONNECTION_OK, _ where state.hasPrefix("08"), "57P01", "57P02", "57P03":
            return StoreError(.unavailable, "the database cannot be reached", detail: detail)
        case "53100": return StoreError(.storageFull, "the server's storage is full", detail: detail)
        case "25006": return StoreError(.readOnly, "the database cannot be written", detail: detail)
        case "40001", "40P01", "55P03": return StoreError(.busy, "the database is busy", detail: detail)
        default: return StoreError(.database, "the database operation failed", detail: detail)
        }
    }

    private static func message(_ text: UnsafePointer<CChar>?) -> String {
        text.map { String(cString: $0).trimmingCharacters(in: .whitespacesAndNewlines) } ?? ""
    }

    /// The store's `?1` parameters as PostgreSQL's `$1` (the store's SQL has no `?` elsewhere).
    static func dollarParameters(_ sql: String) -> String {
        var output = ""
        output.reserveCapacity(sql.utf8.count)
        var previous: Character = " "
        for character in sql {
            if previous == "?" { output.append(character.isNumber ? "$" : "?") }
            if character != "?" { output.append(character) }
            previous = character
        }
        if previous == "?" { output.append("?") }
        return output
    }
}

/// Parameters as libpq takes them: numbers and text as text (the server parses them as the types
/// it inferred), blobs as binary; copies freed by `free()`.
private struct WireParameters {
    var values: [UnsafePointer<CChar>?] = []
    var lengths: [Int32] = []
    var formats: [Int32] = []
    private var owned: [UnsafeMutableRawPointer] = []

    /// PostgreSQL's limit on one value (bytea included).
    static let maxValueBytes = (1 << 30) - 1

    init(_ parameters: [StoreValue]) throws(StoreError) {
        for parameter in parameters {
            if case .borrowedBlob(let bytes) = parameter, bytes.count > Self.maxValueBytes {
                free()
                throw StoreError(.tooLarge, "a tensor over 1 GiB cannot be stored in PostgreSQL", detail: "\(bytes.count) bytes")
            }
            switch parameter {
            case .integer(let integer): addText(String(integer))
            case .real(let real): addText(real.isFinite ? "\(real)" : real.isNaN ? "NaN" : real < 0 ? "-Infinity" : "Infinity")
            case .text(let string): addText(string)
            case .blob(let bytes):
                let copy = malloc(max(1, bytes.count))!
                bytes.withUnsafeBytes { if let base = $0.baseAddress { copy.copyMemory(from: base, byteCount: $0.count) } }
                owned.append(copy)
                addBinary(UnsafeRawPointer(copy), count: bytes.count)
            case .borrowedBlob(let bytes):
                if let base = bytes.baseAddress {
                    addBinary(base, count: bytes.count)
                } else {
                    // libpq reads a null pointer as SQL NULL, so an empty blob needs a real one.
                    let placeholder = malloc(1)!
                    owned.append(placeholder)
                    addBinary(UnsafeRawPointer(placeholder), count: 0)
                }
            case .null:
                values.append(nil)
                lengths.append(0)
                formats.append(0)
            }
        }
    }

    private mutating func addText(_ string: String) {
        let copy = strdup(string)!
        owned.append(UnsafeMutableRawPointer(copy))
        values.append(UnsafePointer(copy))
        lengths.append(0)
        formats.append(0)
    }

    private mutating func addBinary(_ bytes: UnsafeRawPointer, count: Int) {
        values.append(bytes.assumingMemoryBound(to: CChar.self))
        lengths.append(Int32(count))
        formats.append(1)
    }

    func free() { for pointer in owned { Foundation.free(pointer) } }
}

/// A prepared statement: `step` runs it on first call (the whole result comes at once) and walks
/// its rows.
final class PostgresStatement: StoreStatement {
    private let name: String
    private unowned let connection: PostgresConnection
    private var parameters: [StoreValue] = []
    private var result: OpaquePointer?
    private var row: Int32 = -1

    /// Column types read: bool, bytea, name, int8, int2, int4, text, float4, float8, unknown, bpchar, varchar.
    static let readableTypes: Set<Oid> = [16, 17, 19, 20, 21, 23, 25, 700, 701, 705, 1042, 1043]

    fileprivate init(name: String, connection: PostgresConnection) {
        self.name = name
        self.connection = connection
    }

    func reset() {
        PQclear(result)
        result = nil
        row = -1
        parameters = []
    }

    func bind(_ values: [StoreValue]) throws(StoreError) -> Self {
        parameters = values
        return self
    }

    func step() throws(StoreError) -> Bool {
        if result == nil { result = try connection.run(name, parameters) }
        row += 1
        return row < PQntuples(result)
    }

    private func value(_ column: Int32) -> UnsafeRawBufferPointer? {
        guard let result, row >= 0, PQgetisnull(result, row, column) == 0 else { return nil }
        return UnsafeRawBufferPointer(start: PQgetvalue(result, row, column), count: Int(PQgetlength(result, row, column)))
    }

    func integer(_ column: Int32) -> Int64 {
        guard let bytes = value(column) else { return 0 }
        switch PQftype(result, column) {
        case 20: return Int64(bigEndian: bytes.loadUnaligned(as: Int64.self))
        case 23: return Int64(Int32(bigEndian: bytes.loadUnaligned(as: Int32.self)))
        case 21: return Int64(Int16(bigEndian: bytes.loadUnaligned(as: Int16.self)))
        case 16: return Int64(bytes[0])
        case 700, 701: return Int64(real(column))
        default: return Int64(text(column)) ?? 0
        }
    }

    func real(_ column: Int32) -> Double {
        guard let bytes = value(column) else { return 0 }
        switch PQftype(result, column) {
        case 701: return Double(bitPattern: UInt64(bigEndian: bytes.loadUnaligned(as: UInt64.self)))
        case 700: return Double(Float(bitPattern: UInt32(bigEndian: bytes.loadUnaligned(as: UInt32.self))))
        case 16, 20, 21, 23: return Double(integer(column))
        default: return Double(text(column)) ?? 0
        }
    }

    func text(_ column: Int32) -> String {
        guard let bytes = value(column) else { return "" }
        return String(decoding: bytes, as: UTF8.self)
    }

    func isNull(_ column: Int32) -> Bool { value(column) == nil }

    func withBlob<Result>(_ column: Int32, _ body: (UnsafeRawBufferPointer) throws -> Result) rethrows -> Result {
        try body(value(column) ?? UnsafeRawBufferPointer(start: nil, count: 0))
    }
}

/// Runs `body` with `strings` as C strings, in an array ending with a null pointer.
private func withCStrings<Result>(_ strings: [String], _ body: ([UnsafePointer<CChar>?]) -> Result) -> Result {
    let copies = strings.map { strdup($0) }
    defer { for copy in copies { free(copy) } }
    return body(copies.map { UnsafePointer($0) } + [nil])
}

/// Whole blobs by row id, each fetched by one prepared query.
private struct PostgresBlobReader: BlobReader {
    let statement: any StoreStatement

    func withBlob<Result>(rowID: Int64, _ body: (UnsafeRawBufferPointer) throws -> Result) throws -> Result {
        statement.reset()
        try statement.bind(.integer(rowID))
        guard try statement.step() else { throw StoreError(.database, "a stored tensor vanished during a read", detail: "rowid \(rowID)") }
        return try statement.withBlob(0, body)
    }
}
