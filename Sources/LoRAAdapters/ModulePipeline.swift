import Dispatch

/// Per-module work of the svd and hetlora strategies, two modules at a time in the engine's order:
/// a module's input is read on the engine's thread (a source is never shared between threads), its
/// computation runs on a worker while the engine reads the next module's input and starts it on a
/// second worker, and writes tensors. Each computation is single-threaded (svd's OpenBLAS on one
/// thread), so results do not depend on this.
final class ModulePipeline<Output> {
    private let pairs: [String: (a: TensorPlan, b: TensorPlan)]
    private let order: [String]
    private let begin: (String, (a: TensorPlan, b: TensorPlan)) throws -> PendingModule<Output>
    private var started: [String: PendingModule<Output>] = [:]
    /// Results of modules whose first tensor is written and second is not.
    private var ready: [String: Output] = [:]

    /// - Parameters:
    ///   - order: the modules in the order the engine writes their tensors.
    ///   - begin: reads a module's input (on the engine's thread) and starts its computation.
    init(
        pairs: [String: (a: TensorPlan, b: TensorPlan)], order: [String],
        begin: @escaping (String, (a: TensorPlan, b: TensorPlan)) throws -> PendingModule<Output>
    ) {
        self.pairs = pairs
        self.order = order
        self.begin = begin
    }

    /// The module's result; for its first tensor, this also starts the next module's computation.
    func result(of module: String) throws -> Output {
        if let result = ready.removeValue(forKey: module) { return result }
        try start(module)
        if let position = order.firstIndex(of: module), position + 1 < order.count { try start(order[position + 1]) }
        let result = try started.removeValue(forKey: module)!.wait()
        ready[module] = result
        return result
    }

    private func start(_ module: String) throws {
        guard started[module] == nil, ready[module] == nil, let pair = pairs[module] else { return }
        started[module] = try begin(module, pair)
    }
}

/// One module's computation, started on a worker with its input moved in (so the worker holds the
/// input's only reference and can work in place), its result awaited by the engine.
final class PendingModule<Output>: @unchecked Sendable {
    // @unchecked: `result` is written once on the worker before `done` is signalled and read
    // only after waiting on it.
    private let done = DispatchSemaphore(value: 0)
    private var result: Result<Output, any Error>?

    init<Input>(_ input: consuming Input, _ work: @escaping @Sendable (consuming Input) throws -> Output) {
        let box = MovedInput(consume input)
        DispatchQueue.global().async { [self] in
            result = Result { try work(box.take()) }
            done.signal()
        }
    }

    func wait() throws -> Output {
        done.wait()
        return try result!.get()
    }
}

/// A module's input on its way to a worker.
private final class MovedInput<Input>: @unchecked Sendable {
    // @unchecked: filled before the worker starts and emptied by it alone.
    private var input: Input?
    init(_ input: consuming Input) { self.input = consume input }
    func take() -> Input {
        defer { input = nil }
        return input.take()!
    }
}
