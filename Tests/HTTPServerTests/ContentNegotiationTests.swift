import HTTPServer
import Testing

extension HTTPServerTests {
    @Suite struct ContentNegotiationTests {
        private func accept(_ fields: String...) -> AcceptEncoding {
            var headers = HTTPHeaders()
            for field in fields { headers.add("Accept-Encoding", field) }
            return AcceptEncoding(headers)
        }

        @Test func parsesCodingsWithWeightsAcrossFields() {
            #expect(
                accept("gzip;q=0.5, Deflate ; Q=0", "x-gzip", "br;level=3;q=0.25").codings == [
                    .init(name: "gzip", quality: 0.5), .init(name: "deflate", quality: 0),
                    .init(name: "gzip", quality: 1), .init(name: "br", quality: 0.25),
                ])
            #expect(accept("zstd;q=high").codings == [.init(name: "zstd", quality: 1)], "an unreadable weight counts as none given")
            #expect(AcceptEncoding(HTTPHeaders()).codings == nil)
            #expect(accept("").codings == [])
        }

        @Test func qualityFollowsOwnEntryThenStarThenIdentityDefault() {
            let listed = accept("gzip;q=0.5, deflate;q=0")
            #expect(listed.quality(of: "gzip") == 0.5 && listed.quality(of: "GZIP") == 0.5)
            #expect(listed.quality(of: "deflate") == 0, "q=0 means not acceptable")
            #expect(listed.quality(of: "br") == 0 && listed.quality(of: "identity") == 1, "identity is acceptable unless refused")
            let star = accept("*;q=0.25, gzip")
            #expect(star.quality(of: "br") == 0.25 && star.quality(of: "identity") == 0.25 && star.quality(of: "gzip") == 1)
            #expect(accept("*;q=0").quality(of: "identity") == 0 && accept("*;q=0, identity").quality(of: "identity") == 1)
            #expect(accept("identity;q=0").quality(of: "identity") == 0)
            #expect(accept("").quality(of: "identity") == 1 && accept("").quality(of: "gzip") == 0, "an empty field asks for no coding")
            #expect(AcceptEncoding(HTTPHeaders()).quality(of: "gzip") == 1, "without the field, anything goes")
        }

        @Test func preferredIsTheHeaviestAcceptableWithTheServersOrderBreakingTies() {
            let server = ["gzip", "deflate", "identity"]
            #expect(accept("deflate, gzip").preferred(among: server) == "gzip")
            #expect(accept("gzip;q=0.5, deflate").preferred(among: server) == "deflate")
            #expect(accept("gzip;q=0.5").preferred(among: server) == "identity")
            #expect(accept("br").preferred(among: server) == "identity")
            #expect(accept("*").preferred(among: server) == "gzip")
            #expect(accept("gzip;q=0, identity;q=0").preferred(among: server) == nil)
            #expect(accept("*;q=0").preferred(among: server) == nil)
            #expect(AcceptEncoding(HTTPHeaders()).preferred(among: server) == "gzip")
        }

        @Test func namesIsOnlyAnExplicitAcceptableEntry() {
            #expect(accept("gzip").names("gzip") && accept("x-gzip;q=0.1").names("gzip"))
            #expect(!accept("gzip;q=0").names("gzip") && !accept("*").names("gzip") && !AcceptEncoding(HTTPHeaders()).names("gzip"))
        }
    }
}
