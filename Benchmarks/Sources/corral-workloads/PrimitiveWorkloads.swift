import Corral
import Synchronization

// sem.*, chan.*, timeout.overhead — see ../shared/bench/WORKLOADS.md.

let primitiveWorkloads: [Workload] = [
    Workload(name: "sem.uncontended", impl: "corral", n: 10_000_000) { n in
        let semaphore = AsyncSemaphore(permits: 1)
        let elapsed = try await timed {
            for _ in 0..<n {
                try await semaphore.acquire(1)
                semaphore.release(1)
            }
        }
        try check(semaphore.tryAcquire(1), "permit not returned")
        try check(!semaphore.tryAcquire(1), "more than one permit available")
        return Measurement(elapsedNanoseconds: elapsed, extra: ["capacity=1"])
    },
    Workload(name: "sem.uncontended", impl: "actor", n: 10_000_000) { n in
        let semaphore = ActorSemaphore(permits: 1)
        let elapsed = await timed {
            for _ in 0..<n {
                await semaphore.acquire(1)
                await semaphore.release(1)
            }
        }
        try await check(semaphore.available == 1, "permit not returned")
        return Measurement(elapsedNanoseconds: elapsed, extra: ["capacity=1"])
    },
    Workload(name: "sem.contended", impl: "corral", n: 1_000_000) { n in
        let semaphore = AsyncSemaphore(permits: 2)
        let counter = Counter()
        let elapsed = try await timed {
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
        try check(counter.value == n, "counter = \(counter.value), want \(n)")
        try check(semaphore.availablePermits == 2, "permits not all returned")
        return Measurement(elapsedNanoseconds: elapsed, extra: ["capacity=2", "tasks=8"])
    },
    Workload(name: "sem.contended", impl: "actor", n: 1_000_000) { n in
        let semaphore = ActorSemaphore(permits: 2)
        let counter = Counter()
        let elapsed = await timed {
            await withTaskGroup(of: Void.self) { group in
                for k in 0..<8 {
                    let ops = share(n, parts: 8, k).count
                    group.addTask {
                        for _ in 0..<ops {
                            await semaphore.acquire(1)
                            counter.add(1)
                            await semaphore.release(1)
                        }
                    }
                }
            }
        }
        try check(counter.value == n, "counter = \(counter.value), want \(n)")
        return Measurement(elapsedNanoseconds: elapsed, extra: ["capacity=2", "tasks=8"])
    },
    Workload(name: "sem.weighted_mix", impl: "corral", n: 1_000_000) { n in
        let semaphore = AsyncSemaphore(permits: 8)
        let acquired = Counter()
        let operations = Counter()
        let elapsed = try await timed {
            try await withThrowingTaskGroup(of: Void.self) { group in
                for k in 0..<8 {
                    let range = share(n, parts: 8, k)
                    group.addTask {
                        var weight = 0
                        for i in range {
                            let w = weights[i % 4]
                            try await semaphore.acquire(w)
                            semaphore.release(w)
                            weight += w
                        }
                        acquired.add(weight)
                        operations.add(range.count)
                    }
                }
                try await group.waitForAll()
            }
        }
        try checkWeightedMix(n: n, operations: operations.value, acquired: acquired.value)
        try check(semaphore.availablePermits == 8, "permits not all returned")
        return Measurement(elapsedNanoseconds: elapsed, extra: ["capacity=8", "tasks=8", "weights=1,3,5,7"])
    },
    Workload(name: "sem.weighted_mix", impl: "actor", n: 1_000_000) { n in
        let semaphore = ActorSemaphore(permits: 8)
        let acquired = Counter()
        let operations = Counter()
        let elapsed = await timed {
            await withTaskGroup(of: Void.self) { group in
                for k in 0..<8 {
                    let range = share(n, parts: 8, k)
                    group.addTask {
                        var weight = 0
                        for i in range {
                            let w = weights[i % 4]
                            await semaphore.acquire(w)
                            await semaphore.release(w)
                            weight += w
                        }
                        acquired.add(weight)
                        operations.add(range.count)
                    }
                }
            }
        }
        try checkWeightedMix(n: n, operations: operations.value, acquired: acquired.value)
        return Measurement(elapsedNanoseconds: elapsed, extra: ["capacity=8", "tasks=8", "weights=1,3,5,7"])
    },
    Workload(name: "chan.spsc", impl: "corral", n: 1_000_000) { n in
        let channel = BoundedChannel<Int>(capacity: 64)
        let (elapsed, result) = try await timedResult {
            try await withThrowingTaskGroup(of: (sum: Int, count: Int, inOrder: Bool).self) { group in
                group.addTask {
                    for i in 0..<n { try await channel.send(i) }
                    channel.close()
                    return (0, 0, true)
                }
                group.addTask {
                    var sum = 0, count = 0, inOrder = true
                    for try await value in channel {
                        if value != count { inOrder = false }
                        sum += value
                        count += 1
                    }
                    return (sum, count, inOrder)
                }
                var total = (sum: 0, count: 0, inOrder: true)
                for try await part in group {
                    total = (total.sum + part.sum, total.count + part.count, total.inOrder && part.inOrder)
                }
                return total
            }
        }
        try checkChannel(n: n, sum: result.sum, count: result.count)
        try check(result.inOrder, "values arrived out of order")
        return Measurement(elapsedNanoseconds: elapsed, extra: ["capacity=64"])
    },
    Workload(name: "chan.spsc", impl: "asyncstream", n: 1_000_000) { n in
        let (elapsed, result) = await timedResult {
            // What Swift users write today: AsyncStream has no bounded buffer with
            // backpressure, so the producer never waits (unbounded buffering).
            let (stream, continuation) = AsyncStream.makeStream(of: Int.self, bufferingPolicy: .unbounded)
            return await withTaskGroup(of: (sum: Int, count: Int, inOrder: Bool).self) { group in
                group.addTask {
                    for i in 0..<n { continuation.yield(i) }
                    continuation.finish()
                    return (0, 0, true)
                }
                group.addTask {
                    var sum = 0, count = 0, inOrder = true
                    for await value in stream {
                        if value != count { inOrder = false }
                        sum += value
                        count += 1
                    }
                    return (sum, count, inOrder)
                }
                var total = (sum: 0, count: 0, inOrder: true)
                for await part in group {
                    total = (total.sum + part.sum, total.count + part.count, total.inOrder && part.inOrder)
                }
                return total
            }
        }
        try checkChannel(n: n, sum: result.sum, count: result.count)
        try check(result.inOrder, "values arrived out of order")
        return Measurement(elapsedNanoseconds: elapsed, extra: ["capacity=unbounded"])
    },
    Workload(name: "chan.mpmc", impl: "corral", n: 1_000_000) { n in
        let channel = BoundedChannel<Int>(capacity: 64)
        let (elapsed, result) = try await timedResult {
            try await withThrowingTaskGroup(of: (sum: Int, count: Int).self) { consumers in
                for _ in 0..<4 {
                    consumers.addTask {
                        var sum = 0, count = 0
                        for try await value in channel {
                            sum += value
                            count += 1
                        }
                        return (sum, count)
                    }
                }
                try await withThrowingTaskGroup(of: Void.self) { producers in
                    for p in 0..<4 {
                        let range = share(n, parts: 4, p)
                        producers.addTask {
                            for i in range { try await channel.send(i) }
                        }
                    }
                    try await producers.waitForAll()
                }
                channel.close()
                var total = (sum: 0, count: 0)
                for try await part in consumers {
                    total = (total.sum + part.sum, total.count + part.count)
                }
                return total
            }
        }
        try checkChannel(n: n, sum: result.sum, count: result.count)
        return Measurement(elapsedNanoseconds: elapsed, extra: ["capacity=64", "producers=4", "consumers=4"])
    },
    Workload(name: "chan.mpmc", impl: "asyncstream", n: 1_000_000) { n in
        // AsyncStream supports a single consumer only: 4 producers, 1 consumer, unbounded.
        let (elapsed, result) = await timedResult {
            let (stream, continuation) = AsyncStream.makeStream(of: Int.self, bufferingPolicy: .unbounded)
            return await withTaskGroup(of: (sum: Int, count: Int).self) { group in
                group.addTask {
                    var sum = 0, count = 0
                    for await value in stream {
                        sum += value
                        count += 1
                    }
                    return (sum, count)
                }
                await withTaskGroup(of: Void.self) { producers in
                    for p in 0..<4 {
                        let range = share(n, parts: 4, p)
                        producers.addTask {
                            for i in range { continuation.yield(i) }
                        }
                    }
                }
                continuation.finish()
                var total = (sum: 0, count: 0)
                for await part in group {
                    total = (total.sum + part.sum, total.count + part.count)
                }
                return total
            }
        }
        try checkChannel(n: n, sum: result.sum, count: result.count)
        return Measurement(elapsedNanoseconds: elapsed, extra: ["capacity=unbounded", "producers=4", "consumers=1"])
    },
    Workload(name: "timeout.overhead", impl: "corral", n: 1_000_000) { n in
        let ran = Counter()
        let elapsed = try await timed {
            for _ in 0..<n {
                try await withTimeout(.seconds(1)) {
                    ran.add(1)
                }
            }
        }
        try check(ran.value == n, "body ran \(ran.value) times, want \(n)")
        return Measurement(elapsedNanoseconds: elapsed, extra: ["timeout_s=1"])
    },
    Workload(name: "timeout.overhead", impl: "taskgroup", n: 1_000_000) { n in
        let ran = Counter()
        let elapsed = try await timed {
            for _ in 0..<n {
                _ = try await raceTimeout(.seconds(1)) {
                    ran.add(1)
                }
            }
        }
        try check(ran.value == n, "body ran \(ran.value) times, want \(n)")
        return Measurement(elapsedNanoseconds: elapsed, extra: ["timeout_s=1"])
    },
]

private let weights = [1, 3, 5, 7]

private func checkWeightedMix(n: Int, operations: Int, acquired: Int) throws {
    var want = 0
    for i in 0..<n { want += weights[i % 4] }
    try check(operations == n, "ops = \(operations), want \(n)")
    try check(acquired == want, "weight acquired = \(acquired), want \(want)")
}

private func checkChannel(n: Int, sum: Int, count: Int) throws {
    try check(count == n, "received \(count) values, want \(n)")
    try check(sum == n * (n - 1) / 2, "sum = \(sum), want \(n * (n - 1) / 2)")
}

func timedResult<R>(_ body: () async throws -> R) async rethrows -> (UInt64, R) {
    let start = nowNanoseconds()
    let result = try await body()
    return (nowNanoseconds() - start, result)
}

// MARK: - Baselines: what Swift users write today

/// The semaphore a Swift user writes on an actor: FIFO, weighted, no cancellation.
actor ActorSemaphore {
    private(set) var available: Int
    private var waiters: [(permits: Int, continuation: CheckedContinuation<Void, Never>)] = []
    private var head = 0

    init(permits: Int) { available = permits }

    func acquire(_ permits: Int) async {
        if head == waiters.count && available >= permits {
            available -= permits
            return
        }
        await withCheckedContinuation { waiters.append((permits, $0)) }
    }

    func release(_ permits: Int) {
        available += permits
        while head < waiters.count && waiters[head].permits <= available {
            available -= waiters[head].permits
            waiters[head].continuation.resume()
            head += 1
        }
        if head == waiters.count {
            waiters.removeAll(keepingCapacity: true)
            head = 0
        }
    }
}

private struct RaceTimeoutError: Error {}

/// The timeout a Swift user writes today: race the body against a sleeping task.
func raceTimeout<T: Sendable>(_ timeout: Duration, _ body: @escaping @Sendable () async throws -> T) async throws -> T {
    try await withThrowingTaskGroup(of: T.self) { group in
        group.addTask { try await body() }
        group.addTask {
            try await Task.sleep(for: timeout)
            throw RaceTimeoutError()
        }
        defer { group.cancelAll() }
        return try await group.next()!
    }
}
