import Corral
import Synchronization

// group.limit, group.cancel_latency — see ../shared/bench/WORKLOADS.md.

let groupWorkloads: [Workload] = [
    Workload(name: "group.limit", impl: "corral", n: 1_000_000) { n in
        let counter = Counter()
        let elapsed = try await timed {
            try await withErrorGroup(limit: 8) { group in
                for _ in 0..<n {
                    try await group.addTask { counter.add(1) }
                }
            }
        }
        try check(counter.value == n, "counter = \(counter.value), want \(n)")
        return Measurement(elapsedNanoseconds: elapsed, extra: ["limit=8"])
    },
    Workload(name: "group.limit", impl: "taskgroup", n: 1_000_000) { n in
        // What Swift users write today: a sliding window over a TaskGroup, a task per item.
        let counter = Counter()
        let elapsed = try await timed {
            try await withThrowingTaskGroup(of: Void.self) { group in
                for index in 0..<n {
                    if index >= 8 { try await group.next() }
                    group.addTask { counter.add(1) }
                }
                try await group.waitForAll()
            }
        }
        try check(counter.value == n, "counter = \(counter.value), want \(n)")
        return Measurement(elapsedNanoseconds: elapsed, extra: ["limit=8"])
    },
    Workload(name: "group.cancel_latency", impl: "corral", n: 1) { _ in
        try await cancelLatency { tasks, thrower, started, cancelled, release, thrownAt in
            try await withErrorGroup { group in
                for index in 0..<tasks {
                    try await group.addTask {
                        try await waitingTask(index, thrower: thrower, started: started, cancelled: cancelled, release: release, thrownAt: thrownAt)
                    }
                }
                while started.value < tasks { await Task.yield() }
                release.release()
            }
        }
    },
    Workload(name: "group.cancel_latency", impl: "discarding", n: 1) { _ in
        try await cancelLatency { tasks, thrower, started, cancelled, release, thrownAt in
            try await withThrowingDiscardingTaskGroup { group in
                for index in 0..<tasks {
                    group.addTask {
                        try await waitingTask(index, thrower: thrower, started: started, cancelled: cancelled, release: release, thrownAt: thrownAt)
                    }
                }
                while started.value < tasks { await Task.yield() }
                release.release()
            }
        }
    },
    Workload(name: "group.cancel_latency", impl: "taskgroup", n: 1) { _ in
        try await cancelLatency { tasks, thrower, started, cancelled, release, thrownAt in
            try await withThrowingTaskGroup(of: Void.self) { group in
                for index in 0..<tasks {
                    group.addTask {
                        try await waitingTask(index, thrower: thrower, started: started, cancelled: cancelled, release: release, thrownAt: thrownAt)
                    }
                }
                while started.value < tasks { await Task.yield() }
                release.release()
                // The first error ends the loop; the group then cancels and awaits the rest.
                while try await group.next() != nil {}
            }
        }
    },
]

struct Boom: Error {}

/// One of the 10,000 tasks: the thrower waits to be released, then throws; the others wait up
/// to 10 s in a cancellable way and count the cancellation they observe.
private func waitingTask(
    _ index: Int, thrower: Int, started: Counter, cancelled: Counter,
    release: AsyncSemaphore, thrownAt: Timestamp
) async throws {
    started.add(1)
    if index == thrower {
        try await release.acquire()
        thrownAt.set(nowNanoseconds())
        throw Boom()
    }
    do {
        try await Task.sleep(for: .seconds(10))
    } catch {
        cancelled.add(1)
        throw error
    }
}

private func cancelLatency(
    _ run: (Int, Int, Counter, Counter, AsyncSemaphore, Timestamp) async throws -> Void
) async throws -> Measurement {
    let tasks = 10_000, thrower = 5_000
    let started = Counter(), cancelled = Counter()
    let release = AsyncSemaphore(permits: 1)
    try await release.acquire()
    let thrownAt = Timestamp()
    var caught: (any Error)?
    do {
        try await run(tasks, thrower, started, cancelled, release, thrownAt)
    } catch {
        caught = error
    }
    let end = nowNanoseconds()
    try check(caught is Boom, "group threw \(String(describing: caught)), want Boom")
    try check(cancelled.value == tasks - 1, "\(cancelled.value) tasks saw cancellation, want \(tasks - 1)")
    try check(thrownAt.value > 0, "thrower never ran")
    return Measurement(elapsedNanoseconds: end - thrownAt.value, extra: ["tasks=\(tasks)"])
}

/// A nanosecond timestamp written by one task and read by another.
final class Timestamp: Sendable {
    private let storage = Atomic<UInt64>(0)
    func set(_ value: UInt64) { storage.store(value, ordering: .releasing) }
    var value: UInt64 { storage.load(ordering: .acquiring) }
}

// pool.throughput — see ../shared/bench/WORKLOADS.md.

let poolWorkloads: [Workload] = [
    Workload(name: "pool.throughput", impl: "corral", n: 1_000_000) { n in
        let counter = Counter()
        let pool = WorkerPool(.init(workers: .fixed(4), queueCapacity: 1024, name: "throughput"))
        let elapsed = try await timed {
            try await withErrorGroup { group in
                try await group.addTask { try await pool.run() }
                for _ in 0..<n {
                    _ = try await pool.submit { counter.add(1) }
                }
                pool.shutdown(.graceful)
            }
        }
        try check(counter.value == n, "counter = \(counter.value), want \(n)")
        let stats = pool.stats
        try check(stats.completed == n && stats.unfinished == 0, "stats \(stats)")
        return Measurement(elapsedNanoseconds: elapsed, extra: ["workers=4", "queue=1024"])
    },
    // Not in WORKLOADS.md: an elastic pool under bursts, its worker count sampled over time.
    // op = one job (a 200 µs sleep); 3 bursts of n/3 jobs, 150 ms apart.
    Workload(name: "pool.elastic_burst", impl: "corral", n: 3_000) { n in
        let pool = WorkerPool(.init(workers: .elastic(min: 1, max: 8, idleTimeout: .milliseconds(30)), queueCapacity: 256, name: "bursty"))
        let samples = SampleLog()
        let done = Counter()
        let elapsed = try await timed {
            try await withErrorGroup { group in
                try await group.addTask { try await pool.run() }
                try await group.addTask {
                    while done.value == 0 {
                        samples.append(pool.stats.workers)
                        try await Task.sleep(for: .milliseconds(10))
                    }
                }
                for burst in 0..<3 {
                    for _ in 0..<(n / 3) {
                        _ = try await pool.submit { try await Task.sleep(for: .microseconds(200)) }
                    }
                    if burst < 2 { try await Task.sleep(for: .milliseconds(150)) }
                }
                try await Task.sleep(for: .milliseconds(100))  // let it shrink back
                done.add(1)
                pool.shutdown(.graceful)
            }
        }
        let stats = pool.stats
        try check(stats.completed == n / 3 * 3 && stats.unfinished == 0, "stats \(stats)")
        return Measurement(elapsedNanoseconds: elapsed, extra: [
            "min=1", "max=8", "idle_timeout_ms=30", "peak_busy=\(stats.peakBusy)",
            "workers_every_10ms=\(samples.all.map(String.init).joined(separator: ","))",
        ])
    },
    Workload(name: "pool.throughput", impl: "floor", n: 1_000_000) { n in
        // Not a pool: what any pool of async jobs must at least do per job, on one task with
        // no queue and no second thread — allocate a job holding the submitted closure, call
        // it, free it. A lower bound for `impl=corral` in the same run.
        let counter = Counter()
        let elapsed = try await timed {
            for _ in 0..<n {
                let job = FloorJob { counter.add(1) }
                try await job.operation()
            }
        }
        try check(counter.value == n, "counter = \(counter.value), want \(n)")
        return Measurement(elapsedNanoseconds: elapsed, extra: ["workers=0"])
    },
    Workload(name: "pool.throughput", impl: "taskgroup", n: 1_000_000) { n in
        // What Swift users write today: a task per job, at most 4 at once (a sliding window).
        let counter = Counter()
        let elapsed = try await timed {
            try await withThrowingTaskGroup(of: Void.self) { group in
                for index in 0..<n {
                    if index >= 4 { try await group.next() }
                    group.addTask { counter.add(1) }
                }
                try await group.waitForAll()
            }
        }
        try check(counter.value == n, "counter = \(counter.value), want \(n)")
        return Measurement(elapsedNanoseconds: elapsed, extra: ["workers=4"])
    },
]

/// A job of `pool.throughput impl=floor`: the submitted closure, as a pool stores it.
private final class FloorJob: Sendable {
    let operation: @Sendable @isolated(any) () async throws -> Void

    @inline(never)
    init(_ operation: @escaping @Sendable @isolated(any) () async throws -> Void) {
        self.operation = operation
    }
}

/// Integers appended from one task and read after.
final class SampleLog: Sendable {
    private let values = Mutex<[Int]>([])
    func append(_ value: Int) { values.withLock { $0.append(value) } }
    var all: [Int] { values.withLock { $0 } }
}
