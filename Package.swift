// swift-tools-version:6.0
import PackageDescription

let strictSettings: [SwiftSetting] = [
    .enableUpcomingFeature("ExistentialAny")
]

let package = Package(
    name: "lora-aggregator",
    products: [
        .executable(name: "lora-aggregator", targets: ["lora-aggregator"]),
        .library(name: "LoRAAdapters", targets: ["LoRAAdapters"]),
        .library(name: "HTTPServer", targets: ["HTTPServer"]),
        .library(name: "AdapterStore", targets: ["AdapterStore"]),
        .library(name: "Digests", targets: ["Digests"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-crypto.git", from: "3.12.3"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
    ],
    targets: [
        // System libraries, linked through their C APIs (apt: libsqlite3-dev, libpq-dev, zlib1g-dev, libzstd-dev, libopenblas-dev).
        .systemLibrary(name: "CSQLite3", path: "Sources/CSQLite3", providers: [.apt(["libsqlite3-dev"])]),
        .systemLibrary(name: "CPostgres", path: "Sources/CPostgres", providers: [.apt(["libpq-dev"])]),
        .systemLibrary(name: "CZlib", path: "Sources/CZlib", providers: [.apt(["zlib1g-dev"])]),
        .systemLibrary(name: "CZstd", path: "Sources/CZstd", providers: [.apt(["libzstd-dev"])]),
        // LAPACK (QR, SVD) and BLAS from OpenBLAS, for the svd strategy (apt: libopenblas-dev).
        .systemLibrary(name: "CLAPACK", path: "Sources/CLAPACK", providers: [.apt(["libopenblas-dev"])]),
        // epoll, eventfd, accept4, memmem and malloc_trim from the C library, which Swift's Glibc module lacks.
        .target(name: "CLinux"),
        // The engine's hot loops with AVX2, F16C and FMA, bit-identical to the portable Swift ones; chosen
        // at start-up by a CPU check (LoRAAdapters' KernelSet).
        .target(name: "CKernels"),
        // CRC-32 with carry-less multiplication (PCLMULQDQ), the same bits as zlib's, for the CPUs that have it.
        .target(name: "CChecksums"),

        // The numeric/format core: safetensors codec, PEFT naming, validation, aggregation. No HTTP.
        .target(name: "LoRAAdapters", dependencies: ["CLAPACK", "CKernels", "CLinux"], swiftSettings: strictSettings),

        // SHA-256 (hex) and CRC-32 of byte strings, for the store and the service alike.
        .target(name: "Digests", dependencies: ["CChecksums", "CZlib", .product(name: "Crypto", package: "swift-crypto")], swiftSettings: strictSettings),

        // SQLite or PostgreSQL storage of uploads, rounds and cached aggregates; the engine's streaming source.
        .target(
            name: "AdapterStore", dependencies: ["CSQLite3", "CPostgres", "Digests", "LoRAAdapters", .product(name: "Crypto", package: "swift-crypto")],
            swiftSettings: strictSettings),

        // HTTP/1.1 on POSIX sockets and epoll; knows nothing of LoRA.
        .target(name: "HTTPServer", dependencies: ["CLinux"], swiftSettings: strictSettings),

        // libFuzzer targets: HTTP parser, safetensors reader, inflate (scripts/fuzz/run); replays saved inputs otherwise.
        .executableTarget(name: "Fuzzers", dependencies: ["HTTPServer", "LoRAAdapters", "AggregatorService"], swiftSettings: strictSettings),

        // API v1: routes, handlers, content coding, problem+json, metrics, configuration.
        .target(
            name: "AggregatorService",
            dependencies: ["AdapterStore", "Digests", "HTTPServer", "LoRAAdapters", "CZlib", "CZstd"],
            resources: [.embedInCode("Resources/openapi.yaml")],
            swiftSettings: strictSettings
        ),

        // The thin executable: command line, start-up, signals.
        .executableTarget(
            name: "lora-aggregator",
            dependencies: ["AggregatorService", .product(name: "ArgumentParser", package: "swift-argument-parser")],
            swiftSettings: strictSettings
        ),

        // Release-built benchmark programs (scripts/bench); not part of the product.
        .executableTarget(name: "HTTPBenchmarkServer", dependencies: ["HTTPServer"], swiftSettings: strictSettings),
        .executableTarget(
            name: "AggregateBenchmark",
            dependencies: ["LoRAAdapters"],
            swiftSettings: strictSettings
        ),

        .testTarget(name: "CSQLite3Tests", dependencies: ["CSQLite3"], swiftSettings: strictSettings),
        .testTarget(name: "CZlibTests", dependencies: ["CZlib"], swiftSettings: strictSettings),
        // Shared by the test targets: a raw HTTP client and the literal aggregation reference.
        .target(name: "TestSupport", dependencies: ["LoRAAdapters"], path: "Tests/TestSupport", swiftSettings: strictSettings),
        .testTarget(name: "DigestsTests", dependencies: ["Digests"], swiftSettings: strictSettings),
        .testTarget(name: "AdapterStoreTests", dependencies: ["AdapterStore", "Digests", "LoRAAdapters", "TestSupport"], swiftSettings: strictSettings),
        .testTarget(
            name: "AggregatorServiceTests", dependencies: ["AdapterStore", "AggregatorService", "Digests", "LoRAAdapters", "TestSupport"],
            swiftSettings: strictSettings),
        .testTarget(name: "HTTPServerTests", dependencies: ["HTTPServer", "TestSupport"], swiftSettings: strictSettings),
        .testTarget(name: "LoRAAdaptersTests", dependencies: ["LoRAAdapters", "TestSupport"], swiftSettings: strictSettings),
    ],
    swiftLanguageModes: [.v6]
)
