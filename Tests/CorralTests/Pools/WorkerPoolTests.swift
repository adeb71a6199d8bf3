@testable import Corral
import CorralTesting
import Testing

/// Runs `pool` in a child task for the duration of `body`, then checks that `run()` returned
/// and the accounting adds up.
func withRunningPool<Result>(
    _ pool: WorkerPool,
    sourceLocation: SourceLocation = #_sourceLocation,
    _ body: (WorkerPool) async throws -> Result
) async throws -> Result {
    try await expectNoLeakedTasks(sourceLocation: sourceLocation) {
        async let running: Void = pool.run()
        let result: Result
        do {
            result = try await body(pool)
        } catch {
            pool.shutdown(.immediate)
            _ = try? await running
            throw error
        }
        pool.shutdown(.graceful)
        try await running
        let stats = pool.stats
        #expect(stats.unfinished == 0, "accounting: \(stats)", sourceLocation: sourceLocation)
        #expect(stats.workers == 0, "workers left: \(stats)", sourceLocation: sourceLocation)
        return result
    }
}

@Suite("WorkerPool")
struct WorkerPoolTests {
    @Test(arguments: [1, 4])
    func jobsRun_andHandlesReturnTheirValues(workers: Int) async throws {
        let pool = WorkerPool(.init(workers: .fixed(workers), queueCapacity: 16))
        let values = try await withRunningPool(pool) { pool in
            var handles: [JobHandle<Int>] = []
            for index in 0..<100 {
                handles.append(try await pool.submit { index * 3 })
            }
            var values: [Int] = []
            for handle in handles { values.append(try await handle.value) }
            return values
        }
        #expect(values == (0..<100).map { $0 * 3 })
        #expect(pool.stats.completed == 100)
        #expect(pool.stats.submitted == 100)
    }

    @Test func theWorkerLimit_isNeverExceeded() async throws {
        let running = Gauge()
        let pool = WorkerPool(.init(workers: .fixed(3), queueCapacity: 8))
        try await withRunningPool(pool) { pool in
            for _ in 0..<200 {
                _ = try await pool.submit {
                    running.add(1)
                    await Task.yield()
                    running.add(-1)
                }
            }
        }
        #expect(running.peak <= 3)
        #expect(pool.stats.peakBusy <= 3)
    }

    @Test func jobsSubmittedBeforeRun_queue_andRunWhenItStarts() async throws {
        let pool = WorkerPool(.init(workers: .fixed(2), queueCapacity: 10))
        var handles: [JobHandle<Int>] = []
        for index in 0..<10 { handles.append(try await pool.submit { index }) }
        #expect(pool.stats.queued == 10)
        let sum = try await withRunningPool(pool) { _ in
            var sum = 0
            for handle in handles { sum += try await handle.value }
            return sum
        }
        #expect(sum == 45)
    }

    @Test func submit_suspendsWhileTheQueueIsFull() async throws {
        let gate = AsyncSemaphore(permits: 1)
        try await gate.acquire()
        let pool = WorkerPool(.init(workers: .fixed(1), queueCapacity: 2))
        try await withRunningPool(pool) { pool in
            let blocker = try await pool.submit { try await gate.acquire(); gate.release() }
            await waitUntil { pool.stats.busy == 1 }
            _ = try await pool.submit {}
            _ = try await pool.submit {}
            #expect(pool.stats.queued == 2)
            let third = Task { try await pool.submit { 7 } }
            await waitUntil("submitter parked") { pool.storage.state.withLock { $0.submitters.count } == 1 }
            #expect(pool.stats.submitted == 3)  // the waiting one is not accepted yet
            gate.release()
            #expect(try await third.value.value == 7)
            try await blocker.value
        }
    }

    @Test func submitWaitingForRoom_isCancellable_andAcceptsNothing() async throws {
        let gate = AsyncSemaphore(permits: 1)
        try await gate.acquire()
        let pool = WorkerPool(.init(workers: .fixed(1), queueCapacity: 1))
        try await withRunningPool(pool) { pool in
            _ = try await pool.submit { try await gate.acquire(); gate.release() }
            await waitUntil { pool.stats.busy == 1 }
            _ = try await pool.submit {}
            let ran = Gauge()
            let waiting = Task { try await pool.submit { ran.add(1) } }
            await waitUntil { pool.storage.state.withLock { $0.submitters.count } == 1 }
            waiting.cancel()
            await #expect(throws: CancellationError.self) { try await waiting.value }
            #expect(pool.stats.submitted == 2)
            gate.release()
            await waitUntil { pool.stats.completed == 2 }
            #expect(ran.current == 0)
        }
    }

    @Test func trySubmit_refusesWhenFull_andAfterShutdown_distinctFromJobFailure() async throws {
        let gate = AsyncSemaphore(permits: 1)
        try await gate.acquire()
        let pool = WorkerPool(.init(workers: .fixed(1), queueCapacity: 1, name: "tiny"))
        try await withRunningPool(pool) { pool in
            _ = try pool.trySubmit { try await gate.acquire(); gate.release() }
            await waitUntil { pool.stats.busy == 1 }
            _ = try pool.trySubmit {}
            #expect(throws: PoolError.queueFull(pool: "tiny")) { _ = try pool.trySubmit {} }
            #expect(pool.stats.refused == 1)
            gate.release()
        }
        #expect(throws: PoolError.shutdown(pool: "tiny")) { _ = try pool.trySubmit {} }
        await #expect(throws: PoolError.shutdown(pool: "tiny")) { _ = try await pool.submit {} }
        #expect(pool.stats.refused == 3)
        #expect(pool.stats.submitted == 2)
    }

    @Test func aJobThatThrows_failsItsHandleOnly() async throws {
        let pool = WorkerPool(.init(workers: .fixed(2), queueCapacity: 4))
        try await withRunningPool(pool) { pool in
            let failing = try await pool.submit { () throws -> Int in throw TestError(id: 5) }
            let fine = try await pool.submit { 1 }
            await #expect(throws: TestError(id: 5)) { try await failing.value }
            #expect(try await fine.value == 1)
        }
        #expect(pool.stats.failed == 1)
        #expect(pool.stats.completed == 1)
    }

    @Test func cancellingAQueuedJob_removesIt_withoutRunningIt() async throws {
        let gate = AsyncSemaphore(permits: 1)
        try await gate.acquire()
        let ran = Gauge()
        let pool = WorkerPool(.init(workers: .fixed(1), queueCapacity: 4))
        try await withRunningPool(pool) { pool in
            _ = try await pool.submit { try await gate.acquire(); gate.release() }
            await waitUntil { pool.stats.busy == 1 }
            let queued = try await pool.submit { ran.add(1) }
            queued.cancel()
            queued.cancel()  // idempotent
            await #expect(throws: CancellationError.self) { try await queued.value }
            #expect(pool.stats.queued == 0)
            gate.release()
        }
        #expect(ran.current == 0)
        #expect(pool.stats.cancelled == 1)
    }

    @Test func cancellingARunningJob_cancelsIt_andThePoolKeepsWorking() async throws {
        let started = Gauge()
        let pool = WorkerPool(.init(workers: .fixed(1), queueCapacity: 4))
        try await withRunningPool(pool) { pool in
            let running = try await pool.submit {
                started.add(1)
                try await Task.sleep(for: .seconds(3600))
            }
            await waitUntil { started.current == 1 }
            running.cancel()
            await #expect(throws: CancellationError.self) { try await running.value }
            // The worker whose task was cancelled is replaced: the next job is not cancelled.
            let next = try await pool.submit { Task.isCancelled }
            #expect(try await next.value == false)
        }
        #expect(pool.stats.cancelled == 1)
        #expect(pool.stats.completed == 1)
    }

    @Test func immediateShutdown_cancelsRunning_rejectsQueued_refusesWaiting() async throws {
        let pool = WorkerPool(.init(workers: .fixed(1), queueCapacity: 1, name: "stop"))
        let started = Gauge()
        try await expectNoLeakedTasks {
            async let running: Void = pool.run()
            let longJob = try await pool.submit {
                started.add(1)
                try await Task.sleep(for: .seconds(3600))
            }
            await waitUntil { started.current == 1 }
            let queued = try await pool.submit { 1 }
            let waiting = Task { try await pool.submit { 2 } }
            await waitUntil { pool.storage.state.withLock { $0.submitters.count } == 1 }
            pool.shutdown(.immediate)
            try await running
            await #expect(throws: CancellationError.self) { try await longJob.value }
            await #expect(throws: PoolError.shutdown(pool: "stop")) { try await queued.value }
            await #expect(throws: PoolError.shutdown(pool: "stop")) { try await waiting.value }
        }
        let stats = pool.stats
        #expect(stats.cancelled == 1 && stats.rejected == 1 && stats.refused == 1)
        #expect(stats.submitted == stats.completed + stats.failed + stats.cancelled + stats.rejected)
    }

    @Test func aJobIgnoringCancellation_duringImmediateShutdown_isAwaited_andCompletes() async throws {
        let pool = WorkerPool(.init(workers: .fixed(1), queueCapacity: 1))
        let started = Gauge()
        try await expectNoLeakedTasks {
            async let running: Void = pool.run()
            let stubborn = try await pool.submit { () async -> String in
                started.add(1)
                while !Task.isCancelled { await Task.yield() }  // sees the cancellation, ignores it
                return "finished anyway"
            }
            await waitUntil { started.current == 1 }
            pool.shutdown(.immediate)
            try await running  // waits for the stubborn job: nothing outlives run()
            #expect(try await stubborn.value == "finished anyway")
        }
        #expect(pool.stats.completed == 1)
    }

    @Test func gracefulShutdown_runsEverythingQueued() async throws {
        let gate = AsyncSemaphore(permits: 1)
        try await gate.acquire()
        let ran = Gauge()
        let pool = WorkerPool(.init(workers: .fixed(1), queueCapacity: 10))
        try await expectNoLeakedTasks {
            async let running: Void = pool.run()
            _ = try await pool.submit { try await gate.acquire(); gate.release() }
            for _ in 0..<5 { _ = try await pool.submit { ran.add(1) } }
            pool.shutdown(.graceful)
            await #expect(throws: PoolError.self) { _ = try await pool.submit {} }
            gate.release()
            try await running
        }
        #expect(ran.current == 5)
        #expect(pool.stats.completed == 6)
    }

    @Test func gracefulShutdownWithADeadline_escalatesToImmediate() async throws {
        let pool = WorkerPool(.init(workers: .fixed(1), queueCapacity: 4))
        let started = Gauge()
        try await expectNoLeakedTasks {
            async let running: Void = pool.run()
            let slow = try await pool.submit {
                started.add(1)
                try await Task.sleep(for: .seconds(3600))
            }
            let queued = try await pool.submit {}
            await waitUntil { started.current == 1 }
            pool.shutdown(.graceful(timeout: .milliseconds(20)))
            try await running
            await #expect(throws: CancellationError.self) { try await slow.value }
            await #expect(throws: PoolError.self) { try await queued.value }
        }
        #expect(pool.stats.cancelled == 1)
        #expect(pool.stats.rejected == 1)
    }

    @Test func shutdownBeforeRun_graceful_drainsWhenRunStarts() async throws {
        let pool = WorkerPool(.init(workers: .fixed(2), queueCapacity: 4))
        let handle = try await pool.submit { 42 }
        pool.shutdown(.graceful)
        try await expectNoLeakedTasks { try await pool.run() }
        #expect(try await handle.value == 42)
    }

    @Test func shutdownBeforeRun_immediate_rejectsTheQueue_andRunReturnsAtOnce() async throws {
        let pool = WorkerPool(.init(workers: .fixed(2), queueCapacity: 4))
        let handle = try await pool.submit { 42 }
        pool.shutdown(.immediate)
        pool.shutdown(.graceful)  // no effect after immediate
        try await expectNoLeakedTasks { try await pool.run() }
        await #expect(throws: PoolError.self) { try await handle.value }
        #expect(pool.stats.rejected == 1)
    }

    @Test func cancellingRun_shutsDownImmediately_andThrows() async throws {
        let pool = WorkerPool(.init(workers: .fixed(1), queueCapacity: 4))
        let started = Gauge()
        let long = try await pool.submit {
            started.add(1)
            try await Task.sleep(for: .seconds(3600))
        }
        let queued = try await pool.submit {}
        let runner = Task { try await pool.run() }
        await waitUntil { started.current == 1 }
        runner.cancel()
        await #expect(throws: CancellationError.self) { try await runner.value }
        await #expect(throws: CancellationError.self) { try await long.value }
        await #expect(throws: PoolError.self) { try await queued.value }
        let stats = pool.stats
        #expect(stats.submitted == stats.completed + stats.failed + stats.cancelled + stats.rejected)
    }

    @Test func elasticPool_growsUnderABurst_andShrinksBackToMin() async throws {
        let gate = AsyncSemaphore(permits: 8)
        try await gate.acquire(8)
        let pool = WorkerPool(.init(workers: .elastic(min: 1, max: 4, idleTimeout: .milliseconds(20)), queueCapacity: 16))
        try await withRunningPool(pool) { pool in
            #expect(pool.stats.workers <= 1)
            for _ in 0..<8 {
                _ = try await pool.submit { try await gate.acquire(); gate.release() }
            }
            await waitUntil("scaled up to max") { pool.stats.busy == 4 }
            #expect(pool.stats.workers == 4)
            gate.release(8)
            await waitUntil("shrunk back to min") { pool.stats.workers == 1 && pool.stats.completed == 8 }
            #expect(pool.stats.peakBusy == 4)
        }
    }

    @Test func rendezvousPool_acceptsOnlyWhenAWorkerIsIdle() async throws {
        let gate = AsyncSemaphore(permits: 1)
        try await gate.acquire()
        let pool = WorkerPool(.init(workers: .fixed(1), queueCapacity: 0))
        try await withRunningPool(pool) { pool in
            await waitUntil { pool.stats.idle == 1 }
            _ = try pool.trySubmit { try await gate.acquire(); gate.release() }
            #expect(throws: PoolError.self) { _ = try pool.trySubmit {} }
            gate.release()
        }
    }

    @Test func awaitingAValue_isCancellable_andTheJobCarriesOn() async throws {
        let gate = AsyncSemaphore(permits: 1)
        try await gate.acquire()
        let pool = WorkerPool(.init(workers: .fixed(1), queueCapacity: 1))
        try await withRunningPool(pool) { pool in
            let job = try await pool.submit { try await gate.acquire(); gate.release(); return 3 }
            let awaiter = Task { try await job.value }
            await waitUntil("the awaiter is waiting") { pool.storage.state.withLock { _ in job.job.waiterList?.queue.count ?? 0 } == 1 }
            awaiter.cancel()
            await #expect(throws: CancellationError.self) { try await awaiter.value }
            gate.release()
            #expect(try await job.value == 3)
        }
    }

    /// Regression: with a wake-up pending, idle workers can sit beside a non-empty queue; a
    /// graceful shutdown then must still release every one of them once the queue drains.
    @Test func gracefulShutdown_afterAFastProducer_releasesEveryWorker() async throws {
        let pool = WorkerPool(.init(workers: .fixed(4), queueCapacity: 64))
        let ran = Gauge()
        try await expectNoLeakedTasks {
            try await withErrorGroup { group in
                try await group.addTask { try await pool.run() }
                for _ in 0..<20_000 {
                    _ = try await pool.submit { ran.add(1) }
                }
                pool.shutdown(.graceful)
            }
        }
        #expect(ran.current == 20_000)
        #expect(pool.stats.workers == 0)
    }

    @Test func elasticPoolWithoutAQueue_startsWorkersOnDemand() async throws {
        let pool = WorkerPool(.init(workers: .elastic(min: 0, max: 2, idleTimeout: .seconds(60)), queueCapacity: 0))
        try await withRunningPool(pool) { pool in
            #expect(pool.stats.workers == 0)
            let handle = try await pool.submit { 5 }  // no worker, no queue: one is started for it
            #expect(try await handle.value == 5)
            #expect(pool.stats.workers >= 1)
        }
    }

    /// A job batched with a slow one is taken over by an idle worker instead of waiting.
    @Test func aJobBatchedBehindASlowOne_isTakenOverByAnIdleWorker() async throws {
        let gate = AsyncSemaphore(permits: 1)
        try await gate.acquire()
        let pool = WorkerPool(.init(workers: .fixed(2), queueCapacity: 8))
        // Queued before run(): each of the 2 workers takes a batch of 2 (its fair share of 4).
        let slow = try await pool.submit { try await gate.acquire(); gate.release() }
        let behindSlow = try await pool.submit { 1 }
        _ = try await pool.submit { 2 }
        _ = try await pool.submit { 3 }
        try await withRunningPool(pool) { _ in
            #expect(try await behindSlow.value == 1)  // would hang until the gate opened
            gate.release()
            try await slow.value
        }
    }

    @Test func aJobWaitingForAnEarlierJobOfItsBatch_getsItsResult() async throws {
        // Both are queued before run(), so the lone worker takes them as one batch. Before,
        // a job's end was published only with its whole batch: `b` waited for `a`, which
        // was published after `b` — a deadlock (here: b's 5 s guard).
        let pool = WorkerPool(.init(workers: .fixed(1), queueCapacity: 16))
        let a = try pool.trySubmit { 1 }
        let b = try pool.trySubmit { try await withTimeout(.seconds(5)) { try await a.value } + 1 }
        try await withRunningPool(pool) { _ in
            let value = try await b.value
            #expect(value == 2)
        }
    }

    @Test func aJobsResult_doesNotWaitForTheRestOfItsBatch() async throws {
        // `b`, in the same batch as `a`, runs until the test has read `a`'s result.
        let pool = WorkerPool(.init(workers: .fixed(1), queueCapacity: 16))
        let gate = try await closedGate()
        let a = try pool.trySubmit { 1 }
        let b = try pool.trySubmit { try await withTimeout(.seconds(5)) { try await gate.acquire() } }
        try await withRunningPool(pool) { _ in
            #expect(try await a.value == 1)
            gate.release()
            try await b.value
        }
    }

    @Test func aRetiringWorker_isReplacedForAParkedSubmitter_inARendezvousPool() async throws {
        // Elastic, at most one worker, no queue: the worker's job is cancelled (so it
        // retires) while a submitter waits to hand it a job. Before, no replacement started
        // and the submitter waited for a submission that never came (here: its 5 s guard).
        let pool = WorkerPool(.init(workers: .elastic(min: 0, max: 1, idleTimeout: .seconds(60)), queueCapacity: 0))
        try await withRunningPool(pool) { pool in
            let started = try await closedGate()
            let long = try await pool.submit {
                started.release()
                try await Task.sleep(for: .seconds(3600))
            }
            try await started.acquire()  // the long job is running
            async let second = withTimeout(.seconds(5)) { try await pool.submit { 42 } }
            await waitUntil("the submitter parked") { pool.storage.state.withLock { $0.submitters.count } == 1 }
            long.cancel()
            #expect(try await (try await second).value == 42)
        }
    }

    @Test func cancellingAQueuedJob_letsAParkedSubmitterIn() async throws {
        // Queue of 1, no worker running yet: `queued` fills it, a second submitter parks.
        // Cancelling `queued` frees the queue: the submitter gets in at once, before the pool
        // even runs (before, it waited for a worker to take a batch).
        let pool = WorkerPool(.init(workers: .fixed(1), queueCapacity: 1))
        let queued = try pool.trySubmit { 1 }
        let second = Task { try await pool.submit { 2 } }
        await waitUntil("the submitter parked") { pool.storage.state.withLock { $0.submitters.count } == 1 }
        queued.cancel()
        await waitUntil("the submitter got in") {
            pool.storage.state.withLock { $0.submitters.count == 0 && $0.queuedCount == 1 }
        }
        try await withRunningPool(pool) { _ in
            let value = try await second.value.value
            #expect(value == 2)
        }
    }

    @Test func jobsTakenAheadByWorkers_countAsQueued_andStayWithinTheCapacity() async throws {
        // Workers take queued jobs in batches; those not started yet still wait, and count
        // against the queue's capacity (before, the queue took more as soon as a batch left).
        let pool = WorkerPool(.init(workers: .fixed(2), queueCapacity: 4, name: "bounded"))
        let gate = AsyncSemaphore(permits: 100)
        try await gate.acquire(100)
        let started = Gauge()
        for _ in 0..<4 { _ = try pool.trySubmit { started.add(1); try await gate.acquire() } }
        try await withRunningPool(pool) { pool in
            await waitUntil("both workers busy") { started.current == 2 }
            var accepted = 4
            while (try? pool.trySubmit { started.add(1); try await gate.acquire() }) != nil { accepted += 1 }
            let waiting = accepted - started.current
            #expect(pool.stats.queued == waiting, "every job waiting for a worker is counted")
            #expect(waiting <= 4, "\(waiting) jobs wait, for a queue of 4")
            gate.release(accepted)
        }
    }

    /// Parked submitters let in as a worker takes a batch: the batch's jobs still wait, and
    /// count against the capacity (they were let in before the batch was counted).
    @Test func parkedSubmittersLetInWhenABatchIsTaken_stayWithinTheCapacity() async throws {
        let pool = WorkerPool(.init(workers: .fixed(1), queueCapacity: 4, name: "overshoot"))
        let gate = AsyncSemaphore(permits: 8)
        try await gate.acquire(8)
        let started = Gauge()
        for _ in 0..<4 { _ = try pool.trySubmit { started.add(1); try await gate.acquire() } }
        let parked = (0..<4).map { _ in
            Task { try await pool.submit { started.add(1); try await gate.acquire() } }
        }
        await waitUntil("4 submitters parked") { pool.storage.state.withLock { $0.submitters.count } == 4 }
        try await withRunningPool(pool) { pool in
            await waitUntil("the worker took its batch and started its first job") { started.current == 1 }
            let accepted = 8 - pool.storage.state.withLock { $0.submitters.count }
            let waiting = accepted - started.current
            #expect(pool.stats.queued == waiting)
            #expect(waiting <= 4, "\(waiting) jobs wait, for a queue of 4")
            gate.release(8)
            for task in parked { try await task.value.value }
        }
    }

    /// Driven on the state machine: jobs taken ahead keep the last pop from letting parked
    /// submitters in, the queue empties, and a later report frees room. The submitters must
    /// then come in (before, they were handed over one per worker cycle, like a rendezvous).
    @Test func parkedSubmitters_areLetInOnceThereIsRoom() {
        var machine = WorkerPoolStateMachine(name: "stranded", workers: .fixed(3), queueCapacity: 60)
        func job() -> PoolJobBase { PoolJob<Void>(observed: false) {} }
        for _ in 0..<60 {
            guard case .accepted = machine.submitRequested(job(), mayWait: true) else { Issue.record("queue"); return }
        }
        for _ in 0..<20 {
            guard case .suspend = machine.submitRequested(job(), mayWait: true) else { Issue.record("park"); return }
        }
        #expect(machine.runStarted() == 3)
        let workers = (0..<3).map { _ in PoolWorker() }
        for worker in workers { machine.workerStarted(worker, task: nil) }
        func take(_ worker: PoolWorker) -> [PoolJobBase] {
            var resumptions = PoolResumptions()
            if case .run(let batch) = machine.workerReady(worker, into: &resumptions) { return batch }
            return []
        }
        func runAll(_ batch: [PoolJobBase]) { for j in batch { _ = j.claimForRunning(); _ = j.markRan() } }
        let first = take(workers[0])   // 20 jobs; its first one runs long
        let second = take(workers[1])  // 13 jobs; its first one runs long
        _ = first[0].claimForRunning()
        _ = second[0].claimForRunning()
        while machine.queuedCount > 0 { runAll(take(workers[2])) }  // the third drains the queue
        // The first worker's long job ends; it runs the rest of its batch and reports it.
        _ = first[0].markRan()
        runAll(Array(first.dropFirst()))
        _ = take(workers[0])
        // Room below the low watermark, the queue empty: nobody should still be parked.
        let stranded = machine.submitters.count > 0 && machine.waitingCount <= machine.lowWatermark
        #expect(!stranded, "\(machine.submitters.count) submitters parked while \(machine.waitingCount) of 60 wait")
    }
}
