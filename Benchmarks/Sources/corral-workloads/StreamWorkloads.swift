import Corral

// pipeline.3stage, fan.out_in, map.ordered — see ../shared/bench/WORKLOADS.md.

/// Item i of the stream workloads is the value i + 1, pulled from a plain counting sequence
/// (the Go reference feeds a channel from a goroutine).
struct Values: AsyncSequence, Sendable {
    let count: Int

    struct AsyncIterator: AsyncIteratorProtocol {
        var next: UInt64 = 1
        let end: UInt64

        mutating func next() async -> UInt64? {
            guard next <= end else { return nil }
            defer { next += 1 }
            return next
        }
    }

    func makeAsyncIterator() -> AsyncIterator { AsyncIterator(end: UInt64(count)) }
}

/// 100 rounds of xorshift64 (13, 7, 17), as the Go reference.
@inline(never)
func xorshift100(_ value: UInt64) -> UInt64 {
    var x = value
    for _ in 0..<100 {
        x ^= x << 13
        x ^= x >> 7
        x ^= x << 17
    }
    return x
}

/// A value that depends on the order of the values folded into it (FNV-style).
func orderedHash(_ hash: UInt64, _ value: UInt64) -> UInt64 {
    (hash ^ value) &* 1_099_511_628_211
}

func expectedFan(_ n: Int) -> (sum: UInt64, hash: UInt64) {
    var sum: UInt64 = 0, hash: UInt64 = 0
    for i in 0..<n {
        let value = xorshift100(UInt64(i) + 1)
        sum &+= value
        hash = orderedHash(hash, value)
    }
    return (sum, hash)
}

let fanWorkers = 4

let streamWorkloads: [Workload] = [
    Workload(name: "fan.out_in", impl: "corral", n: 1_000_000) { n in
        var sum: UInt64 = 0, count = 0
        let elapsed = try await timed {
            // Go's two channels of 64 hold up to 128 items between source and consumer.
            for try await value in Values(count: n).map(concurrency: fanWorkers, ordered: false, buffer: 128, xorshift100) {
                sum &+= value
                count += 1
            }
        }
        try check(count == n, "received \(count) items, want \(n)")
        try check(sum == expectedFan(n).sum, "sum = \(sum), want \(expectedFan(n).sum)")
        return Measurement(elapsedNanoseconds: elapsed, extra: ["workers=4", "buffer=128", "rounds=100"])
    },
    Workload(name: "fan.out_in", impl: "taskgroup", n: 1_000_000) { n in
        // What Swift users write today: a sliding window of child tasks, one per item.
        var sum: UInt64 = 0, count = 0
        let elapsed = await timed {
            await withTaskGroup(of: UInt64.self) { group in
                for await value in Values(count: n) {
                    if count + fanWorkers <= Int(value) - 1, let result = await group.next() {
                        sum &+= result
                        count += 1
                    }
                    group.addTask { xorshift100(value) }
                }
                for await result in group {
                    sum &+= result
                    count += 1
                }
            }
        }
        try check(count == n, "received \(count) items, want \(n)")
        try check(sum == expectedFan(n).sum, "sum = \(sum), want \(expectedFan(n).sum)")
        return Measurement(elapsedNanoseconds: elapsed, extra: ["workers=4", "rounds=100"])
    },
    Workload(name: "map.ordered", impl: "corral", n: 1_000_000) { n in
        var sum: UInt64 = 0, hash: UInt64 = 0, count = 0
        let elapsed = try await timed {
            for try await value in Values(count: n).map(concurrency: fanWorkers, buffer: 256, xorshift100) {
                sum &+= value
                hash = orderedHash(hash, value)
                count += 1
            }
        }
        let want = expectedFan(n)
        try check(count == n, "received \(count) items, want \(n)")
        try check(sum == want.sum && hash == want.hash, "sum/hash \(sum)/\(hash), want \(want.sum)/\(want.hash): out of order or lost")
        return Measurement(elapsedNanoseconds: elapsed, extra: ["workers=4", "window=256", "rounds=100"])
    },
    Workload(name: "map.ordered", impl: "taskgroup", n: 1_000_000) { n in
        // What Swift users write today: a sliding window of child tasks tagged with their
        // index, and a dictionary to put the results back in order.
        var sum: UInt64 = 0, hash: UInt64 = 0, count = 0
        let elapsed = await timed {
            await withTaskGroup(of: (Int, UInt64).self) { group in
                var parked: [Int: UInt64] = [:]
                var inFlight = 0
                func emit(_ result: (Int, UInt64)) {
                    parked[result.0] = result.1
                    while let value = parked.removeValue(forKey: count) {
                        sum &+= value
                        hash = orderedHash(hash, value)
                        count += 1
                    }
                }
                var index = 0
                for await value in Values(count: n) {
                    // At most 4 running; at most 256 taken and not yet emitted.
                    while inFlight == fanWorkers || index - count >= 256, let result = await group.next() {
                        inFlight -= 1
                        emit(result)
                    }
                    let current = index
                    group.addTask { (current, xorshift100(value)) }
                    inFlight += 1
                    index += 1
                }
                for await result in group { emit(result) }
            }
        }
        let want = expectedFan(n)
        try check(count == n, "received \(count) items, want \(n)")
        try check(sum == want.sum && hash == want.hash, "sum/hash \(sum)/\(hash), want \(want.sum)/\(want.hash): out of order or lost")
        return Measurement(elapsedNanoseconds: elapsed, extra: ["workers=4", "window=256", "rounds=100"])
    },
    Workload(name: "pipeline.3stage", impl: "corral", n: 1_000_000) { n in
        var sum = 0, count = 0
        let elapsed = try await timed {
            let pipeline = Values(count: n)
                .stage("+1", buffer: 50) { Int($0 - 1) + 1 }
                .stage("*2", buffer: 50) { $0 * 2 }
            for try await value in pipeline {
                sum += value
                count += 1
            }
        }
        try checkPipeline(n: n, sum: sum, count: count)
        return Measurement(elapsedNanoseconds: elapsed, extra: ["buffer=50"])
    },
    Workload(name: "pipeline.3stage", impl: "asyncstream", n: 1_000_000) { n in
        // What Swift users write today: a task per stage joined by AsyncStreams. AsyncStream
        // has no bounded buffer with backpressure, so the streams are unbounded.
        var sum = 0, count = 0
        let elapsed = await timed {
            await withTaskGroup(of: Void.self) { group in
                let (source, toAdd) = AsyncStream.makeStream(of: Int.self)
                let (added, toDouble) = AsyncStream.makeStream(of: Int.self)
                let (doubled, toSum) = AsyncStream.makeStream(of: Int.self)
                group.addTask {
                    for i in 0..<n { toAdd.yield(i) }
                    toAdd.finish()
                }
                group.addTask {
                    for await value in source { toDouble.yield(value + 1) }
                    toDouble.finish()
                }
                group.addTask {
                    for await value in added { toSum.yield(value * 2) }
                    toSum.finish()
                }
                for await value in doubled {
                    sum += value
                    count += 1
                }
            }
        }
        try checkPipeline(n: n, sum: sum, count: count)
        return Measurement(elapsedNanoseconds: elapsed, extra: ["buffer=unbounded"])
    },
]

func checkPipeline(n: Int, sum: Int, count: Int) throws {
    try check(count == n, "received \(count) items, want \(n)")
    try check(sum == n * (n + 1), "sum = \(sum), want \(n * (n + 1))")  // 2(i+1) for i in 0..<n
}
