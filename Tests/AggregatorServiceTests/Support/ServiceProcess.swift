import Foundation
import Synchronization
import TestSupport

/// The real `lora-aggregator` executable, started on port 0 against a database for one test and
/// stopped by its PID.
final class ServiceProcess: @unchecked Sendable {
    // @unchecked: `process` is set once in init; stop/kill only signal it.
    let process: Process
    let port: Int
    let databasePath: String
    private let errorOutput: Pipe
    /// Standard error, read as it comes: a full pipe would block the server's logging, and with it
    /// whatever request logs (a database outage logs every refusal).
    private var errorLogDrain: LogDrain?

    static var executable: URL {
        // The test bundle sits next to the package's executables in the build directory.
        var directory = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
        while !FileManager.default.fileExists(atPath: directory.appendingPathComponent("lora-aggregator").path), directory.path != "/" {
            directory.deleteLastPathComponent()
        }
        return directory.appendingPathComponent("lora-aggregator")
    }

    struct ServerStartFailure: Error, CustomStringConvertible {
        let status: Int32
        let reason: Process.TerminationReason
        let log: String
        var description: String { "the server exited (\(reason == .uncaughtSignal ? "signal" : "status") \(status)) before its ready line: \(log)" }
    }

    /// A new, empty database of `backend` (a SQLite file, or a PostgreSQL schema of its own).
    static func temporaryDatabase(_ backend: DatabaseBackend = .sqlite) throws -> String { try backend.makeDatabase() }

    /// Starts the server on a new database of `backend` and waits for its ready line.
    static func start(_ backend: DatabaseBackend = .sqlite, arguments: [String] = []) async throws -> ServiceProcess {
        try await start(database: try temporaryDatabase(backend), arguments: arguments)
    }

    /// Starts the server on `database` and waits for its ready line (off the cooperative pool);
    /// `environment` adds to this process's.
    static func start(database: String, arguments: [String] = [], environment: [String: String] = [:]) async throws -> ServiceProcess {
        try await onOwnThread { try ServiceProcess(database: database, arguments: arguments, environment: environment) }
    }

    private init(database: String, arguments: [String], environment: [String: String]) throws {
        process = Process()
        process.executableURL = Self.executable
        process.arguments = ["serve", "--port", "0", "--database", database, "--no-access-log"] + arguments
        process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
        let output = Pipe()
        errorOutput = Pipe()
        process.standardOutput = output
        process.standardError = errorOutput
        try process.run()
        var line = Data()
        while !line.contains(0x0A) {
            let chunk = output.fileHandleForReading.availableData
            guard !chunk.isEmpty else {
                // The server ended before its ready line: say how, with what it wrote.
                process.waitUntilExit()
                throw ServerStartFailure(
                    status: process.terminationStatus, reason: process.terminationReason,
                    log: String(decoding: errorOutput.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self))
            }
            line.append(chunk)
        }
        let text = String(decoding: line, as: UTF8.self)
        guard let range = text.range(of: #"127\.0\.0\.1:(\d+)"#, options: .regularExpression),
            let port = Int(text[range].split(separator: ":")[1])
        else { throw POSIXError(.EBADMSG) }
        self.port = port
        self.databasePath = database
        errorLogDrain = LogDrain(errorOutput.fileHandleForReading)
    }

    /// A test that throws before stopping its server must not leave it running.
    deinit {
        if process.isRunning { Foundation.kill(process.processIdentifier, SIGKILL) }
    }

    /// SIGTERM, then waits for the exit; returns the exit status.
    @discardableResult
    func stop() async -> Int32 {
        terminate()
        return await onOwnThread { [process] in
            process.waitUntilExit()
            return process.terminationStatus
        }
    }

    /// SIGTERM without waiting: the server finishes what is in flight and exits.
    func terminate() {
        Foundation.kill(process.processIdentifier, SIGTERM)
    }

    /// SIGKILL: no chance to clean up.
    func kill() async {
        Foundation.kill(process.processIdentifier, SIGKILL)
        await onOwnThread { [process] in process.waitUntilExit() }
    }

    /// What the server wrote to standard error; read it once the server has stopped.
    func errorLog() -> String { errorLogDrain?.wholeLog() ?? "" }

    var client: ServiceClient { ServiceClient(port: port) }
}

/// Reads a pipe to its end on a thread of its own, keeping what it read.
private final class LogDrain: Sendable {
    private let data = Mutex(Data())
    private let ended = DispatchSemaphore(value: 0)

    init(_ handle: FileHandle) {
        Thread.detachNewThread { self.read(handle) }
    }

    private func read(_ handle: FileHandle) {
        while case let chunk = handle.availableData, !chunk.isEmpty { data.withLock { $0.append(chunk) } }
        ended.signal()
    }

    /// Everything, once the writer has closed its end.
    func wholeLog() -> String {
        ended.wait()
        ended.signal()
        return String(decoding: data.withLock { $0 }, as: UTF8.self)
    }
}

/// HTTP/1.1 requests to the service; each runs its blocking socket I/O on a Dispatch thread, so
/// tests never hold a thread of the cooperative pool while waiting on the network.
struct ServiceClient: Sendable {
    let port: Int

    func request(_ method: String, _ path: String, headers: [(String, String)] = [], body: [UInt8] = []) async throws -> RawClient.Response {
        try await onOwnThread { [port] in
            let client = try RawClient(port: port, receiveTimeout: 60)
            var head = "\(method) \(path) HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            for (name, value) in headers { head += "\(name): \(value)\r\n" }
            if !body.isEmpty || method == "PUT" || method == "POST" { head += "Content-Length: \(body.count)\r\n" }
            try client.send(Array((head + "\r\n").utf8) + body)
            return try client.readResponse(head: method == "HEAD")
        }
    }

    func get(_ path: String, headers: [(String, String)] = []) async throws -> RawClient.Response {
        try await request("GET", path, headers: headers)
    }
}

extension RawClient.Response {
    /// The body as a JSON object.
    var json: [String: Any] { (try? JSONSerialization.jsonObject(with: Data(body))) as? [String: Any] ?? [:] }
}
