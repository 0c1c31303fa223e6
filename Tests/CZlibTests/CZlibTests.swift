import CZlib
import Testing

/// Compresses with deflateInit2 (gzip framing) and inflates back through the shim's inline wrappers.
@Test(arguments: [15 + 16, 15])  // gzip, zlib
func deflateThenInflateRoundTrips(windowBits: Int32) throws {
    let original = (0..<100_000).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ $0 >> 7) }

    var compressed = [UInt8](repeating: 0, count: original.count + 1024)
    var deflater = z_stream()
    #expect(czlib_deflate_init2(&deflater, Z_BEST_SPEED, windowBits) == Z_OK)
    let compressedCount = original.withUnsafeBufferPointer { input in
        compressed.withUnsafeMutableBufferPointer { output in
            deflater.next_in = UnsafeMutablePointer(mutating: input.baseAddress)
            deflater.avail_in = UInt32(input.count)
            deflater.next_out = output.baseAddress
            deflater.avail_out = UInt32(output.count)
            let status = deflate(&deflater, Z_FINISH)
            #expect(status == Z_STREAM_END)
            return output.count - Int(deflater.avail_out)
        }
    }
    deflateEnd(&deflater)
    #expect(compressedCount < original.count)
    if windowBits > 15 { #expect(Array(compressed.prefix(2)) == [0x1F, 0x8B], "gzip magic") }

    var restored = [UInt8](repeating: 0, count: original.count)
    var inflater = z_stream()
    #expect(czlib_inflate_init2(&inflater, windowBits) == Z_OK)
    let status = compressed.withUnsafeMutableBufferPointer { input in
        restored.withUnsafeMutableBufferPointer { output in
            inflater.next_in = input.baseAddress
            inflater.avail_in = UInt32(compressedCount)
            inflater.next_out = output.baseAddress
            inflater.avail_out = UInt32(output.count)
            return inflate(&inflater, Z_FINISH)
        }
    }
    inflateEnd(&inflater)
    #expect(status == Z_STREAM_END)
    #expect(restored == original)
    #expect(String(cString: zlibVersion()).hasPrefix("1."))
}
