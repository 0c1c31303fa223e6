import Foundation

/// A blocking TCP client for tests: sends exact bytes and reads responses off the wire. Its calls
/// block the calling thread, so suites that use it run serialized: parallel tests would otherwise
/// occupy every thread of the cooperative pool that the server's handlers need.
public final class RawClient {
    public let descriptor: Int32
    private var buffer: [UInt8] = []

    public struct Response: Sendable {
        public let statusCode: Int
        public let headers: [(String, String)]
        public let body: [UInt8]
        public func header(_ name: String) -> String? { headers.first { $0.0.lowercased() == name.lowercased() }?.1 }
        public var text: String { String(decoding: body, as: UTF8.self) }
    }

    public init(port: Int, host: String = "127.0.0.1", receiveTimeout: Double = 5) throws {
        var hints = addrinfo()
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        var results: UnsafeMutablePointer<addrinfo>?
        guard getaddrinfo(host, String(port), &hints, &results) == 0, let info = results?.pointee else { throw POSIXError(.EINVAL) }
        defer { freeaddrinfo(results) }
        descriptor = socket(info.ai_family, Int32(SOCK_STREAM.rawValue), 0)
        // No close here: a class whose init throws once fully initialized still runs deinit, which
        // closes the descriptor. Closing it here as well closed the number a second time, after
        // another thread could have been given it (a server's pipe, say).
        guard connect(descriptor, info.ai_addr, info.ai_addrlen) == 0 else {
            throw POSIXError(POSIXErrorCode(rawValue: errno) ?? .ECONNREFUSED)
        }
        setReceiveTimeout(receiveTimeout)
    }

    /// How long one read waits for bytes before it fails with ETIMEDOUT.
    public func setReceiveTimeout(_ seconds: Double) {
        var timeout = timeval(tv_sec: Int(seconds), tv_usec: Int((seconds - seconds.rounded(.down)) * 1_000_000))
        setsockopt(descriptor, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    }

    deinit { Glibc.close(descriptor) }

    public func send(_ text: String) throws { try send(Array(text.utf8)) }

    public func send(_ bytes: [UInt8]) throws {
        var offset = 0
        while offset < bytes.count {
            let sent = bytes[offset...].withUnsafeBytes { Glibc.send(descriptor, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            guard sent > 0 else { throw POSIXError(POSIXErrorCode(rawValue: errno) ?? .EPIPE) }
            offset += sent
        }
    }

    /// Reads more bytes; false on EOF, error or timeout (`lastFailure` says which).
    @discardableResult
    private func fill() -> Bool {
        var chunk = [UInt8](repeating: 0, count: 65536)
        let count = chunk.withUnsafeMutableBytes { recv(descriptor, $0.baseAddress, $0.count, 0) }
        guard count > 0 else {
            lastFailure = count == 0 ? .ECONNRESET : (errno == EAGAIN || errno == EWOULDBLOCK ? .ETIMEDOUT : POSIXErrorCode(rawValue: errno) ?? .EIO)
            return false
        }
        buffer.append(contentsOf: chunk[0..<count])
        return true
    }

    /// Why the last `fill` failed: ECONNRESET for EOF, ETIMEDOUT for the receive timeout.
    private var lastFailure = POSIXErrorCode.EIO

    private func readLine() throws -> String {
        while true {
            if let index = buffer.firstIndex(of: 0x0A), index > 0, buffer[index - 1] == 0x0D {
                let line = String(decoding: buffer[0..<(index - 1)], as: UTF8.self)
                buffer.removeFirst(index + 1)
                return line
            }
            guard fill() else { throw POSIXError(lastFailure) }
        }
    }

    private func readExactly(_ count: Int) throws -> [UInt8] {
        while buffer.count < count { guard fill() else { throw POSIXError(lastFailure) } }
        defer { buffer.removeFirst(count) }
        return Array(buffer[0..<count])
    }

    /// Reads one response; `head: true` for a response to HEAD (no body whatever the headers say).
    public func readResponse(head: Bool = false) throws -> Response {
        let statusLine = try readLine()
        let parts = statusLine.split(separator: " ", maxSplits: 2)
        guard parts.count >= 2, parts[0].hasPrefix("HTTP/1."), let code = Int(parts[1]) else { throw POSIXError(.EBADMSG) }
        var headers: [(String, String)] = []
        while true {
            let line = try readLine()
            if line.isEmpty { break }
            let pieces = line.split(separator: ":", maxSplits: 1)
            headers.append((String(pieces[0]), pieces.count > 1 ? pieces[1].trimmingCharacters(in: .whitespaces) : ""))
        }
        let response = Response(statusCode: code, headers: headers, body: [])
        if head || code == 204 || code == 304 || (100..<200).contains(code) { return response }
        if let length = response.header("content-length").flatMap(Int.init) {
            return Response(statusCode: code, headers: headers, body: try readExactly(length))
        }
        if response.header("transfer-encoding")?.lowercased() == "chunked" {
            var body: [UInt8] = []
            while true {
                let size = Int(try readLine().split(separator: ";")[0], radix: 16) ?? 0
                if size == 0 {
                    while try !readLine().isEmpty {}
                    break
                }
                body += try readExactly(size)
                _ = try readLine()
            }
            return Response(statusCode: code, headers: headers, body: body)
        }
        while fill() {}
        defer { buffer.removeAll() }
        return Response(statusCode: code, headers: headers, body: buffer)
    }

    /// True if the server has sent bytes or closed the connection; neither waits nor consumes.
    public func serverHasAnsweredOrClosed() -> Bool {
        if !buffer.isEmpty { return true }
        var byte: UInt8 = 0
        let count = recv(descriptor, &byte, 1, Int32(MSG_PEEK | MSG_DONTWAIT))
        return count >= 0 || (errno != EAGAIN && errno != EWOULDBLOCK)
    }

    /// Reads and discards until EOF or reset; returns the byte count, or nil if still open after `timeout`.
    public func drainUntilClosed(timeout: Double = 30) -> Int? {
        let deadline = Date().addingTimeInterval(timeout)
        var total = buffer.count
        buffer.removeAll()
        var chunk = [UInt8](repeating: 0, count: 1 << 16)
        while Date() < deadline {
            let count = chunk.withUnsafeMutableBytes { recv(descriptor, $0.baseAddress, $0.count, 0) }
            if count == 0 { return total }
            if count < 0 && errno != EAGAIN && errno != EWOULDBLOCK { return total }
            if count > 0 { total += count }
        }
        return nil
    }

    /// True once the server has closed the connection (EOF), false if it is still open after `timeout`.
    /// The default only ends a wait for a close that never comes; a busy machine closes late, not never.
    public func waitForClose(timeout: Double = 30) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            var byte: UInt8 = 0
            let count = recv(descriptor, &byte, 1, 0)
            if count == 0 { return true }
            if count < 0 && errno != EAGAIN && errno != EWOULDBLOCK { return true }
            if count > 0 { buffer.append(byte) }
        }
        return false
    }
}
