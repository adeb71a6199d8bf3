import ArgumentParser
import Corral
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// `service --overload`: the seed's "3 AM OOM", side by side with Corral's answer.
///
/// Requests arrive at 20,000 a second; the dependency they call has slowed down to 50
/// connections of 100 ms each, 500 requests a second. Each request holds a 1 KB body until
/// it is answered.
///
/// - With Corral, the requests go to a ``WorkerPool`` of 50 workers with a queue of 1,000:
///   when the queue is full, the arrival loop waits at `submit` (backpressure: a real server
///   would stop accepting, and its clients would back off). Tasks and memory stay flat.
/// - Without a limit, each request gets a `Task {}` — Go's `go handle(req)` — and waits for
///   the dependency inside it. Tasks pile up at 19,500 a second and memory grows with them,
///   until the process is killed; here the demo stops it after 5 s or 100,000 tasks (about 400 MB), then
///   cancels every task it started.
///
/// Corral's side runs first, so that its memory is measured in a process the other side has
/// not grown (freed memory is not always given back to the system).
struct OverloadComparison {
    static let arrivalsPerSecond = 20_000
    static let seconds = 5
    static let taskCap = 100_000
    static let connections = 50
    static let queueCapacity = 1_000
    static let serviceTime = Duration.milliseconds(100)
    static let bodySize = 1_024

    /// One sample a second of one side.
    struct Sample {
        var tasks: Int
        /// Requests admitted but not yet started (the pool's queue).
        var queued: Int
        /// Requests due by the arrival rate but not yet admitted: waiting at the bound.
        var heldBack: Int
        var residentBytes: Int?
    }

    func run() async throws {
        print("""
            == overload: \(Self.arrivalsPerSecond) requests/s (each with a \(Self.bodySize)-byte body) against a dependency \
            that serves \(Self.connections) at a time in \(Self.serviceTime.inMilliseconds) (\(Self.connections * 1_000 / Int(Self.serviceTime.inMicroseconds / 1_000))/s)
               Corral: a WorkerPool of \(Self.connections) workers, queue \(Self.queueCapacity); unbounded: a Task {} per request \
            (stopped after \(Self.seconds) s or \(Self.taskCap) tasks)
            """)
        let dependency = SlowDependency(connections: Self.connections, serviceTime: Self.serviceTime)
        print("  Corral (bounded) …")
        let (bounded, boundedTasksAfter) = try await measureBounded(dependency)
        print("  a Task {} per request (unbounded) …")
        let (unbounded, unboundedTasksAfter) = try await measureUnbounded(dependency)

        print()
        var rows = [["", "unbounded: tasks", "RSS", "", "Corral: tasks", "queued", "held back", "RSS"]]
        for second in 0..<max(bounded.count, unbounded.count) {
            let left = second < unbounded.count ? unbounded[second] : nil
            let right = second < bounded.count ? bounded[second] : nil
            rows.append([
                "\(second + 1) s",
                left.map { "\($0.tasks)" } ?? "", left.map { megabytes($0.residentBytes) } ?? "", "│",
                right.map { "\($0.tasks)" } ?? "", right.map { "\($0.queued)" } ?? "",
                right.map { "\($0.heldBack)" } ?? "", right.map { megabytes($0.residentBytes) } ?? "",
            ])
        }
        print(table(rows, leftAligned: [0]))
        print("""

              tasks:     tasks serving requests (unbounded: one per request not yet answered; Corral: the pool's workers)
              queued:    requests admitted, waiting for a worker (bounded by the queue: \(Self.queueCapacity))
              held back: requests due by the arrival rate that the arrival loop has not yet submitted: it waits at the
                         bound instead of starting more work than the dependency can take (backpressure)
              RSS:       resident memory of the process (/proc/self/statm)
            """)

        // Corral's side must stay within its bound; both must end with no task left.
        let boundedMax = bounded.map(\.tasks).max() ?? 0
        let checks = [
            ("Corral's tasks never above \(Self.connections) workers", boundedMax <= Self.connections),
            ("Corral's queue never above \(Self.queueCapacity)", bounded.allSatisfy { $0.queued <= Self.queueCapacity }),
            ("no task left on either side once stopped (Corral \(boundedTasksAfter), unbounded \(unboundedTasksAfter))", boundedTasksAfter == 0 && unboundedTasksAfter == 0),
        ]
        print()
        for (name, passed) in checks { print("\(passed ? "ok" : "FAILED"): \(name)") }
        guard checks.allSatisfy(\.1) else { throw ExitCode.failure }
    }

    /// The requests through a bounded pool: the arrival loop submits each, waiting while the
    /// queue is full. Returns the samples and the pool's workers once it has stopped.
    private func measureBounded(_ dependency: SlowDependency) async throws -> ([Sample], Int) {
        let pool = WorkerPool(.init(workers: .fixed(Self.connections), queueCapacity: Self.queueCapacity, name: "overload"))
        let arrivals = Arrivals(perSecond: Self.arrivalsPerSecond)
        var samples: [Sample] = []
        try await withErrorGroup(name: "overload, bounded") { group in
            try await group.addTask { try await pool.run() }
            try await group.addTask {
                do {
                    while await arrivals.nextIsDue() {
                        let body = RequestBody(size: Self.bodySize)
                        _ = try await pool.submit { try await dependency.serve(body) }  // waits at the bound
                        arrivals.admitted()
                    }
                } catch let error as PoolError where error.code == .shutdown {
                    return  // stopped: the pool was shut down while we waited for room
                }
            }
            for _ in 0..<Self.seconds {
                try await Task.sleep(for: .seconds(1))
                let stats = pool.stats
                samples.append(Sample(tasks: stats.workers, queued: stats.queued, heldBack: arrivals.heldBack, residentBytes: residentMemory()))
            }
            arrivals.stop()
            pool.shutdown(.immediate)  // cancel what runs, reject what is queued; run() returns
        }
        return (samples, pool.stats.workers)
    }

    /// The requests with a `Task {}` each and no limit — the pattern to avoid. Returns the
    /// samples and the tasks still live once every one has been cancelled and has ended.
    private func measureUnbounded(_ dependency: SlowDependency) async throws -> ([Sample], Int) {
        let tasks = UnboundedTasks()
        let arrivals = Arrivals(perSecond: Self.arrivalsPerSecond)
        var samples: [Sample] = []
        try await withErrorGroup(name: "overload, unbounded") { group in
            try await group.addTask {
                while tasks.live < Self.taskCap, await arrivals.nextIsDue() {
                    let body = RequestBody(size: Self.bodySize)
                    // Deliberately unstructured and unbounded: what Corral exists to prevent.
                    tasks.start {
                        do {
                            try await dependency.serve(body)
                        } catch {
                            return  // cancelled by the demo's cleanup: the request is abandoned
                        }
                    }
                    arrivals.admitted()
                }
            }
            for _ in 0..<Self.seconds {
                try await Task.sleep(for: .seconds(1))
                samples.append(Sample(tasks: tasks.live, queued: 0, heldBack: arrivals.heldBack, residentBytes: residentMemory()))
            }
            arrivals.stop()
        }
        // Clean up: cancel every task and wait for the last to end (at most 10 s).
        tasks.cancelAll()
        let clock = ContinuousClock()
        let deadline = clock.now + .seconds(10)
        while tasks.live > 0 && clock.now < deadline {
            try await Task.sleep(for: .milliseconds(10))
        }
        return (samples, tasks.live)
    }
}

/// The unbounded side's tasks: their handles (to cancel them at the end) and how many are live.
final class UnboundedTasks: Sendable {
    private let handles = Mutex<[Task<Void, Never>]>([])
    private let count = Atomic<Int>(0)

    /// Starts `operation` in a `Task {}` of its own, counted while it runs.
    func start(_ operation: @escaping @Sendable () async -> Void) {
        count.add(1, ordering: .relaxed)
        let task = Task {
            defer { self.count.subtract(1, ordering: .relaxed) }
            await operation()
        }
        handles.withLock { $0.append(task) }
    }

    var live: Int { count.load(ordering: .relaxed) }

    /// Cancels every task started, and forgets their handles.
    func cancelAll() {
        for task in handles.withLock({ handles in defer { handles.removeAll() }; return handles }) {
            task.cancel()
        }
    }
}

/// The slowed-down dependency: `connections` requests at a time, each taking `serviceTime`;
/// the others wait for a connection. (The semaphore is the dependency's own capacity, part of
/// the simulation, not a limit of the client.)
struct SlowDependency: Sendable {
    let connections: AsyncSemaphore
    let serviceTime: Duration

    init(connections: Int, serviceTime: Duration) {
        self.connections = AsyncSemaphore(permits: connections)
        self.serviceTime = serviceTime
    }

    func serve(_ body: RequestBody) async throws {
        try await connections.withPermits {
            try await Task.sleep(for: serviceTime)
        }
        precondition(body.bytes.count > 0)  // the body is held until the request is answered
    }
}

/// A request's body: memory held for as long as the request is.
struct RequestBody: Sendable {
    let bytes: [UInt8]

    init(size: Int) {
        bytes = [UInt8](repeating: 0x2A, count: size)
    }
}

/// Paces the arrivals at `perSecond`: ``nextIsDue()`` returns once the next request is due (at once
/// when the loop is behind), until ``stop()``.
final class Arrivals: Sendable {
    private let perSecond: Int
    private let start = ContinuousClock.now
    private let submitted = Atomic<Int>(0)
    private let stopped = Atomic<Bool>(false)

    init(perSecond: Int) {
        self.perSecond = perSecond
    }

    /// The requests due by now.
    private var due: Int {
        Int(start.duration(to: .now).inSeconds * Double(perSecond))
    }

    /// Waits until a request is due; false once stopped.
    func nextIsDue() async -> Bool {
        while !stopped.load(ordering: .relaxed) {
            if submitted.load(ordering: .relaxed) < due { return true }
            try? await Task.sleep(for: .milliseconds(2))  // a tick: the arrivals come in bursts
        }
        return false
    }

    /// A request was admitted.
    func admitted() { submitted.add(1, ordering: .relaxed) }

    /// Requests due and not yet admitted.
    var heldBack: Int { max(0, due - submitted.load(ordering: .relaxed)) }

    func stop() { stopped.store(true, ordering: .relaxed) }
}

/// The process's resident memory in bytes (Linux: `/proc/self/statm`); nil where unknown.
func residentMemory() -> Int? {
    #if os(Linux)
    guard let stream = fopen("/proc/self/statm", "r") else { return nil }
    defer { fclose(stream) }
    var buffer = [CChar](repeating: 0, count: 128)
    guard fgets(&buffer, Int32(buffer.count), stream) != nil else { return nil }
    let fields = String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self).split(separator: " ")
    guard fields.count > 1, let pages = Int(fields[1]) else { return nil }
    return pages * Int(sysconf(Int32(_SC_PAGESIZE)))
    #else
    return nil
    #endif
}

/// `"123 MB"`, or `"-"` when unknown.
func megabytes(_ bytes: Int?) -> String {
    bytes.map { "\($0 / 1_048_576) MB" } ?? "-"
}
