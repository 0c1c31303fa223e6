import CLinux

#if canImport(Glibc)
    import Glibc
#endif

/// A failed system call, with its errno.
public struct SocketError: Error, Sendable, CustomStringConvertible {
    public let operation: String
    public let errorNumber: Int32

    init(_ operation: String, errorNumber: Int32 = errno) {
        self.operation = operation
        self.errorNumber = errorNumber
    }

    public var description: String { "\(operation) failed: \(String(cString: strerror(errorNumber)))" }
}

/// Where the server listens, as bound (the real port when 0 was asked for).
public struct HTTPServerAddress: Sendable, CustomStringConvertible {
    public let host: String
    public let port: Int
    public var description: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }
}

/// The listening socket: non-blocking, close-on-exec, SO_REUSEADDR, IPv4 or IPv6.
final class ListeningSocket {
    let descriptor: Int32
    let address: HTTPServerAddress

    init(host: String, port: Int, backlog: Int32) throws {
        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV
        var results: UnsafeMutablePointer<addrinfo>?
        let status = getaddrinfo(host, String(port), &hints, &results)
        guard status == 0, let info = results?.pointee else {
            throw SocketError("resolving '\(host)' (\(String(cString: gai_strerror(status))))", errorNumber: EINVAL)
        }
        defer { freeaddrinfo(results) }

        let descriptor = socket(info.ai_family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard descriptor >= 0 else { throw SocketError("socket") }
        var enable: Int32 = 1
        setsockopt(descriptor, SOL_SOCKET, SO_REUSEADDR, &enable, socklen_t(MemoryLayout<Int32>.size))
        if info.ai_family == AF_INET6 {
            // "::" serves IPv4 clients too; a specific IPv6 address serves only itself anyway.
            var v6Only: Int32 = 0
            setsockopt(descriptor, Int32(IPPROTO_IPV6), IPV6_V6ONLY, &v6Only, socklen_t(MemoryLayout<Int32>.size))
        }
        guard bind(descriptor, info.ai_addr, info.ai_addrlen) == 0 else {
            let error = SocketError("binding \(host):\(port)")
            close(descriptor)
            throw error
        }
        guard listen(descriptor, backlog) == 0 else {
            let error = SocketError("listen")
            close(descriptor)
            throw error
        }
        self.descriptor = descriptor
        self.address = try Self.localAddress(of: descriptor)
    }

    deinit { close(descriptor) }

    private static func localAddress(of descriptor: Int32) throws -> HTTPServerAddress {
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let status = withUnsafeMutablePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(descriptor, $0, &length) }
        }
        guard status == 0 else { throw SocketError("getsockname") }
        var text = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN))
        switch Int32(storage.ss_family) {
        case AF_INET:
            var address = withUnsafeBytes(of: storage) { $0.load(as: sockaddr_in.self) }
            inet_ntop(AF_INET, &address.sin_addr, &text, socklen_t(text.count))
            return HTTPServerAddress(host: nulTerminated(text), port: Int(UInt16(bigEndian: address.sin_port)))
        default:
            var address = withUnsafeBytes(of: storage) { $0.load(as: sockaddr_in6.self) }
            inet_ntop(AF_INET6, &address.sin6_addr, &text, socklen_t(text.count))
            return HTTPServerAddress(host: nulTerminated(text), port: Int(UInt16(bigEndian: address.sin6_port)))
        }
    }

    /// A newly accepted connection, non-blocking with TCP_NODELAY, or nil when none is waiting.
    func accept() -> Int32? {
        while true {
            let connection = clinux_accept_nonblocking(descriptor)
            if connection >= 0 {
                var enable: Int32 = 1
                setsockopt(connection, Int32(IPPROTO_TCP), TCP_NODELAY, &enable, socklen_t(MemoryLayout<Int32>.size))
                return connection
            }
            // A connection reset before accept, or a transient error: try the next one.
            if errno == EINTR || errno == ECONNABORTED || errno == EPROTO { continue }
            return nil
        }
    }
}

/// The text of a C string buffer, up to its first NUL.
private func nulTerminated(_ characters: [CChar]) -> String {
    String(decoding: characters.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
}
