import HTTPServer

/// Errors of the service layer itself (requests it refuses); `Problem.response(for:)` maps it and
/// every other module's errors to HTTP.
public struct ServiceError: Error, Sendable, CustomStringConvertible {
    public struct Code: Hashable, Sendable {
        public let rawValue: String
        public let status: HTTPStatus

        public static let badRequest = Code(rawValue: "bad_request", status: .badRequest)
        public static let unauthorized = Code(rawValue: "unauthorized", status: .unauthorized)
        public static let forbidden = Code(rawValue: "forbidden", status: .forbidden)
        public static let notFound = Code(rawValue: "not_found", status: .notFound)
        public static let unsupportedMediaType = Code(rawValue: "unsupported_media_type", status: .unsupportedMediaType)
        public static let contentTooLarge = Code(rawValue: "content_too_large", status: .contentTooLarge)
        public static let unprocessable = Code(rawValue: "unprocessable", status: .unprocessableContent)
        public static let internalError = Code(rawValue: "internal_error", status: .internalServerError)
    }

    public let code: Code
    public let message: String
    public let headers: [String: String]

    public init(_ code: Code, _ message: String, headers: [String: String] = [:]) {
        self.code = code
        self.message = message
        self.headers = headers
    }

    public var description: String { "\(code.rawValue): \(message)" }
}
