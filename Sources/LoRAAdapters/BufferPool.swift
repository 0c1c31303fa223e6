import Synchronization

/// Buffers reused across one aggregation's modules, from any thread: a fresh large buffer costs a
/// page fault per 4 KiB and a clearing, more than the arithmetic done in it.
final class BufferPool: Sendable {
    private let free = Mutex<[Buffer]>([])

    /// A buffer of at least `byteCount` bytes, 64-byte aligned, uninitialized or as its last user
    /// left it. Give it back whole with `recycle`.
    func take(byteCount: Int) -> UnsafeMutableRawBufferPointer {
        let byteCount = max(8, (byteCount + 7) & ~7)
        let reused = free.withLock { free -> Buffer? in
            guard let index = free.indices.filter({ free[$0].memory.count >= byteCount }).min(by: { free[$0].memory.count < free[$1].memory.count })
            else { return nil }
            return free.remove(at: index)
        }
        return reused?.memory ?? .allocate(byteCount: byteCount, alignment: 64)
    }

    /// A buffer of at least `count` Float64 elements, as `take(byteCount:)`.
    func take(_ count: Int) -> UnsafeMutableBufferPointer<Double> {
        take(byteCount: count * MemoryLayout<Double>.stride).bindMemory(to: Double.self)
    }

    /// Takes back a buffer `take` gave.
    func recycle(_ buffer: UnsafeMutableRawBufferPointer) {
        free.withLock { $0.append(Buffer(memory: buffer)) }
    }

    func recycle(_ buffer: UnsafeMutableBufferPointer<Double>) {
        recycle(UnsafeMutableRawBufferPointer(buffer))
    }

    deinit {
        free.withLock { buffers in
            for buffer in buffers { buffer.memory.deallocate() }
        }
    }

    /// A pooled buffer; unchecked: only ever in one thread's hands at a time.
    private struct Buffer: @unchecked Sendable {
        let memory: UnsafeMutableRawBufferPointer
    }
}
