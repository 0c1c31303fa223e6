import AdapterStore
import Digests
import Foundation
import HTTPServer

/// Bearer-token access control for `/v1` (openapi.yaml, the `bearer` security scheme). With no admin token configured
/// everything is open (and the service refuses to listen beyond loopback unless told
/// `--insecure-no-auth`). Tokens are only ever kept as SHA-256 hashes.
struct Authorization: Sendable {
    /// What a route requires of the caller.
    enum Requirement {
        /// The admin token.
        case admin
        /// The admin, or the client named in the path, in the federation named in the path.
        case ownUpload
        /// The admin, or any client of the federation named in the path.
        case federationMember
    }

    enum Principal: Equatable {
        case anyone
        case admin
        case client(federation: FederationID, client: ClientID)
    }

    let adminTokenHash: [UInt8]?
    let store: AdapterStore

    init(adminToken: String?, store: AdapterStore) {
        self.adminTokenHash = adminToken.map { Array(ContentDigest.sha256Hex(Array($0.utf8)).utf8) }
        self.store = store
    }

    /// Throws 401 (no or unknown token) or 403 (known but not allowed).
    func check(_ request: HTTPRequest, _ requirement: Requirement) async throws {
        let principal = try await principal(of: request)
        let federation = request.pathParameters["federation"]
        let client = request.pathParameters["client"]
        let allowed: Bool =
            switch (principal, requirement) {
            case (.anyone, _), (.admin, _): true
            case (.client, .admin): false
            case (.client(let ownFederation, let ownClient), .ownUpload): ownFederation.rawValue == federation && ownClient.rawValue == client
            case (.client(let ownFederation, _), .federationMember): ownFederation.rawValue == federation
            }
        guard allowed else {
            throw ServiceError(
                .forbidden, requirement == .admin ? "this needs the admin token" : "this token does not give access to that federation or client")
        }
    }

    private func principal(of request: HTTPRequest) async throws -> Principal {
        guard let adminTokenHash else { return .anyone }
        let challenge = #"Bearer realm="lora-aggregator""#
        guard let header = request.headers["authorization"], header.count > 7, header.prefix(7).lowercased() == "bearer " else {
            throw ServiceError(.unauthorized, "send 'Authorization: Bearer TOKEN'", headers: ["WWW-Authenticate": challenge])
        }
        let token = header.dropFirst(7).trimmingCharacters(in: .whitespaces)
        let tokenHash = ContentDigest.sha256Hex(Array(token.utf8))
        if Self.constantTimeEqual(Array(tokenHash.utf8), adminTokenHash) { return .admin }
        // A lookup by the hash of a high-entropy token reveals nothing useful through timing.
        if let owner = try await store.clientToken(hash: tokenHash) {
            return .client(federation: owner.federation, client: owner.client)
        }
        throw ServiceError(.unauthorized, "the token is not valid", headers: ["WWW-Authenticate": challenge + #", error="invalid_token""#])
    }

    /// A new client token (256 random bits, hex); the store keeps only its hash.
    func issueToken(federation: FederationID, client: ClientID) async throws -> String {
        var generator = SystemRandomNumberGenerator()
        let token = (0..<4).map { _ in String(generator.next() as UInt64, radix: 16).leftPadded(to: 16) }.joined()
        try await store.addClientToken(hash: ContentDigest.sha256Hex(Array(token.utf8)), federation: federation, client: client)
        return token
    }

    static func constantTimeEqual(_ lhs: [UInt8], _ rhs: [UInt8]) -> Bool {
        guard lhs.count == rhs.count else { return false }
        return zip(lhs, rhs).reduce(UInt8(0)) { $0 | ($1.0 ^ $1.1) } == 0
    }

    /// True for addresses only this machine can reach: 127.0.0.0/8, ::1, localhost.
    static func isLoopback(_ host: String) -> Bool {
        let bare = host.hasPrefix("[") && host.hasSuffix("]") ? String(host.dropFirst().dropLast()) : host
        if bare.lowercased() == "localhost" { return true }
        var v4 = in_addr()
        if inet_pton(AF_INET, bare, &v4) == 1 { return UInt32(bigEndian: v4.s_addr) >> 24 == 127 }
        var v6 = in6_addr()
        guard inet_pton(AF_INET6, bare, &v6) == 1 else { return false }
        let bytes = withUnsafeBytes(of: v6) { Array($0) }
        if bytes == Array(repeating: 0, count: 15) + [1] { return true }
        return bytes.prefix(12) == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF] && bytes[12] == 127  // ::ffff:127.x.x.x
    }
}

extension String {
    fileprivate func leftPadded(to width: Int) -> String { String(repeating: "0", count: max(0, width - count)) + self }
}
