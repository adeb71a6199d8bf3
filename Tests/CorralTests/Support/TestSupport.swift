@testable import Corral
import Testing

/// Yields until `condition` holds — the way a test waits for another task to reach a state
/// that Corral exposes (a waiter parked, a sleeper asleep), without sleeping.
///
/// Records an issue (instead of hanging the suite) if the condition is still false after
/// a very large number of yields.
func waitUntil(
    _ what: @autoclosure () -> String = "condition",
    sourceLocation: SourceLocation = #_sourceLocation,
    _ condition: () -> Bool
) async {
    for _ in 0..<5_000_000 {
        if condition() { return }
        await Task.yield()
    }
    Issue.record("waitUntil: \(what()) never became true", sourceLocation: sourceLocation)
}

/// An append-only list shared between tasks.
final class Log<Element: Sendable>: Sendable {
    private let state = LockedState<[Element]>([])

    func append(_ element: Element) {
        state.withLock { $0.append(element) }
    }

    var elements: [Element] {
        state.withLock { $0 }
    }

    var count: Int {
        state.withLock { $0.count }
    }
}

/// A counter shared between tasks that also tracks its peak.
final class Gauge: Sendable {
    private let state = LockedState<(current: Int, peak: Int)>((0, 0))

    func add(_ delta: Int) {
        state.withLock {
            $0.current += delta
            $0.peak = max($0.peak, $0.current)
        }
    }

    var current: Int { state.withLock { $0.current } }
    var peak: Int { state.withLock { $0.peak } }
}

/// How many iterations a stress test runs: small by default so CI takes seconds,
/// `CORRAL_STRESS_ITERATIONS` to run longer.
func stressIterations(default value: Int) -> Int {
    if let text = Environment.value(of: "CORRAL_STRESS_ITERATIONS"), let iterations = Int(text), iterations > 0 {
        return iterations
    }
    return value
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

enum Environment {
    static func value(of name: String) -> String? {
        getenv(name).map { String(cString: $0) }
    }
}

/// A small deterministic random generator, so a failing stress schedule can be replayed
/// from its seed.
struct SplitMix64: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

struct TestError: Error, Equatable {
    var id = 0
}
