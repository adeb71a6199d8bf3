import Synchronization
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// What one pass of a workload reports.
struct Measurement {
    var elapsedNanoseconds: UInt64
    var extra: [String] = []
}

/// A workload failed its check.
struct CheckFailure: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// One implementation of one workload.
struct Workload: Sendable {
    var name: String
    var impl: String
    var n: Int
    /// Runs one pass of `n` operations and checks its result.
    var run: @Sendable (Int) async throws -> Measurement
}

/// Monotonic nanoseconds.
func nowNanoseconds() -> UInt64 {
    var time = timespec()
    clock_gettime(CLOCK_MONOTONIC, &time)
    return UInt64(time.tv_sec) * 1_000_000_000 + UInt64(time.tv_nsec)
}

/// Times `body` from its first operation to its last completion.
func timed(_ body: () async throws -> Void) async rethrows -> UInt64 {
    let start = nowNanoseconds()
    try await body()
    return nowNanoseconds() - start
}

/// The half-open range of the `k`-th of `parts` shares of `n` (as the Go reference splits).
func share(_ n: Int, parts: Int, _ k: Int) -> Range<Int> {
    (n * k / parts)..<(n * (k + 1) / parts)
}

func check(_ condition: Bool, _ message: @autoclosure () -> String) throws {
    if !condition { throw CheckFailure(message()) }
}

/// Runs the warm-up pass at n/10, then the timed pass, and formats the WORKLOADS.md line.
func measure(_ workload: Workload, n: Int) async throws -> String {
    let warmup = n / 10
    if warmup > 0 {
        _ = try await workload.run(warmup)
    }
    let result = try await workload.run(n)
    guard result.elapsedNanoseconds > 0 else { throw CheckFailure("non-positive elapsed time") }
    let nsPerOp = Double(result.elapsedNanoseconds) / Double(n)
    let opsPerSecond = Double(n) / (Double(result.elapsedNanoseconds) / 1e9)
    var line = "workload=\(workload.name) impl=\(workload.impl) n=\(n) ns_per_op=\(format(nsPerOp, 3)) ops_per_s=\(format(opsPerSecond, 1))"
    for field in result.extra { line += " " + field }
    line += " warmup_n=\(warmup)"
    return line
}

/// `value` with `digits` decimals, without Foundation.
func format(_ value: Double, _ digits: Int) -> String {
    var scale = 1.0
    for _ in 0..<digits { scale *= 10 }
    let scaled = (value * scale).rounded()
    let whole = Int(scaled / scale)
    let fraction = Int(abs(scaled - Double(whole) * scale))
    var fractionText = String(fraction)
    while fractionText.count < digits { fractionText = "0" + fractionText }
    return digits == 0 ? String(whole) : "\(whole).\(fractionText)"
}

/// A shared counter the workloads' tasks add to.
final class Counter: Sendable {
    private let storage = Atomic<Int>(0)
    func add(_ value: Int) { storage.add(value, ordering: .relaxed) }
    var value: Int { storage.load(ordering: .relaxed) }
}
