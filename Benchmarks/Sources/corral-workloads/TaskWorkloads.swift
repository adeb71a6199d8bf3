import Corral
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

// tasks.idle_memory — see ../shared/bench/WORKLOADS.md.

private let idleTasks = 100_000

let taskWorkloads: [Workload] = [
    Workload(name: "tasks.idle_memory", impl: "corral", n: 1) { n in
        // 100,000 tasks of a TaskTracker, each parked on a semaphore until cancelled.
        try await idleMemory(runs: n) { started, exited in
            let tracker = TaskTracker(name: "idle", limit: idleTasks)
            let gate = AsyncSemaphore(permits: 1)
            try await gate.acquire()  // nobody gets a permit: every task waits to be cancelled
            for _ in 0..<idleTasks {
                let spawned = tracker.trySpawn {
                    started.add(1)
                    try? await gate.acquire()
                    exited.add(1)
                }
                try check(spawned, "the tracker refused a task")
            }
            return {
                tracker.cancelAll()
                tracker.close()
                try await tracker.wait()
            }
        }
    },
    Workload(name: "tasks.idle_memory", impl: "taskgroup", n: 1) { n in
        // What Swift users write today: child tasks of a task group, each asleep until
        // cancelled. The group must stay open while we measure, so it runs in a task.
        try await idleMemory(runs: n) { started, exited in
            let group = Task {
                await withTaskGroup(of: Void.self) { group in
                    for _ in 0..<idleTasks {
                        group.addTask {
                            started.add(1)
                            try? await Task.sleep(for: .seconds(86_400))
                            exited.add(1)
                        }
                    }
                    await group.waitForAll()
                }
            }
            return {
                group.cancel()
                await group.value
            }
        }
    },
]

/// Starts `idleTasks` tasks with `start` (which returns how to cancel them and wait for
/// them), and measures the resident memory per parked task and the time to cancel them all.
private func idleMemory(
    runs: Int,
    _ start: (_ started: Counter, _ exited: Counter) async throws -> () async throws -> Void
) async throws -> Measurement {
    var total: UInt64 = 0
    var extra: [String] = []
    for _ in 0..<runs {
        let started = Counter(), exited = Counter()
        let before = try residentBytes()
        let t0 = nowNanoseconds()
        let cancelAll = try await start(started, exited)
        while started.value < idleTasks { await Task.yield() }
        let t1 = nowNanoseconds()
        let after = try residentBytes()
        let t2 = nowNanoseconds()
        try await cancelAll()
        let t3 = nowNanoseconds()
        try check(exited.value == idleTasks, "\(exited.value) tasks exited after cancel, want \(idleTasks)")
        try check(after > before, "RSS did not grow (\(before) -> \(after) bytes) with \(idleTasks) tasks parked")
        total += t3 - t0
        extra = [
            "tasks=\(idleTasks)",
            "bytes_per_task=\(String(format1: Double(after - before) / Double(idleTasks)))",
            "cancel_ns=\(t3 - t2)",
            "spawn_ns=\(t1 - t0)",
            "rss_before=\(before)",
            "rss_after=\(after)",
        ]
    }
    return Measurement(elapsedNanoseconds: total, extra: extra)
}

/// The process's resident set size, from /proc/self/statm.
private func residentBytes() throws -> Int {
    guard let file = fopen("/proc/self/statm", "r") else { throw CheckFailure("cannot open /proc/self/statm") }
    defer { fclose(file) }
    var buffer = [CChar](repeating: 0, count: 256)
    guard fgets(&buffer, Int32(buffer.count), file) != nil else { throw CheckFailure("cannot read /proc/self/statm") }
    let line = String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    let fields = line.split(separator: " ")  // size resident shared …, in pages
    guard fields.count > 1, let resident = Int(fields[1]) else { throw CheckFailure("cannot parse /proc/self/statm") }
    return resident * Int(sysconf(Int32(_SC_PAGESIZE)))
}

extension String {
    /// One decimal, as the Go reference prints (`%.1f`).
    init(format1 value: Double) {
        let tenths = Int((value * 10).rounded())
        self = "\(tenths / 10).\(abs(tenths % 10))"
    }
}
