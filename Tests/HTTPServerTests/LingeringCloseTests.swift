import Foundation
import HTTPServer
import TestSupport
import Testing

extension HTTPServerTests {
    /// A client that sends its whole body before reading (no `Expect: 100-continue`) must read an
    /// early refusal, not a connection reset; and the discarding that makes this so is bounded.
    @Suite struct LingeringCloseTests {
        /// Far more than the kernel's socket buffers hold, so a send only completes if the server reads.
        static let largeBody = [UInt8](repeating: 0x61, count: 64 << 20)

        static func putHead(_ path: String, length: Int) -> String {
            "PUT \(path) HTTP/1.1\r\nHost: x\r\nContent-Length: \(length)\r\n\r\n"
        }

        @Test(arguments: [("/refuse", 403), ("/echo", 413)])
        func aClientSendingItsWholeBodyReadsTheEarlyRefusal(path: String, status: Int) async throws {
            let server = try TestServer.start { $0.lingeringClose.idleTimeout = .seconds(3600) }
            let client = try server.client()
            try client.send(Self.putHead(path, length: Self.largeBody.count))
            try client.send(Self.largeBody)
            let refusal = try client.readResponse()
            #expect(refusal.statusCode == status)
            #expect(refusal.header("Connection") == "close")
            #expect(client.waitForClose(), "the answer ends with the server's FIN")
            shutdown(client.descriptor, Int32(SHUT_WR))
            #expect(try await eventually { await server.server.openConnectionCount() == 0 }, "the server closes once the client does")
            await server.stop()
        }

        @Test func discardingStopsAtTheByteBound() async throws {
            let server = try TestServer.start { $0.lingeringClose.maxBytes = 1 << 20 }
            let client = try server.client()
            try client.send(Self.putHead("/refuse", length: Self.largeBody.count))
            #expect(throws: POSIXError.self, "the server closed after discarding 1 MiB") { try client.send(Self.largeBody) }
            await server.stop()
        }

        @Test func aQuietRefusedClientIsClosedAtTheIdleTimeout() async throws {
            let server = try TestServer.start {
                $0.lingeringClose.idleTimeout = .milliseconds(300)
                $0.lingeringClose.maxDuration = .seconds(3600)
            }
            let client = try server.client()
            try client.send(Self.putHead("/refuse", length: 10_000_000) + String(repeating: "a", count: 1000))
            #expect(try client.readResponse().statusCode == 403)
            #expect(try await eventually { await server.server.openConnectionCount() == 0 }, "only the idle timeout can close it")
            await server.stop()
        }

        @Test func pastTheLingeringLimitARefusedConnectionClosesAtOnceAndShutdownEndsLingering() async throws {
            let gracePeriod = Duration.seconds(60)
            let server = try TestServer.start {
                $0.lingeringClose.maxConnections = 1
                $0.lingeringClose.idleTimeout = .seconds(3600)
                $0.lingeringClose.maxDuration = .seconds(3600)
                $0.shutdownGracePeriod = gracePeriod
            }
            let lingering = try server.client()
            try lingering.send(Self.putHead("/refuse", length: 1 << 40))
            #expect(try lingering.readResponse().statusCode == 403)

            let closed = try server.client()
            try closed.send(Self.putHead("/refuse", length: 1 << 40))
            #expect(try closed.readResponse().statusCode == 403)
            #expect(throws: POSIXError.self, "the second refused connection does not linger") { try closed.send(Self.largeBody) }

            try lingering.send(Self.largeBody)  // still discarded
            #expect(try await eventually { await server.server.openConnectionCount() == 1 })

            let started = ContinuousClock.now
            await server.stop()
            #expect(ContinuousClock.now - started < gracePeriod, "shutdown closed the lingering connection instead of waiting it out")
        }
    }
}
