import Corral
import CorralTesting
import Testing

/// Bad input stops the program with a message naming the argument (DESIGN.md contract 5):
/// never a hang, never a silent clamp.
@Suite("Preconditions")
struct PreconditionTests {
    @Test func semaphoreWithoutPermits() async {
        await #expect(processExitsWith: .failure) { _ = AsyncSemaphore(permits: 0) }
    }

    @Test func semaphoreAcquireOfZero() async {
        await #expect(processExitsWith: .failure) {
            try? await AsyncSemaphore(permits: 1).acquire(0)
        }
    }

    @Test func semaphoreReleasingMoreThanAcquired() async {
        await #expect(processExitsWith: .failure) {
            let semaphore = AsyncSemaphore(permits: 2)
            semaphore.release(1)
        }
    }

    @Test func semaphoreReleasingMoreThanAcquired_whileOthersWait() async {
        await #expect(processExitsWith: .failure) {
            let semaphore = AsyncSemaphore(permits: 2)
            try? await semaphore.acquire(1)
            semaphore.release(2)
        }
    }

    @Test func semaphoreReleasingFarMoreThanAcquired_namesTheCall() async {
        // `current + permits` overflowed before the check: a trap without a message.
        let result = await #expect(processExitsWith: .failure, observing: [\.standardErrorContent]) {
            let semaphore = AsyncSemaphore(permits: 2)
            try? await semaphore.acquire(1)
            semaphore.release(Int.max)
        }
        let text = String(decoding: result?.standardErrorContent ?? [], as: UTF8.self)
        #expect(text.contains("AsyncSemaphore.release"), "stderr: \(text)")
    }

    @Test func channelWithNegativeCapacity() async {
        await #expect(processExitsWith: .failure) { _ = BoundedChannel<Int>(capacity: -1) }
    }

    @Test func rateLimiterWithoutRate() async {
        await #expect(processExitsWith: .failure) { _ = RateLimiter(rate: 0, per: .seconds(1), burst: 1) }
    }

    @Test func rateLimiterWithoutInterval() async {
        await #expect(processExitsWith: .failure) { _ = RateLimiter(rate: 1, per: .zero, burst: 1) }
    }

    @Test func rateLimiterWithoutBurst() async {
        await #expect(processExitsWith: .failure) { _ = RateLimiter(rate: 1, per: .seconds(1), burst: 0) }
    }

    @Test func rateLimiterWaitForZeroTokens() async {
        await #expect(processExitsWith: .failure) {
            try? await RateLimiter(rate: 1, per: .seconds(1), burst: 1).wait(0)
        }
    }

    @Test func manualClockGoingBackwards() async {
        await #expect(processExitsWith: .failure) { ManualClock().advance(by: .seconds(-1)) }
    }
}

@Suite("Preconditions: groups")
struct GroupPreconditionTests {
    @Test func concurrentMapWithZeroLimit() async {
        await #expect(processExitsWith: .failure) { _ = try? await [1, 2].concurrentMap(limit: 0) { $0 } }
    }

    @Test func concurrentForEachWithNegativeLimit() async {
        await #expect(processExitsWith: .failure) { try? await [1].concurrentForEach(limit: -1) { _ in } }
    }

    @Test func errorGroupWithZeroLimit() async {
        await #expect(processExitsWith: .failure) { try? await withErrorGroup(limit: 0) { _ in } }
    }

    @Test func taskTrackerWithZeroLimit() async {
        await #expect(processExitsWith: .failure) { _ = TaskTracker(limit: 0) }
    }
}

@Suite("Preconditions: pools")
struct PoolPreconditionTests {
    @Test func fixedPoolWithoutWorkers() async {
        await #expect(processExitsWith: .failure) { _ = WorkerPool.Configuration.Workers.fixed(0) }
    }

    @Test func elasticPoolWithMinAboveMax() async {
        await #expect(processExitsWith: .failure) {
            _ = WorkerPool.Configuration.Workers.elastic(min: 5, max: 2, idleTimeout: .seconds(1))
        }
    }

    @Test func elasticPoolWithoutIdleTimeout() async {
        await #expect(processExitsWith: .failure) {
            _ = WorkerPool.Configuration.Workers.elastic(min: 1, max: 2, idleTimeout: .zero)
        }
    }

    @Test func poolWithNegativeQueueCapacity() async {
        await #expect(processExitsWith: .failure) {
            _ = WorkerPool.Configuration(workers: .fixed(1), queueCapacity: -1)
        }
    }

    @Test func poolQueueCapacitySetNegativeAfterInit() async {
        // The configuration's properties are public vars: init's check alone let this through.
        await #expect(processExitsWith: .failure) {
            var configuration = WorkerPool.Configuration(workers: .fixed(1), queueCapacity: 1)
            configuration.queueCapacity = -1
            _ = WorkerPool(configuration)
        }
    }

    @Test func runningAPoolTwice() async {
        await #expect(processExitsWith: .failure) {
            let pool = WorkerPool(.init(workers: .fixed(1), queueCapacity: 1))
            async let first: Void = pool.run()
            try? await pool.run()
            pool.shutdown(.immediate)
            try? await first
        }
    }
}

@Suite("Preconditions: resources")
struct ResourcePreconditionTests {
    @Test func objectPoolWithoutCapacity() async {
        await #expect(processExitsWith: .failure) { _ = ObjectPool(capacity: 0) { 0 } }
    }
}

@Suite("Preconditions: streams")
struct StreamPreconditionTests {
    @Test func mapWithoutConcurrency() async {
        await #expect(processExitsWith: .failure) {
            _ = Counting(range: 0..<1).map(concurrency: 0) { $0 }
        }
    }

    @Test func mapWithoutBuffer() async {
        await #expect(processExitsWith: .failure) {
            _ = Counting(range: 0..<1).map(concurrency: 2, buffer: 0) { $0 }
        }
    }

    @Test func mapWithAHugeBuffer_namesIt() async {
        // The slots are allocated up front: Int.max died in the allocator, without a word.
        let result = await #expect(processExitsWith: .failure, observing: [\.standardErrorContent]) {
            _ = Counting(range: 0..<1).map(concurrency: 2, buffer: .max) { $0 }
        }
        let text = String(decoding: result?.standardErrorContent ?? [], as: UTF8.self)
        #expect(text.contains("buffer must be at most"), "stderr: \(text)")
    }

    @Test func stageRetryingZeroTimes() async {
        await #expect(processExitsWith: .failure) {
            _ = Counting(range: 0..<1).stage("x", onError: .retry(attempts: 0, backoff: .zero)) { $0 }
        }
    }

    @Test func stageRetryingARetry() async {
        await #expect(processExitsWith: .failure) {
            _ = Counting(range: 0..<1).stage("x", onError: .retry(attempts: 2, backoff: .zero, then: .retry(attempts: 2, backoff: .zero))) { $0 }
        }
    }
}

@Suite("Preconditions: Batcher")
struct BatcherPreconditionTests {
    @Test func batcherWithoutSize() async {
        await #expect(processExitsWith: .failure) {
            _ = Batcher<Int, Int, ContinuousClock>(maxSize: 0, maxDelay: .seconds(1)) { $0 }
        }
    }

    @Test func batcherWithAHugeSize() async {
        await #expect(processExitsWith: .failure) {
            _ = Batcher<Int, Int, ContinuousClock>(maxSize: Int.max, maxDelay: .seconds(1)) { $0 }
        }
    }

    @Test func batcherWithNegativeDelay() async {
        await #expect(processExitsWith: .failure) {
            _ = Batcher<Int, Int, ContinuousClock>(maxSize: 1, maxDelay: .seconds(-1)) { $0 }
        }
    }

    @Test func batcherWithoutConcurrentBatches() async {
        await #expect(processExitsWith: .failure) {
            _ = Batcher<Int, Int, ContinuousClock>(maxSize: 1, maxDelay: .seconds(1), maxConcurrentBatches: 0) { $0 }
        }
    }

    @Test func batcherRunTwice() async {
        await #expect(processExitsWith: .failure) {
            let batcher = Batcher<Int, Int, ContinuousClock>(maxSize: 1, maxDelay: .seconds(1)) { $0 }
            batcher.shutdown()
            try? await batcher.run()
            try? await batcher.run()
        }
    }
}

@Suite("Preconditions: fanOut")
struct FanOutPreconditionTests {
    @Test func fanOutToNoConsumer() async {
        await #expect(processExitsWith: .failure) {
            _ = Counting(range: 0..<1).fanOut(0)
        }
    }

    @Test func fanOutWithNegativeBuffer() async {
        await #expect(processExitsWith: .failure) {
            _ = Counting(range: 0..<1).fanOut(2, buffer: -1)
        }
    }
}
