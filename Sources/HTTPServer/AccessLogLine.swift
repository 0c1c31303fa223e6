/// The access log's line format: `METHOD PATH STATUS BYTES MILLISECONDS`. Method and path come from
/// a parsed head, which admits only visible ASCII, so a line can never be split or forged; anything
/// else is escaped anyway as `\xNN`.
enum AccessLogLine {
    static func format(method: String, path: Substring, status: Int, bytes: Int, milliseconds: Double) -> String {
        let rounded = (milliseconds * 1000).rounded() / 1000
        return "\(escaped(method[...])) \(escaped(path)) \(status) \(bytes) \(rounded)ms"
    }

    static func escaped(_ text: Substring) -> String {
        guard text.utf8.contains(where: { $0 <= 0x20 || $0 >= 0x7F || $0 == UInt8(ascii: "\\") }) else { return String(text) }
        var result = ""
        for byte in text.utf8 {
            if byte <= 0x20 || byte >= 0x7F || byte == UInt8(ascii: "\\") {
                let hex = String(byte, radix: 16)
                result += "\\x" + (hex.count == 1 ? "0" + hex : hex)
            } else {
                result.unicodeScalars.append(Unicode.Scalar(byte))
            }
        }
        return result
    }
}
