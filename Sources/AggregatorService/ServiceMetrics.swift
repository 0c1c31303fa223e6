import AdapterStore
import HTTPServer
import LoRAAdapters
import Synchronization

/// Counters for `/metrics`, in the Prometheus text exposition format (version 0.0.4).
final class ServiceMetrics: Sendable {
    private struct RequestKey: Hashable, Comparable {
        let route: String
        let method: String
        let status: Int
        static func < (lhs: Self, rhs: Self) -> Bool { (lhs.route, lhs.method, lhs.status) < (rhs.route, rhs.method, rhs.status) }
    }

    private struct State {
        var requests: [RequestKey: Int] = [:]
        var bytesIn = 0
        var bytesOut = 0
        var uploadsStored = 0
        var roundsSealed: [SealReason: Int] = [:]
        /// By strategy: seconds spent and aggregates computed.
        var aggregations: [AggregationStrategy: (seconds: Double, count: Int)] = [:]
    }

    // Updated from the event loop (requests) and from handlers' tasks (uploads, aggregations).
    private let state = Mutex(State())

    func record(_ request: CompletedRequest) {
        // Unmatched paths share one label, so clients cannot grow the label set.
        let key = RequestKey(route: request.route ?? "unmatched", method: request.route == nil ? "-" : request.method, status: request.status)
        state.withLock { state in
            state.requests[key, default: 0] += 1
            state.bytesIn += request.requestBodyBytes
            state.bytesOut += request.responseBodyBytes
        }
    }

    func uploadStored() { state.withLock { $0.uploadsStored += 1 } }

    func roundSealed(by reason: SealReason) { state.withLock { $0.roundsSealed[reason, default: 0] += 1 } }

    func aggregationFinished(_ strategy: AggregationStrategy, seconds: Double) {
        state.withLock { state in
            let sofar = state.aggregations[strategy] ?? (0, 0)
            state.aggregations[strategy] = (sofar.seconds + seconds, sofar.count + 1)
        }
    }

    func exposition() -> String {
        let state = self.state.withLock { $0 }
        var text = """
            # HELP lora_aggregator_requests_total HTTP requests answered, by route pattern, method and status.
            # TYPE lora_aggregator_requests_total counter

            """
        for (key, count) in state.requests.sorted(by: { $0.key < $1.key }) {
            text += "lora_aggregator_requests_total{route=\"\(key.route)\",method=\"\(key.method)\",status=\"\(key.status)\"} \(count)\n"
        }
        text += """
            # HELP lora_aggregator_request_body_bytes_total Request body bytes received (as sent, before decompression).
            # TYPE lora_aggregator_request_body_bytes_total counter
            lora_aggregator_request_body_bytes_total \(state.bytesIn)
            # HELP lora_aggregator_response_body_bytes_total Response body bytes sent.
            # TYPE lora_aggregator_response_body_bytes_total counter
            lora_aggregator_response_body_bytes_total \(state.bytesOut)
            # HELP lora_aggregator_uploads_stored_total Uploads durably stored (created or replaced).
            # TYPE lora_aggregator_uploads_stored_total counter
            lora_aggregator_uploads_stored_total \(state.uploadsStored)
            # HELP lora_aggregator_aggregation_seconds Time spent computing aggregates, by strategy (cache misses; a body streamed while computed counts until its last byte is sent).
            # TYPE lora_aggregator_aggregation_seconds summary

            """
        for strategy in AggregationStrategy.allCases {
            let (seconds, count) = state.aggregations[strategy] ?? (0, 0)
            text += "lora_aggregator_aggregation_seconds_sum{strategy=\"\(strategy.rawValue)\"} \(seconds)\n"
            text += "lora_aggregator_aggregation_seconds_count{strategy=\"\(strategy.rawValue)\"} \(count)\n"
        }
        text += """
            # HELP lora_aggregator_rounds_sealed_total Rounds this process sealed, by reason (request, quorum, max_uploads, timeout).
            # TYPE lora_aggregator_rounds_sealed_total counter

            """
        for reason in SealReason.allCases {
            text += "lora_aggregator_rounds_sealed_total{reason=\"\(reason.rawValue)\"} \(state.roundsSealed[reason] ?? 0)\n"
        }
        return text
    }
}
