extension AdapterAggregator {
    /// The aggregate at a lower rank, cut from the same round's aggregate at a higher one: LoRA
    /// A[:r] and B[:, :r] (further axes ride along; a module of lower rank keeps its own), dense
    /// tensors whole, `rank` in the metadata set to r. For scale-1 aggregates. Equal, byte for byte, to aggregating at rank r, since slice j of a LoRA tensor
    /// depends only on the slice's owners and weights, never on the output's rank; and it reads only
    /// the aggregate instead of every upload.
    public static func truncate(_ aggregate: SafetensorsFile, toRank rank: Int) throws(AdapterError) -> [UInt8] {
        guard let aggregateRank = aggregate.metadata["rank"].flatMap({ Int($0) }) else {
            throw AdapterError(.invalidHeader, "the file has no rank in its metadata, so it is not an aggregate")
        }
        guard (1...aggregateRank).contains(rank) else {
            throw AdapterError(.rankOutOfRange, "rank \(rank) is outside 1...\(aggregateRank), the aggregate's rank")
        }
        var metadata = aggregate.metadata
        metadata["rank"] = String(rank)
        let sources = aggregate.tensors.sorted { $0.name < $1.name }
        // A module whose global rank is below `rank` keeps its own.
        let kept = sources.map { min(rank, TensorRole(tensorName: $0.name).rank(of: $0.shape) ?? rank) }
        let layout = try SafetensorsLayout(
            tensors: zip(sources, kept).map { ($0.name, $0.dtype, TensorRole(tensorName: $0.name).shape($0.shape, withRank: $1)) }, metadata: metadata)
        return layout.makeFile { base in
            for ((source, keep), target) in zip(zip(sources, kept), layout.tensors) {
                aggregate.withBytes(of: source) { bytes in
                    copyLeadingSlices(
                        of: bytes, shape: source.shape, rankAxis: TensorRole(tensorName: source.name).factor?.rankAxis,
                        keeping: keep, byteWidth: source.dtype.byteWidth, to: base + target.byteRange.lowerBound)
                }
            }
        }
    }

    /// Copies the first `rank` indices along `rankAxis` (everything when there is none): for each
    /// index of the axes before it, one contiguous run of `rank` × (the axes after it).
    private static func copyLeadingSlices(
        of bytes: UnsafeRawBufferPointer, shape: [Int], rankAxis: Int?, keeping rank: Int, byteWidth: Int, to destination: UnsafeMutableRawPointer
    ) {
        guard let source = bytes.baseAddress else { return }  // an empty tensor
        guard let rankAxis, shape.count >= 2 else {
            destination.copyMemory(from: source, byteCount: bytes.count)
            return
        }
        let outer = shape[..<rankAxis].reduce(1, *)
        let slice = shape[(rankAxis + 1)...].reduce(byteWidth, *)
        let run = rank * slice
        let stride = shape[rankAxis] * slice
        for index in 0..<outer {
            (destination + index * run).copyMemory(from: source + index * stride, byteCount: run)
        }
    }
}
