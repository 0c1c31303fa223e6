import AdapterStore
import Foundation

/// Fires the store's round deadlines (quorum grace periods, round timeouts) when they are due: one
/// sleeping task for the earliest, armed at start-up and whenever a write adds one. The deadlines
/// are rows in the database, so a restart or another process on the same database finds them; a
/// deadline fired elsewhere is simply gone when this one wakes. Deadlines another process set are
/// seen by looking again every `pollSeconds`, so they fire even if that process died.
actor DeadlineTimer {
    private let store: AdapterStore
    private let metrics: ServiceMetrics
    private var armed: Task<Void, Never>?
    /// Calls to `rearm` so far, and the latest whose reading was applied: a reading that finishes
    /// after a later one started is older than it, so it is dropped.
    private var requested = 0
    private var applied = 0

    init(store: AdapterStore, metrics: ServiceMetrics) {
        self.store = store
        self.metrics = metrics
    }

    /// Looks at the earliest deadline again and sleeps until it, or for `pollSeconds` at most.
    func rearm() async {
        requested += 1
        let request = requested
        let due: Double?
        do {
            due = try await store.nextDeadline()
        } catch {
            Problem.log("the round deadlines could not be read: \(error); trying again in a second")
            due = Date().timeIntervalSince1970 + 1
        }
        guard request > applied else { return }
        applied = request
        let wake = min(due ?? .infinity, Date().timeIntervalSince1970 + Self.pollSeconds)
        armed?.cancel()
        armed = Task { [weak self] in
            do { try await Task.sleep(for: .seconds(max(0, wake - Date().timeIntervalSince1970))) } catch { return }  // cancelled: re-armed
            await self?.fire()
        }
    }

    static let pollSeconds = 5.0

    private func fire() async {
        armed = nil
        do {
            for reason in try await store.fireDueDeadlines() { metrics.roundSealed(by: reason) }
        } catch {
            Problem.log("firing the due round deadlines failed: \(error); trying again in a second")
            try? await Task.sleep(for: .seconds(1))
        }
        await rearm()
    }
}
