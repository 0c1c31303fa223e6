import AdapterStore
import Foundation
import HTTPServer
import LoRAAdapters

/// The round report (openapi.yaml, "Round report"): per module and rank slice, the owners' share
/// and each strategy's contribution, as JSON and as a small SVG plot.
extension AggregatorService {
    func registerReportRoutes(on routes: inout AuthorizedRoutes) {
        routes.add("GET", Self.roundPath + "/report", .federationMember) { [self] request, _ in
            let (federation, round, report) = try await report(request)
            return .json(.ok, ReportBody(federation: federation, round: round, report: report))
        }
        routes.add("GET", Self.roundPath + "/report.svg", .federationMember) { [self] request, _ in
            let (federation, round, report) = try await report(request)
            let svg = ReportPlot.svg(report, title: "\(federation) round \(round)")
            return HTTPResponse(status: .ok, headers: ["Content-Type": "image/svg+xml"], body: Array(svg.utf8))
        }
    }

    /// Every strategy's global adapter at scale 1 (from the cache when computed before), reduced to the report.
    private func report(_ request: HTTPRequest) async throws -> (FederationID, RoundNumber, RoundReport) {
        let parameters = try RequestParameters(request)
        try parameters.allowOnly([])
        let federation = try parameters.federation
        let round = try parameters.round
        // 404 like the round's status: a round with a base or sealed has a report, empty without uploads.
        guard try await store.round(federation: federation, round: round) != nil else {
            throw ServiceError(.notFound, "round \(round) of federation '\(federation)' has no uploads, no base and is not sealed")
        }
        let (participants, holdings, base) = try await store.holdings(federation: federation, round: round)
        guard !participants.isEmpty else { return (federation, round, RoundReport(participants: [], holdings: [], base: [], aggregates: [:])) }
        var aggregates: [AggregationStrategy: [UInt8]] = [:]
        for strategy in AggregationStrategy.allCases {
            aggregates[strategy] = try await store.aggregate(federation: federation, round: round, client: nil, strategy: strategy, rank: nil, dtype: .f32)?
                .bytes
        }
        let files = aggregates
        let report = try await offload {
            RoundReport(participants: participants, holdings: holdings, base: base, aggregates: try files.mapValues { try SafetensorsFile(bytes: $0) })
        }
        return (federation, round, report)
    }
}

struct ReportBody: Encodable {
    struct Slice: Encodable {
        let slice: Int
        let owners: Int
        let ownerShare: Double
        /// By strategy name.
        let contribution: [String: Double]
    }

    struct Module: Encodable {
        let module: String
        let globalRank: Int
        let holders: Int
        let slices: [Slice]
    }

    let federation: FederationID
    let round: RoundNumber
    let strategies: [String]
    let modules: [Module]

    init(federation: FederationID, round: RoundNumber, report: RoundReport) {
        self.federation = federation
        self.round = round
        strategies = AggregationStrategy.allCases.map(\.rawValue)
        modules = report.modules.map { module in
            Module(
                module: module.name, globalRank: module.globalRank, holders: module.holders,
                slices: module.slices.map { slice in
                    Slice(
                        slice: slice.index, owners: slice.owners, ownerShare: slice.ownerShare,
                        contribution: Dictionary(uniqueKeysWithValues: slice.contribution.map { ($0.key.rawValue, $0.value) }))
                })
        }
    }
}

/// The report as an SVG plot: one panel per module (the first `maximumPanels`), slices along x,
/// each strategy's contribution as a line, the owners' share as grey bars behind them.
enum ReportPlot {
    static let maximumPanels = 12
    static let colors: [AggregationStrategy: String] = [.replication: "#1f77b4", .zeroPadding: "#d62728", .hetlora: "#2ca02c", .svd: "#9467bd"]
    private static let (width, panelHeight, margin) = (720.0, 150.0, 48.0)

    static func svg(_ report: RoundReport, title: String) -> String {
        let panels = Array(report.modules.prefix(maximumPanels))
        let height = 60 + Double(panels.count) * (panelHeight + 30) + 20
        var svg = """
            <svg xmlns="http://www.w3.org/2000/svg" width="\(Int(width))" height="\(Int(height))" viewBox="0 0 \(Int(width)) \(Int(height))" font-family="sans-serif" font-size="11">
            <rect width="100%" height="100%" fill="white"/>
            <text x="\(margin)" y="20" font-size="14">\(escape(title)): each strategy's contribution ‖B[:,j]·A[j,:]‖ per rank slice j; grey bars: the owners' share of the weight</text>

            """
        for (index, strategy) in AggregationStrategy.allCases.enumerated() {
            let x = margin + Double(index) * 140
            svg +=
                "<rect x=\"\(x)\" y=\"32\" width=\"12\" height=\"12\" fill=\"\(colors[strategy]!)\"/><text x=\"\(x + 16)\" y=\"42\">\(strategy.rawValue)</text>\n"
        }
        for (index, module) in panels.enumerated() {
            let top = 60 + Double(index) * (panelHeight + 30)
            svg += panel(module, top: top)
        }
        if report.modules.count > panels.count {
            svg += "<text x=\"\(margin)\" y=\"\(height - 8)\">… and \(report.modules.count - panels.count) more modules in the JSON report</text>\n"
        }
        return svg + "</svg>\n"
    }

    private static func panel(_ module: RoundReport.Module, top: Double) -> String {
        let plotWidth = width - 2 * margin
        let slices = max(1, module.slices.count)
        let step = plotWidth / Double(slices)
        let largest = module.slices.flatMap { $0.contribution.values }.max() ?? 0
        let scale = largest > 0 ? panelHeight / largest : 0
        var text = "<text x=\"\(margin)\" y=\"\(top + 12)\">\(escape(module.name)) (rank \(module.globalRank), \(module.holders) holders)</text>\n"
        let bottom = top + 18 + panelHeight
        text += "<rect x=\"\(margin)\" y=\"\(top + 18)\" width=\"\(plotWidth)\" height=\"\(panelHeight)\" fill=\"none\" stroke=\"#999\"/>\n"
        for slice in module.slices {
            let barHeight = slice.ownerShare * panelHeight
            text +=
                "<rect x=\"\(margin + Double(slice.index) * step + step * 0.1)\" y=\"\(bottom - barHeight)\" width=\"\(step * 0.8)\" height=\"\(barHeight)\" fill=\"#ddd\"/>\n"
        }
        for strategy in AggregationStrategy.allCases {
            let points = module.slices.map { slice in
                "\(margin + (Double(slice.index) + 0.5) * step),\(bottom - (slice.contribution[strategy] ?? 0) * scale)"
            }
            text += "<polyline fill=\"none\" stroke=\"\(colors[strategy]!)\" stroke-width=\"2\" points=\"\(points.joined(separator: " "))\"/>\n"
        }
        text += "<text x=\"\(margin - 4)\" y=\"\(top + 28)\" text-anchor=\"end\">\(String(format: "%.3g", largest))</text>\n"
        text += "<text x=\"\(margin - 4)\" y=\"\(bottom)\" text-anchor=\"end\">0</text>\n"
        text += "<text x=\"\(margin + plotWidth / 2)\" y=\"\(bottom + 14)\" text-anchor=\"middle\">rank slice j (0 to \(module.globalRank - 1))</text>\n"
        return text
    }

    private static func escape(_ text: String) -> String {
        text.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;").replacingOccurrences(of: ">", with: "&gt;")
    }
}
