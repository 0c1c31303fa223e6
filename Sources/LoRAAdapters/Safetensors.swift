/// One tensor of a safetensors file: its name, element type, shape and where its bytes lie.
public struct TensorInfo: Sendable, Hashable {
    public let name: String
    public let dtype: DType
    public let shape: [Int]
    /// Byte range of the tensor's data within the whole file (not relative to the data section).
    public let byteRange: Range<Int>

    public init(name: String, dtype: DType, shape: [Int], byteRange: Range<Int>) {
        self.name = name
        self.dtype = dtype
        self.shape = shape
        self.byteRange = byteRange
    }

    public var elementCount: Int { shape.reduce(1, *) }
}

/// The parsed and fully checked header of a safetensors file.
public struct SafetensorsHeader: Sendable {
    /// The largest JSON header accepted, as in the reference implementation.
    public static let maximumHeaderLength = 100_000_000

    public let metadata: [String: String]
    /// Tensors sorted by name.
    public let tensors: [TensorInfo]

    public func tensor(named name: String) -> TensorInfo? {
        var low = 0
        var high = tensors.count
        while low < high {
            let middle = (low + high) / 2
            if tensors[middle].name < name { low = middle + 1 } else { high = middle }
        }
        return low < tensors.count && tensors[low].name == name ? tensors[low] : nil
    }
}

/// A safetensors file held in memory, checked on construction.
public struct SafetensorsFile: Sendable {
    public let bytes: [UInt8]
    public let header: SafetensorsHeader

    public init(bytes: [UInt8]) throws(AdapterError) {
        // withUnsafeBytes only rethrows untyped errors, so the typed error travels in a Result.
        let parsed = bytes.withUnsafeBytes { raw in Result { () throws(AdapterError) in try SafetensorsReader.parseHeader(raw) } }
        self.header = try parsed.get()
        self.bytes = bytes
    }

    public var tensors: [TensorInfo] { header.tensors }
    public var metadata: [String: String] { header.metadata }

    /// The length prefix and JSON header: what precedes the data section.
    public var headerBytes: [UInt8] { Array(bytes[0..<(8 + Int(bytes.withUnsafeBytes { $0.loadUnaligned(as: UInt64.self) }))]) }

    public func tensor(named name: String) -> TensorInfo? { header.tensor(named: name) }

    /// Calls `body` with the raw little-endian bytes of `tensor`, which must belong to this file.
    public func withBytes<Result>(
        of tensor: TensorInfo, _ body: (UnsafeRawBufferPointer) throws -> Result
    ) rethrows -> Result {
        try bytes.withUnsafeBytes { try body(UnsafeRawBufferPointer(rebasing: $0[tensor.byteRange])) }
    }

    /// The elements of `tensor` decoded to Float64.
    public func values(of tensor: TensorInfo) -> [Double] {
        tensor.dtype.decode(Array(bytes[tensor.byteRange]))
    }
}
