import LoRAAdapters
import TestSupport
import Testing

/// Every tensor of `bytes` within `tolerance` (relative) of the reference; same names and shapes.
func expectMatches(
    _ bytes: [UInt8], _ reference: [String: TestTensor], tolerance: Double, _ context: String, sourceLocation: SourceLocation = #_sourceLocation
) throws {
    let file = try SafetensorsFile(bytes: bytes)
    #expect(Set(file.tensors.map(\.name)) == Set(reference.keys), "\(context)", sourceLocation: sourceLocation)
    for tensor in file.tensors {
        guard let expected = reference[tensor.name] else { continue }
        #expect(tensor.shape == expected.shape, "\(context) \(tensor.name)", sourceLocation: sourceLocation)
        let worst = zip(file.values(of: tensor), expected.values).map { abs($0 - $1) / (abs($1) + 1e-12) }.max() ?? 0
        #expect(worst <= tolerance, "\(context) \(tensor.name): worst relative error \(worst)", sourceLocation: sourceLocation)
    }
}
