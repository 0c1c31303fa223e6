// The engine side of scripts/bench/aggregate. Subcommands:
//   generate SCENARIO DTYPE DIR   write a deterministic round (client files + round.json) into DIR
//   engine DIR REPEATS            time the in-memory engine and a plain memcpy of the same input bytes
//   rss DIR                       aggregate once from a file-backed streaming source; report peak RSS
//   strategy DIR STRATEGY REPEATS svd or hetlora: once streamed (time, peak RSS), then timed in memory
// Every subcommand prints one JSON object on stdout.
import Foundation
import LoRAAdapters

struct RoundFile: Codable {
    struct Client: Codable {
        let client: String
        let rank: Int
        let weight: Double
        let file: String
        /// name → (dtype, shape, byte range in the file): lets the file-backed source read one tensor at a time.
        let tensors: [String: IndexedTensor]
    }
    struct IndexedTensor: Codable {
        let dtype: String
        let shape: [Int]
        let begin: Int
        let end: Int
    }
    let scenario: String
    let clients: [Client]
}

enum Scenario: String {
    case distilbert, llama
    /// Eight Llama-7B-like clients all at rank 16: the ingest benchmark's uploads.
    case llama16

    var modules: Int { self == .distilbert ? 18 : 64 }
    var width: Int { self == .distilbert ? 768 : 4096 }

    var ranks: [Int] {
        switch self {
        case .distilbert: [5, 20, 5, 20, 5, 20, 5, 20, 5, 20]
        case .llama: [4, 8, 16, 32, 64, 4, 8, 16, 32, 64, 4, 8, 16, 32, 64, 16]
        case .llama16: Array(repeating: 16, count: 8)
        }
    }
}

/// xorshift64*: fast deterministic values in [-1, 1).
struct ValueGenerator {
    var state: UInt64
    mutating func next() -> Float {
        state ^= state >> 12
        state ^= state << 25
        state ^= state >> 27
        return Float(Int32(truncatingIfNeeded: (state &* 0x2545_F491_4F6C_DD1D) >> 32)) * 0x1p-31
    }
}

func generate(scenario: Scenario, dtype: DType, directory: URL) throws {
    try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
    var clients: [RoundFile.Client] = []
    for (index, rank) in scenario.ranks.enumerated() {
        var values = ValueGenerator(state: UInt64(index + 1) &* 0x9E37_79B9_7F4A_7C15)
        var records: [TensorRecord] = []
        for module in 0..<scenario.modules {
            let prefix = "base_model.model.layers.\(module / 2).self_attn.\(module % 2 == 0 ? "q" : "v")_proj"
            for (suffix, shape) in [("lora_A.weight", [rank, scenario.width]), ("lora_B.weight", [scenario.width, rank])] {
                let data = dtype.encode((0..<(rank * scenario.width)).map { _ in Double(values.next()) * 0.01 })
                records.append(TensorRecord(name: "\(prefix).\(suffix)", dtype: dtype, shape: shape, data: data))
            }
        }
        let bytes = try SafetensorsWriter.write(records, metadata: ["format": "pt"])
        let name = String(format: "client-%02d", index)
        try Data(bytes).write(to: directory.appendingPathComponent("\(name).safetensors"))
        let parsed = try SafetensorsFile(bytes: bytes)
        let tensorIndex = Dictionary(
            uniqueKeysWithValues: parsed.tensors.map {
                ($0.name, RoundFile.IndexedTensor(dtype: $0.dtype.rawValue, shape: $0.shape, begin: $0.byteRange.lowerBound, end: $0.byteRange.upperBound))
            })
        clients.append(.init(client: name, rank: rank, weight: Double(100 + 37 * index), file: "\(name).safetensors", tensors: tensorIndex))
    }
    let round = RoundFile(scenario: scenario.rawValue, clients: clients)
    try JSONEncoder().encode(round).write(to: directory.appendingPathComponent("round.json"))
    print(#"{"generated":\#(clients.count)}"#)
}

func loadRound(_ directory: URL) throws -> RoundFile {
    try JSONDecoder().decode(RoundFile.self, from: Data(contentsOf: directory.appendingPathComponent("round.json")))
}

/// The round's client files, read whole into memory.
func loadAdapters(_ round: RoundFile, _ directory: URL) throws -> [ClientAdapter] {
    try round.clients.map {
        ClientAdapter(
            clientID: $0.client, rank: $0.rank, weight: $0.weight,
            file: try SafetensorsFile(bytes: [UInt8](Data(contentsOf: directory.appendingPathComponent($0.file)))))
    }
}

func median(_ values: [Double]) -> Double { values.sorted()[values.count / 2] }

func seconds(_ duration: Duration) -> Double {
    Double(duration.components.seconds) + Double(duration.components.attoseconds) * 1e-18
}

func benchmarkEngine(directory: URL, repeats: Int) throws {
    let round = try loadRound(directory)
    let adapters = try loadAdapters(round, directory)
    let source = InMemoryAdapterSource(adapters)
    // The same round as PEFT clients with one lora_alpha would send it: every client at its own
    // scale 16/r, folded on the way in and unfolded to lora_alpha 16 on the way out.
    let scaledSource = InMemoryAdapterSource(
        try adapters.map {
            ClientAdapter(
                participant: RoundParticipant(
                    clientID: $0.participant.clientID, weight: $0.participant.weight, config: try AdapterConfig(rank: $0.participant.rank, loraAlpha: 16)),
                file: $0.file)
        })
    let scaledOptions = AggregationOptions(strategy: .replication, dtype: .f32, scaling: .uniform(loraAlpha: 16, useRSLoRA: false))
    let unscaledOptions = AggregationOptions(strategy: .replication, dtype: .f32)
    // A round whose highest-rank slices nobody trained: the clients below the top rank, with one
    // top-rank adapter as the round's base (every LoRA tensor reads its base row for those slices),
    // against the same clients with that adapter as one more upload (the same bytes read).
    let topRank = adapters.map(\.participant.rank).max()!
    let lowerClients = adapters.filter { $0.participant.rank < topRank }
    let topClient = adapters.first { $0.participant.rank == topRank }!
    // And the portable kernels against the best ones (AVX2 where the CPU has it).
    var portableOptions = unscaledOptions
    portableOptions.kernels = .portable
    let variants: [(source: InMemoryAdapterSource, options: AggregationOptions)] = [
        (source, unscaledOptions), (scaledSource, scaledOptions),
        (InMemoryAdapterSource(lowerClients, base: topClient.file), unscaledOptions), (InMemoryAdapterSource(lowerClients + [topClient]), unscaledOptions),
        (source, portableOptions),
    ]
    let inputBytes = adapters.reduce(0) { total, adapter in total + adapter.file.tensors.reduce(0) { $0 + $1.byteRange.count } }

    let clock = ContinuousClock()
    var times = Array(repeating: [Double](), count: variants.count)
    var output: AggregatedAdapter?
    // Two untimed warm-up runs: a fresh process's first aggregations wait on the kernel for new memory.
    for _ in 0..<2 { _ = try AdapterAggregator.aggregate(source, options: unscaledOptions) }
    // The variants take turns, each starting the turn in rotation, so all see the same machine.
    for iteration in 0..<repeats {
        for offset in 0..<variants.count {
            let index = (iteration + offset) % variants.count
            let start = clock.now
            let result = try AdapterAggregator.aggregate(variants[index].source, options: variants[index].options)
            times[index].append(seconds(clock.now - start))
            if index == 0 { output = result }
        }
    }
    try Data(output!.bytes).write(to: directory.appendingPathComponent("engine_output.safetensors"))

    // The ceiling: copying the same tensor bytes once, into a destination touched beforehand.
    let destination = UnsafeMutableRawPointer.allocate(byteCount: inputBytes, alignment: 64)
    defer { destination.deallocate() }
    memset(destination, 1, inputBytes)
    var copyTimes: [Double] = []
    for _ in 0..<repeats {
        let start = clock.now
        var offset = 0
        for adapter in adapters {
            for tensor in adapter.file.tensors {
                _ = adapter.file.withBytes(of: tensor) { memcpy(destination + offset, $0.baseAddress!, $0.count) }
                offset += tensor.byteRange.count
            }
        }
        copyTimes.append(seconds(clock.now - start))
    }
    print(
        #"{"input_bytes":\#(inputBytes),"output_bytes":\#(output!.bytes.count),"engine_seconds":\#(median(times[0])),"scaled_seconds":\#(median(times[1])),"base_seconds":\#(median(times[2])),"base_as_upload_seconds":\#(median(times[3])),"portable_seconds":\#(median(times[4])),"kernels":"\#(KernelSet.best.rawValue)","memcpy_seconds":\#(median(copyTimes))}"#
    )
}

/// Parts of tensors read with pread from the client files.
struct FileReader: ContributionReader {
    let parts: [(descriptor: Int32, offset: Int)]

    func withBytes(ofHolder index: Int, in byteRange: Range<Int>, scratch: UnsafeMutableRawPointer, _ body: (UnsafeRawPointer) throws -> Void) throws {
        let (descriptor, offset) = parts[index]
        guard pread(descriptor, scratch, byteRange.count, off_t(offset + byteRange.lowerBound)) == byteRange.count else { throw CocoaError(.fileReadUnknown) }
        try body(scratch)
    }
}

/// Reads one tensor at a time from the client files with pread into one reusable buffer, as a store
/// would from its pages, so the process holds no more input than one tensor.
final class FileBackedSource: AdapterSource {
    let round: RoundFile
    /// A client file of the round directory read as the round's base (its values at scale 1).
    let base: RoundFile.Client?
    let descriptors: [String: Int32]
    var buffer: [UInt8] = []

    init(round: RoundFile, directory: URL, base: RoundFile.Client? = nil) {
        self.round = round
        self.base = base
        var descriptors: [String: Int32] = [:]
        for client in round.clients + (base.map { [$0] } ?? []) {
            descriptors[client.file] = open(directory.appendingPathComponent(client.file).path, O_RDONLY)
        }
        self.descriptors = descriptors
    }

    deinit { for descriptor in descriptors.values { close(descriptor) } }

    func participants() -> [RoundParticipant] {
        round.clients.map { RoundParticipant(clientID: $0.client, rank: $0.rank, weight: $0.weight) }
    }

    func holdings() -> [TensorHolding] {
        round.clients.flatMap { client in
            client.tensors.map { TensorHolding(name: $0.key, clientID: client.client, dtype: DType(rawValue: $0.value.dtype)!, shape: $0.value.shape) }
        }
    }

    func forEachContribution(toTensor tensorName: String, _ body: (TensorContribution) throws -> Void) throws {
        for client in round.clients.sorted(by: { $0.client < $1.client }) {
            try read(tensorName, of: client, as: client.client, body)
        }
    }

    /// As the store reads a tensor: each part straight from the file into the engine's buffer.
    func withContributionReader(toTensor tensorName: String, _ body: ([ContributionInfo], any ContributionReader) throws -> Void) throws {
        let holders = round.clients.sorted(by: { $0.client < $1.client }).compactMap { client in client.tensors[tensorName].map { (client, $0) } }
        let infos = holders.map { client, tensor in
            ContributionInfo(clientID: client.client, dtype: DType(rawValue: tensor.dtype)!, shape: tensor.shape, byteCount: tensor.end - tensor.begin)
        }
        try body(infos, FileReader(parts: holders.map { client, tensor in (descriptors[client.file]!, tensor.begin) }))
    }

    func baseTensors() -> [BaseTensor] {
        base?.tensors.map { BaseTensor(name: $0.key, dtype: DType(rawValue: $0.value.dtype)!, shape: $0.value.shape) } ?? []
    }

    func withBaseTensor(named tensorName: String, _ body: (TensorContribution) throws -> Void) throws {
        if let base { try read(tensorName, of: base, as: "", body) }
    }

    private func read(_ tensorName: String, of client: RoundFile.Client, as clientID: String, _ body: (TensorContribution) throws -> Void) throws {
        guard let tensor = client.tensors[tensorName] else { return }
        let count = tensor.end - tensor.begin
        if buffer.count < count { buffer = [UInt8](repeating: 0, count: count) }
        try buffer.withUnsafeMutableBytes { raw in
            guard pread(descriptors[client.file]!, raw.baseAddress!, count, off_t(tensor.begin)) == count else {
                throw CocoaError(.fileReadUnknown)
            }
            try body(
                TensorContribution(
                    clientID: clientID, dtype: DType(rawValue: tensor.dtype)!, shape: tensor.shape, bytes: UnsafeRawBufferPointer(rebasing: raw[0..<count])))
        }
    }
}

/// Peak resident set size (VmHWM) of this process, in bytes.
func peakResidentBytes() -> Int {
    let status = (try? String(contentsOfFile: "/proc/self/status", encoding: .utf8)) ?? ""
    let line = status.split(separator: "\n").first { $0.hasPrefix("VmHWM:") } ?? ""
    return (Int(line.split(separator: " ").dropFirst().first ?? "0") ?? 0) * 1024
}

func measureStreamingMemory(directory: URL) throws {
    let round = try loadRound(directory)
    let source = FileBackedSource(round: round, directory: directory)
    let largestInputTensor = round.clients.flatMap { $0.tensors.values.map { $0.end - $0.begin } }.max() ?? 0
    let baseline = peakResidentBytes()
    let output = try AdapterAggregator.aggregate(source, options: .init(strategy: .replication, dtype: .f32))
    let peak = peakResidentBytes()
    print(
        #"{"baseline_rss_bytes":\#(baseline),"peak_rss_bytes":\#(peak),"output_bytes":\#(output.bytes.count),"largest_input_tensor_bytes":\#(largestInputTensor)}"#
    )
}

/// The svd or hetlora strategy: first once streamed from the round's files, as the store streams
/// it (its time, the peak RSS over the process's baseline, and the largest module's stacks: the bound
/// the strategies promise beside the output); then the median time from the files held in memory,
/// as the numpy peer times it. Writes the result for the numpy peer to check.
func benchmarkStrategy(directory: URL, strategy: AggregationStrategy, repeats: Int) throws {
    let round = try loadRound(directory)
    var stacks: [String: (rows: Int, columns: Int, ranks: Int)] = [:]
    for client in round.clients {
        for (name, tensor) in client.tensors {
            guard let module = TensorRole.moduleName(ofTensor: name), let factor = TensorRole(tensorName: name).factor else { continue }
            var entry = stacks[module] ?? (0, 0, 0)
            if factor == .a {
                entry.columns = tensor.shape.dropFirst().reduce(1, *)
                entry.ranks += tensor.shape[0]
            } else {
                entry.rows = tensor.shape[0] * tensor.shape.dropFirst(2).reduce(1, *)
            }
            stacks[module] = entry
        }
    }
    let largestStacks = stacks.values.map { ($0.rows + $0.columns) * $0.ranks * 8 }.max() ?? 0
    let options = AggregationOptions(strategy: strategy, dtype: .f32)
    let clock = ContinuousClock()
    let baseline = peakResidentBytes()
    var start = clock.now
    let streamed = try AdapterAggregator.aggregate(FileBackedSource(round: round, directory: directory), options: options)
    let streamedSeconds = seconds(clock.now - start)
    let peak = peakResidentBytes()

    let source = InMemoryAdapterSource(try loadAdapters(round, directory))
    var times: [Double] = []
    for _ in 0..<repeats {
        start = clock.now
        let output = try AdapterAggregator.aggregate(source, options: options)
        times.append(seconds(clock.now - start))
        guard output.bytes == streamed.bytes else { throw CocoaError(.coderInvalidValue) }
    }
    try Data(streamed.bytes).write(to: directory.appendingPathComponent("engine_\(strategy.rawValue).safetensors"))
    print(
        #"{"seconds":\#(median(times)),"streamed_seconds":\#(streamedSeconds),"baseline_rss_bytes":\#(baseline),"peak_rss_bytes":\#(peak),"output_bytes":\#(streamed.bytes.count),"largest_stacks_bytes":\#(largestStacks)}"#
    )
}

let arguments = CommandLine.arguments.dropFirst()
do {
    switch (arguments.first, arguments.count) {
    case ("generate", 4):
        let values = Array(arguments.dropFirst())
        guard let scenario = Scenario(rawValue: values[0]), let dtype = DType(rawValue: values[1]) else { throw CocoaError(.formatting) }
        try generate(scenario: scenario, dtype: dtype, directory: URL(fileURLWithPath: values[2]))
    case ("engine", 3):
        let values = Array(arguments.dropFirst())
        try benchmarkEngine(directory: URL(fileURLWithPath: values[0]), repeats: Int(values[1]) ?? 3)
    case ("rss", 2):
        try measureStreamingMemory(directory: URL(fileURLWithPath: Array(arguments)[1]))
    case ("strategy", 4):
        let values = Array(arguments.dropFirst())
        guard let strategy = AggregationStrategy(rawValue: values[1]), let repeats = Int(values[2]) else { throw CocoaError(.formatting) }
        try benchmarkStrategy(directory: URL(fileURLWithPath: values[0]), strategy: strategy, repeats: repeats)
    default:
        FileHandle.standardError.write(
            Data(
                "usage: AggregateBenchmark generate {distilbert|llama|llama16} {F32|BF16} DIR | engine DIR REPEATS | rss DIR | strategy DIR {svd|hetlora} REPEATS\n"
                    .utf8))
        exit(2)
    }
} catch {
    FileHandle.standardError.write(Data("AggregateBenchmark: \(error)\n".utf8))
    exit(1)
}
