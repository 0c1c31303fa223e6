import Testing

@testable import HTTPServer

/// The streaming multipart/form-data reader (RFC 7578), fed in every possible split.
extension HTTPServerTests {
    @Suite struct MultipartFormDataTests {
        private static let contentType = "multipart/form-data; boundary=XyZ"
        private static let limits = MultipartLimits(maxPartBytes: ["adapter_model.safetensors": 1000, "adapter_config.json": 100])

        private static func body(_ parts: [(headers: String, body: String)], preamble: String = "", epilogue: String = "") -> [UInt8] {
            var text = preamble
            for part in parts { text += (text.isEmpty ? "" : "\r\n") + "--XyZ\r\n" + part.headers + "\r\n\r\n" + part.body }
            return Array((text + "\r\n--XyZ--" + epilogue).utf8)
        }

        private static let wellFormed = body(
            [
                (
                    "Content-Disposition: form-data; name=\"adapter_model.safetensors\"; filename=\"adapter_model.safetensors\"\r\nContent-Type: application/octet-stream",
                    "\u{0}\u{1}--XyZ is not a delimiter without CRLF\r\n-"
                ),
                ("content-disposition: form-data; name=adapter_config.json", #"{"r":8}"#),
            ], preamble: "ignored preamble", epilogue: "\r\nignored epilogue")

        private func read(_ chunks: [[UInt8]], contentType: String = contentType, limits: MultipartLimits = limits) throws(HTTPServerError) -> [MultipartPart] {
            var reader = try MultipartFormDataReader(contentType: contentType, limits: limits)
            for chunk in chunks { try reader.append(chunk) }
            return try reader.finish()
        }

        @Test func partsComeOutWholeHoweverTheBodyIsSplit() throws {
            let bytes = Self.wellFormed
            for split in 0...bytes.count {
                for second in stride(from: split, through: bytes.count, by: 7) {
                    let parts = try read([Array(bytes[..<split]), Array(bytes[split..<second]), Array(bytes[second...])])
                    #expect(parts.map(\.name) == ["adapter_model.safetensors", "adapter_config.json"])
                    #expect(parts[0].body == Array("\u{0}\u{1}--XyZ is not a delimiter without CRLF\r\n-".utf8))
                    #expect(parts[0].filename == "adapter_model.safetensors" && parts[0].contentType == "application/octet-stream")
                    #expect(String(decoding: parts[1].body, as: UTF8.self) == #"{"r":8}"#)
                }
            }
        }

        @Test func aLargePartFullOfDelimiterPrefixesSurvivesRandomChunks() throws {
            // Bytes from the delimiter's own alphabet put its prefixes at every chunk junction.
            var generator = SystemRandomNumberGenerator()
            let alphabet = Array("\r\n-XyZa".utf8)
            for _ in 0..<50 {
                var content = (0..<4000).map { _ in alphabet.randomElement(using: &generator)! }
                while let range = content.firstRange(of: Array("\r\n--XyZ".utf8)) { content[range.lowerBound] = UInt8(ascii: "a") }
                let bytes =
                    Array("--XyZ\r\nContent-Disposition: form-data; name=\"adapter_model.safetensors\"\r\n\r\n".utf8) + content + Array("\r\n--XyZ--".utf8)
                var chunks: [[UInt8]] = []
                var offset = 0
                while offset < bytes.count {
                    let end = min(bytes.count, offset + Int.random(in: 1...300, using: &generator))
                    chunks.append(Array(bytes[offset..<end]))
                    offset = end
                }
                let parts = try read(chunks, limits: MultipartLimits(maxPartBytes: ["adapter_model.safetensors": 4000]))
                #expect(parts.count == 1 && parts[0].body == content)
            }
        }

        @Test func theBoundaryParameterIsReadStrictly() {
            #expect(MultipartFormDataReader.boundary(in: "multipart/form-data; boundary=\"a b:c\"") == "a b:c")
            #expect(MultipartFormDataReader.boundary(in: "Multipart/Form-Data;charset=x; BOUNDARY=abc") == "abc")
            #expect(MultipartFormDataReader.boundary(in: "multipart/mixed; boundary=abc") == nil)
            #expect(MultipartFormDataReader.boundary(in: "multipart/form-data") == nil)
            #expect(MultipartFormDataReader.boundary(in: "multipart/form-data; boundary=" + String(repeating: "a", count: 71)) == nil)
            #expect(MultipartFormDataReader.boundary(in: "multipart/form-data; boundary=a{b") == nil)
        }

        @Test(arguments: [
            ("no close delimiter", Array("--XyZ\r\nContent-Disposition: form-data; name=\"adapter_config.json\"\r\n\r\n{}".utf8), "close delimiter"),
            ("no delimiter at all", Array(String(repeating: "x", count: 10_000).utf8), "no multipart boundary"),
            ("no Content-Disposition", body([("Content-Type: text/plain", "x")]), "no Content-Disposition"),
            ("not form-data", body([("Content-Disposition: attachment; name=\"adapter_config.json\"", "x")]), "form-data with a name"),
            ("no name", body([("Content-Disposition: form-data; filename=\"a\"", "x")]), "form-data with a name"),
            ("an unexpected part", body([("Content-Disposition: form-data; name=\"other\"", "x")]), "unexpected multipart part \"other\""),
            (
                "a repeated part",
                body([
                    ("Content-Disposition: form-data; name=\"adapter_config.json\"", "{}"),
                    ("Content-Disposition: form-data; name=\"adapter_config.json\"", "{}"),
                ]), "appears twice"
            ),
            (
                "headers over their limit",
                body([("Content-Disposition: form-data; name=\"adapter_config.json\"\r\nX: " + String(repeating: "x", count: 9000), "{}")]), "headers exceed"
            ),
            ("a malformed header line", body([("Content-Disposition: form-data; name=\"adapter_config.json\"\r\nno colon", "{}")]), "malformed header line"),
            ("garbage after a delimiter", Array("--XyZ junk\r\n".utf8), "not followed by CRLF"),
            ("endless padding after a delimiter", Array("--XyZ".utf8) + Array(repeating: 0x20, count: 300), "delimiter line is malformed"),
        ])
        func malformedBodiesAreRefusedSayingWhy(description: String, bytes: [UInt8], reason: String) {
            #expect(
                performing: { _ = try read([bytes]) },
                throws: { error in
                    guard let error = error as? HTTPServerError else { return false }
                    return error.status == .badRequest && error.message.contains(reason)
                })
        }

        @Test func aPartOverItsLimitIsContentTooLarge() {
            let bytes = Self.body([("Content-Disposition: form-data; name=\"adapter_config.json\"", String(repeating: "x", count: 101))])
            #expect(
                performing: { _ = try read([bytes]) },
                throws: { error in
                    guard let error = error as? HTTPServerError else { return false }
                    return error.status == .contentTooLarge && error.message.contains("\"adapter_config.json\" exceeds 100 bytes")
                })
        }

        @Test func morePartsThanAllowedAreRefused() {
            var limits = Self.limits
            limits.maxParts = 1
            let bytes = Self.body([
                ("Content-Disposition: form-data; name=\"adapter_config.json\"", "{}"),
                ("Content-Disposition: form-data; name=\"adapter_model.safetensors\"", "x"),
            ])
            #expect(performing: { _ = try read([bytes], limits: limits) }, throws: { ($0 as? HTTPServerError)?.message.contains("more than 1 parts") == true })
        }
    }
}
