/// A tensor to be written: name, element type, shape, and its little-endian bytes.
public struct TensorRecord: Sendable, Equatable {
    public let name: String
    public let dtype: DType
    public let shape: [Int]
    public let data: [UInt8]

    public init(name: String, dtype: DType, shape: [Int], data: [UInt8]) {
        self.name = name
        self.dtype = dtype
        self.shape = shape
        self.data = data
    }
}

/// Where each tensor of a file to be written goes: the deterministic header, then the data section
/// with tensors in name order. Lets a producer write data tensor by tensor into a preallocated buffer.
public struct SafetensorsLayout: Sendable {
    /// The 8-byte length followed by the JSON header, padded with spaces to a multiple of 8.
    public let headerBytes: [UInt8]
    /// Tensors sorted by name, with byte ranges within the whole file.
    public let tensors: [TensorInfo]
    public let fileSize: Int

    /// - Throws: `duplicateTensorName` for a name given twice, `invalidShape` for an impossible size.
    public init(tensors specs: [(name: String, dtype: DType, shape: [Int])], metadata: [String: String]) throws(AdapterError) {
        let ordered = specs.sorted { $0.name < $1.name }
        var json = "{"
        var separator = ""
        if !metadata.isEmpty {
            let members = metadata.sorted { $0.key < $1.key }.map { "\(Self.quoted($0.key)):\(Self.quoted($0.value))" }
            json += "\(Self.quoted(SafetensorsReader.metadataKey)):{\(members.joined(separator: ","))}"
            separator = ","
        }
        var relativeRanges: [Range<Int>] = []
        var offset = 0
        for (index, spec) in ordered.enumerated() {
            guard !spec.name.isEmpty, spec.name != SafetensorsReader.metadataKey else {
                throw AdapterError(.invalidHeader, "a tensor may not be named '\(spec.name)'", tensor: spec.name)
            }
            if index > 0, ordered[index - 1].name == spec.name {
                throw AdapterError(.duplicateTensorName, "the tensor is given twice", tensor: spec.name)
            }
            var byteCount = spec.dtype.byteWidth
            for size in spec.shape {
                let (product, overflow) = byteCount.multipliedReportingOverflow(by: size)
                guard size >= 0, !overflow else { throw AdapterError(.invalidShape, "shape \(spec.shape) is impossible", tensor: spec.name) }
                byteCount = product
            }
            relativeRanges.append(offset..<(offset + byteCount))
            json += separator
            json +=
                "\(Self.quoted(spec.name)):{\"dtype\":\"\(spec.dtype.rawValue)\",\"shape\":[\(spec.shape.map(String.init).joined(separator: ","))],\"data_offsets\":[\(offset),\(offset + byteCount)]}"
            separator = ","
            offset += byteCount
        }
        json += "}"

        var header = Array(json.utf8)
        header.append(contentsOf: repeatElement(UInt8(ascii: " "), count: (8 - header.count % 8) % 8))
        var bytes = withUnsafeBytes(of: UInt64(header.count).littleEndian, Array.init)
        bytes.append(contentsOf: header)
        headerBytes = bytes
        let dataStart = bytes.count
        tensors = zip(ordered, relativeRanges).map { spec, range in
            TensorInfo(
                name: spec.name, dtype: spec.dtype, shape: spec.shape,
                byteRange: (dataStart + range.lowerBound)..<(dataStart + range.upperBound))
        }
        fileSize = dataStart + offset
    }

    /// A new file of this layout: its header, then `fillTensors` writes every tensor's bytes at its
    /// range from the file's start. The tensors tile the rest of the file, so nothing is zero-filled.
    public func makeFile(fillingTensors fillTensors: (UnsafeMutableRawPointer) throws -> Void) rethrows -> [UInt8] {
        try [UInt8](unsafeUninitializedCapacity: fileSize) { output, initializedCount in
            let base = UnsafeMutableRawPointer(output.baseAddress!)
            headerBytes.withUnsafeBytes { base.copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
            try fillTensors(base)
            initializedCount = fileSize
        }
    }

    /// JSON string literal for `string`: quotes, backslashes and control characters escaped.
    static func quoted(_ string: String) -> String {
        var result = "\""
        for scalar in string.unicodeScalars {
            switch scalar {
            case "\"": result += "\\\""
            case "\\": result += "\\\\"
            case "\n": result += "\\n"
            case "\r": result += "\\r"
            case "\t": result += "\\t"
            case "\u{00}"..."\u{1F}":
                let hex = String(scalar.value, radix: 16)
                result += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
            default: result.unicodeScalars.append(scalar)
            }
        }
        return result + "\""
    }
}

/// The deterministic safetensors writer: the same tensors and metadata always give the same bytes.
public enum SafetensorsWriter {
    public static func write(_ tensors: [TensorRecord], metadata: [String: String] = [:]) throws(AdapterError) -> [UInt8] {
        let layout = try SafetensorsLayout(tensors: tensors.map { ($0.name, $0.dtype, $0.shape) }, metadata: metadata)
        let byName = Dictionary(tensors.map { ($0.name, $0) }, uniquingKeysWith: { first, _ in first })
        var bytes = layout.headerBytes
        bytes.reserveCapacity(layout.fileSize)
        for info in layout.tensors {
            let record = byName[info.name]!
            guard record.data.count == info.byteRange.count else {
                throw AdapterError(
                    .sizeMismatch, "shape \(info.shape) of \(info.dtype.rawValue) needs \(info.byteRange.count) bytes, got \(record.data.count)",
                    tensor: info.name)
            }
            bytes.append(contentsOf: record.data)
        }
        return bytes
    }
}
