import Foundation
import HTTPServer
import Synchronization
import TestSupport
import Testing

extension HTTPServerTests {
    @Suite struct HTTPLifecycleTests {
        @Test func slowlorisConnectionsDoNotHoldUpOthersAndCloseAtTheHeaderTimeout() async throws {
            let headerTimeout = Duration.seconds(3)
            let server = try TestServer.start { $0.headerTimeout = headerTimeout }
            // 300 connections each send part of a head and then trickle; each one's timeout runs
            // from its own first bytes, so each remembers when it sent them.
            var trickling: [(client: RawClient, startedBefore: ContinuousClock.Instant)] = []
            for index in 0..<300 {
                let started = ContinuousClock.now
                let client = try server.client()
                try client.send("GET /healthz HTTP/1.1\r\nHost: x\r\nX-\(index): ")
                trickling.append((client, started))
            }
            for (client, _) in trickling { try? client.send("a") }

            // Normal clients are served while the slow ones hold their connections.
            for _ in 0..<20 {
                let normal = try server.client()
                try normal.send("GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                #expect(try normal.readResponse().statusCode == 200)
            }
            // None was answered before its own header timeout: one that has been must be at least
            // that old. (On a busy machine some may rightly have been answered by now.)
            for (index, (client, started)) in trickling.enumerated() where client.serverHasAnsweredOrClosed() {
                #expect(ContinuousClock.now - started >= headerTimeout, "slow connection \(index) was answered before its header timeout")
            }

            // Every trickling connection is answered 408 and closed once its timeout has passed.
            var answered408 = 0
            for (client, _) in trickling {
                if (try? client.readResponse())?.statusCode == 408 && client.waitForClose() { answered408 += 1 }
            }
            #expect(answered408 == 300)
            await server.stop()
        }

        @Test func idleKeepAliveConnectionsAreClosed() async throws {
            let keepAliveTimeout = Duration.milliseconds(300)
            let server = try TestServer.start { $0.keepAliveTimeout = keepAliveTimeout }
            let client = try server.client()
            // The idle time runs from the response, which comes after this instant.
            let sent = ContinuousClock.now
            try client.send("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            #expect(try client.readResponse().statusCode == 200)
            #expect(client.waitForClose())
            #expect(ContinuousClock.now - sent >= keepAliveTimeout, "closed before the keep-alive timeout")
            await server.stop()
        }

        @Test func aStalledBodyTimesOutWith408() async throws {
            let server = try TestServer.start { $0.bodyIdleTimeout = .milliseconds(300) }
            let client = try server.client()
            try client.send("PUT /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
            let response = try client.readResponse()
            #expect(response.statusCode == 408)
            #expect(client.waitForClose())
            await server.stop()
        }

        @Test func aReaderThatStopsReadingIsDroppedAtTheWriteTimeout() async throws {
            let size = 64 << 20
            let server = try TestServer.start(
                configure: { $0.writeTimeout = .milliseconds(300) },
                routes: { router in
                    router.add("GET", "/huge") { _, _ in HTTPResponse(status: .ok, body: [UInt8](repeating: 1, count: size)) }
                })
            let client = try server.client()
            try client.send("GET /huge HTTP/1.1\r\nHost: x\r\n\r\n")
            // Read nothing until the server, its writes stalled, has dropped the connection.
            #expect(try await eventually { await server.server.openConnectionCount() == 0 }, "the server kept the stalled connection open")
            let received = try #require(client.drainUntilClosed())
            #expect(received < size, "the connection was cut before the whole response went out")
            let next = try server.client()
            try next.send("GET /huge HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            #expect(try next.readResponse().body.count == size, "a reader that keeps up gets everything")
            await server.stop()
        }

        @Test func aClientLeavingMidBodyFailsTheHandlersBody() async throws {
            let outcome = Mutex<String?>(nil)
            let server = try TestServer.start(routes: { router in
                router.add("PUT", "/upload") { _, body in
                    do {
                        _ = try await body.collect(upTo: 1 << 20)
                        outcome.withLock { $0 = "completed" }
                    } catch {
                        outcome.withLock { $0 = "failed: \(error)" }
                        throw error
                    }
                    return HTTPResponse(status: .ok)
                }
            })
            let client = try server.client()
            try client.send("PUT /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + String(repeating: "x", count: 5000))
            shutdown(client.descriptor, Int32(SHUT_RDWR))
            #expect(try await eventually { outcome.withLock { $0 } != nil })
            #expect(outcome.withLock { $0 }?.hasPrefix("failed") == true)
            await server.stop()
        }

        @Test func gracefulShutdownFinishesTheRequestInFlight() async throws {
            let inFlight = Gate()
            let release = Gate()
            let server = try TestServer.start(
                configure: { $0.shutdownGracePeriod = .seconds(600) },
                routes: { router in
                    TestServer.standardRoutes(&router)
                    router.add("GET", "/held") { _, _ in
                        inFlight.open()
                        await release.wait()
                        return HTTPResponse(status: .ok, body: Array("held".utf8))
                    }
                })
            let busy = try server.client()
            let idle = try server.client()
            try idle.send("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            #expect(try idle.readResponse().statusCode == 200)

            try busy.send("GET /held HTTP/1.1\r\nHost: x\r\n\r\n")
            await inFlight.wait()
            server.server.shutdown()
            #expect(idle.waitForClose(), "idle connections close while a request is in flight")
            #expect(!busy.serverHasAnsweredOrClosed(), "the request in flight keeps its connection")
            release.open()
            let response = try busy.readResponse()
            #expect(response.statusCode == 200 && response.text == "held")
            #expect(response.header("Connection") == "close")
            // Returns once the last request is done, not at the end of the (600 s) grace period.
            await server.server.run()
            #expect(throws: (any Error).self, "no longer listening") { try server.client() }
        }

        @Test func shutdownGivesUpAfterTheGracePeriod() async throws {
            let gracePeriod = Duration.milliseconds(300)
            let inFlight = Gate()
            let never = Gate()
            let server = try TestServer.start(
                configure: { $0.shutdownGracePeriod = gracePeriod },
                routes: { router in
                    router.add("GET", "/forever") { _, _ in
                        inFlight.open()
                        await never.wait()
                        return HTTPResponse(status: .ok)
                    }
                })
            let client = try server.client()
            try client.send("GET /forever HTTP/1.1\r\nHost: x\r\n\r\n")
            await inFlight.wait()
            let started = ContinuousClock.now
            // Returns although the handler never finishes, and not before the grace period.
            await server.stop()
            #expect(ContinuousClock.now - started >= gracePeriod)
            #expect(client.waitForClose())
            never.open()
        }

        @Test func pastTheConnectionLimitNewClientsWaitUntilOneCloses() async throws {
            let server = try TestServer.start { $0.maxConnections = 2 }
            let first = try server.client()
            let second = try server.client()
            for client in [first, second] {
                try client.send("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                #expect(try client.readResponse().statusCode == 200)
            }
            // The third connects (the kernel's backlog) but is not served while two are open.
            let third = try server.client(receiveTimeout: 0.5)
            try third.send("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            #expect(throws: (any Error).self) { try third.readResponse() }
            third.setReceiveTimeout(30)
            try first.send("GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            _ = try first.readResponse()
            #expect(try third.readResponse().statusCode == 200, "served once a slot freed")
            await server.stop()
        }

        @Test func listensOnIPv6() async throws {
            let server = try TestServer.start { $0.host = "::1" }
            #expect(server.server.address?.host == "::1")
            let client = try RawClient(port: server.port, host: "::1")
            try client.send("GET /healthz HTTP/1.1\r\nHost: [::1]\r\n\r\n")
            #expect(try client.readResponse().statusCode == 200)
            await server.stop()
        }

        @Test func writesOneAccessLogLinePerRequest() async throws {
            let lines = Mutex<[String]>([])
            let server = try TestServer.start { configuration in
                configuration.onRequestCompleted = { request in lines.withLock { $0.append(request.accessLogLine) } }
            }
            let client = try server.client()
            try client.send("GET /items/x%0Ay HTTP/1.1\r\nHost: x\r\n\r\nGET /nope HTTP/1.1\r\nHost: x\r\n\r\n")
            _ = try client.readResponse()
            _ = try client.readResponse()
            // The line is written just after the response, on the server's thread.
            #expect(try await eventually { lines.withLock { $0.count } >= 2 })
            let logged = lines.withLock { $0 }
            #expect(logged.count == 2)
            #expect(logged.first?.hasPrefix("GET /items/x%0Ay 200 3 ") == true)
            #expect(logged.last?.hasPrefix("GET /nope 404 ") == true)
            #expect(logged.allSatisfy { !$0.contains("\n") })
            await server.stop()
        }
    }
}

/// curl as a real client.
extension HTTPServerTests {
    @Suite struct HTTPCurlTests {
        static var curlAvailable: Bool { FileManager.default.isExecutableFile(atPath: "/usr/bin/curl") }

        @Test(.enabled(if: curlAvailable))
        func aLargeUploadWithExpectContinueDoesNotWaitASecond() async throws {
            let server = try TestServer.start()
            let file = ScratchFiles.url("upload")
            try Data(repeating: 0x5A, count: 32 << 20).write(to: file)
            defer { try? FileManager.default.removeItem(at: file) }

            let process = Process()
            process.executableURL = URL(fileURLWithPath: "/usr/bin/curl")
            process.arguments = [
                "-sS", "-v", "-X", "PUT", "-H", "Expect: 100-continue", "--data-binary", "@\(file.path)",
                "-w", "\\n%{time_total}", "http://127.0.0.1:\(server.port)/big",
            ]
            let output = Pipe()
            let trace = Pipe()
            process.standardOutput = output
            process.standardError = trace
            try process.run()
            let text = String(decoding: output.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            let verbose = String(decoding: trace.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            process.waitUntilExit()
            let lines = text.split(separator: "\n")
            #expect(lines.first == #"{"bytes":33554432}"#)
            // curl waits up to a second for 100 Continue before sending anyway; it must not have to.
            #expect(verbose.contains("< HTTP/1.1 100 Continue"), "no 100 Continue; curl took \(lines.last ?? "?") s")
            await server.stop()
        }
    }
}
