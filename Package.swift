// swift-tools-version:6.0
import PackageDescription

let strictSettings: [SwiftSetting] = [
    .enableUpcomingFeature("ExistentialAny"),
]

let package = Package(
    name: "lora-aggregator",
    products: [
        .library(name: "LoRAAdapters", targets: ["LoRAAdapters"]),
    ],
    targets: [
        // System libraries, linked through their C APIs (apt: libsqlite3-dev, zlib1g-dev).
        .systemLibrary(name: "CSQLite3", path: "Sources/CSQLite3", providers: [.apt(["libsqlite3-dev"])]),
        .systemLibrary(name: "CZlib", path: "Sources/CZlib", providers: [.apt(["zlib1g-dev"])]),

        // The numeric/format core: safetensors codec, PEFT naming, validation, aggregation. No HTTP.
        .target(name: "LoRAAdapters", swiftSettings: strictSettings),

        // Release-built benchmark for scripts/bench/aggregate; not part of the product.
        .executableTarget(
            name: "AggregateBenchmark",
            dependencies: ["LoRAAdapters"],
            swiftSettings: strictSettings
        ),

        .testTarget(name: "CSQLite3Tests", dependencies: ["CSQLite3"], swiftSettings: strictSettings),
        .testTarget(name: "CZlibTests", dependencies: ["CZlib"], swiftSettings: strictSettings),
        .testTarget(name: "LoRAAdaptersTests", dependencies: ["LoRAAdapters"], swiftSettings: strictSettings),
    ],
    swiftLanguageModes: [.v6]
)
