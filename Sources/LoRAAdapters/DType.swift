/// Element types of safetensors tensors that the aggregator reads; `F32`, `F16` and `BF16` are also
/// written. Other safetensors dtypes are recognised so that they get a precise "unsupported" error.
public enum DType: String, Sendable, CaseIterable, Codable {
    case f32 = "F32"
    case f16 = "F16"
    case bf16 = "BF16"
    case f64 = "F64"

    /// The dtypes an aggregate may be written in.
    public static let outputTypes: [DType] = [.f32, .f16, .bf16]

    /// Every dtype name the safetensors format defines that this service does not accept.
    static let recognisedButUnsupported: Set<String> = [
        "BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64",
        "F8_E4M3", "F8_E5M2", "F8_E8M0", "F6_E2M3", "F6_E3M2", "F4", "C64",
    ]

    public var byteWidth: Int {
        switch self {
        case .f16, .bf16: 2
        case .f32: 4
        case .f64: 8
        }
    }
}
