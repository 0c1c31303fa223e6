import AdapterStore
import Foundation

/// Fires the store's round deadlines (quorum grace periods, round timeouts) when they are due: one
/// sleeping task for the earliest, armed at start-up and whenever a write adds one, and none while
/// nothing is due. The deadlines are rows in the database, so a restart or another process on the
/// same file finds them; a deadline fired elsewhere is simply gone when this one wakes.
actor DeadlineTimer {
    private let store: AdapterStore
    private let metrics: ServiceMetrics
    private var armed: (due: Double, task: Task<Void, Never>)?

    init(store: AdapterStore, metrics: ServiceMetrics) {
        self.store = store
        self.metrics = metrics
    }

    /// Looks at the earliest deadline again and sleeps until it.
    func rearm() async {
        let due: Double?
        do {
            due = try await store.nextDeadline()
        } catch {
            Problem.log("the round deadlines could not be read: \(error); trying again in a second")
            due = Date().timeIntervalSince1970 + 1
        }
        guard let due else {
            armed?.task.cancel()
            armed = nil
            return
        }
        if armed?.due == due { return }
        armed?.task.cancel()
        armed = (
            due,
            Task { [weak self] in
                do { try await Task.sleep(for: .seconds(max(0, due - Date().timeIntervalSince1970))) } catch { return }  // cancelled: re-armed
                await self?.fire()
            }
        )
    }

    private func fire() async {
        armed = nil
        do {
            for reason in try await store.fireDueDeadlines() { metrics.roundSealed(by: reason) }
        } catch {
            Problem.log("firing the due round deadlines failed: \(error)")
        }
        await rearm()
    }
}
