import Corral
import CorralServices
import MetricsTestKit
import ServiceLifecycle
import ServiceLifecycleTestKit
import Testing

struct Boom: Error {}

@Suite("CorralMetrics")
struct CorralMetricsTests {
    @Test func pool_jobsByOutcome_gauges_andLatencies() async throws {
        let backend = TestMetrics()
        let metrics = CorralMetrics(factory: backend)
        let pool = WorkerPool(.init(
            workers: .fixed(2), queueCapacity: 8, name: "images", observer: metrics.jobObserver(pool: "images")
        ))
        metrics.register(pool)
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await pool.run() }
            var handles: [JobHandle<Int>] = []
            for job in 0..<5 {
                handles.append(try await pool.submit {
                    if job == 3 { throw Boom() }
                    return job
                })
            }
            for handle in handles { _ = try? await handle.value }
            pool.shutdown()
            try await group.waitForAll()
        }
        metrics.publish()
        metrics.publish()  // a second sample adds nothing: counters move by the difference
        #expect(backend.counterTotal(label: "corral_pool_jobs_total", dimensions: [("pool", "images"), ("outcome", "completed")]) == 4)
        #expect(backend.counterTotal(label: "corral_pool_jobs_total", dimensions: [("pool", "images"), ("outcome", "failed")]) == 1)
        #expect(backend.counterTotal(label: "corral_pool_jobs_total", dimensions: [("pool", "images"), ("outcome", "rejected")]) == 0)
        #expect(backend.counterTotal(label: "corral_pool_jobs_submitted_total", dimensions: [("pool", "images")]) == 5)
        let queueDepth = try backend.expectGauge("corral_pool_queue_depth", [("pool", "images")])
        #expect(queueDepth.lastValue == 0)
        let durations = try backend.expectTimer("corral_pool_job_duration_seconds", [("pool", "images")])
        #expect(durations.values.count == 5, "one latency per job that ran")
        let waits = try backend.expectTimer("corral_pool_job_wait_seconds", [("pool", "images")])
        #expect(waits.values.count == 5)
    }

    @Test func batcher_itemsAndBatches() async throws {
        let backend = TestMetrics()
        let metrics = CorralMetrics(factory: backend)
        let batcher = Batcher<Int, Int, ContinuousClock>(maxSize: 2, maxDelay: .seconds(3600), name: "rows") { $0 }
        metrics.register(batcher)
        let tickets = try (0..<5).map { try batcher.enqueue($0) }
        batcher.shutdown()
        try await batcher.run()
        for ticket in tickets { _ = try await ticket.value }
        metrics.publish()
        #expect(backend.counterTotal(label: "corral_batcher_items_total", dimensions: [("batcher", "rows"), ("outcome", "handled")]) == 5)
        #expect(backend.counterTotal(label: "corral_batcher_batches_total", dimensions: [("batcher", "rows"), ("reason", "size")]) == 2)
        #expect(backend.counterTotal(label: "corral_batcher_batches_total", dimensions: [("batcher", "rows"), ("reason", "shutdown")]) == 1)
        #expect(try backend.expectGauge("corral_batcher_buffered_items", [("batcher", "rows")]).lastValue == 0)
    }

    @Test func structuresSharingAName_addUp_andAreHeldWeakly() async throws {
        let backend = TestMetrics()
        let metrics = CorralMetrics(factory: backend)
        var first: Batcher<Int, Int, ContinuousClock>? = Batcher(maxSize: 10, maxDelay: .seconds(3600), name: "rows") { $0 }
        let second = Batcher<Int, Int, ContinuousClock>(maxSize: 10, maxDelay: .seconds(3600), name: "rows") { $0 }
        metrics.register(first!)
        metrics.register(second)
        for (batcher, count) in [(first!, 3), (second, 5)] {
            let tickets = try (0..<count).map { try batcher.enqueue($0) }
            batcher.shutdown()
            try await batcher.run()
            for ticket in tickets { _ = try await ticket.value }
        }
        metrics.publish()
        #expect(backend.counterTotal(label: "corral_batcher_items_total", dimensions: [("batcher", "rows"), ("outcome", "handled")]) == 8)
        first = nil  // no longer published, and its count stays in the total
        metrics.publish()
        #expect(backend.counterTotal(label: "corral_batcher_items_total", dimensions: [("batcher", "rows"), ("outcome", "handled")]) == 8)
    }

    @Test func pipelineStages_elementsByEvent() async throws {
        let backend = TestMetrics()
        let metrics = CorralMetrics(factory: backend)
        let numbers = AsyncStream<Int> { continuation in
            for value in 0..<20 { continuation.yield(value) }
            continuation.finish()
        }
        let pipeline = numbers
            .stage("parse", onError: .skip) { value in
                if value % 5 == 0 { throw Boom() }
                return value
            }
            .stage("double") { $0 * 2 }
        metrics.register(pipeline: "numbers", stages: { pipeline.pipelineStats })
        var count = 0
        for try await _ in pipeline { count += 1 }
        metrics.publish()
        #expect(count == 16)
        let parse = [("pipeline", "numbers"), ("stage", "parse")]
        #expect(backend.counterTotal(label: "corral_stage_elements_total", dimensions: parse + [("event", "received")]) == 20)
        #expect(backend.counterTotal(label: "corral_stage_elements_total", dimensions: parse + [("event", "skipped")]) == 4)
        #expect(backend.counterTotal(label: "corral_stage_elements_total", dimensions: parse + [("event", "emitted")]) == 16)
        let double = [("pipeline", "numbers"), ("stage", "double")]
        #expect(backend.counterTotal(label: "corral_stage_elements_total", dimensions: double + [("event", "emitted")]) == 16)
        #expect(try backend.expectGauge("corral_stage_in_flight", double).lastValue == 0)
    }

    @Test func semaphoreAndChannel_gauges() async throws {
        let backend = TestMetrics()
        let metrics = CorralMetrics(factory: backend)
        let quota = AsyncSemaphore(permits: 10)
        let jobs = BoundedChannel<Int>(capacity: 4)
        metrics.register(quota, name: "quota")
        metrics.register(jobs, name: "jobs")
        try await quota.acquire(3)
        try await jobs.send(1)
        try await jobs.send(2)
        metrics.publish()
        #expect(try backend.expectGauge("corral_semaphore_available_permits", [("semaphore", "quota")]).lastValue == 7)
        #expect(try backend.expectGauge("corral_semaphore_waiters", [("semaphore", "quota")]).lastValue == 0)
        #expect(try backend.expectGauge("corral_channel_buffered", [("channel", "jobs")]).lastValue == 2)
        quota.release(3)
    }

    @Test func run_publishesUntilGracefulShutdown_andOnceMoreAtTheEnd() async throws {
        let backend = TestMetrics()
        let metrics = CorralMetrics(interval: .seconds(3600), factory: backend)
        let quota = AsyncSemaphore(permits: 4)
        metrics.register(quota, name: "quota")
        try await testGracefulShutdown { trigger in
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { try await metrics.run() }
                await waitUntil("the first sample") { (try? backend.expectGauge("corral_semaphore_available_permits", [("semaphore", "quota")])) != nil }
                try await quota.acquire(1)
                trigger.triggerGracefulShutdown()
                try await group.waitForAll()   // returns without waiting for the hour
            }
        }
        #expect(try backend.expectGauge("corral_semaphore_available_permits", [("semaphore", "quota")]).lastValue == 3)
        quota.release(1)
    }

    /// A pool deallocated after a sample leaves its gauges at their last value for good.
    @Test func aDeallocatedPool_doesNotLeaveItsGaugesBehind() async throws {
        let backend = TestMetrics()
        let metrics = CorralMetrics(factory: backend)
        var pool: WorkerPool? = WorkerPool(.init(workers: .fixed(2), queueCapacity: 8, name: "gone"))
        for job in 0..<3 { _ = try await pool!.submit { job } }  // queued: run() never starts
        metrics.register(pool!)
        metrics.publish()
        #expect(try backend.expectGauge("corral_pool_queue_depth", [("pool", "gone")]).lastValue == 3)
        pool = nil
        metrics.publish()
        #expect(try backend.expectGauge("corral_pool_queue_depth", [("pool", "gone")]).lastValue == 0,
                "a pool that no longer exists still reports 3 queued jobs")
    }

    /// Two stages of one pipeline that share a name: their gauges add up, their counters do not.
    @Test func pipelineStagesSharingAName_countersAddUp() async throws {
        let backend = TestMetrics()
        let metrics = CorralMetrics(factory: backend)
        let pipeline = AsyncStream<Int> { continuation in
            for value in 0..<10 { continuation.yield(value) }
            continuation.finish()
        }
        .stage("step") { $0 }
        .stage("step") { $0 }
        metrics.register(pipeline: "twins", stages: { pipeline.pipelineStats })
        for try await _ in pipeline {}
        metrics.publish()
        let step = [("pipeline", "twins"), ("stage", "step")]
        #expect(backend.counterTotal(label: "corral_stage_elements_total", dimensions: step + [("event", "received")]) == 20,
                "10 received by each of the two stages")
    }

    /// One worker takes the queued jobs as one batch: the completed counter does not move while
    /// they finish.
    @Test func completedCounter_followsTheJobs() async throws {
        let backend = TestMetrics()
        let metrics = CorralMetrics(factory: backend)
        let pool = WorkerPool(.init(workers: .fixed(1), queueCapacity: 16, name: "batched"))
        metrics.register(pool)
        let gate = AsyncSemaphore(permits: 4)
        try await gate.acquire(4)
        let started = Gauge()
        for _ in 0..<4 { _ = try await pool.submit { started.add(1); try await gate.acquire() } }
        let run = Task { try await pool.run() }
        await waitUntil("job 1 started") { started.current == 1 }
        gate.release()
        await waitUntil("job 2 started") { started.current == 2 }
        gate.release()
        await waitUntil("job 3 started") { started.current == 3 }
        metrics.publish()
        #expect(backend.counterTotal(label: "corral_pool_jobs_total", dimensions: [("pool", "batched"), ("outcome", "completed")]) == 2)
        #expect(try backend.expectGauge("corral_pool_queue_depth", [("pool", "batched")]).lastValue == 1, "job 4 waits")
        gate.release(2)
        pool.shutdown()
        try await run.value
    }

    /// The group's deadline escalates: every service is cancelled at once, so the metrics
    /// service's own last publication may come before the pool has counted the job it
    /// stopped. One more publish() after the group returns, as documented, carries it.
    @Test func afterAnEscalation_aPublishAfterTheGroupCarriesTheFinalCounts() async throws {
        let backend = TestMetrics()
        let metrics = CorralMetrics(interval: .seconds(3600), factory: backend)
        let (logger, _) = capturingLogger()
        let pool = WorkerPool(.init(workers: .fixed(1), queueCapacity: 4, name: "escalated"))
        metrics.register(pool)
        let gate = try await closedGate()
        let started = Gauge()
        let stuck = try await pool.submit { started.add(1); try await gate.acquire() }
        var configuration = ServiceGroupConfiguration(
            services: [.init(service: metrics), .init(service: pool.service(drainTimeout: .seconds(3600), logger: logger))],
            logger: logger)
        configuration.maximumGracefulShutdownDuration = .milliseconds(10)
        let group = ServiceGroup(configuration: configuration)
        try? await withThrowingTaskGroup(of: Void.self) { tasks in
            tasks.addTask { try await group.run() }
            await waitUntil("the job started") { started.current == 1 }
            await group.triggerGracefulShutdown()
            try await tasks.waitForAll()
        }
        _ = try? await stuck.value
        metrics.publish()
        #expect(pool.stats.cancelled == 1)
        #expect(backend.counterTotal(label: "corral_pool_jobs_total", dimensions: [("pool", "escalated"), ("outcome", "cancelled")]) == 1,
                "the final count never reached the backend")
    }
}
