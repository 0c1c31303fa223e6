#if canImport(Glibc)
    import Glibc
#endif

/// The bytes a connection has queued for its socket, in order, and the callbacks waiting for them
/// to be written. A partial `writev` leaves the rest queued at the right offset. No sockets here:
/// the connection hands it what the kernel took.
struct WriteQueue {
    private var buffers: [[UInt8]] = []
    /// How much of `buffers[0]` is already written.
    private var offset = 0
    private var completions: [(Bool) -> Void] = []

    var isEmpty: Bool { buffers.isEmpty }

    /// Queues `pieces` (empty ones are dropped); `completion` runs once everything queued so far is
    /// written (true) or the connection closed first (false).
    mutating func append(_ pieces: [[UInt8]], then completion: ((Bool) -> Void)?) {
        buffers.append(contentsOf: pieces.filter { !$0.isEmpty })
        if let completion { completions.append(completion) }
    }

    /// Calls `write` with iovecs over the first (at most 64) unwritten buffers; returns its result.
    func withIOVectors<Result>(_ write: (UnsafeBufferPointer<iovec>) -> Result) -> Result {
        let window = buffers.prefix(64)
        var vectors: [iovec] = []
        vectors.reserveCapacity(window.count)
        func gather(_ index: Int) -> Result {
            guard index < window.endIndex else { return vectors.withUnsafeBufferPointer(write) }
            return window[index].withUnsafeBytes { raw in
                let skip = index == window.startIndex ? offset : 0
                vectors.append(iovec(iov_base: UnsafeMutableRawPointer(mutating: raw.baseAddress! + skip), iov_len: raw.count - skip))
                return gather(index + 1)
            }
        }
        return gather(window.startIndex)
    }

    /// Drops the `count` bytes the kernel took from the front of the queue.
    mutating func consume(_ count: Int) {
        var remaining = count
        while remaining > 0 {
            let available = buffers[0].count - offset
            if remaining >= available {
                remaining -= available
                buffers.removeFirst()
                offset = 0
            } else {
                offset += remaining
                remaining = 0
            }
        }
    }

    /// The callbacks whose bytes are all written, to be told true: every one once the queue is
    /// empty, none before.
    mutating func takeCompletions() -> [(Bool) -> Void] {
        guard buffers.isEmpty else { return [] }
        defer { completions.removeAll() }
        return completions
    }

    /// Forgets the unwritten bytes; returns the callbacks, which must be told false.
    mutating func abandon() -> [(Bool) -> Void] {
        buffers.removeAll()
        offset = 0
        defer { completions.removeAll() }
        return completions
    }
}
