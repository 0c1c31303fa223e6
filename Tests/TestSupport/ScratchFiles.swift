import Foundation

/// Where tests put their files (SQLite databases with their WAL, token files, upload bodies): one
/// directory per test process, removed when the process exits, so test runs do not pile files up in
/// the temporary directory (a week of runs here had left 1,246 databases, 1.1 GB).
public enum ScratchFiles {
    /// A new path in the directory, nothing created at it yet: `prefix`, a UUID, then `suffix`.
    public static func path(_ prefix: String, suffix: String = "") -> String { url(prefix, suffix: suffix).path }

    public static func url(_ prefix: String, suffix: String = "") -> URL {
        directory.appendingPathComponent("\(prefix)-\(UUID().uuidString)\(suffix)")
    }

    private static let directory: URL = {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("lora-aggregator-tests-\(UUID().uuidString)")
        do {
            try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        } catch {
            fatalError("cannot create the tests' scratch directory \(directory.path): \(error)")
        }
        atexit { try? FileManager.default.removeItem(at: ScratchFiles.directory) }
        return directory
    }()
}
