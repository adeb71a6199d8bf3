// swift-tools-version: 6.1
import PackageDescription

let strictSwift6: [SwiftSetting] = [
    .swiftLanguageMode(.v6),
    .enableUpcomingFeature("ExistentialAny"),
]

let package = Package(
    name: "Corral",
    platforms: [.macOS(.v15), .iOS(.v18), .tvOS(.v18), .watchOS(.v11), .visionOS(.v2)],
    products: [
        .library(name: "Corral", targets: ["Corral"]),
        .library(name: "CorralTesting", targets: ["CorralTesting"]),
        .library(name: "CorralServices", targets: ["CorralServices"]),
        .executable(name: "corral-demo", targets: ["corral-demo"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-collections.git", from: "1.1.0"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.5.0"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", from: "2.6.0"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.0"),
        .package(url: "https://github.com/apple/swift-metrics.git", from: "2.5.0"),
        .package(url: "https://github.com/swiftlang/swift-docc-plugin.git", from: "1.4.0"),
    ],
    targets: [
        .target(
            name: "Corral",
            dependencies: [.product(name: "DequeModule", package: "swift-collections")],
            swiftSettings: strictSwift6
        ),
        .target(
            name: "CorralTesting",
            dependencies: ["Corral"],
            swiftSettings: strictSwift6
        ),
        .target(
            name: "CorralServices",
            dependencies: [
                "Corral",
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
            ],
            swiftSettings: strictSwift6
        ),
        .executableTarget(
            name: "corral-demo",
            dependencies: [
                "Corral",
                "CorralServices",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strictSwift6
        ),
        .testTarget(
            name: "CorralTests",
            dependencies: ["Corral", "CorralTesting"],
            swiftSettings: strictSwift6
        ),
        .testTarget(
            name: "CorralServicesTests",
            dependencies: [
                "CorralServices",
                "CorralTesting",
                .product(name: "ServiceLifecycleTestKit", package: "swift-service-lifecycle"),
                .product(name: "MetricsTestKit", package: "swift-metrics"),
            ],
            swiftSettings: strictSwift6
        ),
    ]
)
