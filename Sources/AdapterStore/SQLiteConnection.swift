import CSQLite3
import LoRAAdapters
import Synchronization

/// One SQLite connection and its prepared statements, wrapping the C handles. Not thread-safe:
/// `AdapterStore` confines each connection to one serial queue.
final class SQLiteConnection: StoreConnection {
    private let handle: OpaquePointer
    private var statements: [String: SQLiteStatement] = [:]
    /// Taken by every blob read of `withBlobParts` readers, which several threads use at once (the
    /// connection is opened without SQLite's own mutex).
    fileprivate let blobReadLock = Mutex(())

    init(path: String, busyTimeoutMilliseconds: Int32 = 5000) throws(StoreError) {
        var handle: OpaquePointer?
        let status = sqlite3_open_v2(path, &handle, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX, nil)
        guard status == SQLITE_OK, let handle else {
            let detail = handle.map { String(cString: sqlite3_errmsg($0)) } ?? "status \(status)"
            sqlite3_close_v2(handle)
            throw Self.error(status, "the database cannot be opened", detail: detail)
        }
        // SQLITE_OPEN_READWRITE quietly falls back to read-only when the OS refuses writes; a store
        // that cannot write must say so at start, not at the first upload.
        guard sqlite3_db_readonly(handle, "main") == 0 else {
            sqlite3_close_v2(handle)
            throw StoreError(.readOnly, "the database is read-only", detail: path)
        }
        self.handle = handle
        sqlite3_extended_result_codes(handle, 1)
        sqlite3_busy_timeout(handle, busyTimeoutMilliseconds)
    }

    deinit {
        for statement in statements.values { statement.finalize() }
        sqlite3_close_v2(handle)
    }

    /// Runs one or more statements without results (schema, pragmas, transaction control).
    func execute(_ sql: String) throws(StoreError) {
        let status = sqlite3_exec(handle, sql, nil, nil, nil)
        guard status == SQLITE_OK else { throw failure(status) }
    }

    /// The prepared statement for `sql`, prepared on first use and reset for reuse after.
    func statement(_ sql: String) throws(StoreError) -> any StoreStatement { try sqliteStatement(sql) }

    func sqliteStatement(_ sql: String) throws(StoreError) -> SQLiteStatement {
        if let statement = statements[sql] {
            statement.reset()
            return statement
        }
        var raw: OpaquePointer?
        let status = sqlite3_prepare_v3(handle, sql, -1, UInt32(SQLITE_PREPARE_PERSISTENT), &raw, nil)
        guard status == SQLITE_OK, let raw else { throw failure(status) }
        let statement = SQLiteStatement(raw, connection: self)
        statements[sql] = statement
        return statement
    }

    /// A write transaction is immediate: it takes the write lock at the start, so it never fails
    /// half-way for want of it. Every cached statement is reset before the end: one left on a row
    /// would keep its read snapshot pinned.
    func transaction<Result>(_ kind: TransactionKind, _ body: () throws -> Result) throws -> Result {
        try execute(kind == .write ? "BEGIN IMMEDIATE" : "BEGIN")
        do {
            let result = try body()
            resetStatements()
            try execute("COMMIT")
            return result
        } catch {
            resetStatements()
            try? execute("ROLLBACK")
            throw error
        }
    }

    private func resetStatements() {
        for statement in statements.values { statement.reset() }
    }

    func withBlobReader<Result>(table: String, column: String, _ body: (any BlobReader) throws -> Result) throws -> Result {
        let reader = SQLiteBlobReader(connection: self, database: handle, table: table, column: column)
        defer { reader.close() }
        return try body(reader)
    }

    /// Incremental readers of the blobs, all open at once (SQLite keeps each one's overflow-page
    /// list, so a part anywhere in a blob costs only its own pages).
    func withBlobParts<Result>(table: String, column: String, rowIDs: [Int64], _ body: (any ContributionReader) throws -> Result) throws -> Result {
        let parts = SQLiteBlobParts(connection: self)
        defer { parts.close() }
        for rowID in rowIDs {
            var blob: OpaquePointer?
            let status = sqlite3_blob_open(handle, "main", table, column, rowID, 0, &blob)
            guard status == SQLITE_OK else {
                sqlite3_blob_close(blob)
                throw failure(status)
            }
            parts.handles.append(blob)
        }
        return try body(parts)
    }

    var changes: Int { Int(sqlite3_changes(handle)) }

    func failure(_ status: Int32) -> StoreError {
        Self.error(status, "the database operation failed", detail: String(cString: sqlite3_errmsg(handle)))
    }

    static func error(_ status: Int32, _ message: String, detail: String) -> StoreError {
        switch status & 0xFF {
        case SQLITE_FULL: StoreError(.storageFull, "the server's storage is full", detail: detail)
        case SQLITE_READONLY, SQLITE_CANTOPEN, SQLITE_PERM: StoreError(.readOnly, "the database cannot be written", detail: detail)
        case SQLITE_BUSY, SQLITE_LOCKED: StoreError(.busy, "the database is busy", detail: detail)
        default: StoreError(.database, message, detail: detail)
        }
    }
}

/// A prepared statement; bind with 1-based indices, then step.
final class SQLiteStatement: StoreStatement {
    private let raw: OpaquePointer
    private unowned let connection: SQLiteConnection

    init(_ raw: OpaquePointer, connection: SQLiteConnection) {
        self.raw = raw
        self.connection = connection
    }

    func finalize() { sqlite3_finalize(raw) }

    func reset() {
        sqlite3_reset(raw)
        sqlite3_clear_bindings(raw)
    }

    @discardableResult
    func bind(_ values: [StoreValue]) throws(StoreError) -> Self {
        for (offset, value) in values.enumerated() {
            let index = Int32(offset + 1)
            let status: Int32 =
                switch value {
                case .integer(let integer): sqlite3_bind_int64(raw, index, integer)
                case .real(let real): sqlite3_bind_double(raw, index, real)
                case .text(let text): sqlite3_bind_text(raw, index, text, -1, csqlite3_transient())
                case .blob(let bytes): bytes.withUnsafeBytes { sqlite3_bind_blob64(raw, index, $0.baseAddress, sqlite3_uint64($0.count), csqlite3_transient()) }
                case .borrowedBlob(let bytes): sqlite3_bind_blob64(raw, index, bytes.baseAddress, sqlite3_uint64(bytes.count), csqlite3_static())
                case .null: sqlite3_bind_null(raw, index)
                }
            guard status == SQLITE_OK else { throw connection.failure(status) }
        }
        return self
    }

    /// Advances; true when a row is available.
    func step() throws(StoreError) -> Bool {
        let status = sqlite3_step(raw)
        switch status {
        case SQLITE_ROW: return true
        case SQLITE_DONE: return false
        default: throw connection.failure(status)
        }
    }

    func integer(_ column: Int32) -> Int64 { sqlite3_column_int64(raw, column) }
    func real(_ column: Int32) -> Double { sqlite3_column_double(raw, column) }
    func text(_ column: Int32) -> String { sqlite3_column_text(raw, column).map { String(cString: $0) } ?? "" }
    func isNull(_ column: Int32) -> Bool { sqlite3_column_type(raw, column) == SQLITE_NULL }

    /// The blob in `column`, valid until the next step or reset.
    func withBlob<Result>(_ column: Int32, _ body: (UnsafeRawBufferPointer) throws -> Result) rethrows -> Result {
        let count = Int(sqlite3_column_bytes(raw, column))
        return try body(UnsafeRawBufferPointer(start: sqlite3_column_blob(raw, column), count: count))
    }
}

/// Reads whole blobs through SQLite's incremental I/O into one buffer it reuses, instead of the
/// fresh allocation `sqlite3_column_blob` makes for every blob that spills into overflow pages.
final class SQLiteBlobReader: BlobReader {
    private unowned let connection: SQLiteConnection
    private let database: OpaquePointer
    private let table: String, column: String
    private var handle: OpaquePointer?
    private var buffer = UnsafeMutableRawBufferPointer(start: nil, count: 0)

    fileprivate init(connection: SQLiteConnection, database: OpaquePointer, table: String, column: String) {
        self.connection = connection
        self.database = database
        self.table = table
        self.column = column
    }

    fileprivate func close() {
        sqlite3_blob_close(handle)
        handle = nil
        buffer.deallocate()
        buffer = UnsafeMutableRawBufferPointer(start: nil, count: 0)
    }

    /// The blob of row `rowID`, valid until the next call.
    func withBlob<Result>(rowID: Int64, _ body: (UnsafeRawBufferPointer) throws -> Result) throws -> Result {
        let status = handle == nil ? sqlite3_blob_open(database, "main", table, column, rowID, 0, &handle) : sqlite3_blob_reopen(handle, rowID)
        guard status == SQLITE_OK else {
            let error = connection.failure(status)
            sqlite3_blob_close(handle)
            handle = nil
            throw error
        }
        let count = Int(sqlite3_blob_bytes(handle))
        if count > buffer.count {
            buffer.deallocate()
            buffer = .allocate(byteCount: count, alignment: 64)
        }
        let read = sqlite3_blob_read(handle, buffer.baseAddress, Int32(count), 0)
        guard read == SQLITE_OK else { throw connection.failure(read) }
        return try body(UnsafeRawBufferPointer(rebasing: buffer[0..<count]))
    }
}

/// Open blobs read in parts into callers' buffers. The connection is opened without SQLite's own
/// mutex (its queue confines it), so reads from several threads take turns here.
final class SQLiteBlobParts: ContributionReader, @unchecked Sendable {
    // @unchecked: `handles` is filled before the reader is shared, then only read; every use of
    // the connection goes through its `blobReadLock`, shared by all its readers.
    fileprivate var handles: [OpaquePointer?] = []
    private let connection: SQLiteConnection

    fileprivate init(connection: SQLiteConnection) { self.connection = connection }

    func withBytes(ofHolder index: Int, in byteRange: Range<Int>, scratch: UnsafeMutableRawPointer, _ body: (UnsafeRawPointer) throws -> Void) throws {
        // The message is taken under the same lock as the read, before another read replaces it.
        let failure = connection.blobReadLock.withLock { _ in
            let status = sqlite3_blob_read(handles[index], scratch, Int32(byteRange.count), Int32(byteRange.lowerBound))
            return status == SQLITE_OK ? nil : connection.failure(status)
        }
        if let failure { throw failure }
        try body(UnsafeRawPointer(scratch))
    }

    func close() {
        for handle in handles { sqlite3_blob_close(handle) }
        handles = []
    }
}
