import Foundation
import LoRAAdapters

/// How a federation runs its rounds (openapi.yaml, "Federation"). A federation never configured has
/// the defaults: replication, no chaining, sealed only on request.
public struct FederationSettings: Sendable, Equatable, Codable {
    public struct Quorum: Sendable, Equatable, Codable {
        /// Once a round holds this many uploads it is sealed `graceSeconds` later.
        public var minUploads: Int?
        public var graceSeconds: Double
        /// A round is sealed as soon as it holds this many.
        public var maxUploads: Int?

        public init(minUploads: Int? = nil, graceSeconds: Double = 0, maxUploads: Int? = nil) {
            self.minUploads = minUploads
            self.graceSeconds = graceSeconds
            self.maxUploads = maxUploads
        }
    }

    /// The strategy of requests that name none, and of chaining.
    public var strategy: AggregationStrategy
    /// Sealing round t stores its aggregate as round t+1's base.
    public var chain: Bool
    public var quorum: Quorum?
    /// Counted from a round's first upload.
    public var roundTimeoutSeconds: Double?

    public init(strategy: AggregationStrategy = .replication, chain: Bool = false, quorum: Quorum? = nil, roundTimeoutSeconds: Double? = nil) {
        self.strategy = strategy
        self.chain = chain
        self.quorum = quorum
        self.roundTimeoutSeconds = roundTimeoutSeconds
    }

    /// The uploads a timed-out round needs to be sealed.
    var uploadsToSealOnTimeout: Int { quorum?.minUploads ?? 1 }

    static func decode(_ text: String) throws -> FederationSettings {
        try JSONDecoder().decode(FederationSettings.self, from: Data(text.utf8))
    }

    func encoded() -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = .sortedKeys
        return String(decoding: try! encoder.encode(self), as: UTF8.self)  // a plain struct of numbers, flags and a string always encodes
    }
}

/// Why a round was sealed.
public enum SealReason: String, Sendable, CaseIterable {
    /// `POST …/seal`.
    case request
    /// `min_uploads` reached and the grace period over.
    case quorum
    case maxUploads = "max_uploads"
    /// `round_timeout_seconds` after the first upload, with `min_uploads` held.
    case timeout
}
