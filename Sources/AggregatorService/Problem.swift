import AdapterStore
import Foundation
import HTTPServer
import LoRAAdapters

/// RFC 9457 problem details: the one place where any error becomes an HTTP status and body. Messages
/// are written for clients; SQL, file paths and stack traces never reach them (SQLite's own text
/// goes to the server log only).
enum Problem {
    struct Body: Encodable {
        let type: String
        let title: String
        let status: Int
        let detail: String
    }

    /// The server's log (standard error): what clients must not see, and the access log. A closed
    /// log loses the line, not the server (`write(_:)` traps on EPIPE).
    static func log(_ line: String) { try? FileHandle.standardError.write(contentsOf: Data((line + "\n").utf8)) }

    static func response(for error: any Error, log: (String) -> Void = log) -> HTTPResponse {
        let (status, code, detail, headers) = classify(error, log: log)
        let body = Body(type: "urn:lora-aggregator:problem:\(code)", title: status.reasonPhrase, status: status.code, detail: detail)
        var responseHeaders: HTTPHeaders = ["Content-Type": "application/problem+json"]
        for (name, value) in headers.sorted(by: { $0.key < $1.key }) { responseHeaders.add(name, value) }
        return HTTPResponse(status: status, headers: responseHeaders, body: JSON.encode(body))
    }

    private static func classify(_ error: any Error, log: (String) -> Void) -> (HTTPStatus, String, String, [String: String]) {
        switch error {
        case let error as ServiceError:
            return (error.code.status, error.code.rawValue, error.message, error.headers)
        case let error as HTTPServerError:
            let code = error.status.reasonPhrase.lowercased().replacingOccurrences(of: " ", with: "_")
            return (error.status, code, error.message, error.headers)
        case let error as AdapterError:
            let detail = error.tensor.map { "tensor '\($0)': \(error.message)" } ?? error.message
            let status: HTTPStatus =
                switch error.code {
                case _ where error.code.isMalformedFile: .badRequest
                case .emptyRound: .notFound
                case .inconsistentSource, .numericalFailure: .internalServerError
                default: .unprocessableContent
                }
            if status == .internalServerError { log("internal error: \(error)") }
            return (status, error.code.rawValue, detail, [:])
        case let error as StoreError:
            let status: HTTPStatus =
                switch error.code {
                case .roundSealed: .conflict
                case .storageFull: .insufficientStorage
                case .tooLarge: .contentTooLarge
                case .readOnly, .busy, .unavailable: .serviceUnavailable
                default: .internalServerError
                }
            if !error.detail.isEmpty { log("store error: \(error)") }
            return (status, error.code.rawValue, error.message, status == .serviceUnavailable ? ["Retry-After": "1"] : [:])
        default:
            log("internal error: \(error)")
            return (.internalServerError, "internal_error", "the server failed to handle the request", [:])
        }
    }
}

enum JSON {
    /// Compact JSON with sorted keys, so equal values give equal bytes.
    static func encode(_ value: some Encodable) -> [UInt8] {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        encoder.keyEncodingStrategy = .convertToSnakeCase
        return (try? Array(encoder.encode(value))) ?? Array("{}".utf8)
    }
}
