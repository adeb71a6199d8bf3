@testable import Corral
import CorralTesting
import Testing

/// Jobs handed to idle workers while another idle worker is being woken, jobs cancelled in the
/// queue, and pools released without running: the cases in which work used to wait for a job
/// to end that might never end.
@Suite("WorkerPool hand-offs")
struct WorkerPoolHandoffTests {
    /// Holds jobs until released.
    private static func gated(_ pool: WorkerPool, _ gate: AsyncSemaphore) throws -> JobHandle<Void> {
        try pool.trySubmit { try await gate.acquire(); gate.release() }
    }

    /// Once the pool's two workers are idle, submits two jobs that wait for the returned gate:
    /// the first goes to an idle worker, which is then being woken, the second right after.
    private static func twoJobsBehindAGate(_ pool: WorkerPool) async throws -> AsyncSemaphore {
        await waitUntil("both workers idle") { pool.stats.idle == 2 }
        let gate = AsyncSemaphore(permits: 1)
        try await gate.acquire()
        _ = try gated(pool, gate)
        _ = try gated(pool, gate)
        return gate
    }

    @Test func aFullQueue_withAnIdleWorker_takesTheJob_insteadOfRefusingIt() async throws {
        let pool = WorkerPool(.init(workers: .fixed(2), queueCapacity: 1))
        try await withRunningPool(pool) { pool in
            // The second job is queued while the first's worker wakes, or handed to the second.
            let gate = try await Self.twoJobsBehindAGate(pool)
            // The second worker may still be idle: then it takes this one, full queue or not.
            let third = try pool.trySubmit { 3 }
            #expect(pool.stats.queued <= 1, "more waits than the capacity: \(pool.stats)")
            gate.release()
            #expect(try await third.value == 3)
        }
    }

    @Test func aSubmitterNeverWaitsForRoomInAnEmptyQueue() async throws {
        let pool = WorkerPool(.init(workers: .fixed(2), queueCapacity: 1))
        try await withRunningPool(pool) { pool in
            let gate = try await Self.twoJobsBehindAGate(pool)
            // Both workers end up busy until the gate opens, which happens only after this job
            // is accepted: a submitter left waiting with the queue empty would never be let in.
            let third = Task { try await pool.submit { 3 } }
            await waitUntil("the third job accepted") { pool.stats.submitted == 3 }
            gate.release()
            #expect(try await third.value.value == 3)
        }
    }

    @Test func anElasticPool_startsAWorker_whenTheLastIdleOneIsHandedAQueuedJob() async throws {
        let pool = WorkerPool(.init(workers: .elastic(min: 2, max: 3, idleTimeout: .seconds(60)), queueCapacity: 4))
        try await withRunningPool(pool) { pool in
            // Two jobs that wait for a third: only a third worker can run it.
            let gate = try await Self.twoJobsBehindAGate(pool)
            let opened = Gauge()
            _ = try pool.trySubmit { opened.add(1); gate.release() }
            await waitUntil("the third job ran") { opened.current == 1 }
            if opened.current == 0 { gate.release() }  // (the failure is recorded: let the pool drain)
            await waitUntil("every job completed") { pool.stats.completed == 3 }
            #expect(pool.stats.peakBusy == 3)
        }
    }

    @Test func jobsCancelledInTheQueue_releaseWhatTheyCaptured_andDoNotPileUp() async throws {
        final class Payload: Sendable {}
        final class WeakPayload: @unchecked Sendable {
            // @unchecked Sendable: written once at init, read by the test's task only.
            weak var object: Payload?
            init(_ object: Payload) { self.object = object }
        }
        let pool = WorkerPool(.init(workers: .fixed(1), queueCapacity: 4))
        try await withRunningPool(pool) { pool in
            let gate = AsyncSemaphore(permits: 1)
            try await gate.acquire()
            _ = try Self.gated(pool, gate)
            await waitUntil("the worker busy") { pool.stats.busy == 1 }
            var payloads: [WeakPayload] = []
            for _ in 0..<2_000 {
                let payload = Payload()
                payloads.append(WeakPayload(payload))
                try pool.trySubmit { _ = payload }.cancel()
            }
            #expect(payloads.allSatisfy { $0.object == nil }, "cancelled jobs still hold what they captured")
            let held = pool.storage.state.withLock { $0.queue.count }
            #expect(held <= 4 + WorkerPoolStateMachine.tombstoneSlack, "\(held) jobs held in the queue")
            #expect(pool.stats.cancelled == 2_000)
            gate.release()
        }
    }

    @Test func cancellingAQueuedJob_releasesItsClosureOutsideTheLock() async throws {
        // The closure holds the last reference to its pool: releasing it runs the pool's
        // deinit, which shuts the pool down — under the pool's lock, that deadlocked.
        var handle: JobHandle<Void>?
        do {
            let pool = WorkerPool(.init(workers: .fixed(1), queueCapacity: 4))
            handle = try pool.trySubmit { _ = pool.name }
        }
        let done = Gauge()
        Task.detached { [handle] in
            handle?.cancel()
            done.add(1)
        }
        await waitUntil("cancel() returned") { done.current == 1 }
        await #expect(throws: CancellationError.self) { try await handle?.value }
    }

    @Test func anImmediateShutdown_releasesDroppedClosuresOutsideTheLock() async throws {
        final class ReadsStatsWhenReleased: Sendable {
            let pool: WorkerPool
            init(_ pool: WorkerPool) { self.pool = pool }
            deinit { _ = pool.stats }  // takes the pool's lock
        }
        let pool = WorkerPool(.init(workers: .fixed(1), queueCapacity: 4))
        let probe = ReadsStatsWhenReleased(pool)
        let handle = try pool.trySubmit { _ = probe }
        _ = consume probe
        let done = Gauge()
        Task.detached {
            pool.shutdown(.immediate)
            done.add(1)
        }
        await waitUntil("shutdown returned") { done.current == 1 }
        await #expect(throws: PoolError.self) { try await handle.value }
    }

    @Test func aPoolReleasedWithoutRunning_failsItsQueuedJobs() async throws {
        var pool: WorkerPool? = WorkerPool(.init(workers: .fixed(1), queueCapacity: 4))
        let handle = try pool!.trySubmit { 1 }
        pool = nil
        // (Bounded: without the fix the handle waited for ever.)
        await #expect(throws: PoolError.self) { try await withTimeout(.seconds(10)) { try await handle.value } }
    }
}
