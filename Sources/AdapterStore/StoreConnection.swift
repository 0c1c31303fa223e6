import Foundation
import LoRAAdapters

/// What the store needs of a database connection; SQLite and PostgreSQL each provide it. The store's
/// SQL is written once, in what both dialects accept: numbered parameters (`?1`, which PostgreSQL
/// reads as `$1`), integers for flags (`sealed <> 0`), `ON CONFLICT (…) DO UPDATE` for upserts,
/// `RETURNING id` for new rows, timestamps bound by the caller. A connection is not thread-safe:
/// the store confines each to one serial queue (`ConnectionQueue`).
protocol StoreConnection: AnyObject {
    /// Runs one or more statements without parameters or results (schema, settings).
    func execute(_ sql: String) throws(StoreError)
    /// The prepared statement for `sql`, prepared on first use and reset for reuse after.
    func statement(_ sql: String) throws(StoreError) -> any StoreStatement
    /// Runs `body` in a transaction: a `read` one sees one snapshot and writes nothing; `write` ones
    /// run one at a time, across every process on the database, so each sees all before it.
    func transaction<Result>(_ kind: TransactionKind, _ body: () throws -> Result) throws -> Result
    /// Rows changed by the last statement run.
    var changes: Int { get }
    /// Runs `body` with a reader of whole blobs of `column` in `table`, by row id.
    func withBlobReader<Result>(table: String, column: String, _ body: (any BlobReader) throws -> Result) throws -> Result
    /// Runs `body` with the blobs of `rowIDs` readable in parts, from several threads at once; may
    /// be called inside another call's `body`, and both readers used at once.
    func withBlobParts<Result>(table: String, column: String, rowIDs: [Int64], _ body: (any ContributionReader) throws -> Result) throws -> Result
}

enum TransactionKind {
    case read, write
}

extension StoreConnection {
    /// Runs `body` inside a savepoint of the current transaction: on a throw, only what `body` did
    /// is rolled back, and the error is rethrown.
    func savepoint<Result>(_ body: () throws -> Result) throws -> Result {
        try execute("SAVEPOINT nested")
        do {
            let result = try body()
            try execute("RELEASE SAVEPOINT nested")
            return result
        } catch {
            try? execute("ROLLBACK TO SAVEPOINT nested")
            try? execute("RELEASE SAVEPOINT nested")
            throw error
        }
    }
}

/// A prepared statement: bind (values in parameter order), then step through its rows, reading
/// columns by 0-based index. A NULL reads as 0, 0.0, "" or no bytes.
protocol StoreStatement: AnyObject {
    func reset()
    @discardableResult
    func bind(_ values: [StoreValue]) throws(StoreError) -> Self
    /// Advances; true when a row is available.
    func step() throws(StoreError) -> Bool
    func integer(_ column: Int32) -> Int64
    func real(_ column: Int32) -> Double
    func text(_ column: Int32) -> String
    func isNull(_ column: Int32) -> Bool
    /// The blob in `column`, valid until the next step or reset.
    func withBlob<Result>(_ column: Int32, _ body: (UnsafeRawBufferPointer) throws -> Result) rethrows -> Result
}

extension StoreStatement {
    @discardableResult
    func bind(_ values: StoreValue...) throws(StoreError) -> Self { try bind(values) }

    /// Steps a statement that returns no rows.
    func run() throws(StoreError) { _ = try step() }

    /// Steps through every row, each decoded by `decode`.
    func rows<Row>(_ decode: (any StoreStatement) throws -> Row) throws -> [Row] {
        var rows: [Row] = []
        while try step() { rows.append(try decode(self)) }
        return rows
    }

    func blob(_ column: Int32) -> [UInt8] { withBlob(column) { Array($0) } }
}

/// Reads whole blobs by row id, each valid until the next read.
protocol BlobReader {
    func withBlob<Result>(rowID: Int64, _ body: (UnsafeRawBufferPointer) throws -> Result) throws -> Result
}

enum StoreValue {
    case integer(Int64)
    case real(Double)
    case text(String)
    case blob([UInt8])
    /// Bound without a copy: the caller keeps the memory alive until the statement has stepped.
    case borrowedBlob(UnsafeRawBufferPointer)
    case null

    /// A federation or client id, as its text.
    static func id<Kind>(_ id: Identifier<Kind>) -> StoreValue { .text(id.rawValue) }
    static func round(_ round: RoundNumber) -> StoreValue { .integer(round.rawValue) }
    /// The time now, as the store keeps it in text columns: ISO 8601, UTC, in milliseconds.
    static var now: StoreValue { .text(Date.now.formatted(Date.ISO8601FormatStyle(includingFractionalSeconds: true))) }
}
