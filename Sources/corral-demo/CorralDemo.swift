import ArgumentParser
import Corral

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// `swift run corral-demo`: the production job service (the default), and Corral's other
/// scenarios, each checking its own accounting.
@main
struct CorralDemo: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "corral-demo",
        abstract: "Corral's demo: a production job service (the default) — generator, pipeline, worker pool, batched writer, run as services with graceful shutdown — and smaller scenarios.",
        discussion: """
            With no subcommand, runs the job service with its defaults (about 15 s): 30,000 jobs \
            through a validate → enrich → transform pipeline (the enrich stage calls a slow, \
            flaky downstream behind a rate limiter, a weighted semaphore and per-call \
            timeouts, with retries), a worker pool and a batcher writing a JSON Lines file; \
            a live progress line, then a report that accounts for every job, checks every \
            limit, and checks that no task leaked. Press Ctrl-C to shut it down gracefully: \
            the report still accounts for every job. `corral-demo service --overload` shows \
            the "3 AM OOM" of a task per request, side by side with Corral's bounded pool.

            The other scenarios: `quota` (a tiered API-quota client), `pool` (an elastic \
            worker pool under load), `pipeline` (a pipeline into a batched file writer, \
            with per-stage statistics); `all` runs every scenario. Each fails the command if \
            its checks fail.
            """,
        subcommands: [ServiceScenario.self, Everything.self, QuotaScenario.self, PoolScenario.self, PipelineScenario.self],
        defaultSubcommand: ServiceScenario.self
    )
}

/// Every scenario, one after the other, with its defaults.
struct Everything: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "all",
        abstract: "Runs every scenario with its defaults: quota, pool, pipeline, then the job service."
    )

    func run() async throws {
        try await QuotaScenario.parse([]).run()
        print()
        try await PoolScenario.parse([]).run()
        print()
        try await PipelineScenario.parse([]).run()
        print()
        try await ServiceScenario.parse([]).run()
    }
}

/// A tiered API-quota client built from Corral's primitives.
///
/// A producer puts requests on a bounded channel (backpressure: it waits when the workers
/// fall behind); workers take them off, pass a rate limiter, take 10 permits (light call)
/// or 50 permits (heavy call) of a 100-permit quota semaphore, and call a simulated
/// downstream API under a per-call timeout. At the end it prints what happened, and checks
/// that every request is accounted for and the quota was never exceeded.
struct QuotaScenario: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "quota",
        abstract: "A tiered API-quota client on Corral's semaphore, channel, rate limiter and timeouts.",
        discussion: """
            Light calls cost 10 permits and heavy calls 50 of a 100-permit quota; every call \
            runs under a timeout, behind a token-bucket rate limiter. The report shows calls \
            made, timeouts, and the peak quota in use (never above 100).
            """
    )

    @Option(help: "Number of API calls to make.")
    var calls = 2_000

    @Option(help: "Concurrent workers taking requests off the queue.")
    var workers = 32

    @Option(help: "Fraction of calls that are heavy (cost 50 permits instead of 10), 0...1.")
    var heavyRatio = 0.2

    @Option(help: "Per-call timeout, in milliseconds.")
    var timeoutMs = 40

    @Option(help: "Rate limit, calls per second (burst: a tenth of it).")
    var rate = 4_000

    @Option(help: "Mean simulated API latency, in milliseconds (one call in 20 takes 4× longer).")
    var latencyMs = 8

    @Option(help: "Seed for the simulated latencies and call mix.")
    var seed: UInt64 = 42

    func validate() throws {
        guard calls > 0 else { throw ValidationError("--calls must be greater than 0") }
        guard workers > 0 else { throw ValidationError("--workers must be greater than 0") }
        guard (0...1).contains(heavyRatio) else { throw ValidationError("--heavy-ratio must be within 0...1") }
        guard timeoutMs > 0 else { throw ValidationError("--timeout-ms must be greater than 0") }
        guard rate > 0 else { throw ValidationError("--rate must be greater than 0") }
        guard latencyMs >= 0 else { throw ValidationError("--latency-ms must not be negative") }
    }

    func run() async throws {
        let quota = AsyncSemaphore(permits: 100)
        let limiter = RateLimiter(rate: rate, per: .seconds(1), burst: max(1, rate / 10))
        let requests = BoundedChannel<Request>(capacity: 64)
        let report = Report()
        let plan = makePlan()

        print("== quota: \(calls) calls (\(plan.filter(\.isHeavy).count) heavy), \(workers) workers, quota 100 permits, \(rate)/s, timeout \(timeoutMs) ms")
        let clock = ContinuousClock()
        let start = clock.now
        // One error group runs the producer and the workers: the first error (a bug, not a
        // timeout: those are handled per call) cancels everything and is thrown here.
        try await withErrorGroup(name: "api-quota client") { group in
            try await group.addTask {
                for request in plan {
                    try await requests.send(request)  // waits while the workers are behind
                    report.queued(depth: requests.count)
                }
                requests.close()
            }
            for _ in 0..<workers {
                try await group.addTask {
                    for try await request in requests {
                        try await limiter.wait()
                        let cost = request.isHeavy ? 50 : 10
                        try await quota.withPermits(cost) {
                            report.permits(+cost)
                            defer { report.permits(-cost) }
                            do {
                                try await withTimeout(.milliseconds(timeoutMs)) {
                                    try await callAPI(request)
                                }
                                report.finished(.succeeded)
                            } catch is TimeoutError {
                                report.finished(.timedOut)
                            }
                        }
                    }
                }
            }
        }
        let elapsed = start.duration(to: clock.now)
        print(report.summary(calls: calls, elapsed: elapsed, rate: rate))
        let totals = report.totals
        guard totals.succeeded + totals.timedOut == calls, totals.peakPermits <= 100, quota.availablePermits == 100 else {
            throw ExitCode.failure
        }
    }

    /// The calls to make: which are heavy, and how long the simulated API takes for each.
    func makePlan() -> [Request] {
        var random = SplitMix64(seed: seed)
        return (0..<calls).map { index in
            let slow = Int.random(in: 0..<20, using: &random) == 0
            let jitter = Double.random(in: 0.5...1.5, using: &random)
            let latency = Double(latencyMs) * jitter * (slow ? 4 : 1)
            return Request(
                id: index,
                isHeavy: Double.random(in: 0..<1, using: &random) < heavyRatio,
                latency: .microseconds(Int64(latency * 1_000))
            )
        }
    }
}

struct Request: Sendable {
    var id: Int
    var isHeavy: Bool
    var latency: Duration
}

/// The simulated downstream API: takes `request.latency`, honours cancellation.
func callAPI(_ request: Request) async throws {
    try await Task.sleep(for: request.latency)
}

/// A small deterministic random generator (SplitMix64), so runs are reproducible.
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
