import Foundation
import HTTPServer
import TestSupport
import Testing

extension HTTPServerTests {
    @Suite struct HTTPProtocolTests {
        @Test func answersWithDateLengthAndKeepsTheConnection() async throws {
            let server = try TestServer.start()
            let client = try server.client()
            for _ in 0..<3 {
                try client.send("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                let response = try client.readResponse()
                #expect(response.statusCode == 200)
                #expect(response.text == #"{"status":"ok"}"#)
                #expect(response.header("Content-Length") == "15")
                #expect(response.header("Date")?.hasSuffix(" GMT") == true)
                #expect(response.header("Connection") == nil)
            }
            await server.stop()
        }

        @Test func connectionCloseAndHTTP10AreHonoured() async throws {
            let server = try TestServer.start()
            let closing = try server.client()
            try closing.send("GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            #expect(try closing.readResponse().header("Connection") == "close")
            #expect(closing.waitForClose())

            let old = try server.client()
            try old.send("GET /healthz HTTP/1.0\r\n\r\n")
            let response = try old.readResponse()
            #expect(response.statusCode == 200)
            #expect(old.waitForClose())

            let oldKeepAlive = try server.client()
            try oldKeepAlive.send("GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            #expect(try oldKeepAlive.readResponse().header("Connection") == "keep-alive")
            try oldKeepAlive.send("GET /items/7 HTTP/1.0\r\n\r\n")
            #expect(try oldKeepAlive.readResponse().text == "7")
            await server.stop()
        }

        @Test func pipelinedRequestsAreAnsweredInOrder() async throws {
            let server = try TestServer.start()
            let client = try server.client()
            // The slow one first: its answer must still come first.
            try client.send(
                "GET /slow HTTP/1.1\r\nHost: x\r\n\r\nPUT /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloGET /items/a%20b HTTP/1.1\r\nHost: x\r\n\r\nHEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
            )
            #expect(try client.readResponse().text == "slow")
            #expect(try client.readResponse().text == "hello")
            #expect(try client.readResponse().text == "a b")
            let head = try client.readResponse(head: true)
            #expect(head.statusCode == 200 && head.header("Content-Length") == "15")
            try client.send("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            #expect(try client.readResponse().statusCode == 200, "nothing of the HEAD response's body was sent")
            await server.stop()
        }

        @Test func routesGive404And405WithAllow() async throws {
            let server = try TestServer.start()
            let client = try server.client()
            try client.send("GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")
            #expect(try client.readResponse().statusCode == 404)
            try client.send("DELETE /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            let response = try client.readResponse()
            #expect(response.statusCode == 405)
            #expect(response.header("Allow") == "GET, HEAD")
            try client.send("GET /items/%FF%FE HTTP/1.1\r\nHost: x\r\n\r\n")
            #expect(try client.readResponse().statusCode == 400, "invalid UTF-8 after percent-decoding")
            try client.send("GET /items/caf%C3%A9?x=1 HTTP/1.1\r\nHost: x\r\n\r\n")
            #expect(try client.readResponse().text == "café")
            await server.stop()
        }

        @Test func thousandsOfPipelinedRequestsAnsweredAtOnceAreServedInOrder() async throws {
            let server = try TestServer.start()
            let client = try server.client()
            let count = 5000
            try client.send(String(repeating: "GET /nope HTTP/1.1\r\nHost: x\r\n\r\n", count: count - 1) + "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            var notFound = 0
            for _ in 0..<(count - 1) where try client.readResponse().statusCode == 404 { notFound += 1 }
            #expect(notFound == count - 1)
            #expect(try client.readResponse().statusCode == 200, "the last request, after all the others")
            await server.stop()
        }

        @Test func chunkedUploadsAreDecodedAndTrailersDropped() async throws {
            let server = try TestServer.start()
            let client = try server.client()
            try client.send(
                "PUT /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;name=value\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: dropped\r\n\r\n")
            #expect(try client.readResponse().text == "hello world")
            try client.send("PUT /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
            try client.send("3\r\nabc\r\n")
            try await Task.sleep(for: .milliseconds(50))
            try client.send("0\r\n\r\n")
            #expect(try client.readResponse().text == "abc")
            await server.stop()
        }

        @Test func streamedResponsesAreChunked() async throws {
            let server = try TestServer.start()
            let client = try server.client()
            try client.send("GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
            let response = try client.readResponse()
            #expect(response.header("Transfer-Encoding") == "chunked")
            #expect(response.text == "one,two,three")
            try client.send("GET /stream HTTP/1.0\r\n\r\n")
            let old = try client.readResponse()
            #expect(old.text == "one,two,three" && old.header("Transfer-Encoding") == nil)
            await server.stop()
        }

        @Test func expectContinueSendsContinueOnlyWhenTheBodyIsWanted() async throws {
            let server = try TestServer.start()
            let client = try server.client()
            try client.send("PUT /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
            #expect(try client.readResponse().statusCode == 100)
            try client.send("data")
            #expect(try client.readResponse().text == "data")

            // The handler refuses without reading: the final status comes at once, with no 100.
            try client.send("PUT /refuse HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\nExpect: 100-continue\r\n\r\n")
            let refusal = try client.readResponse()
            #expect(refusal.statusCode == 403)
            #expect(refusal.header("Connection") == "close")
            #expect(client.waitForClose())

            // Over the route's limit: 413 before any body byte is sent.
            let another = try server.client()
            try another.send("PUT /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\nExpect: 100-continue\r\n\r\n")
            #expect(try another.readResponse().statusCode == 413)
            let unknown = try server.client()
            try unknown.send("PUT /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nExpect: something-else\r\n\r\nx")
            #expect(try unknown.readResponse().statusCode == 417)
            await server.stop()
        }

        /// Requests that break framing or the grammar: each gets its status and a closed connection,
        /// and the server goes on serving a well-behaved client.
        static let malformed: [(String, String, Int)] = [
            ("Content-Length with Transfer-Encoding", "PUT /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
            ("differing Content-Lengths", "PUT /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
            ("Content-Length list that differs", "PUT /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 4\r\n\r\nabcd", 400),
            ("signed Content-Length", "PUT /echo HTTP/1.1\r\nHost: x\r\nContent-Length: +3\r\n\r\nabc", 400),
            ("gzip transfer coding", "PUT /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 400),
            ("chunked twice", "PUT /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
            ("Transfer-Encoding on HTTP/1.0", "PUT /echo HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
            ("obs-fold", "GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n  continued\r\n\r\n", 400),
            ("space before colon", "GET /healthz HTTP/1.1\r\nHost : x\r\n\r\n", 400),
            ("control character in a value", "GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\u{01}b\r\n\r\n", 400),
            ("bare CR", "GET /healthz HTTP/1.1\r\nHost: x\rX-A: 1\r\n\r\n", 400),
            ("bare LF", "GET /healthz HTTP/1.1\nHost: x\r\n\r\n", 400),
            ("missing Host", "GET /healthz HTTP/1.1\r\n\r\n", 400),
            ("two Hosts", "GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
            ("double space in request line", "GET  /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 400),
            ("no version", "GET /healthz\r\nHost: x\r\n\r\n", 400),
            ("unknown version", "GET /healthz HTTP/2.0\r\nHost: x\r\n\r\n", 505),
            ("not a path", "GET healthz HTTP/1.1\r\nHost: x\r\n\r\n", 400),
            ("malformed chunk size", "PUT /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n", 400),
            ("oversized chunk size", "PUT /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\nabc\r\n0\r\n\r\n", 400),
            ("chunk longer than its size", "PUT /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n", 400),
            ("chunk size over the body limit", "PUT /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nfffffff\r\nabc\r\n0\r\n\r\n", 413),
            ("binary garbage", "\u{16}\u{03}\u{01}\u{02}\u{00}\u{01}\u{00}\u{01}\u{fc}\u{03}\u{03}\r\n\r\n", 400),
        ]

        @Test(arguments: malformed)
        func malformedRequestsAreRefusedAndTheServerGoesOn(description: String, request: String, status: Int) async throws {
            let server = try TestServer.start()
            let client = try server.client()
            try client.send(request)
            let response = try client.readResponse()
            #expect(response.statusCode == status, "\(description)")
            #expect(response.header("Connection") == "close", "\(description)")
            #expect(client.waitForClose(), "\(description)")

            let next = try server.client()
            try next.send("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            #expect(try next.readResponse().statusCode == 200)
            await server.stop()
        }

        @Test func limitsGive414And431And413() async throws {
            let server = try TestServer.start { configuration in
                configuration.headLimits = HTTPHeadLimits(maxRequestLineBytes: 1024, maxHeaderBytes: 4096, maxHeaderCount: 20)
            }
            let longURI = try server.client()
            try longURI.send("GET /" + String(repeating: "a", count: 2000) + " HTTP/1.1\r\nHost: x\r\n\r\n")
            #expect(try longURI.readResponse().statusCode == 414)

            let bigHeaders = try server.client()
            try bigHeaders.send("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + String(repeating: "b", count: 5000) + "\r\n\r\n")
            #expect(try bigHeaders.readResponse().statusCode == 431)

            let manyHeaders = try server.client()
            try manyHeaders.send("GET /healthz HTTP/1.1\r\nHost: x\r\n" + (0..<25).map { "X-\($0): v\r\n" }.joined() + "\r\n")
            #expect(try manyHeaders.readResponse().statusCode == 431)

            // Refused before the body is read: the client may still be sending it.
            let declaredTooLarge = try server.client()
            try declaredTooLarge.send("PUT /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1048577\r\n\r\n")
            #expect(try declaredTooLarge.readResponse().statusCode == 413)

            // Chunked: enforced while reading.
            let chunkedTooLarge = try server.client()
            try chunkedTooLarge.send("PUT /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
            let chunk = "80000\r\n" + String(repeating: "z", count: 0x80000) + "\r\n"
            try? chunkedTooLarge.send(chunk + chunk + chunk)
            #expect(try chunkedTooLarge.readResponse().statusCode == 413)
            await server.stop()
        }
    }
}
