/// Polls `condition` every 10 ms until it holds, for up to 30 s; returns whether it did. For what a
/// store or server does just after answering (a write on its own queue).
@discardableResult
public func eventually(_ condition: () async throws -> Bool) async throws -> Bool {
    let deadline = ContinuousClock.now + .seconds(30)
    while ContinuousClock.now < deadline {
        if try await condition() { return true }
        try await Task.sleep(for: .milliseconds(10))
    }
    return false
}
