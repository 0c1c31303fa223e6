import AdapterStore
import Foundation
import Testing

@Suite struct IdentifierTests {
    @Test func idsAreOneTo64CharactersFromTheURLSafeSet() {
        for valid in ["a", "fed-1", "client_2.v3", "ABC.xyz_-09", String(repeating: "x", count: 64)] {
            #expect(ClientID(rawValue: valid)?.rawValue == valid, "\(valid)")
        }
        for invalid in ["", String(repeating: "x", count: 65), "a b", "a/b", "é", "a%20", "a+b", "a\u{0}"] {
            #expect(FederationID(rawValue: invalid) == nil, "\(invalid)")
        }
        #expect(ClientKind.name == "client" && FederationKind.name == "federation")
    }

    @Test func roundsAreDecimalDigitsBelowTwoToThe53() {
        #expect(RoundNumber("0")?.rawValue == 0 && RoundNumber("0042")?.rawValue == 42)
        #expect(RoundNumber("9007199254740991")?.rawValue == (1 << 53) - 1)
        for invalid in ["", "9007199254740992", "00000000000000001", "-1", "+1", "1.0", "1e3", " 1", "٣"] {
            #expect(RoundNumber(invalid) == nil, "\(invalid)")
        }
        #expect(RoundNumber(rawValue: -1) == nil && RoundNumber(rawValue: 1 << 53) == nil)
    }

    @Test func idsEncodeAsTheirRawValues() throws {
        struct Body: Encodable {
            let federation: FederationID
            let round: RoundNumber
        }
        let encoder = JSONEncoder()
        encoder.outputFormatting = .sortedKeys
        let json = try encoder.encode(Body(federation: "fed", round: 7))
        #expect(String(decoding: json, as: UTF8.self) == #"{"federation":"fed","round":7}"#)
    }
}
