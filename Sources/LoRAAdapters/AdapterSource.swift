/// One client's upload in a round, as the aggregation sees it.
public struct RoundParticipant: Sendable, Equatable {
    public let clientID: String
    /// Positive and finite; typically the client's sample count.
    public let weight: Double
    /// The ranks and scales of its modules.
    public let config: AdapterConfig

    public init(clientID: String, weight: Double, config: AdapterConfig) {
        self.clientID = clientID
        self.weight = weight
        self.config = config
    }

    /// An upload tagged with one rank for every module, at scale 1.
    public init(clientID: String, rank: Int, weight: Double) {
        self.init(clientID: clientID, weight: weight, config: AdapterConfig(unscaledRank: rank))
    }

    /// The config's `r`: the rank of every module that no `rank_pattern` key matches.
    public var rank: Int { config.rank }
}

/// That `clientID` holds tensor `name` with this dtype and shape; metadata only, no data.
public struct TensorHolding: Sendable, Hashable {
    public let name: String
    public let clientID: String
    public let dtype: DType
    public let shape: [Int]

    public init(name: String, clientID: String, dtype: DType, shape: [Int]) {
        self.name = name
        self.clientID = clientID
        self.dtype = dtype
        self.shape = shape
    }
}

/// One tensor of the round's base (the global adapter the round started from, held at scale 1):
/// metadata only, no data.
public struct BaseTensor: Sendable, Hashable {
    public let name: String
    public let dtype: DType
    public let shape: [Int]

    public init(name: String, dtype: DType, shape: [Int]) {
        self.name = name
        self.dtype = dtype
        self.shape = shape
    }
}

/// One client's bytes of one tensor (or the base's, with an empty client id), valid only inside the
/// callback that receives it.
public struct TensorContribution {
    public let clientID: String
    public let dtype: DType
    public let shape: [Int]
    public let bytes: UnsafeRawBufferPointer

    public init(clientID: String, dtype: DType, shape: [Int], bytes: UnsafeRawBufferPointer) {
        self.clientID = clientID
        self.dtype = dtype
        self.shape = shape
        self.bytes = bytes
    }
}

/// Where the aggregation engine pulls a round from, one tensor name at a time across all clients
/// (module-major, client-minor), so that memory holds one tensor's worth of input at a time however
/// many clients there are. The SQLite store and the in-memory source implement it.
public protocol AdapterSource {
    /// Every upload of the round, in any order.
    func participants() throws -> [RoundParticipant]
    /// Every (tensor, client) pair of the round, in any order.
    func holdings() throws -> [TensorHolding]
    /// Calls `body` once for each client holding `tensorName`, in ascending client-id order
    /// (byte-wise), with that client's bytes of the tensor.
    func forEachContribution(toTensor tensorName: String, _ body: (TensorContribution) throws -> Void) throws
    /// Calls `body` once with the holders of `tensorName` (as `forEachContribution` orders them)
    /// and a reader of any part of their bytes, valid inside `body` only: the engine reads every
    /// holder's part of one cache-sized block of the output at a time, from two cores at once. It
    /// may call this inside another call's `body` (small tensors are summed side by side, one per
    /// core), using both readers at once. The default copies what `forEachContribution` delivers.
    func withContributionReader(toTensor tensorName: String, _ body: ([ContributionInfo], any ContributionReader) throws -> Void) throws
    /// Every tensor of the round's base; empty when the round has none.
    func baseTensors() throws -> [BaseTensor]
    /// Calls `body` once with the base's bytes of `tensorName`, one of `baseTensors()`.
    func withBaseTensor(named tensorName: String, _ body: (TensorContribution) throws -> Void) throws
}

/// One holder of a tensor, without its bytes.
public struct ContributionInfo: Sendable {
    public let clientID: String
    public let dtype: DType
    public let shape: [Int]
    public let byteCount: Int

    public init(clientID: String, dtype: DType, shape: [Int], byteCount: Int) {
        self.clientID = clientID
        self.dtype = dtype
        self.shape = shape
        self.byteCount = byteCount
    }
}

/// Parts of the holders' bytes of one tensor. Safe to call from several threads at once, each with
/// its own scratch buffer.
public protocol ContributionReader: Sendable {
    /// Calls `body` with holder `index`'s bytes in `byteRange`: in place where the source holds them
    /// in memory, else read into `scratch` (at least `byteRange.count` bytes).
    func withBytes(ofHolder index: Int, in byteRange: Range<Int>, scratch: UnsafeMutableRawPointer, _ body: (UnsafeRawPointer) throws -> Void) throws
}

/// Holders' bytes that stay in memory while the reader is used: parts are lent in place.
public struct InPlaceContributionReader: ContributionReader, @unchecked Sendable {
    // @unchecked: the pointers are only read, and outlive the reader (the caller's contract).
    private let bytes: [UnsafeRawPointer?]

    public init(_ contributions: [TensorContribution]) { self.init(holders: contributions.map(\.bytes)) }

    public init(holders: [UnsafeRawBufferPointer]) { bytes = holders.map(\.baseAddress) }

    public func withBytes(
        ofHolder index: Int, in byteRange: Range<Int>, scratch: UnsafeMutableRawPointer, _ body: (UnsafeRawPointer) throws -> Void
    ) throws {
        guard let base = bytes[index] else { return }
        try body(base + byteRange.lowerBound)
    }
}

extension TensorContribution {
    var info: ContributionInfo { ContributionInfo(clientID: clientID, dtype: dtype, shape: shape, byteCount: bytes.count) }
}

extension AdapterSource {
    public func withContributionReader(toTensor tensorName: String, _ body: ([ContributionInfo], any ContributionReader) throws -> Void) throws {
        var copies: [(info: ContributionInfo, offset: Int)] = []
        var arena: [UInt8] = []
        try forEachContribution(toTensor: tensorName) { contribution in
            copies.append((contribution.info, arena.count))
            arena.append(contentsOf: contribution.bytes)
        }
        try arena.withUnsafeBytes { bytes in
            let contributions = copies.map { copy in
                TensorContribution(
                    clientID: copy.info.clientID, dtype: copy.info.dtype, shape: copy.info.shape,
                    bytes: UnsafeRawBufferPointer(rebasing: bytes[copy.offset..<(copy.offset + copy.info.byteCount)]))
            }
            try body(copies.map(\.info), InPlaceContributionReader(contributions))
        }
    }
}

/// One client's parsed upload held in memory.
public struct ClientAdapter: Sendable {
    public let participant: RoundParticipant
    public let file: SafetensorsFile

    public init(clientID: String, rank: Int, weight: Double, file: SafetensorsFile) {
        self.init(participant: RoundParticipant(clientID: clientID, rank: rank, weight: weight), file: file)
    }

    public init(participant: RoundParticipant, file: SafetensorsFile) {
        self.participant = participant
        self.file = file
    }
}

/// A round held in memory: for tests, benchmarks, and callers that already have the files.
public struct InMemoryAdapterSource: AdapterSource, Sendable {
    private let adapters: [ClientAdapter]
    /// At scale 1, as a base is held.
    private let base: SafetensorsFile?

    public init(_ adapters: [ClientAdapter], base: SafetensorsFile? = nil) {
        self.adapters = adapters.sorted { $0.participant.clientID < $1.participant.clientID }
        self.base = base
    }

    public func participants() -> [RoundParticipant] { adapters.map(\.participant) }

    public func holdings() -> [TensorHolding] {
        adapters.flatMap { adapter in
            adapter.file.tensors.map {
                TensorHolding(name: $0.name, clientID: adapter.participant.clientID, dtype: $0.dtype, shape: $0.shape)
            }
        }
    }

    public func forEachContribution(toTensor tensorName: String, _ body: (TensorContribution) throws -> Void) throws {
        for adapter in adapters {
            guard let tensor = adapter.file.tensor(named: tensorName) else { continue }
            try adapter.file.withBytes(of: tensor) { bytes in
                try body(TensorContribution(clientID: adapter.participant.clientID, dtype: tensor.dtype, shape: tensor.shape, bytes: bytes))
            }
        }
    }

    /// The files' own bytes, lent in place.
    public func withContributionReader(toTensor tensorName: String, _ body: ([ContributionInfo], any ContributionReader) throws -> Void) throws {
        let holders = adapters.compactMap { adapter in adapter.file.tensor(named: tensorName).map { (adapter, $0) } }
        func gather(_ index: Int, _ gathered: [TensorContribution]) throws {
            guard index < holders.count else { return try body(gathered.map(\.info), InPlaceContributionReader(gathered)) }
            let (adapter, tensor) = holders[index]
            try adapter.file.withBytes(of: tensor) { bytes in
                try gather(
                    index + 1, gathered + [TensorContribution(clientID: adapter.participant.clientID, dtype: tensor.dtype, shape: tensor.shape, bytes: bytes)])
            }
        }
        try gather(0, [])
    }

    public func baseTensors() -> [BaseTensor] { base?.tensors.map { BaseTensor(name: $0.name, dtype: $0.dtype, shape: $0.shape) } ?? [] }

    public func withBaseTensor(named tensorName: String, _ body: (TensorContribution) throws -> Void) throws {
        guard let base, let tensor = base.tensor(named: tensorName) else { return }
        try base.withBytes(of: tensor) { try body(TensorContribution(clientID: "", dtype: tensor.dtype, shape: tensor.shape, bytes: $0)) }
    }
}
