import LoRAAdapters
import TestSupport
import Testing

/// A file with a hand-written header: the 8-byte length, the header text, then `data`.
func handMadeFile(_ header: String, data: [UInt8] = [], declaredLength: UInt64? = nil) -> [UInt8] {
    let headerBytes = Array(header.utf8)
    return withUnsafeBytes(of: (declaredLength ?? UInt64(headerBytes.count)).littleEndian, Array.init) + headerBytes + data
}

private let eightBytes = [UInt8](repeating: 0, count: 8)

@Suite struct SafetensorsReaderTests {
    @Test func readsAWellFormedFile() throws {
        let header =
            #"{"__metadata__":{"format":"pt"},"b":{"dtype":"F16","shape":[2],"data_offsets":[8,12]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}  "#
        let data = DType.f32.encode([1, 2]) + DType.f16.encode([3, 4])
        let file = try SafetensorsFile(bytes: handMadeFile(header, data: data))
        #expect(file.metadata == ["format": "pt"])
        #expect(file.tensors.map(\.name) == ["a", "b"])
        let b = try #require(file.tensor(named: "b"))
        #expect(b.dtype == .f16 && b.shape == [2] && file.values(of: b) == [3, 4])
        #expect(file.values(of: try #require(file.tensor(named: "a"))) == [1, 2])
        #expect(file.tensor(named: "c") == nil)
    }

    @Test func acceptsScalarsEmptyTensorsAndAnEmptyFile() throws {
        let scalar = handMadeFile(
            #"{"s":{"dtype":"F64","shape":[],"data_offsets":[0,8]},"e":{"dtype":"F32","shape":[0,3],"data_offsets":[8,8]}}"#, data: DType.f64.encode([2.5]))
        let file = try SafetensorsFile(bytes: scalar)
        #expect(file.values(of: try #require(file.tensor(named: "s"))) == [2.5])
        #expect(try #require(file.tensor(named: "e")).elementCount == 0)
        #expect(try SafetensorsFile(bytes: handMadeFile("{}")).tensors.isEmpty)
    }

    /// Each malformed file and the error code it must get; every code appears once on purpose.
    static let malformed: [(String, [UInt8], AdapterError.Code)] = [
        ("fewer than 8 bytes", [1, 0, 0], .truncatedFile),
        ("header length over 100 MB", handMadeFile("{}", declaredLength: 100_000_001), .headerTooLarge),
        ("header length past the end", handMadeFile("{}", declaredLength: 40), .headerOutOfBounds),
        ("header length of 2^64-1", handMadeFile("{}", declaredLength: .max), .headerTooLarge),
        ("header is not JSON", handMadeFile("{\"a\":"), .invalidJSON),
        ("header has a control character", handMadeFile("{\"a\u{01}\":{}}"), .invalidJSON),
        ("header is invalid UTF-8", withUnsafeBytes(of: UInt64(6).littleEndian, Array.init) + [0x7B, 0x22, 0xFF, 0x22, 0x3A, 0x7D], .invalidJSON),
        ("header nests too deep", handMadeFile(String(repeating: "[", count: 100) + String(repeating: "]", count: 100)), .invalidJSON),
        ("header is an array", handMadeFile("[]"), .invalidHeader),
        ("tensor entry is not an object", handMadeFile(#"{"a":[1]}"#), .invalidHeader),
        ("tensor entry lacks data_offsets", handMadeFile(#"{"a":{"dtype":"F32","shape":[2]}}"#, data: eightBytes), .invalidHeader),
        ("tensor entry has an unknown field", handMadeFile(#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":1}}"#, data: eightBytes), .invalidHeader),
        ("metadata value is not a string", handMadeFile(#"{"__metadata__":{"n":1}}"#), .invalidMetadata),
        (
            "duplicate tensor name",
            handMadeFile(#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#, data: eightBytes),
            .duplicateTensorName
        ),
        ("unknown dtype", handMadeFile(#"{"a":{"dtype":"X99","shape":[2],"data_offsets":[0,8]}}"#, data: eightBytes), .unknownDType),
        ("unsupported dtype", handMadeFile(#"{"a":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}}"#, data: eightBytes), .unsupportedDType),
        ("negative dimension", handMadeFile(#"{"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}"#, data: eightBytes), .invalidShape),
        ("fractional dimension", handMadeFile(#"{"a":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}}"#, data: eightBytes), .invalidShape),
        (
            "element count overflows", handMadeFile(#"{"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}}"#, data: eightBytes),
            .invalidShape
        ),
        ("offsets past the data", handMadeFile(#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#, data: eightBytes), .invalidOffsets),
        ("offsets reversed", handMadeFile(#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}}"#, data: eightBytes), .invalidOffsets),
        (
            "overlapping offsets",
            handMadeFile(#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#, data: eightBytes),
            .overlappingOffsets
        ),
        ("data not starting at 0", handMadeFile(#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#, data: eightBytes), .dataGap),
        ("trailing bytes", handMadeFile(#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#, data: eightBytes), .trailingBytes),
        ("shape disagrees with size", handMadeFile(#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#, data: eightBytes), .sizeMismatch),
    ]

    @Test(arguments: malformed)
    func malformedFilesGetTheirOwnError(description: String, bytes: [UInt8], expected: AdapterError.Code) {
        #expect(expected.isMalformedFile == (expected != .unsupportedDType))
        #expect { try SafetensorsFile(bytes: bytes) } throws: { error in
            (error as? AdapterError)?.code == expected
        }
    }

    @Test func errorsNameTheTensor() {
        let shapeDisagrees = Self.malformed.first { $0.0 == "shape disagrees with size" }!.1
        #expect { try SafetensorsFile(bytes: shapeDisagrees) } throws: { error in
            let error = error as? AdapterError
            return error?.tensor == "a" && error?.message.contains("needs 12 bytes") == true
        }
    }

    @Test func aTruncatedWellFormedFileIsRefusedAtEveryLength() throws {
        let complete = try TestRound.random(seed: 1)[0].safetensors().bytes
        for length in 0..<complete.count {
            #expect(throws: AdapterError.self) { try SafetensorsFile(bytes: Array(complete.prefix(length))) }
        }
    }

    @Test func randomCorruptionNeverCrashes() throws {
        // Byte flips in the length and header: every outcome is a parse or an AdapterError, never a trap.
        let complete = try TestRound.random(seed: 2)[0].safetensors().bytes
        let headerEnd = 8 + Int(complete.withUnsafeBytes { $0.loadUnaligned(as: UInt64.self) })
        var random = SeededGenerator(seed: 99)
        var refused = 0
        for _ in 0..<3000 {
            var corrupt = complete
            for _ in 0..<Int.random(in: 1...4, using: &random) {
                corrupt[Int.random(in: 0..<headerEnd, using: &random)] = UInt8.random(in: 0...255, using: &random)
            }
            do { _ = try SafetensorsFile(bytes: corrupt) } catch { refused += 1 }  // typed: always AdapterError
        }
        #expect(refused > 2000)
    }
}
