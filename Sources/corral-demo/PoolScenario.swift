import ArgumentParser
import Corral
@preconcurrency import Dispatch
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The seed's worker-pool pattern under load, done with Corral: an elastic pool fed by a
/// producer faster than the workers.
///
/// A burst phase offers jobs with `trySubmit` (rejections are counted: load shedding), then a
/// steady phase submits with `submit` (backpressure: the producer waits while the queue is
/// full). Some jobs fail; their errors reach their handles and the accounting. A progress
/// line shows the queue depth and the workers; Ctrl-C shuts the pool down gracefully (and
/// immediately if the queue has not drained in two seconds). The final accounting checks
/// `submitted == completed + failed + cancelled + rejected`.
struct PoolScenario: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "pool",
        abstract: "An elastic worker pool fed by a fast producer: backpressure, rejections, graceful shutdown on Ctrl-C."
    )

    @Option(help: "Jobs the producer offers.")
    var jobs = 3_000

    @Option(help: "Workers the pool keeps at least.")
    var minWorkers = 2

    @Option(help: "Workers the pool may grow to.")
    var maxWorkers = 16

    @Option(help: "Jobs that may wait for a worker.")
    var queueCapacity = 100

    @Option(help: "Mean simulated job duration, in milliseconds.")
    var jobMs = 4

    @Option(help: "Fraction of jobs that fail, 0...1.")
    var failureRate = 0.05

    func validate() throws {
        guard jobs > 0 else { throw ValidationError("--jobs must be greater than 0") }
        guard minWorkers >= 0 else { throw ValidationError("--min-workers must not be negative") }
        guard maxWorkers > 0, maxWorkers >= minWorkers else { throw ValidationError("--max-workers must be greater than 0 and at least --min-workers") }
        guard queueCapacity >= 0 else { throw ValidationError("--queue-capacity must not be negative") }
        guard jobMs >= 0 else { throw ValidationError("--job-ms must not be negative") }
        guard (0...1).contains(failureRate) else { throw ValidationError("--failure-rate must be within 0...1") }
    }

    func run() async throws {
        let pool = WorkerPool(.init(
            workers: .elastic(min: minWorkers, max: maxWorkers, idleTimeout: .milliseconds(100)),
            queueCapacity: queueCapacity,
            name: "pattern-1"
        ))
        print("== pool: \(jobs) jobs of ~\(jobMs) ms, elastic \(minWorkers)...\(maxWorkers) workers, queue \(queueCapacity); Ctrl-C shuts it down gracefully")
        let interruption = Interruption { pool.shutdown(.graceful(timeout: .seconds(2))) }
        defer { interruption.stop() }
        let interrupted = interruption.flag
        let burst = jobs / 3
        let handles = HandleLog()
        let clock = ContinuousClock()
        let start = clock.now

        try await withErrorGroup(name: "pool scenario") { group in
            try await group.addTask { try await pool.run() }
            try await group.addTask {
                // A progress line while the pool runs.
                while !Task.isCancelled && pool.stats.unfinished + pool.stats.queued > 0 || pool.stats.submitted == 0 {
                    printProgress(pool.stats)
                    try? await Task.sleep(for: .milliseconds(250))
                    if interrupted.isSet && pool.stats.workers == 0 { break }
                }
            }
            var random = SplitMix64(seed: 7)
            for index in 0..<jobs {
                let duration = Duration.microseconds(Int64(Double(jobMs * 1_000) * Double.random(in: 0.5...1.5, using: &random)))
                let fails = Double.random(in: 0..<1, using: &random) < failureRate
                let job: @Sendable () async throws -> Int = {
                    try await Task.sleep(for: duration)
                    if fails { throw SimulatedFailure(job: index) }
                    return index
                }
                do {
                    if index < burst {
                        handles.append(try pool.trySubmit(job))       // load shedding: never waits
                    } else {
                        handles.append(try await pool.submit(job))    // backpressure: waits for room
                    }
                } catch let error as PoolError where error.code == .queueFull {
                    continue  // refused, counted in stats.refused
                } catch is PoolError {
                    break     // shut down (Ctrl-C): stop producing
                }
            }
            pool.shutdown(.graceful)
        }

        var failures: [String: Int] = [:]
        for handle in handles.all {
            do {
                _ = try await handle.value
            } catch {
                failures["\(type(of: error))", default: 0] += 1
            }
        }
        let stats = pool.stats
        print()
        print("""
            jobs offered:    \(jobs)\(interrupted.isSet ? " (interrupted: shut down gracefully)" : "")
              accepted:      \(stats.submitted)
              refused:       \(stats.refused) (trySubmit on a full queue, or after shutdown)
            accepted jobs:   completed \(stats.completed), failed \(stats.failed), cancelled \(stats.cancelled), rejected \(stats.rejected)
            failure reasons: \(failures.isEmpty ? "none" : failures.sorted { $0.key < $1.key }.map { "\($0.key) × \($0.value)" }.joined(separator: ", "))
            peak queued:     \(stats.peakQueued) of \(queueCapacity)
            peak busy:       \(stats.peakBusy) workers (max \(maxWorkers))
            elapsed:         \(start.duration(to: clock.now))
            """)
        let accounted = stats.submitted == stats.completed + stats.failed + stats.cancelled + stats.rejected
        print("accounting:      submitted == completed + failed + cancelled + rejected: \(accounted ? "yes" : "NO")")
        guard accounted, stats.peakBusy <= maxWorkers, stats.workers == 0 else { throw ExitCode.failure }
    }
}

private func printProgress(_ stats: WorkerPool.Stats) {
    printStatus("  queued \(stats.queued), workers \(stats.workers) (busy \(stats.busy)), completed \(stats.completed), failed \(stats.failed), refused \(stats.refused)")
}

/// A job's simulated failure: reaches its handle, counted by reason in the report.
struct SimulatedFailure: Error {
    var job: Int
}

/// The handles of accepted jobs, kept by the producer.
final class HandleLog: Sendable {
    private let handles = Mutex<[JobHandle<Int>]>([])
    func append(_ handle: JobHandle<Int>) { handles.withLock { $0.append(handle) } }
    var all: [JobHandle<Int>] { handles.withLock { $0 } }
}

/// Whether Ctrl-C (or SIGTERM) was received.
final class InterruptFlag: Sendable {
    private let flag = Atomic<Bool>(false)
    func set() { flag.store(true, ordering: .relaxed) }
    var isSet: Bool { flag.load(ordering: .relaxed) }
}

/// Calls `action` on Ctrl-C (SIGINT) or SIGTERM, instead of letting the process die, until
/// `stop()`.
final class Interruption {
    private var sources: [any DispatchSourceSignal] = []
    let flag = InterruptFlag()

    init(_ action: @escaping @Sendable () -> Void) {
        for signalNumber in [SIGINT, SIGTERM] {
            signal(signalNumber, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: signalNumber, queue: .global())
            source.setEventHandler { [flag] in
                flag.set()
                action()
            }
            source.resume()
            sources.append(source)
        }
    }

    var happened: Bool { flag.isSet }

    func stop() {
        for source in sources { source.cancel() }
        sources = []
        signal(SIGINT, SIG_DFL)
        signal(SIGTERM, SIG_DFL)
    }
}
