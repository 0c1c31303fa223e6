import Testing

@testable import HTTPServer

/// The response encoder's bytes, without sockets.
extension HTTPServerTests {
    @Suite struct HTTPResponseEncoderTests {
        private func head(
            _ status: HTTPStatus = .ok, _ headers: HTTPHeaders = ["Content-Type": "text/plain"], bodyLength: Int?, method: String = "GET",
            version: HTTPVersion = .http1_1, keepAlive: Bool = true
        ) -> (text: String, framing: OutgoingBodyFraming) {
            let framing = OutgoingBodyFraming(status: status, bodyLength: bodyLength, requestMethod: method, version: version)
            let bytes = HTTPResponseEncoder.head(
                status: status, headers: headers, framing: framing, version: version, keepAlive: keepAlive, date: "Tue, 01 Dec 2026 00:00:00 GMT")
            return (String(decoding: bytes, as: UTF8.self), framing)
        }

        @Test func aSizedBodyGetsItsLengthAndTheServersFields() {
            let encoded = head(bodyLength: 5)
            #expect(encoded.framing == .sized(5))
            #expect(encoded.text == "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\nDate: Tue, 01 Dec 2026 00:00:00 GMT\r\n\r\n")
        }

        @Test func handlersCannotSetTheFramingConnectionOrDate() {
            let encoded = head(
                .ok, ["Content-Length": "999", "Transfer-Encoding": "gzip", "Connection": "upgrade", "Date": "then", "ETag": "\"x\""], bodyLength: 2)
            #expect(encoded.text == "HTTP/1.1 200 OK\r\nETag: \"x\"\r\nContent-Length: 2\r\nDate: Tue, 01 Dec 2026 00:00:00 GMT\r\n\r\n")
        }

        @Test func anUnknownLengthIsChunkedOn11AndCloseDelimitedOn10() {
            let chunked = head(bodyLength: nil)
            #expect(chunked.framing == .chunked && chunked.framing.allowsKeepAlive)
            #expect(chunked.text.contains("\r\nTransfer-Encoding: chunked\r\n") && !chunked.text.contains("Content-Length"))
            let old = head(bodyLength: nil, version: .http1_0, keepAlive: false)
            #expect(old.framing == .untilClose && !old.framing.allowsKeepAlive)
            #expect(old.text.hasPrefix("HTTP/1.0 200 OK\r\n") && old.text.hasSuffix("Connection: close\r\n\r\n") && !old.text.contains("Transfer-Encoding"))
        }

        @Test func headAdvertisesTheLengthAndSendsNoBody() {
            #expect(head(bodyLength: 42, method: "HEAD").framing == .omitted(advertisedLength: 42))
            #expect(head(bodyLength: 42, method: "HEAD").text.contains("\r\nContent-Length: 42\r\n"))
            let unknown = head(bodyLength: nil, method: "HEAD")
            #expect(
                unknown.framing == .omitted(advertisedLength: nil) && !unknown.text.contains("Content-Length") && !unknown.text.contains("Transfer-Encoding"))
        }

        @Test func statusesWithoutBodiesCarryNoFraming() {
            for status in [HTTPStatus.notModified, .noContent] {
                let encoded = head(status, bodyLength: 10)
                #expect(encoded.framing == .omitted(advertisedLength: nil))
                #expect(!encoded.text.contains("Content-Length") && !encoded.text.contains("Transfer-Encoding"))
            }
        }

        @Test func keepAliveIsSaidOnlyWhereItIsNotTheDefault() {
            #expect(!head(bodyLength: 0).text.contains("Connection:"))
            #expect(head(bodyLength: 0, keepAlive: false).text.contains("\r\nConnection: close\r\n"))
            #expect(head(bodyLength: 0, version: .http1_0).text.contains("\r\nConnection: keep-alive\r\n"))
        }

        @Test func chunksAreFramedInHexAndTheLastIsEmpty() {
            let piece = HTTPResponseEncoder.bodyPiece(Array(repeating: 0x61, count: 26), framing: .chunked).flatMap { $0 }
            #expect(String(decoding: piece, as: UTF8.self) == "1a\r\n" + String(repeating: "a", count: 26) + "\r\n")
            #expect(HTTPResponseEncoder.bodyPiece([1, 2], framing: .sized(2)) == [[1, 2]])
            #expect(HTTPResponseEncoder.bodyPiece([], framing: .chunked).isEmpty, "an empty piece must not end the body")
            #expect(String(decoding: HTTPResponseEncoder.lastChunk, as: UTF8.self) == "0\r\n\r\n")
            #expect(String(decoding: HTTPResponseEncoder.continueResponse, as: UTF8.self) == "HTTP/1.1 100 Continue\r\n\r\n")
        }
    }
}
