import Foundation

/// The databases the store's and the service's suites run against. SQLite always; PostgreSQL on
/// the throw-away server `scripts/test` starts (its URI in `LORA_AGGREGATOR_TEST_POSTGRES`), and
/// always under CI, where a missing server fails the PostgreSQL cases instead of leaving them out.
public enum DatabaseBackend: String, Sendable {
    case sqlite
    case postgresql

    public static let available: [DatabaseBackend] =
        serverURI != nil || ProcessInfo.processInfo.environment["CI"] == "true" ? [.sqlite, .postgresql] : [.sqlite]

    private static let serverURI = ProcessInfo.processInfo.environment["LORA_AGGREGATOR_TEST_POSTGRES"]

    /// A new, empty database no other test uses: a file in the temporary directory, or a schema of
    /// its own on the test server (the URI sets it as the search path).
    public func makeDatabase() throws -> String {
        switch self {
        case .sqlite:
            return ScratchFiles.path("store", suffix: ".sqlite")
        case .postgresql:
            guard let server = Self.serverURI else { throw TestDatabaseError("LORA_AGGREGATOR_TEST_POSTGRES is not set: run the tests with scripts/test") }
            let schema = "t_" + UUID().uuidString.replacingOccurrences(of: "-", with: "").lowercased()
            try Self.psql(server, "CREATE SCHEMA \(schema)")
            return server + (server.contains("?") ? "&" : "?") + "options=-csearch_path%3D\(schema)"
        }
    }

    /// Runs `sql` on a PostgreSQL database through psql, behind the store's back; returns what it
    /// printed (unaligned, tuples only). Blocks: call it off the cooperative pool.
    @discardableResult
    public static func psql(_ uri: String, _ sql: String) throws -> String {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = ["psql", "--no-psqlrc", "--quiet", "--tuples-only", "--no-align", "-v", "ON_ERROR_STOP=1", "--dbname", uri, "--command", sql]
        let output = Pipe()
        process.standardOutput = output
        try process.run()
        let printed = String(decoding: output.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        guard exitedCleanly(process) else { throw TestDatabaseError("psql failed on: \(sql)") }
        return printed.trimmingCharacters(in: .whitespacesAndNewlines)
    }
}

public struct TestDatabaseError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// Waits for `process` to end; true when it exited with status 0. The child is reaped here, since
/// Foundation's own wait has been seen to miss a child's exit; when Foundation reaped it first, its
/// record is awaited instead (reading it earlier traps).
public func exitedCleanly(_ process: Process) -> Bool {
    var status: Int32 = 0
    while true {
        let reaped = waitpid(process.processIdentifier, &status, 0)
        if reaped == process.processIdentifier { return (status & 0x7F) == 0 && (status >> 8) & 0xFF == 0 }
        if reaped == -1 && errno == EINTR { continue }
        break
    }
    while process.isRunning { usleep(1000) }
    return process.terminationReason == .exit && process.terminationStatus == 0
}
