import CSQLite3
import Testing

@Test func linksTheSystemSQLiteAndRunsAStatement() throws {
    #expect(sqlite3_libversion_number() >= 3_035_000, "RETURNING and modern pragmas need SQLite 3.35+")

    var database: OpaquePointer?
    #expect(sqlite3_open_v2(":memory:", &database, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, nil) == SQLITE_OK)
    defer { sqlite3_close_v2(database) }

    var statement: OpaquePointer?
    #expect(sqlite3_prepare_v2(database, "SELECT ?1 || '-' || sqlite_version()", -1, &statement, nil) == SQLITE_OK)
    defer { sqlite3_finalize(statement) }
    #expect(sqlite3_bind_text(statement, 1, "lora", -1, csqlite3_transient()) == SQLITE_OK)
    #expect(sqlite3_step(statement) == SQLITE_ROW)
    let text = String(cString: sqlite3_column_text(statement, 0))
    #expect(text == "lora-" + String(cString: sqlite3_libversion()))
}
