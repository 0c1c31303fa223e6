import AdapterStore
import HTTPServer
import LoRAAdapters

extension AggregatorService {
    func registerAggregateRoutes(on routes: inout AuthorizedRoutes) {
        routes.add("GET", Self.roundPath + "/aggregate", .federationMember) { [self] request, _ in try await getAggregate(request, perClient: false) }
        routes.add("GET", Self.roundPath + "/aggregate/{client}", .federationMember) { [self] request, _ in try await getAggregate(request, perClient: true) }
    }

    private func getAggregate(_ request: HTTPRequest, perClient: Bool) async throws -> HTTPResponse {
        let parameters = try RequestParameters(request)
        try parameters.allowOnly(perClient ? ["strategy", "dtype"] : ["strategy", "rank", "dtype", "lora_alpha", "use_rslora"])
        let federation = try parameters.federation
        let round = try parameters.round
        let client = perClient ? try parameters.client : nil
        let coding = Self.responseCoding(request)
        let strategy = try await strategy(parameters)
        let started = ContinuousClock.now
        // The ETag derives from the round's inputs, so a matching If-None-Match needs no computing,
        // a HEAD needs none when the size is on record or the answer is compressed, and a GET
        // streams the body (compressed as it comes, if asked) while it is computed.
        let outcome = try await store.aggregate(
            federation: federation, round: round, client: client, strategy: strategy,
            rank: try parameters.integer("rank"), dtype: try parameters.outputDType, scaling: try Self.targetScaling(parameters)
        ) { tag, recorded in
            if Self.notModified(request, tag: tag, coding: coding) { return .bodiless }
            if request.method == "HEAD" { return recorded != nil || coding != nil ? .bodiless : .compute }
            return .stream
        }
        let metrics = self.metrics
        let recordAggregation = { @Sendable in metrics.aggregationFinished(strategy, seconds: Double((ContinuousClock.now - started) / .microseconds(1)) / 1e6)
        }
        switch outcome {
        case nil:
            throw ServiceError(
                .notFound, client.map { "client '\($0)' has no upload in round \(round)" } ?? "round \(round) of federation '\(federation)' has no uploads")
        case .complete(let aggregate)?:
            if !aggregate.fromCache { recordAggregation() }
            return try await download(aggregate.bytes, tag: aggregate.tag, sha256: aggregate.sha256, for: request)
        case .bodiless(let tag, let recorded)?:
            return Self.bodiless(tag: tag, sha256: recorded?.sha256, byteCount: recorded?.byteCount, coding: coding, for: request)
        case .streaming(let tag, let byteCount, let sha256, let pieces, let joined)?:
            var headers = Self.downloadHeaders(tag: tag, sha256: sha256, coding: coding)
            let encoder = coding.flatMap { ResponseEncoder(coding: $0) }
            guard (encoder == nil) == (coding == nil) else { throw ServiceError(.internalError, "the response compressor could not start") }
            if let coding { headers.add("Content-Encoding", coding.rawValue) }
            // A compressed body's length is known only at its end: it goes chunked.
            return HTTPResponse(status: .ok, headers: headers, streamLength: coding == nil ? byteCount : nil) { [self] writer in
                do {
                    for try await piece in pieces {
                        guard let encoder else {
                            try await writer.write(piece)
                            continue
                        }
                        let encoded = try await offload { encoder.encode(piece) }
                        if !encoded.isEmpty { try await writer.write(encoded) }
                    }
                    if let encoder { try await writer.write(try await offload { encoder.finish() }) }
                } catch {
                    // The head is out, so no problem+json can follow: the connection closes short.
                    if !(error is HTTPServerError) { Problem.log("an aggregate stream failed after its head was sent: \(error)") }
                    throw error
                }
                // A joined stream shares another request's aggregation, which that one counts.
                if !joined { recordAggregation() }
            }
        }
    }

    /// The scale the global adapter is unfolded to: scale 1, or PEFT's from one `lora_alpha`.
    static func targetScaling(_ parameters: RequestParameters) throws(ServiceError) -> TargetScaling {
        let useRSLoRA = try parameters.flag("use_rslora")
        guard let loraAlpha = try parameters.positiveNumber("lora_alpha") else {
            guard useRSLoRA == nil else { throw ServiceError(.badRequest, "use_rslora needs lora_alpha: without it the answer is at scale 1") }
            return .unit
        }
        do { try AdapterConfig.checkLoraAlpha(loraAlpha, field: "lora_alpha") } catch { throw ServiceError(.badRequest, error.message) }
        return .uniform(loraAlpha: loraAlpha, useRSLoRA: useRSLoRA ?? false)
    }
}
