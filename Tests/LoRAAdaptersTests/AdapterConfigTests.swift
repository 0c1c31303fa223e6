import LoRAAdapters
import Testing

@Suite struct AdapterConfigTests {
    private func config(_ json: String) throws -> AdapterConfig { try AdapterConfig(json: Array(json.utf8)) }

    @Test func scalesAreLoraAlphaOverROrOverRootR() throws {
        let plain = try config(#"{"peft_type":"LORA","r":16,"lora_alpha":32,"target_modules":["q_proj"]}"#)
        #expect(plain.scale(ofModule: "model.layers.0.self_attn.q_proj") == 2)
        let rs = try config(#"{"r":16,"lora_alpha":32,"use_rslora":true}"#)
        #expect(rs.scale(ofModule: "anything") == 8)
        #expect(try config(#"{"r":4,"lora_alpha":4}"#).isUnscaled)
        #expect(try config(#"{"r":16}"#).scale(ofModule: "q") == 0.5, "PEFT's default lora_alpha is 8, not r")
        #expect(try !config(#"{"r":4,"lora_alpha":8}"#).isUnscaled)
    }

    @Test func patternsMatchAsPEFTDoesAndTheFirstMatchingKeyWins() throws {
        let resolved = try config(#"{"r":8,"lora_alpha":16,"rank_pattern":{"q_proj":4,"layers\\.1\\..*":2},"alpha_pattern":{"v_proj":64}}"#)
        #expect(resolved.rank(ofModule: "model.layers.0.self_attn.q_proj") == 4)
        #expect(resolved.rank(ofModule: "model.layers.1.self_attn.q_proj") == 4, "q_proj comes first in the object")
        #expect(resolved.rank(ofModule: "model.layers.1.mlp.up_proj") == 2)
        #expect(resolved.rank(ofModule: "model.layers.0.self_attn.k_proj") == 8)
        #expect(resolved.rank(ofModule: "model.layers.0.self_attn.xq_proj") == 8, "a key matches whole dotted components only")
        #expect(resolved.alpha(ofModule: "model.layers.3.self_attn.v_proj") == 64)
        #expect(resolved.scale(ofModule: "model.layers.3.self_attn.v_proj") == 8)
        #expect(resolved.patternKeysMatchingNone(of: ["model.layers.0.self_attn.q_proj"]) == ["layers\\.1\\..*", "v_proj"])
    }

    @Test(arguments: [
        (#"[1]"#, AdapterError.Code.malformedConfig),
        (#"{"r":4,"r":8}"#, .malformedConfig),
        (#"{"r":4"#, .malformedConfig),
        (#"{"lora_alpha":8}"#, .invalidConfig),
        (#"{"r":0}"#, .invalidConfig),
        (#"{"r":2.5}"#, .invalidConfig),
        (#"{"r":4,"lora_alpha":-1}"#, .invalidConfig),
        (#"{"r":4,"lora_alpha":"16"}"#, .invalidConfig),
        (#"{"r":4,"use_rslora":"yes"}"#, .invalidConfig),
        (#"{"r":4,"rank_pattern":{"q":0}}"#, .invalidConfig),
        (#"{"r":4,"rank_pattern":[1]}"#, .invalidConfig),
        (#"{"r":4,"alpha_pattern":{"q":"x"}}"#, .invalidConfig),
        (#"{"r":4,"rank_pattern":{"(":2}}"#, .invalidConfig),
        (#"{"r":4,"peft_type":"IA3"}"#, .invalidConfig),
        (#"{"r":4,"rank_pattern":{""# + String(repeating: "a", count: 257) + #"":2}}"#, .invalidConfig),
    ])
    func badConfigsAreRefusedNamingTheProblem(json: String, code: AdapterError.Code) {
        #expect { try config(json) } throws: { ($0 as? AdapterError)?.code == code }
    }

    @Test func errorsNameTheField() {
        #expect { try config(#"{"r":4,"alpha_pattern":{"v_proj":0}}"#) } throws: { error in
            (error as? AdapterError)?.message.contains(#"alpha_pattern["v_proj"]"#) == true
        }
    }
}
