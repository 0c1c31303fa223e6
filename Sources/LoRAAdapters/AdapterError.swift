/// Every failure of the adapter core: a stable machine-readable code, a message for people, and the
/// tensor it concerns when there is one. The service maps codes to HTTP statuses in one place.
public struct AdapterError: Error, Sendable, Equatable, CustomStringConvertible {
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        public let rawValue: String
        private init(_ rawValue: String) { self.rawValue = rawValue }
        public var description: String { rawValue }

        // The file is not a well-formed safetensors file.
        public static let truncatedFile = Code("truncated_file")
        public static let headerTooLarge = Code("header_too_large")
        public static let headerOutOfBounds = Code("header_out_of_bounds")
        public static let invalidJSON = Code("invalid_json")
        public static let invalidHeader = Code("invalid_header")
        public static let invalidMetadata = Code("invalid_metadata")
        public static let duplicateTensorName = Code("duplicate_tensor_name")
        public static let unknownDType = Code("unknown_dtype")
        public static let invalidShape = Code("invalid_shape")
        public static let invalidOffsets = Code("invalid_offsets")
        public static let overlappingOffsets = Code("overlapping_offsets")
        public static let dataGap = Code("data_gap")
        public static let trailingBytes = Code("trailing_bytes")
        public static let sizeMismatch = Code("size_mismatch")

        // A well-formed file whose content the service cannot accept.
        public static let unsupportedDType = Code("unsupported_dtype")
        public static let invalidRank = Code("invalid_rank")
        public static let rankMismatch = Code("rank_mismatch")
        public static let unpairedLoRATensor = Code("unpaired_lora_tensor")
        public static let nonFiniteValue = Code("non_finite_value")
        public static let shapeMismatch = Code("shape_mismatch")

        // adapter_config.json: not a JSON object (malformed), or values PEFT would not accept.
        public static let malformedConfig = Code("malformed_config")
        public static let invalidConfig = Code("invalid_config")

        // Aggregation requests and sources.
        public static let invalidWeight = Code("invalid_weight")
        public static let rankOutOfRange = Code("rank_out_of_range")
        public static let emptyRound = Code("empty_round")
        public static let inconsistentSource = Code("inconsistent_source")
        /// LAPACK did not converge (the svd strategy); not expected for finite inputs.
        public static let numericalFailure = Code("numerical_failure")

        /// Codes that mean "these bytes are not a safetensors file" rather than "a file we refuse".
        public var isMalformedFile: Bool { Self.malformedFileCodes.contains(self) }
        private static let malformedFileCodes: Set<Code> = [
            .truncatedFile, .headerTooLarge, .headerOutOfBounds, .invalidJSON, .invalidHeader,
            .invalidMetadata, .duplicateTensorName, .unknownDType, .invalidShape, .invalidOffsets,
            .overlappingOffsets, .dataGap, .trailingBytes, .sizeMismatch, .malformedConfig,
        ]
    }

    public let code: Code
    public let message: String
    public let tensor: String?

    public init(_ code: Code, _ message: String, tensor: String? = nil) {
        self.code = code
        self.message = message
        self.tensor = tensor
    }

    public var description: String {
        if let tensor { return "\(code): tensor '\(tensor)': \(message)" }
        return "\(code): \(message)"
    }
}
