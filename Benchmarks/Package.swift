// swift-tools-version: 6.1
import PackageDescription

// Corral's benchmarks live in their own package (like swift-nio's) so that their
// dependencies never reach a user's dependency graph.
//
//   swift run -c release corral-workloads all          # WORKLOADS.md lines, vs ../shared/bench/go-reference
//   swift package --disable-sandbox benchmark         # package-benchmark suites (wall clock, mallocs)
//   python3 perf-report.py                            # Go vs Corral vs Swift baselines, alternating runs ->
//                                                     # Results/report.md (table) and Results/ratios.svg
let package = Package(
    name: "CorralBenchmarks",
    platforms: [.macOS(.v15)],
    dependencies: [
        .package(name: "Corral", path: "../"),
        .package(
            url: "https://github.com/ordo-one/benchmark.git",
            from: "1.27.0",
            traits: ["MallocInterposer"]
        ),
    ],
    targets: [
        .executableTarget(
            name: "corral-workloads",
            dependencies: [.product(name: "Corral", package: "Corral")],
            swiftSettings: [.swiftLanguageMode(.v6)]
        ),
        .executableTarget(
            name: "CorralBenchmarks",
            dependencies: [
                .product(name: "Corral", package: "Corral"),
                .product(name: "Benchmark", package: "benchmark"),
            ],
            path: "Benchmarks/CorralBenchmarks",
            swiftSettings: [.swiftLanguageMode(.v6)],
            plugins: [.plugin(name: "BenchmarkPlugin", package: "benchmark")]
        ),
    ]
)
