import LoRAAdapters
import TestSupport
import Testing

@Suite struct SafetensorsWriterTests {
    @Test func writesTheExactDocumentedBytes() throws {
        let bytes = try SafetensorsWriter.write(
            [
                TensorRecord(name: "b", dtype: .f16, shape: [1], data: [0x00, 0x3C]),
                TensorRecord(name: "a\"\n", dtype: .f32, shape: [], data: [0, 0, 0x80, 0x3F]),
            ],
            metadata: ["z": "1", "format": "pt"])
        let header =
            #"{"__metadata__":{"format":"pt","z":"1"},"a\"\n":{"dtype":"F32","shape":[],"data_offsets":[0,4]},"b":{"dtype":"F16","shape":[1],"data_offsets":[4,6]}}"#
        let padded = header + String(repeating: " ", count: (8 - header.utf8.count % 8) % 8)
        #expect(bytes == handMadeFile(padded, data: [0, 0, 0x80, 0x3F, 0x00, 0x3C]))
        #expect((bytes.count - 6) % 8 == 0, "data starts on an 8-byte boundary")
    }

    @Test(arguments: 0..<10)
    func readingWhatWasWrittenGivesItBack(seed: UInt64) throws {
        let client = TestRound.random(seed: seed)[0]
        let records = client.tensors.map { TensorRecord(name: $0.key, dtype: client.dtype, shape: $0.value.shape, data: client.dtype.encode($0.value.values)) }
        let bytes = try SafetensorsWriter.write(records, metadata: ["format": "pt", "note": "ünïcødé ✓"])
        let file = try SafetensorsFile(bytes: bytes)
        #expect(file.metadata == ["format": "pt", "note": "ünïcødé ✓"])
        #expect(file.tensors.map(\.name) == records.map(\.name).sorted())
        for record in records {
            let info = try #require(file.tensor(named: record.name))
            #expect(info.dtype == record.dtype && info.shape == record.shape)
            #expect(Array(file.bytes[info.byteRange]) == record.data)
        }
        // Deterministic: input order does not matter, and rewriting what was read is the identity.
        #expect(try SafetensorsWriter.write(records.reversed(), metadata: ["note": "ünïcødé ✓", "format": "pt"]) == bytes)
        let reread = file.tensors.map { TensorRecord(name: $0.name, dtype: $0.dtype, shape: $0.shape, data: Array(file.bytes[$0.byteRange])) }
        #expect(try SafetensorsWriter.write(reread, metadata: file.metadata) == bytes)
    }

    @Test func refusesDuplicateNamesAndWrongSizes() {
        #expect {
            try SafetensorsWriter.write([
                TensorRecord(name: "a", dtype: .f32, shape: [1], data: [0, 0, 0, 0]), TensorRecord(name: "a", dtype: .f32, shape: [1], data: [0, 0, 0, 0]),
            ])
        } throws: {
            ($0 as? AdapterError)?.code == .duplicateTensorName
        }
        #expect { try SafetensorsWriter.write([TensorRecord(name: "a", dtype: .f32, shape: [2], data: [0, 0, 0, 0])]) } throws: {
            ($0 as? AdapterError)?.code == .sizeMismatch
        }
    }
}
