import Corral

// batch.throughput — see ../shared/bench/WORKLOADS.md.

/// 8 adders, each keeping up to 256 results outstanding; batches of 100, flushed after 10 ms.
private let adders = 8, batchSize = 100, window = 256

let batchWorkloads: [Workload] = [
    Workload(name: "batch.throughput", impl: "corral", n: 1_000_000) { n in
        // The Go reference's Add returns a channel; Corral's `enqueue` returns a ticket. Each
        // adder awaits its oldest ticket once it has `window` outstanding.
        let batcher = Batcher<Int, Int, ContinuousClock>(maxSize: batchSize, maxDelay: .milliseconds(10)) { items in
            items.map { 2 * $0 }
        }
        let (elapsed, totals) = try await timedResult {
            try await withThrowingTaskGroup(of: (received: Int, wrong: Int, sum: Int).self) { group in
                group.addTask { try await batcher.run(); return (0, 0, 0) }
                let totals = try await withThrowingTaskGroup(of: (received: Int, wrong: Int, sum: Int).self) { addersGroup in
                    for adder in 0..<adders {
                        let range = share(n, parts: adders, adder)
                        addersGroup.addTask {
                            // The awaits are written in the loops, on plain struct state: a local
                            // async function would switch executors on entry and on return, and
                            // local functions capturing the counters would check exclusivity at
                            // run time, on every item.
                            var outstanding = Outstanding()
                            var tally = Tally()
                            for x in range {
                                if outstanding.isFull {
                                    let (ticket, want) = outstanding.removeOldest()
                                    tally.add(try await ticket.value, want: want)
                                }
                                outstanding.append(try batcher.enqueue(x), want: 2 * x)
                            }
                            while !outstanding.isEmpty {
                                let (ticket, want) = outstanding.removeOldest()
                                tally.add(try await ticket.value, want: want)
                            }
                            return (tally.received, tally.wrong, tally.sum)
                        }
                    }
                    var totals = (received: 0, wrong: 0, sum: 0)
                    for try await part in addersGroup {
                        totals.received += part.received
                        totals.wrong += part.wrong
                        totals.sum += part.sum
                    }
                    batcher.shutdown()
                    return totals
                }
                try await group.waitForAll()
                return totals
            }
        }
        try check(totals.wrong == 0, "\(totals.wrong) callers got a result that was not their item doubled")
        try check(totals.received == n, "received \(totals.received) results, want \(n)")
        try check(totals.sum == n * (n - 1), "sum of results = \(totals.sum), want \(n * (n - 1))")
        let stats = batcher.stats
        return Measurement(elapsedNanoseconds: elapsed, extra: [
            "adders=8", "batch=100", "interval_ms=10", "window=\(window)",
            "size_flushes=\(stats.flushedBySize)", "delay_flushes=\(stats.flushedByDelay)",
        ])
    },
]

/// An adder's tickets not yet awaited, oldest first: a ring of `window`.
private struct Outstanding {
    private var ring: [(ticket: BatchTicket<Int>, want: Int)?] = Array(repeating: nil, count: window)
    private var head = 0, count = 0

    var isFull: Bool { count == window }
    var isEmpty: Bool { count == 0 }

    mutating func append(_ ticket: BatchTicket<Int>, want: Int) {
        ring[(head + count) % window] = (ticket, want)
        count += 1
    }

    mutating func removeOldest() -> (ticket: BatchTicket<Int>, want: Int) {
        defer {
            ring[head] = nil
            head = (head + 1) % window
            count -= 1
        }
        return ring[head]!
    }
}

/// An adder's results: how many, how many wrong (the first one is reported), and their sum.
private struct Tally {
    var received = 0, wrong = 0, sum = 0

    mutating func add(_ value: Int, want: Int) {
        received += 1
        sum += value
        if value != want {
            if wrong == 0 { printError("batch.throughput: item \(want / 2) got \(value)") }
            wrong += 1
        }
    }
}
