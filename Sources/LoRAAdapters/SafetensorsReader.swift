/// The strict safetensors reader: every length, offset and name is checked before use, and every
/// violation is an `AdapterError` naming the tensor and the problem. Nothing here traps on any input,
/// and nothing allocates more than in proportion to the header, which is itself inside the file.
public enum SafetensorsReader {
    static let metadataKey = "__metadata__"
    private static let tensorKeys: Set<String> = ["dtype", "shape", "data_offsets"]

    public static func parseHeader(_ file: UnsafeRawBufferPointer) throws(AdapterError) -> SafetensorsHeader {
        guard file.count >= 8 else {
            throw AdapterError(.truncatedFile, "the file has \(file.count) bytes, fewer than the 8-byte header length")
        }
        let declaredLength = UInt64(littleEndian: file.loadUnaligned(as: UInt64.self))
        guard declaredLength <= UInt64(SafetensorsHeader.maximumHeaderLength) else {
            throw AdapterError(.headerTooLarge, "the header length \(declaredLength) exceeds the limit of \(SafetensorsHeader.maximumHeaderLength) bytes")
        }
        let headerLength = Int(declaredLength)
        guard headerLength <= file.count - 8 else {
            throw AdapterError(.headerOutOfBounds, "the header length \(headerLength) runs past the end of the \(file.count)-byte file")
        }
        let dataStart = 8 + headerLength
        let dataLength = file.count - dataStart

        let json = try HeaderJSON.parse(UnsafeRawBufferPointer(rebasing: file[8..<dataStart]))
        guard case .object(let members) = json else {
            throw AdapterError(.invalidHeader, "the header is a JSON \(json.typeName), not an object")
        }

        var metadata: [String: String] = [:]
        var entries: [(info: TensorInfo, relative: Range<Int>)] = []
        entries.reserveCapacity(members.count)
        for (name, value) in members {
            if name == metadataKey {
                metadata = try parseMetadata(value)
            } else {
                let (dtype, shape, relative) = try parseTensorEntry(name: name, value)
                guard relative.upperBound <= dataLength else {
                    throw AdapterError(
                        .invalidOffsets, "data_offsets [\(relative.lowerBound), \(relative.upperBound)] run past the \(dataLength)-byte data section",
                        tensor: name)
                }
                let info = TensorInfo(
                    name: name, dtype: dtype, shape: shape,
                    byteRange: (dataStart + relative.lowerBound)..<(dataStart + relative.upperBound))
                entries.append((info, relative))
            }
        }
        try checkCoverage(entries.map { ($0.info.name, $0.relative) }, dataLength: dataLength)
        return SafetensorsHeader(metadata: metadata, tensors: entries.map(\.info).sorted { $0.name < $1.name })
    }

    private static func parseMetadata(_ value: HeaderJSON) throws(AdapterError) -> [String: String] {
        guard case .object(let members) = value else {
            throw AdapterError(.invalidMetadata, "__metadata__ is a \(value.typeName), not an object of strings")
        }
        var metadata: [String: String] = [:]
        for (key, entry) in members {
            guard case .string(let string) = entry else {
                throw AdapterError(.invalidMetadata, "__metadata__ entry '\(key)' is a \(entry.typeName), not a string")
            }
            metadata[key] = string
        }
        return metadata
    }

    private static func parseTensorEntry(
        name: String, _ value: HeaderJSON
    ) throws(AdapterError) -> (DType, [Int], Range<Int>) {
        guard !name.isEmpty else { throw AdapterError(.invalidHeader, "a tensor has an empty name", tensor: name) }
        guard case .object(let members) = value else {
            throw AdapterError(.invalidHeader, "the entry is a \(value.typeName), not an object", tensor: name)
        }
        var fields: [String: HeaderJSON] = [:]
        for (key, field) in members {
            guard tensorKeys.contains(key) else {
                throw AdapterError(.invalidHeader, "unexpected field '\(key)'", tensor: name)
            }
            fields[key] = field
        }
        guard let dtypeField = fields["dtype"], let shapeField = fields["shape"], let offsetsField = fields["data_offsets"] else {
            let missing = tensorKeys.subtracting(fields.keys).sorted().joined(separator: ", ")
            throw AdapterError(.invalidHeader, "missing field \(missing)", tensor: name)
        }

        guard case .string(let dtypeName) = dtypeField else {
            throw AdapterError(.unknownDType, "dtype is a \(dtypeField.typeName), not a string", tensor: name)
        }
        guard let dtype = DType(rawValue: dtypeName) else {
            if DType.recognisedButUnsupported.contains(dtypeName) {
                throw AdapterError(.unsupportedDType, "dtype \(dtypeName) is not supported (use F32, F16, BF16 or F64)", tensor: name)
            }
            throw AdapterError(.unknownDType, "unknown dtype '\(dtypeName)'", tensor: name)
        }

        guard case .array(let dimensions) = shapeField else {
            throw AdapterError(.invalidShape, "shape is a \(shapeField.typeName), not an array", tensor: name)
        }
        var shape: [Int] = []
        shape.reserveCapacity(dimensions.count)
        var byteCount = dtype.byteWidth
        for dimension in dimensions {
            guard let size = dimension.nonNegativeInteger else {
                throw AdapterError(.invalidShape, "shape holds something other than a non-negative integer", tensor: name)
            }
            let (product, overflow) = byteCount.multipliedReportingOverflow(by: size)
            guard !overflow else { throw AdapterError(.invalidShape, "shape \(shape + [size]) is too large", tensor: name) }
            byteCount = product
            shape.append(size)
        }

        guard case .array(let offsets) = offsetsField, offsets.count == 2,
            let begin = offsets[0].nonNegativeInteger, let end = offsets[1].nonNegativeInteger
        else {
            throw AdapterError(.invalidOffsets, "data_offsets must be two non-negative integers", tensor: name)
        }
        guard begin <= end else {
            throw AdapterError(.invalidOffsets, "data_offsets [\(begin), \(end)] end before they begin", tensor: name)
        }
        guard end - begin == byteCount else {
            throw AdapterError(.sizeMismatch, "shape \(shape) of \(dtypeName) needs \(byteCount) bytes but data_offsets span \(end - begin)", tensor: name)
        }
        return (dtype, shape, begin..<end)
    }

    /// The tensors' ranges must tile the data section exactly: start at 0, no overlap, no gap, no tail.
    private static func checkCoverage(_ ranges: [(name: String, range: Range<Int>)], dataLength: Int) throws(AdapterError) {
        let ordered = ranges.sorted { ($0.range.lowerBound, $0.range.upperBound) < ($1.range.lowerBound, $1.range.upperBound) }
        var covered = 0
        var previous: String?
        for (name, range) in ordered {
            if range.lowerBound < covered {
                throw AdapterError(.overlappingOffsets, "its data overlaps tensor '\(previous ?? "")'", tensor: name)
            }
            if range.lowerBound > covered {
                throw AdapterError(.dataGap, "bytes \(covered)..<\(range.lowerBound) of the data section belong to no tensor", tensor: name)
            }
            covered = range.upperBound
            previous = name
        }
        if covered < dataLength {
            throw AdapterError(.trailingBytes, "\(dataLength - covered) bytes after the last tensor belong to no tensor")
        }
    }
}
