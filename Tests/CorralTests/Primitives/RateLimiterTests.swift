@testable import Corral
import CorralTesting
import Testing

@Suite("RateLimiter")
struct RateLimiterTests {
    @Test func bucketStartsFull_thenRefillsAtTheRate() async throws {
        let clock = ManualClock()
        let limiter = RateLimiter(rate: 2, per: .seconds(1), burst: 3, clock: clock)
        #expect(limiter.tryAcquire(3))  // the whole burst at once
        #expect(!limiter.tryAcquire())
        clock.advance(by: .milliseconds(499))
        #expect(!limiter.tryAcquire())
        clock.advance(by: .milliseconds(1))  // one token costs 500 ms
        #expect(limiter.tryAcquire())
        #expect(!limiter.tryAcquire())
        clock.advance(by: .seconds(10))  // refills up to the burst, no further
        #expect(limiter.tryAcquire(3))
        #expect(!limiter.tryAcquire())
    }

    @Test func aHugeBurst_isNoBurstLimit_andNeverOverflows() async throws {
        // `burst: .max` ("no burst limit") and long intervals overflowed Duration (a trap).
        let clock = ManualClock()
        let hourly = RateLimiter(rate: 100, per: .seconds(3600), burst: .max, clock: clock)
        #expect(hourly.tryAcquire(1_000_000))
        let limiter = RateLimiter(rate: 1, per: .seconds(10), burst: .max, clock: clock)
        try await limiter.wait(.max)  // the whole (clamped) bucket
        #expect(!limiter.tryAcquire(.max))
        #expect(!limiter.tryAcquire())
        let minutely = RateLimiter(rate: 1, per: .seconds(60), burst: .max, clock: clock)
        #expect(minutely.tryAcquire(Int.max / 2))
    }

    @Test func wait_returnsAtOnce_whenTokensAreThere() async throws {
        let clock = ManualClock()
        let limiter = RateLimiter(rate: 1, per: .seconds(1), burst: 2, clock: clock)
        try await limiter.wait()
        try await limiter.wait()
        #expect(clock.sleeperCount == 0)
        #expect(limiter.waiters == 0)
    }

    @Test func wait_sleepsUntilTheTokensAreDue() async throws {
        let clock = ManualClock()
        let limiter = RateLimiter(rate: 1, per: .seconds(1), burst: 1, clock: clock)
        try await limiter.wait()
        let waiter = Task { try await limiter.wait() }
        await clock.waitForSleepers(count: 1)
        #expect(limiter.waiters == 1)
        clock.advance(by: .seconds(1))
        try await waiter.value
        #expect(limiter.waiters == 0)
        #expect(!limiter.tryAcquire())  // the waiter took the token
    }

    @Test func waiters_areServedInArrivalOrder_andOnlyTheHeadSleeps() async throws {
        let clock = ManualClock()
        let limiter = RateLimiter(rate: 1, per: .seconds(1), burst: 1, clock: clock)
        try await limiter.wait()
        let order = Log<Int>()
        var tasks: [Task<Void, any Error>] = []
        for index in 0..<3 {
            tasks.append(Task {
                try await limiter.wait()
                order.append(index)
            })
            await waitUntil("waiter \(index) in line") { limiter.waiters == index + 1 }
        }
        await clock.waitForSleepers(count: 1)
        #expect(clock.sleeperCount == 1)  // one timer, however long the line
        for served in 1...3 {
            clock.advance(by: .seconds(1))
            await waitUntil("waiter \(served - 1) served") { order.count == served }
            if served < 3 { await clock.waitForSleepers(count: 1) }
        }
        for task in tasks { try await task.value }
        #expect(order.elements == [0, 1, 2])
    }

    @Test func largeRequestAtHead_delaysSmallerOnesBehindIt() async throws {
        let clock = ManualClock()
        let limiter = RateLimiter(rate: 1, per: .seconds(1), burst: 4, clock: clock)
        try await limiter.wait(4)
        let order = Log<String>()
        let large = Task {
            try await limiter.wait(4)
            order.append("large")
        }
        await clock.waitForSleepers(count: 1)
        let small = Task {
            try await limiter.wait(1)
            order.append("small")
        }
        await waitUntil { limiter.waiters == 2 }
        clock.advance(by: .seconds(1))  // 1 token: the small request would fit, but waits its turn
        #expect(order.count == 0)
        clock.advance(by: .seconds(3))
        try await large.value
        await clock.waitForSleepers(count: 1)
        clock.advance(by: .seconds(1))
        try await small.value
        #expect(order.elements == ["large", "small"])
    }

    @Test func cancellingTheSleepingHead_handsTheTurnToTheNext_andTakesNoToken() async throws {
        let clock = ManualClock()
        let limiter = RateLimiter(rate: 1, per: .seconds(1), burst: 1, clock: clock)
        try await limiter.wait()
        let head = Task { try await limiter.wait() }
        await clock.waitForSleepers(count: 1)
        let next = Task { try await limiter.wait() }
        await waitUntil { limiter.waiters == 2 }
        head.cancel()
        await #expect(throws: CancellationError.self) { try await head.value }
        await clock.waitForSleepers(count: 1)  // the next waiter took over the sleep
        clock.advance(by: .seconds(1))
        try await next.value
        #expect(limiter.waiters == 0)
    }

    @Test func cancellingAWaiterInLine_removesIt_andTakesNoToken() async throws {
        let clock = ManualClock()
        let limiter = RateLimiter(rate: 1, per: .seconds(1), burst: 1, clock: clock)
        try await limiter.wait()
        let head = Task { try await limiter.wait() }
        await clock.waitForSleepers(count: 1)
        let second = Task { try await limiter.wait() }
        await waitUntil { limiter.waiters == 2 }
        second.cancel()
        await #expect(throws: CancellationError.self) { try await second.value }
        #expect(limiter.waiters == 1)
        clock.advance(by: .seconds(1))
        try await head.value
        clock.advance(by: .seconds(1))
        #expect(limiter.tryAcquire())  // the cancelled waiter's token is still there
    }

    @Test func requestLargerThanBurst_throwsAtOnce() async throws {
        let limiter = RateLimiter(rate: 10, per: .seconds(1), burst: 5, clock: ManualClock())
        await #expect(throws: CapacityError(requested: 6, capacity: 5, operation: "RateLimiter.wait")) {
            try await limiter.wait(6)
        }
        #expect(!limiter.tryAcquire(6))
        #expect(limiter.tryAcquire(5))
    }

    @Test func tryAcquire_failsWhileAnyoneWaits() async throws {
        let clock = ManualClock()
        let limiter = RateLimiter(rate: 1, per: .seconds(1), burst: 2, clock: clock)
        try await limiter.wait(2)
        let waiter = Task { try await limiter.wait(2) }
        await clock.waitForSleepers(count: 1)
        clock.advance(by: .seconds(1))  // one token back, but the waiter needs two
        #expect(!limiter.tryAcquire(1))
        clock.advance(by: .seconds(1))
        try await waiter.value
    }

    @Test func wait_honoursTheEnclosingDeadline() async throws {
        // A real clock: the deadline must cancel the limiter's sleep.
        let limiter = RateLimiter(rate: 1, per: .seconds(3600), burst: 1)
        try await limiter.wait()
        await #expect(throws: TimeoutError.self) {
            try await withTimeout(.milliseconds(20)) { try await limiter.wait() }
        }
        #expect(limiter.waiters == 0)
    }

    @Test func fractionalTokenCost_losesNothingToRounding() async throws {
        let clock = ManualClock()
        let limiter = RateLimiter(rate: 3, per: .seconds(1), burst: 3, clock: clock)
        #expect(limiter.tryAcquire(3))
        // A token costs a third of a second, which no whole number of nanoseconds is; the
        // bucket still refills exactly three tokens per second.
        var granted = 0
        for _ in 0..<300 {
            clock.advance(by: .milliseconds(10))
            while limiter.tryAcquire() { granted += 1 }
        }
        #expect(granted == 9)
    }
}
