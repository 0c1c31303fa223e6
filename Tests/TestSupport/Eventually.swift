/// Polls `condition` every 10 ms until it holds, for up to 30 s; returns whether it did. For what a
/// store or server does just after answering (a write on its own queue). The deadline only ends a
/// wait that will never succeed; on a busy machine a slow success still succeeds.
public func eventually(_ condition: () async throws -> Bool) async throws -> Bool {
    let deadline = ContinuousClock.now + .seconds(30)
    while ContinuousClock.now < deadline {
        if try await condition() { return true }
        try await Task.sleep(for: .milliseconds(10))
    }
    return false
}
