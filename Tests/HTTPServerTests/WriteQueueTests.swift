import Testing

@testable import HTTPServer

#if canImport(Glibc)
    import Glibc
#endif

/// The connection's queue of unwritten bytes, fed what a partial `writev` took.
extension HTTPServerTests {
    @Suite struct WriteQueueTests {
        /// The bytes the queue would hand to `writev` next.
        private func pending(_ queue: WriteQueue) -> [UInt8] {
            queue.withIOVectors { vectors in
                vectors.flatMap { Array(UnsafeRawBufferPointer(start: $0.iov_base, count: $0.iov_len)) }
            }
        }

        @Test func partialWritesResumeAtTheRightByte() {
            var queue = WriteQueue()
            queue.append([[1, 2, 3], [], [4, 5], [6]], then: nil)
            #expect(pending(queue) == [1, 2, 3, 4, 5, 6])
            queue.consume(2)
            #expect(pending(queue) == [3, 4, 5, 6])
            queue.consume(2)
            #expect(pending(queue) == [5, 6])
            queue.consume(2)
            #expect(queue.isEmpty)
        }

        @Test func completionsWaitForEverythingQueuedBeforeThem() {
            var queue = WriteQueue()
            var told: [String] = []
            queue.append([[1, 2]], then: { told.append("first \($0)") })
            queue.append([[3]], then: { told.append("second \($0)") })
            queue.consume(2)
            #expect(queue.takeCompletions().isEmpty, "byte 3 is still queued")
            queue.consume(1)
            for completion in queue.takeCompletions() { completion(true) }
            #expect(told == ["first true", "second true"])
            #expect(queue.takeCompletions().isEmpty, "each completion runs once")
        }

        @Test func abandoningTellsEveryWaiterAndForgetsTheBytes() {
            var queue = WriteQueue()
            var told: [Bool] = []
            queue.append([[1, 2, 3]], then: { told.append($0) })
            queue.consume(1)
            for completion in queue.abandon() { completion(false) }
            #expect(told == [false] && queue.isEmpty)
            queue.append([[9]], then: nil)
            #expect(pending(queue) == [9], "no stale offset after abandoning")
        }

        @Test func oneWritevTakesAtMost64Buffers() {
            var queue = WriteQueue()
            queue.append((0..<100).map { [UInt8($0)] }, then: nil)
            #expect(queue.withIOVectors { $0.count } == 64)
            queue.consume(64)
            #expect(pending(queue) == (64..<100).map { UInt8($0) })
        }
    }
}
