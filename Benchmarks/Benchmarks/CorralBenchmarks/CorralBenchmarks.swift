// package-benchmark suites for Corral's primitives: AsyncSemaphore, BoundedChannel,
// RateLimiter and the deadline scopes. Every benchmark measures wall clock, mallocs (total)
// and context switches; the `*` columns are per operation (one outer iteration runs 1,000
// operations; `--scale` shows the raw per-iteration figures). The whole run takes about
// 15 seconds once built. From this package's directory (`Benchmarks/`):
//
//   swift package --disable-sandbox benchmark                           # run everything
//   swift package --disable-sandbox benchmark --filter 'BoundedChannel'  # a regex on the names
//
// Thresholds: the p90 of mallocCountTotal only (stable), never of time (these machines are
// noisy). In package-benchmark 1.38 a configuration's `thresholds:` are tolerances, not
// values, so the values are committed as JSON next to this suite, in Thresholds/
// (`CorralBenchmarks.<name>.p90.json`, the one key `mallocCountTotal`, counted per outer
// iteration of 1,000 operations), and each configuration below carries the tolerance. The
// fast paths (uncontended acquire/release and withPermits, tryAcquire, trySend/tryReceive,
// RateLimiter with tokens available) have the value 0 with tolerance 0: a malloc in more
// than a tenth of the outer iterations fails the check. Both commands work offline:
//
//   swift package --disable-sandbox benchmark thresholds check --path Benchmarks/Thresholds
//       # exit 0: within tolerance; otherwise it prints the deviations and fails with
//       # `benchmarkThresholdRegression` (more mallocs) or `benchmarkThresholdImprovement`
//       # (fewer: update the files). Run it without --filter: 1.38.1 then finds no benchmark.
//   swift package --disable-sandbox benchmark thresholds update --metric mallocCountTotal \
//       --path Benchmarks/Thresholds --no-progress
//       # after an intended change; `--metric` keeps time out of the files
//
// Context switches: package-benchmark reports `.contextSwitches` on macOS only, so on
// Linux the suite adds `contextSwitches(rusage)`: the process's voluntary and involuntary
// switches from getrusage(2) around the measured part. It counts every thread, the
// harness's included, so read it as an upper bound. Tasks switching on the cooperative pool
// are not context switches; a thread that parks for lack of work is.

import Benchmark
import Corral
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

let benchmarks: @Sendable () -> Void = {
    semaphoreBenchmarks()
    channelBenchmarks()
    rateLimiterBenchmarks()
    deadlineBenchmarks()
    groupBenchmarks()
    resourceBenchmarks()
    streamBenchmarks()
}

// MARK: - Streams

/// 0..<count, one element per `next()`, never suspending.
struct Numbers: AsyncSequence, Sendable {
    let count: Int

    struct AsyncIterator: AsyncIteratorProtocol {
        var next = 0
        let end: Int

        mutating func next() async -> Int? {
            guard next < end else { return nil }
            defer { next += 1 }
            return next
        }
    }

    func makeAsyncIterator() -> AsyncIterator { AsyncIterator(end: count) }
}

func streamBenchmarks() {
    // One operation = one element through the operator, the transform trivial: what the
    // operator itself costs per element.
    for ordered in [false, true] {
        Benchmark("map.concurrency4.\(ordered ? "ordered" : "unordered")", configuration: allocating(mallocTolerance: 16)) { benchmark in
            let n = benchmark.scaledIterations.count
            var sum = 0
            try await measure(benchmark) { _ in
                for try await value in Numbers(count: n).map(concurrency: 4, ordered: ordered, buffer: 128, { $0 &* 2 }) {
                    sum &+= value
                }
            }
            expect(benchmark, sum == n * (n - 1), "sum = \(sum), want \(n * (n - 1))")
        }
    }

    Benchmark("merge.4sources", configuration: allocating(mallocTolerance: 16)) { benchmark in
        let n = benchmark.scaledIterations.count
        var count = 0
        try await measure(benchmark) { _ in
            for try await _ in merge((0..<4).map { share(n, parts: 4, $0) }.map { Numbers(count: $0.count) }) {
                count += 1
            }
        }
        expect(benchmark, count == n, "count = \(count), want \(n)")
    }

    Benchmark("fanOut.4consumers", configuration: allocating(mallocTolerance: 16)) { benchmark in
        let n = benchmark.scaledIterations.count
        let sum = try await measure(benchmark) { _ in
            try await withThrowingTaskGroup(of: Int.self) { group in
                for part in Numbers(count: n).fanOut(4, buffer: 64) {
                    group.addTask {
                        var partial = 0
                        for try await value in part { partial &+= value }
                        return partial
                    }
                }
                var total = 0
                for try await partial in group { total &+= partial }
                return total
            }
        }
        expect(benchmark, sum == n * (n - 1) / 2, "sum = \(sum), want \(n * (n - 1) / 2)")
    }

    // One operation = one item through the batcher: enqueue, then its result from the ticket
    // (one adder keeping 256 outstanding, batches of 100).
    Benchmark("Batcher.enqueue.batch100", configuration: allocating(mallocTolerance: 16)) { benchmark in
        let n = benchmark.scaledIterations.count
        let batcher = Batcher<Int, Int, ContinuousClock>(maxSize: 100, maxDelay: .milliseconds(10)) { items in
            items.map { $0 &* 2 }
        }
        var sum = 0
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await batcher.run() }
            try await measure(benchmark) { _ in
                var outstanding: [BatchTicket<Int>] = []
                outstanding.reserveCapacity(256)
                var head = 0
                for item in 0..<n {
                    if outstanding.count - head == 256 {
                        sum &+= try await outstanding[head].value
                        head += 1
                    }
                    outstanding.append(try batcher.enqueue(item))
                }
                batcher.shutdown()
                for ticket in outstanding[head...] { sum &+= try await ticket.value }
            }
            try await group.waitForAll()
        }
        expect(benchmark, sum == n * (n - 1), "sum = \(sum), want \(n * (n - 1))")
    }
}

// MARK: - Resources

func resourceBenchmarks() {
    Benchmark("ObjectPool.withObject.buffer4K", configuration: fastPath()) { benchmark in
        let pool = ObjectPool(capacity: 8) {
            [UInt8](repeating: 0, count: 4096)
        } reset: {
            $0[0] = 0
        }
        var sum = 0
        measureSync(benchmark) { operations in
            for i in operations {
                sum &+= pool.withObject { buffer in
                    buffer[0] = UInt8(truncatingIfNeeded: i)
                    return Int(buffer[0])
                }
            }
        }
        blackHole(sum)
        expect(benchmark, pool.stats.misses <= 1, "the pool made \(pool.stats.misses) buffers")
    }
}

// MARK: - Configurations

#if os(Linux)
/// Context switches of the whole process, from getrusage(2) (see the note at the top).
let contextSwitchesMetric = BenchmarkMetric.custom("contextSwitches(rusage)", polarity: .prefersSmaller, useScalingFactor: true)
let measuredMetrics: [BenchmarkMetric] = [.wallClock, .throughput, .mallocCountTotal, .contextSwitches, contextSwitchesMetric]
#else
let measuredMetrics: [BenchmarkMetric] = [.wallClock, .throughput, .mallocCountTotal, .contextSwitches]
#endif

/// A fast path: lock, update, unlock, no suspension. Allocates nothing: tolerance 0 on a
/// committed p90 of 0 mallocs.
func fastPath() -> Benchmark.Configuration {
    .init(
        metrics: measuredMetrics,
        warmupIterations: 10,
        scalingFactor: .kilo,
        maxDuration: .seconds(1),
        maxIterations: 2_000,
        thresholds: [.mallocCountTotal: BenchmarkThresholds(absolute: [.p90: 0])]
    )
}

/// Task creation, suspensions, deadline scopes: allocations that are part of the work. The
/// count is steady on one machine (26, 40, 6001… per 1,000 operations) but the waiters'
/// slabs grow with how many tasks end up waiting at once, which depends on the schedule:
/// `mallocTolerance` is the allowed difference from the committed p90, in mallocs per outer
/// iteration (1,000 operations), either way. One extra malloc per operation is +1,000.
func allocating(mallocTolerance: Int) -> Benchmark.Configuration {
    .init(
        metrics: measuredMetrics,
        warmupIterations: 5,
        scalingFactor: .kilo,
        maxDuration: .seconds(2),
        maxIterations: 300,
        thresholds: [.mallocCountTotal: BenchmarkThresholds(absolute: [.p90: mallocTolerance])]
    )
}

// MARK: - AsyncSemaphore

func semaphoreBenchmarks() {
    Benchmark("AsyncSemaphore.uncontended.acquireRelease", configuration: fastPath()) { benchmark in
        let semaphore = AsyncSemaphore(permits: 1)
        try await measure(benchmark, warmUp: true) { operations in
            for _ in operations {
                try await semaphore.acquire(1)
                semaphore.release(1)
            }
        }
        expect(benchmark, semaphore.availablePermits == 1, "permit not returned")
    }

    Benchmark("AsyncSemaphore.uncontended.withPermits", configuration: fastPath()) { benchmark in
        let semaphore = AsyncSemaphore(permits: 1)
        var sum = 0
        try await measure(benchmark, warmUp: true) { operations in
            for i in operations {
                sum &+= try await semaphore.withPermits(1) { i }
            }
        }
        blackHole(sum)
        expect(benchmark, semaphore.availablePermits == 1, "permit not returned")
    }

    Benchmark("AsyncSemaphore.uncontended.tryAcquireRelease", configuration: fastPath()) { benchmark in
        let semaphore = AsyncSemaphore(permits: 1)
        var failures = 0
        measureSync(benchmark) { operations in
            for _ in operations {
                if semaphore.tryAcquire(1) {
                    semaphore.release(1)
                } else {
                    failures += 1
                }
            }
        }
        expect(benchmark, failures == 0, "tryAcquire failed \(failures) times on a free semaphore")
    }

    // sem.contended in WORKLOADS.md: acquire(1), add 1 to a counter, release(1).
    Benchmark(
        "AsyncSemaphore.contended.8tasks.2permits",
        configuration: allocating(mallocTolerance: 8)
    ) { benchmark in
        let semaphore = AsyncSemaphore(permits: 2)
        let counter = Counter()
        let n = benchmark.scaledIterations.count
        try await measure(benchmark) { _ in
            try await withThrowingTaskGroup(of: Void.self) { group in
                for k in 0..<8 {
                    let ops = share(n, parts: 8, k).count
                    group.addTask {
                        for _ in 0..<ops {
                            try await semaphore.acquire(1)
                            counter.add(1)
                            semaphore.release(1)
                        }
                    }
                }
                try await group.waitForAll()
            }
        }
        expect(benchmark, counter.value == n, "counter = \(counter.value), want \(n)")
        expect(benchmark, semaphore.availablePermits == 2, "permits not all returned")
    }

    // sem.weighted_mix in WORKLOADS.md: acquire(w), release(w), w cycling 1, 3, 5, 7.
    Benchmark(
        "AsyncSemaphore.weightedMix.8tasks.8permits",
        configuration: allocating(mallocTolerance: 8)
    ) { benchmark in
        let semaphore = AsyncSemaphore(permits: 8)
        let acquired = Counter()
        let n = benchmark.scaledIterations.count
        try await measure(benchmark) { _ in
            try await withThrowingTaskGroup(of: Void.self) { group in
                for k in 0..<8 {
                    let range = share(n, parts: 8, k)
                    group.addTask {
                        var total = 0
                        for i in range {
                            let weight = weights[i % 4]
                            try await semaphore.acquire(weight)
                            semaphore.release(weight)
                            total += weight
                        }
                        acquired.add(total)
                    }
                }
                try await group.waitForAll()
            }
        }
        let want = (0..<n).reduce(0) { $0 + weights[$1 % 4] }
        expect(benchmark, acquired.value == want, "acquired \(acquired.value) permits, want \(want)")
        expect(benchmark, semaphore.availablePermits == 8, "permits not all returned")
    }
}

private let weights = [1, 3, 5, 7]

// MARK: - BoundedChannel

func channelBenchmarks() {
    // chan.spsc in WORKLOADS.md: one element sent and received.
    Benchmark("BoundedChannel.spsc.capacity64", configuration: allocating(mallocTolerance: 8)) { benchmark in
        let channel = warmedChannel(capacity: 64)
        let n = benchmark.scaledIterations.count
        let (sum, count) = try await measure(benchmark) { _ in
            try await pump(channel, producers: 1, consumers: 1, n: n)
        }
        expectDelivered(benchmark, n: n, sum: sum, count: count)
    }

    // chan.mpmc in WORKLOADS.md: 4 producers share n sends, 4 consumers drain until close.
    Benchmark("BoundedChannel.mpmc.4x4.capacity64", configuration: allocating(mallocTolerance: 8)) { benchmark in
        let channel = warmedChannel(capacity: 64)
        let n = benchmark.scaledIterations.count
        let (sum, count) = try await measure(benchmark) { _ in
            try await pump(channel, producers: 4, consumers: 4, n: n)
        }
        expectDelivered(benchmark, n: n, sum: sum, count: count)
    }

    // Capacity 0: every send waits for a receiver, so every element is a hand-off.
    Benchmark("BoundedChannel.rendezvous.spsc", configuration: allocating(mallocTolerance: 8)) { benchmark in
        let channel = BoundedChannel<Int>(capacity: 0)
        let n = benchmark.scaledIterations.count
        let (sum, count) = try await measure(benchmark) { _ in
            try await pump(channel, producers: 1, consumers: 1, n: n)
        }
        expectDelivered(benchmark, n: n, sum: sum, count: count)
    }

    // trySend into a non-full buffer, tryReceive from a non-empty one: no waiting, no malloc.
    Benchmark("BoundedChannel.trySendTryReceive.capacity64", configuration: fastPath()) { benchmark in
        let channel = warmedChannel(capacity: 64)
        _ = channel.trySend(-1)  // keep one element buffered: neither call meets an edge
        var sum = 0
        var misses = 0
        measureSync(benchmark) { operations in
            for i in operations {
                if channel.trySend(i) != .enqueued { misses += 1 }
                if case .element(let value) = channel.tryReceive() { sum &+= value } else { misses += 1 }
            }
        }
        let n = benchmark.scaledIterations.count
        expect(benchmark, misses == 0, "\(misses) trySend/tryReceive calls did not go through")
        expect(benchmark, sum == -1 + n * (n - 1) / 2 - (n - 1), "elements lost or reordered: sum \(sum)")
    }
}

/// A channel whose buffer has already grown to `capacity`, so the measured part does not
/// count the buffer's first allocations.
func warmedChannel(capacity: Int) -> BoundedChannel<Int> {
    let channel = BoundedChannel<Int>(capacity: capacity)
    for i in 0..<capacity { _ = channel.trySend(i) }
    while case .element = channel.tryReceive() {}
    return channel
}

/// Sends 0..<n from `producers` tasks, closes the channel once they are done, and receives
/// in `consumers` tasks until it is drained.
/// - Returns: the sum and count of what the consumers received.
func pump(_ channel: BoundedChannel<Int>, producers: Int, consumers: Int, n: Int) async throws -> (sum: Int, count: Int) {
    try await withThrowingTaskGroup(of: (sum: Int, count: Int).self) { receivers in
        for _ in 0..<consumers {
            receivers.addTask {
                var sum = 0
                var count = 0
                for try await value in channel {
                    sum &+= value
                    count += 1
                }
                return (sum, count)
            }
        }
        try await withThrowingTaskGroup(of: Void.self) { senders in
            for p in 0..<producers {
                let range = share(n, parts: producers, p)
                senders.addTask {
                    for i in range { try await channel.send(i) }
                }
            }
            try await senders.waitForAll()
        }
        channel.close()
        var total = (sum: 0, count: 0)
        for try await part in receivers {
            total = (total.sum &+ part.sum, total.count + part.count)
        }
        return total
    }
}

func expectDelivered(_ benchmark: Benchmark, n: Int, sum: Int, count: Int) {
    expect(benchmark, count == n, "received \(count) elements, want \(n)")
    expect(benchmark, sum == n * (n - 1) / 2, "sum = \(sum), want \(n * (n - 1) / 2)")
}

// MARK: - RateLimiter

func rateLimiterBenchmarks() {
    // A token costs 1 ns and the bucket holds a million: one call takes far longer than
    // 1 ns, so the bucket never runs dry and this measures the fast path only.
    Benchmark("RateLimiter.tryAcquire.available", configuration: fastPath()) { benchmark in
        let limiter = RateLimiter(rate: 1_000_000_000, per: .seconds(1), burst: 1_000_000)
        var refusals = 0
        measureSync(benchmark) { operations in
            for _ in operations where !limiter.tryAcquire(1) {
                refusals += 1
            }
        }
        expect(benchmark, refusals == 0, "tryAcquire refused \(refusals) times")
    }

    Benchmark("RateLimiter.wait.available", configuration: fastPath()) { benchmark in
        let limiter = RateLimiter(rate: 1_000_000_000, per: .seconds(1), burst: 1_000_000)
        try await measure(benchmark, warmUp: true) { operations in
            for _ in operations {
                try await limiter.wait(1)
            }
        }
        expect(benchmark, limiter.waiters == 0, "a waiter was left in line")
    }
}

// MARK: - Deadlines

func deadlineBenchmarks() {
    // timeout.overhead in WORKLOADS.md: arm a deadline, run the body in its own task, disarm.
    Benchmark("Deadline.withTimeout.trivialBody", configuration: allocating(mallocTolerance: 10)) { benchmark in
        let ran = Counter()
        try await measure(benchmark) { operations in
            for _ in operations {
                try await withTimeout(.seconds(1)) { ran.add(1) }
            }
        }
        let n = benchmark.scaledIterations.count
        expect(benchmark, ran.value == n, "body ran \(ran.value) times, want \(n)")
    }

    // An inner scope under a tighter enclosing deadline runs its body inline, in the calling
    // task: no task, no timer.
    Benchmark("Deadline.withDeadline.underTighterDeadline", configuration: allocating(mallocTolerance: 10)) { benchmark in
        let ran = Counter()
        let later = ContinuousClock.now + .seconds(3_600)
        let handle = BenchmarkHandle(benchmark: benchmark)
        try await withTimeout(.seconds(60)) {
            try await measure(handle.benchmark) { operations in
                for _ in operations {
                    try await withDeadline(later) { ran.add(1) }
                }
            }
        }
        let n = benchmark.scaledIterations.count
        expect(benchmark, ran.value == n, "body ran \(ran.value) times, want \(n)")
    }
}

// MARK: - Support

/// Measures `body(benchmark.scaledIterations)` alone: setup before it and checks after it
/// are not counted.
///
/// With `warmUp`, first runs `body(0..<1)` unmeasured, through the same frames. The harness
/// starts every outer iteration in a new task, and the first time that task's frames get this
/// deep its task allocator mallocs a slab: one malloc per outer iteration, not per operation,
/// which would hide in the per-operation figures but break a committed p90 of 0.
// MARK: - Groups

func groupBenchmarks() {
    // group.limit in WORKLOADS.md: a task per operation in a group limited to 8.
    Benchmark("ErrorGroup.limit8.trivialTasks", configuration: allocating(mallocTolerance: 40)) { benchmark in
        let counter = Counter()
        let n = benchmark.scaledIterations.count
        try await measure(benchmark) { _ in
            try await withErrorGroup(limit: 8) { group in
                for _ in 0..<n {
                    try await group.addTask { counter.add(1) }
                }
            }
        }
        expect(benchmark, counter.value == n, "counter = \(counter.value), want \(n)")
    }

    Benchmark("ErrorGroup.unlimited.trivialTasks", configuration: allocating(mallocTolerance: 40)) { benchmark in
        let counter = Counter()
        let n = benchmark.scaledIterations.count
        try await measure(benchmark) { _ in
            try await withErrorGroup { group in
                for _ in 0..<n {
                    try await group.addTask { counter.add(1) }
                }
            }
        }
        expect(benchmark, counter.value == n, "counter = \(counter.value), want \(n)")
    }

    Benchmark("concurrentMap.limit4", configuration: allocating(mallocTolerance: 16)) { benchmark in
        let input = Array(0..<benchmark.scaledIterations.count)
        let output = try await measure(benchmark) { _ in
            try await input.concurrentMap(limit: 4) { $0 &* 2 }
        }
        expect(benchmark, output.count == input.count && output.last == input.last.map { $0 &* 2 }, "wrong output")
    }

    // pool.throughput in WORKLOADS.md: submit a job to 4 workers, queue 1024.
    Benchmark("WorkerPool.fixed4.submit", configuration: allocating(mallocTolerance: 80)) { benchmark in
        let counter = Counter()
        let n = benchmark.scaledIterations.count
        try await measure(benchmark) { _ in
            let pool = WorkerPool(.init(workers: .fixed(4), queueCapacity: 1024, name: "benchmark"))
            try await withErrorGroup { group in
                try await group.addTask { try await pool.run() }
                for _ in 0..<n {
                    _ = try await pool.submit { counter.add(1) }
                }
                pool.shutdown(.graceful)
            }
        }
        expect(benchmark, counter.value == n, "counter = \(counter.value), want \(n)")
    }

    Benchmark("TaskTracker.spawnAndDrain.limit64", configuration: allocating(mallocTolerance: 40)) { benchmark in
        let counter = Counter()
        let n = benchmark.scaledIterations.count
        try await measure(benchmark) { _ in
            let tracker = TaskTracker(name: "benchmark", limit: 64)
            for _ in 0..<n {
                try await tracker.spawn { counter.add(1) }
            }
            tracker.close()
            try await tracker.wait()
        }
        expect(benchmark, counter.value == n, "counter = \(counter.value), want \(n)")
    }
}

func measure<R>(
    _ benchmark: Benchmark,
    warmUp: Bool = false,
    _ body: (Range<Int>) async throws -> R
) async rethrows -> R {
    if warmUp { _ = try await body(0..<1) }
    let switches = contextSwitches()
    benchmark.startMeasurement()
    let result = try await body(benchmark.scaledIterations)
    benchmark.stopMeasurement()
    recordContextSwitches(benchmark, since: switches)
    return result
}

/// ``measure(_:warmUp:_:)`` for a body that does not suspend (no task allocator involved).
func measureSync<R>(_ benchmark: Benchmark, _ body: (Range<Int>) throws -> R) rethrows -> R {
    let switches = contextSwitches()
    benchmark.startMeasurement()
    let result = try body(benchmark.scaledIterations)
    benchmark.stopMeasurement()
    recordContextSwitches(benchmark, since: switches)
    return result
}

func recordContextSwitches(_ benchmark: Benchmark, since start: Int) {
    #if os(Linux)
    benchmark.measurement(contextSwitchesMetric, contextSwitches() - start)
    #endif
}

/// The process's voluntary and involuntary context switches so far.
func contextSwitches() -> Int {
    var usage = rusage()
    #if canImport(Glibc)
    let who = __rusage_who_t(RUSAGE_SELF.rawValue)
    #else
    let who = RUSAGE_SELF
    #endif
    guard getrusage(who, &usage) == 0 else { return 0 }
    return usage.ru_nvcsw + usage.ru_nivcsw
}

/// Stops the run when a workload's result is wrong: a fast benchmark of a broken primitive
/// proves nothing. A crash rather than `benchmark.error(_:)`, which package-benchmark 1.38.1
/// only prints: the run still exits 0 and `thresholds check` passes on the missing results.
/// The plugin then fails with "benchmark job(s) failed"; the message shows without
/// `--no-progress`.
func expect(_ benchmark: Benchmark, _ condition: Bool, _ message: @autoclosure () -> String) {
    if !condition { fatalError("\(benchmark.name): \(message())") }
}

/// The half-open range of the `k`-th of `parts` shares of `n` (as WORKLOADS.md splits).
func share(_ n: Int, parts: Int, _ k: Int) -> Range<Int> {
    (n * k / parts)..<(n * (k + 1) / parts)
}

/// Lets a deadline scope's body (a `sending` closure) measure: the body runs while the
/// benchmark's task waits for it, so one task at a time uses the benchmark.
struct BenchmarkHandle: @unchecked Sendable {
    let benchmark: Benchmark
}

final class Counter: Sendable {
    private let count = Atomic<Int>(0)

    func add(_ amount: Int) {
        count.add(amount, ordering: .relaxed)
    }

    var value: Int {
        count.load(ordering: .relaxed)
    }
}
