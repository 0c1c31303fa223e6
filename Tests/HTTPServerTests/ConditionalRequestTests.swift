import HTTPServer
import Testing

extension HTTPServerTests {
    @Suite struct ConditionalRequestTests {
        @Test func entityTagsParseAndPrintWithTheirWeakness() {
            #expect(EntityTag(parsing: #""abc""#) == EntityTag("abc"))
            #expect(EntityTag(parsing: #"W/"abc""#) == EntityTag("abc", weak: true))
            #expect(EntityTag(parsing: #""a,b""#)?.opaqueTag == "a,b")
            #expect(EntityTag(parsing: #""""#) == EntityTag(""))
            for malformed in ["abc", #""abc"#, #"w/"abc""#, #"W/abc"#, #"""#, #""a"b""#, ""] {
                #expect(EntityTag(parsing: malformed) == nil, "\(malformed)")
            }
            #expect(EntityTag("abc").description == #""abc""#)
            #expect(EntityTag("abc", weak: true).description == #"W/"abc""#)
        }

        /// RFC 9110 §8.8.3.2's table.
        @Test func strongAndWeakComparison() {
            let weak1 = EntityTag("1", weak: true)
            let weak2 = EntityTag("2", weak: true)
            let strong1 = EntityTag("1")
            #expect(!weak1.strongMatches(weak1) && weak1.weakMatches(weak1))
            #expect(!weak1.strongMatches(weak2) && !weak1.weakMatches(weak2))
            #expect(!weak1.strongMatches(strong1) && weak1.weakMatches(strong1))
            #expect(strong1.strongMatches(strong1) && strong1.weakMatches(strong1))
        }

        @Test func ifNoneMatchListsCombineAcrossFieldsAndCompareWeakly() {
            let etag = EntityTag("d41d8c")
            func matches(_ fields: [String]) -> Bool {
                var headers = HTTPHeaders()
                for field in fields { headers.add("If-None-Match", field) }
                return IfNoneMatch(headers).matches(etag)
            }
            #expect(IfNoneMatch(HTTPHeaders()) == .absent && !matches([]))
            #expect(matches([#""d41d8c""#]))
            #expect(matches([#"W/"d41d8c""#]), "If-None-Match uses the weak comparison")
            #expect(matches([#""other", "d41d8c""#]) && matches([#" "other" ,W/"d41d8c"  "#]))
            #expect(matches([#""other""#, #""d41d8c""#]), "a second field continues the list")
            #expect(matches(["*"]) && IfNoneMatch(["If-None-Match": "*"]) == .any)
            #expect(!matches([#""other""#]) && !matches([#""d41d8c-gzip""#]) && !matches(["d41d8c"]) && !matches([""]))
            #expect(IfNoneMatch(["If-None-Match": #""a,b", junk, W/"c""#]) == .tags([EntityTag("a,b"), EntityTag("c", weak: true)]))
        }
    }
}
