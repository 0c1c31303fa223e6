import CLinux
import Foundation
import Synchronization

/// The aggregation engine: the aggregation semantics of openapi.yaml's description, streamed tensor by tensor.
///
/// For each tensor name (in name order), block by block of its output elements, it reads every
/// holder's part of the block in ascending client-id order, accumulates `w·x` in Float64 into the
/// block of one reusable buffer while it is in cache, divides each rank slice by its strategy's
/// denominator, and rounds straight into the preallocated output file; a large tensor's two halves
/// go to two cores, small tensors side by side in groups. Memory is the output file plus one Float64
/// tensor (or group) and a block of scratch per core, whatever the number of clients.
public enum AdapterAggregator {
    /// The version of the bytes `aggregate` produces with `strategy` for given inputs and options,
    /// in this process. Bump a strategy's with any change to its bytes (summation, rounding, layout,
    /// metadata): digests recorded for an older version are then no longer trusted to describe what
    /// this one computes. For svd it also holds the LAPACK build and the CPU kernels it runs, so that
    /// servers on different CPUs never give one tag (or one digest record) to different bytes; every
    /// other strategy's arithmetic is the engine's own, the same on every CPU. Never negative.
    public static func outputVersion(of strategy: AggregationStrategy) -> Int64 {
        switch strategy {
        case .replication, .zeroPadding: 1
        // 2: the norms from the engine's own Gram kernels (their last bits changed).
        case .hetlora: 2
        case .svd: svdOutputVersion
        }
    }

    /// Version 2 of svd's bytes (2: q applied by its reflectors, not formed) with this process's
    /// LAPACK, as a stable hash (FNV-1a): the same in every process.
    private static let svdOutputVersion = Int64(
        "svd 2 \(LinearAlgebra.implementation)".utf8.reduce(0xcbf2_9ce4_8422_2325 as UInt64) { ($0 ^ UInt64($1)) &* 0x100_0000_01b3 } >> 1)

    /// - Parameter observer: sees each region of the output as soon as it is final (to hash it on
    ///   another core meanwhile, say).
    public static func aggregate(
        _ source: some AdapterSource, options: AggregationOptions = .init(), observer: (any AggregationOutputObserver)? = nil
    ) throws -> AggregatedAdapter {
        let base = try source.baseTensors()
        let participants = try checkedParticipants(try source.participants(), hasBase: !base.isEmpty)
        let holdings = try source.holdings()
        let ranks = ModuleRanks(participants: Array(participants.values), base: base)
        let modules = Set(Set(holdings.map(\.name)).compactMap { TensorRole.moduleName(ofTensor: $0) }).union(ranks.baseModules)
        // Uploads and bases are validated to hold a LoRA module, so a round without one is not a round.
        guard let globalRank = modules.map({ ranks.globalRank(ofModule: $0) }).max() else {
            throw AdapterError(.emptyRound, "the round holds no LoRA module")
        }
        var rankLimit: Int?
        if case .client = options.scaling {
        } else {
            let rank = options.rank ?? globalRank
            guard (1...globalRank).contains(rank) else {
                throw AdapterError(.rankOutOfRange, "rank \(rank) is outside 1...\(globalRank), the largest rank in the round")
            }
            rankLimit = rank
        }

        let plans = try TensorPlan.plans(
            for: holdings, base: base, participants: participants, ranks: ranks, rankLimit: rankLimit, scaling: options.scaling, strategy: options.strategy)
        let pairs = try modulePairs(plans)
        let rank = plans.filter(\.isLoRA).map(\.outputRank).max() ?? rankLimit ?? globalRank
        var metadata = options.metadata
        metadata["format"] = "pt"
        metadata["strategy"] = options.strategy.rawValue
        metadata["rank"] = String(rank)
        metadata["clients"] = String(participants.count)
        // Weights change no shape, so the layout is known before any factor is read.
        let layout = try SafetensorsLayout(tensors: plans.map { ($0.name, options.dtype, $0.outputShape) }, metadata: metadata)
        observer?.outputWillBegin(byteCount: layout.fileSize)

        let accumulator = UnsafeMutableBufferPointer<Double>.allocate(capacity: max(smallGroupElements, plans.map(\.outputElementCount).max() ?? 1))
        defer { accumulator.deallocate() }
        let scratch = UnsafeMutableRawPointer.allocate(byteCount: 2 * scratchBytes, alignment: 64)
        defer { scratch.deallocate() }
        var moduleOrder: [String] = []
        for plan in plans { if let module = plan.module, moduleOrder.last != module, !moduleOrder.contains(module) { moduleOrder.append(module) } }
        let kernels = options.kernels
        defer {
            // svd's and hetlora's per-module buffers, freed by now, stay in malloc's arenas (glibc
            // keeps large freed chunks for reuse); give them back, so they do not add to the output's.
            if options.strategy.worksPerModule { clinux_release_free_memory() }
        }
        let output = try layout.makeFile { base in
            // Even when aggregation fails half-way, the observer is done with the buffer before it goes.
            defer { observer?.outputComplete() }
            // Inside: the pipelines and their pooled buffers are gone before the memory goes back.
            let factorPipeline = ModulePipeline<LowRankFactors>(pairs: pairs, order: moduleOrder) { module, pair in
                let rank = ranks.globalRank(ofModule: module)
                return PendingModule(try LowRankFactors.stacks(a: pair.a, b: pair.b, from: source)) { try LowRankFactors($0, rank: rank) }
            }
            let pool = BufferPool()
            let normPipeline = ModulePipeline<NormWeightedModule>(pairs: pairs, order: moduleOrder) { _, pair in
                PendingModule(try NormWeightedModule.Input(a: pair.a, b: pair.b, from: source, pool: pool)) { NormWeightedModule($0, kernels: kernels) }
            }
            adviseHugePages(base, byteCount: layout.fileSize)
            observer?.regionFinished(UnsafeRawBufferPointer(start: base, count: layout.headerBytes.count))
            var index = 0
            while index < plans.count {
                let plan = plans[index]
                let sums = UnsafeMutableBufferPointer(rebasing: accumulator[0..<plan.outputElementCount])
                let destination = base + layout.tensors[index].byteRange.lowerBound
                var done = index + 1
                switch (options.strategy, plan.module, plan.factor) {
                case (.svd, let module?, _):
                    try factorPipeline.result(of: module).fill(plan, into: sums)
                    plan.writeMeans(of: sums, as: options.dtype, to: destination, kernels: kernels)
                case (.hetlora, let module?, let factor?):
                    let weighted = try normPipeline.result(of: module)
                    if !weighted.writeMeans(of: factor, as: options.dtype, to: destination, kernels: kernels) {
                        let fallback = factor == .a ? weighted.a : weighted.b
                        try aggregate(fallback, from: source, into: sums, writingTo: destination, dtype: options.dtype, kernels: kernels, scratch: scratch)
                    }
                default:
                    done = smallGroupEnd(plans, from: index, strategy: options.strategy)
                    if done - index > 1 {
                        let group = Array(zip(plans[index..<done], layout.tensors[index..<done].map { base + $0.byteRange.lowerBound }))
                        try aggregate(small: group, from: source, into: accumulator, dtype: options.dtype, kernels: kernels, scratch: scratch)
                    } else {
                        try aggregate(plan, from: source, into: sums, writingTo: destination, dtype: options.dtype, kernels: kernels, scratch: scratch)
                    }
                }
                for info in layout.tensors[index..<done] {
                    observer?.regionFinished(UnsafeRawBufferPointer(start: base + info.byteRange.lowerBound, count: info.byteRange.count))
                }
                index = done
            }
        }
        return AggregatedAdapter(bytes: output, rank: rank, globalRank: globalRank, clientCount: participants.count)
    }

    /// Each LoRA module's A and B plans.
    private static func modulePairs(_ plans: [TensorPlan]) throws(AdapterError) -> [String: (a: TensorPlan, b: TensorPlan)] {
        var a: [String: TensorPlan] = [:]
        var b: [String: TensorPlan] = [:]
        for plan in plans {
            guard let module = plan.module else { continue }
            if plan.factor == .a { a[module] = plan } else { b[module] = plan }
        }
        var pairs: [String: (a: TensorPlan, b: TensorPlan)] = [:]
        for (module, aPlan) in a {
            guard let bPlan = b[module] else { throw AdapterError(.unpairedLoRATensor, "the module has an A tensor but no B tensor", tensor: aPlan.name) }
            pairs[module] = (aPlan, bPlan)
        }
        if let unpaired = b.first(where: { a[$0.key] == nil }) {
            throw AdapterError(.unpairedLoRATensor, "the module has a B tensor but no A tensor", tensor: unpaired.value.name)
        }
        return pairs
    }

    /// Asks the kernel to back a large fresh buffer with transparent huge pages: one fault per
    /// 2 MiB instead of per 4 KiB, which on virtual machines is most of the cost of a new output.
    private static func adviseHugePages(_ base: UnsafeMutableRawPointer, byteCount: Int) {
        let hugePage = 2 << 20
        guard byteCount >= 2 * hugePage else { return }
        let start = (Int(bitPattern: base) + hugePage - 1) & ~(hugePage - 1)
        let end = (Int(bitPattern: base) + byteCount) & ~(hugePage - 1)
        if end > start { _ = madvise(UnsafeMutableRawPointer(bitPattern: start), end - start, MADV_HUGEPAGE) }
    }

    /// A round without uploads aggregates to its base (at the asked rank and scale), so only a
    /// round with neither is empty.
    private static func checkedParticipants(_ list: [RoundParticipant], hasBase: Bool) throws(AdapterError) -> [String: RoundParticipant] {
        guard !list.isEmpty || hasBase else { throw AdapterError(.emptyRound, "the round has no uploads") }
        var byClient: [String: RoundParticipant] = [:]
        for participant in list {
            guard participant.weight > 0, participant.weight.isFinite else {
                throw AdapterError(.invalidWeight, "client '\(participant.clientID)' has weight \(participant.weight); weights must be positive and finite")
            }
            guard participant.rank >= 1 else {
                throw AdapterError(.invalidRank, "client '\(participant.clientID)' has rank \(participant.rank)")
            }
            guard byClient.updateValue(participant, forKey: participant.clientID) == nil else {
                throw AdapterError(.inconsistentSource, "client '\(participant.clientID)' appears twice in the round")
            }
        }
        return byClient
    }

    /// Output elements summed and written per step: a block of the sums (256 KiB) stays in the
    /// core's cache while every holder is added to it and it is divided and rounded into the output.
    static let blockElements = 1 << 15
    /// Tensors at least this large are shared by two cores, half each; a smaller one would spend
    /// more on waking the second core than it saves.
    static let twoCoreElements = 1 << 17
    /// Small tensors go to the two cores in groups of at most this many output elements (their sums
    /// share one buffer of that size).
    static let smallGroupElements = 1 << 17
    /// And at most this many tensors: each is a source call inside the previous one's, with its
    /// holders' blobs open.
    static let smallGroupTensors = 32
    /// Scratch for one core's part of one holder of a block: at most a block of elements of at most 8 bytes.
    static let scratchBytes = blockElements * 8

    /// Sums `w·x` over the plan's holders (and the base's slices) into `sums` and writes the means
    /// at `destination`, block by block: each holder's part of a block is read (from the store's
    /// mapped file into a cache-sized scratch, or in place) just before it is added, so the input
    /// crosses memory once. Checks that the source delivers exactly the announced holders, in
    /// client-id order, with the announced shapes and sizes.
    private static func aggregate(
        _ plan: TensorPlan, from source: some AdapterSource, into sums: UnsafeMutableBufferPointer<Double>, writingTo destination: UnsafeMutableRawPointer,
        dtype: DType, kernels: KernelSet, scratch: UnsafeMutableRawPointer
    ) throws {
        try source.withContributionReader(toTensor: plan.name) { contributions, reader in
            let holders = try plan.checkedHolders(contributions)
            try withBaseBytes(of: plan, from: source) { baseBytes in
                let tensor = OpenTensor(plan: plan, holders: holders, reader: reader, baseBytes: baseBytes)
                let count = plan.outputElementCount
                guard count >= twoCoreElements else {
                    return try tensor.sum(0..<count, into: sums, writingTo: destination, dtype: dtype, kernels: kernels, scratch: scratch)
                }
                try onTwoCores(scratch: scratch) { half, scratch in
                    try tensor.sum(
                        half == 0 ? 0..<count / 2 : count / 2..<count, into: sums, writingTo: destination, dtype: dtype, kernels: kernels, scratch: scratch)
                }
            }
        }
    }

    /// The end of the run of small tensors from `index` that the plain engine sums (no svd or
    /// hetlora module, no base slices), at most `smallGroupTensors` of together at most
    /// `smallGroupElements` output elements: they go to two cores side by side, each whole on one,
    /// where one alone would not pay for waking the second core.
    private static func smallGroupEnd(_ plans: [TensorPlan], from index: Int, strategy: AggregationStrategy) -> Int {
        var end = index
        var elements = 0
        while end < plans.count {
            let plan = plans[end]
            guard plan.module == nil || !strategy.worksPerModule, !plan.readsBase, elements + plan.outputElementCount <= smallGroupElements,
                end - index < smallGroupTensors
            else { break }
            elements += plan.outputElementCount
            end += 1
        }
        return max(end, index + 1)
    }

    /// Sums a group of small tensors (`smallGroupEnd`) into consecutive parts of `sums`, the first
    /// tensors on one core and the rest on the other, split near half of the elements.
    private static func aggregate(
        small group: [(plan: TensorPlan, destination: UnsafeMutableRawPointer)], from source: some AdapterSource,
        into sums: UnsafeMutableBufferPointer<Double>, dtype: DType, kernels: KernelSet, scratch: UnsafeMutableRawPointer
    ) throws {
        try withOpenTensors(group.map(\.plan)[...], from: source) { tensors in
            var offsets = [0]
            for (plan, _) in group { offsets.append(offsets.last! + plan.outputElementCount) }
            // The first tensors go to one core up to the offset nearest half of the elements.
            let split = offsets.indices.min { abs(2 * offsets[$0] - offsets.last!) < abs(2 * offsets[$1] - offsets.last!) }!
            try onTwoCores(scratch: scratch) { half, scratch in
                for index in half == 0 ? 0..<split : split..<group.count {
                    let part = UnsafeMutableBufferPointer(rebasing: sums[offsets[index]..<offsets[index + 1]])
                    try tensors[index].sum(
                        0..<group[index].plan.outputElementCount, into: part, writingTo: group[index].destination, dtype: dtype, kernels: kernels,
                        scratch: scratch)
                }
            }
        }
    }

    /// Opens every plan's holders (checked) for reading, one source call inside the other, and calls
    /// `body` with them all.
    private static func withOpenTensors(
        _ plans: ArraySlice<TensorPlan>, from source: some AdapterSource, opened: [OpenTensor] = [], _ body: ([OpenTensor]) throws -> Void
    ) throws {
        guard let plan = plans.first else { return try body(opened) }
        try source.withContributionReader(toTensor: plan.name) { contributions, reader in
            let tensor = OpenTensor(plan: plan, holders: try plan.checkedHolders(contributions), reader: reader, baseBytes: nil)
            try withOpenTensors(plans.dropFirst(), from: source, opened: opened + [tensor], body)
        }
    }

    /// Runs `work` on two cores, each with its half of the scratch (half 0 or 1); rethrows the first failure.
    private static func onTwoCores(scratch: UnsafeMutableRawPointer, _ work: (Int, UnsafeMutableRawPointer) throws -> Void) throws {
        // Unchecked: callers give the halves disjoint elements of the sums and the output, and read
        // the inputs only through readers (safe from two threads), each half with its own scratch.
        nonisolated(unsafe) let work = work
        nonisolated(unsafe) let scratch = scratch
        let failures = Mutex<[any Error]>([])
        DispatchQueue.concurrentPerform(iterations: 2) { half in
            do {
                try work(half, scratch + half * scratchBytes)
            } catch {
                failures.withLock { $0.append(error) }
            }
        }
        if let failure = failures.withLock({ $0.first }) { throw failure }
    }

    /// Calls `body` with the base's bytes of the plan's tensor when the base gives it slices, else nil.
    private static func withBaseBytes(of plan: TensorPlan, from source: some AdapterSource, _ body: (UnsafeRawPointer?) throws -> Void) throws {
        guard plan.readsBase, let base = plan.base else { return try body(nil) }
        var delivered = false
        try source.withBaseTensor(named: plan.name) { contribution in
            guard !delivered, contribution.dtype == base.dtype, contribution.shape == base.shape,
                contribution.bytes.count == base.shape.reduce(1, *) * base.dtype.byteWidth
            else {
                throw AdapterError(.inconsistentSource, "the base delivered bytes that disagree with its announced dtype and shape", tensor: plan.name)
            }
            delivered = true
            try body(contribution.bytes.baseAddress)
        }
        guard delivered else { throw AdapterError(.inconsistentSource, "the base did not deliver the tensor it announced", tensor: plan.name) }
    }
}

/// A tensor's checked holders with a reader of their bytes, and the base's bytes when it gives the
/// tensor slices: valid inside the source call that opened them.
private struct OpenTensor {
    let plan: TensorPlan
    let holders: [TensorPlan.Holder]
    let reader: any ContributionReader
    let baseBytes: UnsafeRawPointer?

    /// Sums the output elements in `range` block by block into `sums` (indexed as the tensor's
    /// elements) and writes their means at `destination`.
    func sum(
        _ range: Range<Int>, into sums: UnsafeMutableBufferPointer<Double>, writingTo destination: UnsafeMutableRawPointer, dtype: DType,
        kernels: KernelSet, scratch: UnsafeMutableRawPointer
    ) throws {
        for start in stride(from: range.lowerBound, to: range.upperBound, by: AdapterAggregator.blockElements) {
            let block = start..<min(start + AdapterAggregator.blockElements, range.upperBound)
            UnsafeMutableBufferPointer(rebasing: sums[block]).initialize(repeating: 0)
            for (index, holder) in holders.enumerated() {
                let slices = 0..<min(holder.rank, plan.outputRank)
                let width = holder.dtype.byteWidth
                // Each span fits the scratch (runs are never longer than a block).
                try plan.forEachSourceSpan(clientRank: holder.rank, slices: slices, in: block, maxElements: AdapterAggregator.scratchBytes / width) {
                    source, output in
                    try reader.withBytes(ofHolder: index, in: (source.lowerBound * width)..<(source.upperBound * width), scratch: scratch) {
                        plan.add(
                            $0, sourceOffset: source.lowerBound, dtype: holder.dtype, clientRank: holder.rank, slices: slices, weight: holder.foldedWeight,
                            into: sums, kernels: kernels, range: output)
                    }
                }
            }
            if let baseBytes, let base = plan.base {
                plan.add(
                    baseBytes, dtype: base.dtype, clientRank: plan.baseRank, slices: plan.baseSlices, weight: 1, into: sums, kernels: kernels, range: block)
            }
            plan.writeMeans(of: sums, as: dtype, to: destination, kernels: kernels, range: block)
        }
    }
}
