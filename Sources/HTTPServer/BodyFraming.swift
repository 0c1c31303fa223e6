/// How a request's body is delimited (RFC 9112 §6.3), refusing every ambiguous combination that
/// request smuggling relies on.
enum BodyFraming: Equatable {
    case none
    case length(Int)
    case chunked

    init(_ request: HTTPRequest) throws(HTTPServerError) {
        let transferCodings = request.headers.tokens(for: "transfer-encoding")
        let lengths = request.headers.values(for: "content-length")
        if request.headers.contains("transfer-encoding") {
            guard lengths.isEmpty else {
                throw HTTPServerError(.badRequest, "a request may not carry both Transfer-Encoding and Content-Length")
            }
            guard request.version == .http1_1 else {
                throw HTTPServerError(.badRequest, "Transfer-Encoding is not defined for HTTP/1.0 requests")
            }
            guard transferCodings == ["chunked"] else {
                throw HTTPServerError(.badRequest, "the only accepted transfer coding is 'chunked'")
            }
            self = .chunked
            return
        }
        guard !lengths.isEmpty else {
            self = .none
            return
        }
        // Repeated fields or list members are tolerated only when every value is the same number.
        let values = Set(lengths.flatMap { $0.split(separator: ",", omittingEmptySubsequences: false) }.map { $0.trimmingASCIIWhitespace() })
        guard values.count == 1, let text = values.first, !text.isEmpty, text.utf8.count <= 18,
            text.utf8.allSatisfy(HTTPHeadParser.isDigit), let length = Int(text)
        else {
            throw HTTPServerError(.badRequest, "Content-Length must be one non-negative decimal number")
        }
        self = length == 0 ? .none : .length(length)
    }
}
