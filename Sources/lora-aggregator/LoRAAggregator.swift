import AggregatorService
import ArgumentParser
import Foundation

@main
struct LoRAAggregator: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "lora-aggregator",
        abstract: "Aggregates heterogeneous-rank LoRA adapters for federated fine-tuning (replication padding).",
        subcommands: [Serve.self]
    )
}

/// Every flag can also come from `LORA_AGGREGATOR_<FLAG>` (`--max-upload-bytes` →
/// `LORA_AGGREGATOR_MAX_UPLOAD_BYTES`); a flag on the command line wins.
struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Serve API v1 until SIGTERM or SIGINT.")

    @Option(help: "Address to listen on. (default: 127.0.0.1)") var host: String?
    @Option(help: "Port; 0 picks a free one and the ready line names it. (default: 8080)") var port: Int?
    @Option(help: "SQLite database file, or a postgresql:// URI that any number of servers may share. (default: ./lora-aggregator.sqlite)")
    var database: String?
    @Option(help: "Database connections for reads per server, SQLite or PostgreSQL (one more for writes, and SQLite's checkpointer). (default: 8)")
    var databaseConnections: Int?
    @Option(help: "Largest upload, as sent and decompressed, in bytes. (default: 1073741824)") var maxUploadBytes: Int?
    @Option(help: "Memory for recently computed aggregates, in bytes. (default: 1073741824)") var aggregateCacheBytes: Int?
    @Option(help: "Open connections before accepting pauses. (default: 1024)") var maxConnections: Int?
    @Option(help: "Seconds a request head may take to arrive. (default: 10)") var headerTimeout: Double?
    @Option(help: "Seconds an idle keep-alive connection is kept. (default: 60)") var keepAliveTimeout: Double?
    @Option(help: "Seconds a request body may stall. (default: 30)") var bodyTimeout: Double?
    @Option(help: "Seconds a response write may stall. (default: 30)") var writeTimeout: Double?
    @Option(help: "Seconds to finish requests in flight on shutdown. (default: 10)") var shutdownGracePeriod: Double?
    @Option(help: "After an early refusal, seconds to read and discard the rest of the body before closing. (default: 30)")
    var lingeringTime: Double?
    @Option(help: "Seconds a refused client may send nothing before its connection closes. (default: 5)") var lingeringTimeout: Double?
    @Option(help: "Bytes of a refused body read and discarded before closing. (default: 1073741824)") var lingeringBytes: Int?
    @Option(help: "Refused connections discarding their bodies at once; past this they close at once. (default: 64)")
    var maxLingeringConnections: Int?
    @Flag(help: "Do not write an access-log line per request to standard error.") var noAccessLog = false
    @Option(help: "File holding the admin token; then every /v1 request needs 'Authorization: Bearer'. (LORA_AGGREGATOR_ADMIN_TOKEN gives the token itself.)")
    var adminTokenFile: String?
    @Flag(help: "Serve a non-loopback address without an admin token.") var insecureNoAuth = false

    func run() async throws {
        var configuration = ServiceConfiguration()
        let environment = Environment()
        configuration.http.host = try host ?? environment.value("host") ?? configuration.http.host
        configuration.http.port = try port ?? environment.value("port") ?? configuration.http.port
        configuration.database = try database ?? environment.value("database") ?? configuration.database
        configuration.databaseConnections = try databaseConnections ?? environment.value("database-connections") ?? configuration.databaseConnections
        configuration.maxUploadBytes = try maxUploadBytes ?? environment.value("max-upload-bytes") ?? configuration.maxUploadBytes
        configuration.aggregateCacheBytes = try aggregateCacheBytes ?? environment.value("aggregate-cache-bytes") ?? configuration.aggregateCacheBytes
        configuration.http.maxConnections = try maxConnections ?? environment.value("max-connections") ?? configuration.http.maxConnections
        func seconds(_ flag: Double?, _ name: String, _ fallback: Duration) throws -> Duration {
            guard let value = try flag ?? environment.value(name) as Double? else { return fallback }
            guard value > 0, value.isFinite else { throw ValidationError("--\(name) must be a positive number of seconds") }
            return .milliseconds(Int64(value * 1000))
        }
        configuration.http.headerTimeout = try seconds(headerTimeout, "header-timeout", configuration.http.headerTimeout)
        configuration.http.keepAliveTimeout = try seconds(keepAliveTimeout, "keep-alive-timeout", configuration.http.keepAliveTimeout)
        configuration.http.bodyIdleTimeout = try seconds(bodyTimeout, "body-timeout", configuration.http.bodyIdleTimeout)
        configuration.http.writeTimeout = try seconds(writeTimeout, "write-timeout", configuration.http.writeTimeout)
        configuration.http.shutdownGracePeriod = try seconds(shutdownGracePeriod, "shutdown-grace-period", configuration.http.shutdownGracePeriod)
        var lingering = configuration.http.lingeringClose
        lingering.maxDuration = try seconds(lingeringTime, "lingering-time", lingering.maxDuration)
        lingering.idleTimeout = try seconds(lingeringTimeout, "lingering-timeout", lingering.idleTimeout)
        lingering.maxBytes = try lingeringBytes ?? environment.value("lingering-bytes") ?? lingering.maxBytes
        lingering.maxConnections = try maxLingeringConnections ?? environment.value("max-lingering-connections") ?? lingering.maxConnections
        guard lingering.maxBytes >= 0, lingering.maxConnections >= 0 else {
            throw ValidationError("--lingering-bytes and --max-lingering-connections must not be negative (0 turns lingering off)")
        }
        configuration.http.lingeringClose = lingering
        configuration.accessLog = !(noAccessLog || environment.flag("no-access-log"))
        configuration.insecureNoAuth = insecureNoAuth || environment.flag("insecure-no-auth")
        if let path = adminTokenFile ?? environment.variables[environment.name("admin-token-file")] {
            guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { throw ValidationError("cannot read the admin token file '\(path)'") }
            configuration.adminToken = text.trimmingCharacters(in: .whitespacesAndNewlines)
        } else if let token = environment.variables[environment.name("admin-token")] {
            configuration.adminToken = token.trimmingCharacters(in: .whitespacesAndNewlines)
        }
        guard (0...65535).contains(configuration.http.port) else { throw ValidationError("--port must be 0 to 65535") }
        guard configuration.maxUploadBytes > 0 else { throw ValidationError("--max-upload-bytes must be positive") }
        guard configuration.aggregateCacheBytes >= 0 else { throw ValidationError("--aggregate-cache-bytes must not be negative") }
        guard configuration.databaseConnections > 0 else { throw ValidationError("--database-connections must be positive") }

        let service: AggregatorService
        do {
            service = try AggregatorService(configuration: configuration)
        } catch let error as ServiceError {
            throw ValidationError(error.message)
        } catch {
            throw ValidationError("cannot open the database '\(configuration.databaseForLogs)': \(error)")
        }
        let server = service.makeServer()
        let address = try server.start()
        let signals = [SIGTERM, SIGINT].map { number in
            signal(number, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: number)
            source.setEventHandler { server.shutdown() }
            source.resume()
            return source
        }
        // Written straight to the descriptor: a pipe would otherwise hold stdout's buffer back. A
        // reader gone already costs the line, not the server (`write(_:)` traps on EPIPE).
        try? FileHandle.standardOutput.write(
            contentsOf: Data("lora-aggregator listening on http://\(address) (database \(configuration.databaseForLogs))\n".utf8))
        await server.run()
        for signal in signals { signal.cancel() }
    }
}

/// `LORA_AGGREGATOR_<FLAG>` variables.
struct Environment {
    let variables = ProcessInfo.processInfo.environment

    func name(_ flag: String) -> String { "LORA_AGGREGATOR_" + flag.uppercased().replacingOccurrences(of: "-", with: "_") }

    func value<Value: LosslessStringConvertible>(_ flag: String) throws -> Value? {
        guard let text = variables[name(flag)] else { return nil }
        guard let value = Value(text) else { throw ValidationError("\(name(flag))='\(text)' is not a valid value for --\(flag)") }
        return value
    }

    func flag(_ flag: String) -> Bool {
        guard let text = variables[name(flag)]?.lowercased() else { return false }
        return ["1", "true", "yes"].contains(text)
    }
}
