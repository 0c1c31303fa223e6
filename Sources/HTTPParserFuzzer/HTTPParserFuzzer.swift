// Fuzz target for the request-head parser and the chunked decoder (scripts/fuzz).
//
// Built with `-DFUZZING -sanitize=fuzzer,address`, the entry point hands control to libFuzzer's
// driver, which calls `LLVMFuzzerTestOneInput`. In an ordinary build `main` replays the files named
// on the command line through the same function, which is how saved crashing inputs are re-run.
import Foundation
import HTTPServer

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOneInput(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let input = UnsafeRawBufferPointer(start: data, count: size)
    let limits = HTTPHeadLimits(maxRequestLineBytes: 512, maxHeaderBytes: 2048, maxHeaderCount: 16)
    if case .complete(let request, let length)? = try? HTTPHeadParser.parse(input, limits: limits) {
        precondition(length > 0 && length <= size, "the head length lies outside the input")
        precondition(request.headers.count <= limits.maxHeaderCount, "the header count limit was not enforced")
        _ = request.path
        _ = request.queryParameters()
    }
    // Every input is also a chunked body: the decoder must never hand back more than it consumed.
    var decoder = ChunkedDecoder(maxBodyBytes: 4096, maxTrailerBytes: 512)
    var output: [UInt8] = []
    if let consumed = try? decoder.decode(input, into: &output) {
        precondition(consumed <= size && output.count <= consumed, "the decoder produced more than it read")
    }
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
@_cdecl("HTTPParserFuzzer_main")
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
            print("ok \(path)")
        }
    }
}
#endif
