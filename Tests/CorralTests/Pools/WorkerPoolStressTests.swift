@testable import Corral
import CorralTesting
import Testing

/// Every shutdown mode racing concurrent submitters, handle cancellations and slow or failing
/// jobs: every accepted job ends exactly once, no job runs twice, no handle is left
/// unresolved, and `submitted == completed + failed + cancelled + rejected` once `run()`
/// returns. Sized for seconds; `CORRAL_STRESS_ITERATIONS=<rounds>` runs longer.
@Suite("WorkerPool stress")
struct WorkerPoolStressTests {
    enum Ending: Equatable {
        case value
        case failed
        case cancelled
        case rejected
    }

    @Test func shutdownsRacingSubmitters_loseNothing_andRunNothingTwice() async throws {
        let rounds = stressIterations(default: 40)
        for round in 0..<rounds {
            var generator = SplitMix64(seed: UInt64(5_000 + round))
            let workers: WorkerPool.Configuration.Workers = Bool.random(using: &generator)
                ? .fixed(Int.random(in: 1...4, using: &generator))
                : .elastic(min: Int.random(in: 0...1, using: &generator), max: Int.random(in: 2...4, using: &generator), idleTimeout: .milliseconds(1))
            let capacity = Int.random(in: 0...6, using: &generator)
            let pool = WorkerPool(.init(workers: workers, queueCapacity: capacity, name: "stress"))
            let runs = Log<Int>()
            let accepted = Log<JobHandle<Int>>()
            let mode = Int.random(in: 0..<4, using: &generator)  // graceful, immediate, graceful→immediate, cancel run()
            let ledger = TaskLedger()
            let runner = Task { try await TaskLedger.$current.withValue(ledger) { try await pool.run() } }
            let submitters = (0..<3).map { submitter in
                let seed = generator.next()
                return Task {
                    var random = SplitMix64(seed: seed)
                    for index in 0..<25 {
                        let id = submitter * 100 + index
                        let kind = Int.random(in: 0..<6, using: &random)
                        let operation: @Sendable () async throws -> Int = {
                            runs.append(id)
                            switch kind {
                            case 0: throw TestError(id: id)
                            case 1: try await Task.sleep(for: .microseconds(Int64(id % 50)))
                            case 2: await Task.yield()
                            default: break
                            }
                            return id
                        }
                        do {
                            let handle = Bool.random(using: &random)
                                ? try await pool.submit(operation)
                                : try pool.trySubmit(operation)
                            accepted.append(handle)
                            if Int.random(in: 0..<8, using: &random) == 0 { handle.cancel() }
                        } catch is PoolError {
                            continue  // refused: full or shut down
                        } catch {
                            return  // this submitter was cancelled
                        }
                    }
                }
            }
            for _ in 0..<Int.random(in: 0...40, using: &generator) { await Task.yield() }
            switch mode {
            case 0: pool.shutdown(.graceful)
            case 1: pool.shutdown(.immediate)
            case 2:
                pool.shutdown(.graceful(timeout: .microseconds(Int64.random(in: 0...300, using: &generator))))
            default: runner.cancel()
            }
            if Bool.random(using: &generator), let victim = submitters.randomElement(using: &generator) { victim.cancel() }
            for submitter in submitters { await submitter.value }
            pool.shutdown(.immediate)  // in case the graceful drain waits on nothing, end it
            _ = await runner.result

            var endings: [Ending] = []
            for handle in accepted.elements {
                do {
                    _ = try await handle.value  // never hangs: every accepted job has ended
                    endings.append(.value)
                } catch is TestError {
                    endings.append(.failed)
                } catch is CancellationError {
                    endings.append(.cancelled)
                } catch is PoolError {
                    endings.append(.rejected)
                } catch {
                    Issue.record("round \(round): unexpected error \(error)")
                }
            }
            let stats = pool.stats
            let label = "round \(round): \(workers), capacity \(capacity), mode \(mode): \(stats)"
            #expect(ledger.liveTaskCount == 0, "\(label): worker tasks outlived run()")
            #expect(stats.submitted == accepted.count, "\(label)")
            #expect(stats.unfinished == 0, "\(label)")
            #expect(stats.workers == 0 && stats.busy == 0, "\(label)")
            #expect(Set(runs.elements).count == runs.count, "\(label): a job ran twice")
            #expect(stats.completed == endings.count { $0 == .value }, "\(label)")
            #expect(stats.rejected == endings.count { $0 == .rejected }, "\(label)")
            #expect(stats.failed + stats.cancelled == endings.count { $0 == .failed || $0 == .cancelled }, "\(label)")
        }
    }

    @Test func jobsAwaitingEarlierJobs_neverDeadlock_andSeeTheirResults() async throws {
        // Each job may await the handle of an earlier job — of its own batch, another
        // worker's, or one already done — while handles are cancelled at random. A job's
        // end must be published as soon as it has run when someone waits for it; before,
        // a job awaiting an earlier job of its own batch waited forever.
        for round in 0..<stressIterations(default: 30) {
            var generator = SystemRandomNumberGenerator()
            let count = Int.random(in: 1...200, using: &generator)
            let pool = WorkerPool(.init(
                workers: .fixed(Int.random(in: 1...3, using: &generator)),
                queueCapacity: Int.random(in: 1...64, using: &generator)))
            let handles = Log<JobHandle<Int>>()
            let wrong = Log<String>()
            try await withTimeout(.seconds(30)) {  // a deadlock shows as a TimeoutError
                try await withRunningPool(pool) { pool in
                    for index in 0..<count {
                        let awaited = index > 0 && Bool.random() ? Int.random(in: 0..<index) : nil
                        let earlier = awaited.map { handles.elements[$0] }
                        handles.append(try await pool.submit {
                            if let earlier, let awaited {
                                do {
                                    let value = try await earlier.value
                                    if value != awaited { wrong.append("job \(index) read \(value) from job \(awaited)") }
                                } catch is CancellationError {
                                    // that job was cancelled
                                }
                            }
                            return index
                        })
                        if Int.random(in: 0..<10) == 0, let victim = handles.elements.randomElement() {
                            victim.cancel()
                        }
                    }
                    for (index, handle) in handles.elements.enumerated() {
                        do {
                            let value = try await handle.value
                            if value != index { wrong.append("job \(index) returned \(value)") }
                        } catch is CancellationError {
                            // cancelled before or while it ran
                        }
                    }
                }
            }
            #expect(wrong.elements.isEmpty, "round \(round): \(wrong.elements.prefix(3))")
            let stats = pool.stats
            #expect(stats.submitted == count && stats.completed + stats.cancelled == count, "round \(round): \(stats)")
        }
    }
}
