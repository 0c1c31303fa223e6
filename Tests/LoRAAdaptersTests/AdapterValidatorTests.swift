import LoRAAdapters
import TestSupport
import Testing

private func file(_ tensors: [(String, [Int], [Double])], dtype: DType = .f32) throws -> SafetensorsFile {
    try SafetensorsFile(bytes: SafetensorsWriter.write(tensors.map { TensorRecord(name: $0.0, dtype: dtype, shape: $0.1, data: dtype.encode($0.2)) }))
}

@Suite struct AdapterValidatorTests {
    @Test func classifiesPEFTNames() {
        #expect(TensorRole(tensorName: "base_model.model.q_proj.lora_A.weight") == .lora(.a, pairKey: "base_model.model.q_proj.lora_B.weight"))
        #expect(TensorRole(tensorName: "base_model.model.q_proj.lora_B.weight") == .lora(.b, pairKey: "base_model.model.q_proj.lora_B.weight"))
        #expect(TensorRole(tensorName: "base_model.model.embed.lora_embedding_A") == .lora(.a, pairKey: "base_model.model.embed.lora_embedding_B"))
        #expect(TensorRole(tensorName: "base_model.model.embed.lora_embedding_B").factor == .b)
        #expect(TensorRole(tensorName: "base_model.model.classifier.weight") == .dense)
        #expect(TensorRole(tensorName: "base_model.model.q_proj.lora_magnitude_vector") == .dense)
        #expect(TensorRole(tensorName: "lora_A.weight.bias") == .dense)
    }

    @Test func acceptsAPairedAdapterAndCountsModules() throws {
        let adapter = try file([
            ("m.q.lora_A.weight", [2, 3], Array(repeating: 0.5, count: 6)), ("m.q.lora_B.weight", [4, 2], Array(repeating: 1, count: 8)),
            ("m.conv.lora_A.weight", [2, 1, 3, 3], Array(repeating: 1, count: 18)), ("m.conv.lora_B.weight", [5, 2, 1, 1], Array(repeating: 1, count: 10)),
            ("m.e.lora_embedding_A", [2, 7], Array(repeating: 1, count: 14)), ("m.e.lora_embedding_B", [3, 2], Array(repeating: 1, count: 6)),
            ("m.head.weight", [2, 2], [1, 2, 3, 4]),
        ])
        #expect(try AdapterValidator.validate(adapter, declaredRank: 2).loraModuleCount == 3)
        #expect(try AdapterValidator.validate(adapter, declaredRank: 2).tensorCount == 7)
    }

    @Test func refusesAWrongRankTagNamingTheTensor() throws {
        let adapter = try file([("m.lora_A.weight", [4, 3], Array(repeating: 0, count: 12)), ("m.lora_B.weight", [2, 4], Array(repeating: 0, count: 8))])
        #expect { try AdapterValidator.validate(adapter, declaredRank: 8) } throws: { error in
            let error = error as? AdapterError
            return error?.code == .rankMismatch && error?.tensor == "m.lora_A.weight"
        }
        let mixed = try file([("m.lora_A.weight", [4, 3], Array(repeating: 0, count: 12)), ("m.lora_B.weight", [2, 2], Array(repeating: 0, count: 4))])
        #expect { try AdapterValidator.validate(mixed, declaredRank: 4) } throws: { ($0 as? AdapterError)?.tensor == "m.lora_B.weight" }
        #expect { try AdapterValidator.validate(adapter, declaredRank: 0) } throws: { ($0 as? AdapterError)?.code == .invalidRank }
        let flat = try file([("m.lora_A.weight", [4], Array(repeating: 0, count: 4)), ("m.lora_B.weight", [2, 4], Array(repeating: 0, count: 8))])
        #expect { try AdapterValidator.validate(flat, declaredRank: 4) } throws: { ($0 as? AdapterError)?.code == .invalidRank }
    }

    @Test func refusesAnAWithoutItsBAndTheReverse() throws {
        let lonelyA = try file([("m.lora_A.weight", [2, 3], Array(repeating: 0, count: 6)), ("n.lora_B.weight", [3, 2], Array(repeating: 0, count: 6))])
        #expect { try AdapterValidator.validate(lonelyA, declaredRank: 2) } throws: { error in
            let error = error as? AdapterError
            return error?.code == .unpairedLoRATensor && error?.tensor == "m.lora_A.weight"
        }
        let onlyDense = try file([("head.weight", [2], [1, 2])])
        #expect { try AdapterValidator.validate(onlyDense, declaredRank: 2) } throws: { ($0 as? AdapterError)?.code == .unpairedLoRATensor }
    }

    @Test(arguments: DType.allCases)
    func refusesNaNAndInfWithTheElementIndex(dtype: DType) throws {
        for bad in [Double.nan, .infinity, -.infinity] {
            var values = Array(repeating: 0.25, count: 6)
            values[5] = bad
            let adapter = try file([("m.lora_A.weight", [2, 3], values), ("m.lora_B.weight", [3, 2], Array(repeating: 1, count: 6))], dtype: dtype)
            #expect { try AdapterValidator.validate(adapter, declaredRank: 2) } throws: { error in
                let error = error as? AdapterError
                return error?.code == .nonFiniteValue && error?.tensor == "m.lora_A.weight" && error?.message.contains("element 5") == true
            }
        }
    }

    @Test func roundShapeCheckIgnoresOnlyTheRankAxis() throws {
        try RoundShapeCheck.check(name: "m.lora_A.weight", shape: [4, 3], against: [16, 3])
        try RoundShapeCheck.check(name: "m.lora_B.weight", shape: [7, 4, 1, 1], against: [7, 16, 1, 1])
        #expect(throws: AdapterError.self) { try RoundShapeCheck.check(name: "m.lora_A.weight", shape: [4, 3], against: [4, 5]) }
        #expect(throws: AdapterError.self) { try RoundShapeCheck.check(name: "m.lora_B.weight", shape: [7, 4], against: [8, 4]) }
        #expect(throws: AdapterError.self) { try RoundShapeCheck.check(name: "head.weight", shape: [4, 3], against: [3, 3]) }
    }
}
