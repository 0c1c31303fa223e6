// libFuzzer targets (scripts/fuzz/run), one binary, chosen by FUZZ_TARGET:
//   http-parser   the request-head parser and the chunked decoder
//   safetensors   the strict safetensors reader and upload validation
//   inflate       gzip/deflate decoding with its decompression cap
//   multipart     the multipart/form-data reader, fed in chunks, and the adapter_config.json reader
//
// Built with `-DFUZZING -sanitize=fuzzer,address`, the entry point hands control to libFuzzer's
// driver, which calls `LLVMFuzzerTestOneInput`. In an ordinary build `main` replays the files named
// on the command line through the same target, which is how saved crashing inputs are re-run.
import AggregatorService
import Foundation
import HTTPServer
import LoRAAdapters

enum FuzzTarget: String {
    case httpParser = "http-parser"
    case safetensors
    case inflate
    case multipart

    static let selected = FuzzTarget(rawValue: ProcessInfo.processInfo.environment["FUZZ_TARGET"] ?? "") ?? .httpParser

    func run(_ input: UnsafeRawBufferPointer) {
        switch self {
        case .httpParser: Self.parseHTTP(input)
        case .safetensors: Self.readSafetensors(input)
        case .inflate: Self.inflate(input)
        case .multipart: Self.readMultipart(input)
        }
    }

    private static func parseHTTP(_ input: UnsafeRawBufferPointer) {
        let limits = HTTPHeadLimits(maxRequestLineBytes: 512, maxHeaderBytes: 2048, maxHeaderCount: 16)
        if case .complete(let request, let length)? = try? HTTPHeadParser.parse(input, limits: limits) {
            precondition(length > 0 && length <= input.count, "the head length lies outside the input")
            precondition(request.headers.count <= limits.maxHeaderCount, "the header count limit was not enforced")
            _ = request.path
            _ = request.queryParameters()
        }
        // Every input is also a chunked body: the decoder must never hand back more than it consumed.
        var decoder = ChunkedDecoder(maxBodyBytes: 4096, maxTrailerBytes: 512)
        var output: [UInt8] = []
        if let consumed = try? decoder.decode(input, into: &output) {
            precondition(consumed <= input.count && output.count <= consumed, "the decoder produced more than it read")
        }
    }

    private static func readSafetensors(_ input: UnsafeRawBufferPointer) {
        guard let file = try? SafetensorsFile(bytes: Array(input)) else { return }
        for tensor in file.tensors {
            precondition(tensor.byteRange.upperBound <= input.count, "a tensor lies outside the file")
            precondition(tensor.byteRange.count == tensor.elementCount * tensor.dtype.byteWidth, "a tensor's size disagrees with its shape")
        }
        if let rank = file.tensors.compactMap({ TensorRole(tensorName: $0.name).rank(of: $0.shape) }).first {
            _ = try? AdapterValidator.validate(file, declaredRank: rank)
        }
        // What was read must write back to a file that reads the same.
        let records = file.tensors.map { TensorRecord(name: $0.name, dtype: $0.dtype, shape: $0.shape, data: Array(file.bytes[$0.byteRange])) }
        if let rewritten = try? SafetensorsWriter.write(records, metadata: file.metadata) {
            let reread = try? SafetensorsFile(bytes: rewritten)
            precondition(reread?.tensors.map(\.name) == file.tensors.map(\.name), "a rewritten file does not read back")
        }
    }

    /// The first byte picks the chunk size; the rest is the body. Read in chunks or whole, a body
    /// gives the same parts or fails the same way, and no part passes its limit.
    private static func readMultipart(_ input: UnsafeRawBufferPointer) {
        guard let first = input.first else { return }
        let body = Array(input.dropFirst())
        let limits = MultipartLimits(maxPartBytes: ["adapter_model.safetensors": 4096, "adapter_config.json": 512])
        func read(chunkSize: Int) -> Result<[MultipartPart], HTTPServerError> {
            Result { () throws(HTTPServerError) in
                var reader = try MultipartFormDataReader(contentType: "multipart/form-data; boundary=XyZ", limits: limits)
                var offset = 0
                while offset < body.count {
                    try reader.append(Array(body[offset..<min(body.count, offset + chunkSize)]))
                    offset += chunkSize
                }
                return try reader.finish()
            }
        }
        let chunked = read(chunkSize: Int(first) + 1)
        let whole = read(chunkSize: max(1, body.count))
        switch (chunked, whole) {
        case (.success(let parts), .success(let same)):
            precondition(parts.map(\.name) == same.map(\.name) && parts.map(\.body) == same.map(\.body), "chunking changed the parts")
            precondition(parts.count <= limits.maxParts, "the part count limit was not enforced")
            for part in parts {
                precondition(part.body.count <= limits.maxPartBytes[part.name]!, "a part passed its limit")
                if part.name == "adapter_config.json", let config = try? AdapterConfig(json: part.body) {
                    precondition(config.rank >= 1 && config.loraAlpha > 0, "an invalid config was accepted")
                    _ = config.scale(ofModule: "model.layers.0.self_attn.q_proj")
                }
            }
        case (.failure, .failure):
            break
        default:
            preconditionFailure("chunking changed whether the body is accepted")
        }
    }

    private static func inflate(_ input: UnsafeRawBufferPointer) {
        let limit = 1 << 20
        for coding in ["gzip", "deflate"] {
            if let output = try? ContentDecoding.inflate(Array(input), coding: coding, limit: limit) {
                precondition(output.count <= limit, "the decompression cap was not enforced")
            }
        }
    }
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOneInput(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    FuzzTarget.selected.run(UnsafeRawBufferPointer(start: data, count: size))
    return 0
}

#if FUZZING
    @_silgen_name("LLVMFuzzerRunDriver")
    func runFuzzerDriver(
        _ argc: UnsafeMutablePointer<CInt>,
        _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>,
        _ callback: @convention(c) (UnsafePointer<UInt8>, Int) -> CInt
    ) -> CInt

    /// SwiftPM links an executable's entry point under the name `<target>_main`; this is it.
    @_cdecl("Fuzzers_main")
    func fuzzerEntryPoint(_ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> CInt {
        var count = argc
        var arguments = argv
        return runFuzzerDriver(&count, &arguments) { data, size in fuzzOneInput(data, size) }
    }
#else
    @main
    enum ReplayInputs {
        static func main() throws {
            for path in CommandLine.arguments.dropFirst() {
                let bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
                _ = bytes.withUnsafeBufferPointer { buffer in
                    fuzzOneInput(buffer.baseAddress ?? UnsafePointer(bitPattern: 1)!, buffer.count)
                }
                print("ok \(FuzzTarget.selected.rawValue) \(path)")
            }
        }
    }
#endif
