extension AdapterAggregator {
    /// `file` at scale 1, as a round's base is held: each LoRA factor times `√s` of its module
    /// (folding, openapi.yaml's aggregation semantics step 1), rounded once to F32. The file itself
    /// when every scale is already 1.
    public static func foldedToUnitScale(_ file: SafetensorsFile, config: AdapterConfig) throws -> SafetensorsFile {
        guard !config.isUnscaled else { return file }
        // A round of one upload with weight 1 is exactly its folded factors.
        let source = InMemoryAdapterSource([ClientAdapter(participant: RoundParticipant(clientID: "base", weight: 1, config: config), file: file)])
        return try SafetensorsFile(bytes: aggregate(source, options: .init(strategy: .replication, dtype: .f32)).bytes)
    }
}
