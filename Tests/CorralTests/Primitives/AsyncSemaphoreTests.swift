@testable import Corral
import Testing

@Suite("AsyncSemaphore")
struct AsyncSemaphoreTests {
    @Test func acquireAndRelease_withoutContention_neverSuspends() async throws {
        let semaphore = AsyncSemaphore(permits: 3)
        try await semaphore.acquire(2)
        #expect(semaphore.availablePermits == 1)
        try await semaphore.acquire()
        #expect(semaphore.availablePermits == 0)
        semaphore.release(3)
        #expect(semaphore.availablePermits == 3)
        #expect(semaphore.waiters == 0)
    }

    @Test func tryAcquire_takesFreePermits_andFailsWhenShort() {
        let semaphore = AsyncSemaphore(permits: 5)
        #expect(semaphore.tryAcquire(4))
        #expect(!semaphore.tryAcquire(2))
        #expect(semaphore.tryAcquire(1))
        #expect(semaphore.availablePermits == 0)
        semaphore.release(5)
    }

    @Test func tryAcquire_failsWhileAnyoneWaits_evenIfPermitsFit() async throws {
        let semaphore = AsyncSemaphore(permits: 10)
        try await semaphore.acquire(8)
        let waiter = Task { try await semaphore.acquire(5) }
        await waitUntil("waiter parked") { semaphore.waiters == 1 }
        // 2 permits are free, but the line is not empty: no jumping it (like Go's TryAcquire).
        #expect(!semaphore.tryAcquire(1))
        semaphore.release(8)
        try await waiter.value
        #expect(semaphore.availablePermits == 5)
    }

    @Test func requestLargerThanCapacity_throwsAtOnce() async throws {
        let semaphore = AsyncSemaphore(permits: 4)
        await #expect(throws: CapacityError(requested: 5, capacity: 4, operation: "AsyncSemaphore.acquire")) {
            try await semaphore.acquire(5)
        }
        await #expect(throws: CapacityError.self) {
            try await semaphore.acquire(5, timeout: .seconds(10))
        }
        #expect(!semaphore.tryAcquire(5))
        #expect(semaphore.availablePermits == 4)
        #expect(semaphore.waiters == 0)
    }

    @Test func requestLargerThanCapacity_throwsAtOnce_evenBehindWaiters() async throws {
        let semaphore = AsyncSemaphore(permits: 4)
        try await semaphore.acquire(4)
        let waiter = Task { try await semaphore.acquire(1) }
        await waitUntil { semaphore.waiters == 1 }
        await #expect(throws: CapacityError.self) { try await semaphore.acquire(9) }
        semaphore.release(4)
        try await waiter.value
    }

    @Test func waiters_areServedInArrivalOrder() async throws {
        let semaphore = AsyncSemaphore(permits: 1)
        try await semaphore.acquire()
        let order = Log<Int>()
        var tasks: [Task<Void, any Error>] = []
        for index in 0..<5 {
            tasks.append(Task {
                try await semaphore.acquire()
                order.append(index)
                semaphore.release()
            })
            await waitUntil("waiter \(index) parked") { semaphore.waiters == index + 1 }
        }
        semaphore.release()
        for task in tasks { try await task.value }
        #expect(order.elements == [0, 1, 2, 3, 4])
        #expect(semaphore.availablePermits == 1)
    }

    @Test func largeWaiterAtHead_blocksSmallerOnesBehindIt() async throws {
        let semaphore = AsyncSemaphore(permits: 10)
        try await semaphore.acquire(6)
        let order = Log<String>()
        let large = Task {
            try await semaphore.acquire(10)
            order.append("large")
            semaphore.release(10)
        }
        await waitUntil { semaphore.waiters == 1 }
        let small = Task {
            try await semaphore.acquire(1)
            order.append("small")
            semaphore.release(1)
        }
        await waitUntil { semaphore.waiters == 2 }
        // 4 permits are free and the small request would fit, but it waits behind the large one.
        #expect(semaphore.availablePermits == 4)
        #expect(order.elements.isEmpty)
        semaphore.release(6)
        try await large.value
        try await small.value
        #expect(order.elements == ["large", "small"])
    }

    @Test func release_wakesEveryWaiterThatNowFits() async throws {
        let semaphore = AsyncSemaphore(permits: 6)
        try await semaphore.acquire(6)
        let tasks = (1...3).map { weight in
            Task { try await semaphore.acquire(weight) }
        }
        await waitUntil { semaphore.waiters == 3 }
        semaphore.release(6)  // 1 + 2 + 3 == 6: all three fit
        for task in tasks { try await task.value }
        #expect(semaphore.availablePermits == 0)
        semaphore.release(6)
    }

    @Test func cancelledWaiter_throwsCancellationError_andTakesNothing() async throws {
        let semaphore = AsyncSemaphore(permits: 2)
        try await semaphore.acquire(2)
        let waiter = Task { try await semaphore.acquire(1) }
        await waitUntil { semaphore.waiters == 1 }
        waiter.cancel()
        await #expect(throws: CancellationError.self) { try await waiter.value }
        #expect(semaphore.waiters == 0)
        #expect(semaphore.availablePermits == 0)
        semaphore.release(2)
        #expect(semaphore.availablePermits == 2)
    }

    @Test func alreadyCancelledTask_thatMustWait_throwsWithoutWaiting() async throws {
        let semaphore = AsyncSemaphore(permits: 1)
        try await semaphore.acquire()
        let task = Task {
            withUnsafeCurrentTask { $0?.cancel() }
            try await semaphore.acquire()
        }
        await #expect(throws: CancellationError.self) { try await task.value }
        #expect(semaphore.waiters == 0)
        semaphore.release()
        #expect(semaphore.availablePermits == 1)
    }

    /// Go issue #37852: when the head waiter is cancelled, the waiters behind it that fit
    /// must be woken, or they sleep forever although permits are free.
    @Test func cancellingTheHeadWaiter_wakesTheWaitersBehindItThatFit() async throws {
        let semaphore = AsyncSemaphore(permits: 10)
        try await semaphore.acquire(5)
        let head = Task { try await semaphore.acquire(10) }
        await waitUntil { semaphore.waiters == 1 }
        let behind = Task { try await semaphore.acquire(3) }
        await waitUntil { semaphore.waiters == 2 }
        head.cancel()
        await #expect(throws: CancellationError.self) { try await head.value }
        try await behind.value  // would hang without the wake-up
        #expect(semaphore.availablePermits == 2)
        semaphore.release(8)
    }

    @Test func cancellingAMiddleWaiter_keepsTheOthersInOrder() async throws {
        let semaphore = AsyncSemaphore(permits: 1)
        try await semaphore.acquire()
        let order = Log<Int>()
        var tasks: [Task<Void, any Error>] = []
        for index in 0..<3 {
            tasks.append(Task {
                try await semaphore.acquire()
                order.append(index)
                semaphore.release()
            })
            await waitUntil { semaphore.waiters == index + 1 }
        }
        tasks[1].cancel()
        await waitUntil { semaphore.waiters == 2 }
        semaphore.release()
        try await tasks[0].value
        await #expect(throws: CancellationError.self) { try await tasks[1].value }
        try await tasks[2].value
        #expect(order.elements == [0, 2])
    }

    @Test func acquireWithTimeout_throwsTimeoutError_andTakesNothing() async throws {
        let semaphore = AsyncSemaphore(permits: 1)
        try await semaphore.acquire()
        await #expect(throws: TimeoutError.self) {
            try await semaphore.acquire(1, timeout: .milliseconds(20))
        }
        #expect(semaphore.waiters == 0)
        semaphore.release()
        try await semaphore.acquire(1, timeout: .milliseconds(20))  // free: no wait at all
        semaphore.release()
        #expect(semaphore.availablePermits == 1)
    }

    @Test func acquireWithNonPositiveTimeout_onlyTakesFreePermits() async throws {
        let semaphore = AsyncSemaphore(permits: 1)
        try await semaphore.acquire(1, timeout: .zero)
        await #expect(throws: TimeoutError.self) { try await semaphore.acquire(1, timeout: .zero) }
        semaphore.release()
    }

    @Test func acquireWithTimeout_succeedsWhenReleasedInTime() async throws {
        let semaphore = AsyncSemaphore(permits: 1)
        try await semaphore.acquire()
        let waiter = Task { try await semaphore.acquire(1, timeout: .seconds(60)) }
        await waitUntil { semaphore.waiters == 1 }
        semaphore.release()
        try await waiter.value
        #expect(semaphore.availablePermits == 0)
        semaphore.release()
    }

    @Test func acquire_honoursTheEnclosingDeadline() async throws {
        let semaphore = AsyncSemaphore(permits: 1)
        try await semaphore.acquire()
        let error = await #expect(throws: TimeoutError.self) {
            try await withTimeout(.milliseconds(20)) {
                try await semaphore.acquire()
            }
        }
        #expect(error?.deadline != nil)
        #expect(semaphore.waiters == 0)
        #expect(semaphore.availablePermits == 0)
        semaphore.release()
    }

    @Test func withPermits_releasesOnReturn() async throws {
        let semaphore = AsyncSemaphore(permits: 3)
        let value = try await semaphore.withPermits(2) {
            #expect(semaphore.availablePermits == 1)
            return 42
        }
        #expect(value == 42)
        #expect(semaphore.availablePermits == 3)
    }

    @Test func withPermits_releasesWhenTheBodyThrows() async throws {
        let semaphore = AsyncSemaphore(permits: 3)
        await #expect(throws: TestError.self) {
            try await semaphore.withPermits(3) { throw TestError() }
        }
        #expect(semaphore.availablePermits == 3)
    }

    @Test func withPermits_releasesWhenTheBodyIsCancelled() async throws {
        let semaphore = AsyncSemaphore(permits: 1)
        let entered = AsyncSemaphore(permits: 1)
        try await entered.acquire()
        let task = Task {
            try await semaphore.withPermits {
                entered.release()
                try await Task.sleep(for: .seconds(3600))
            }
        }
        try await entered.acquire()
        #expect(semaphore.availablePermits == 0)
        task.cancel()
        await #expect(throws: CancellationError.self) { try await task.value }
        #expect(semaphore.availablePermits == 1)
    }

    @Test func withPermits_doesNotRunTheBody_whenAcquireFails() async throws {
        let semaphore = AsyncSemaphore(permits: 1)
        let ran = Log<Bool>()
        await #expect(throws: CapacityError.self) {
            try await semaphore.withPermits(2) { ran.append(true) }
        }
        #expect(ran.count == 0)
    }

    @Test func withPermits_runsOnTheCallersActor() async throws {
        @MainActor final class Model {
            var value = 0
        }
        let semaphore = AsyncSemaphore(permits: 1)
        let model = Model()
        try await Task { @MainActor in
            try await semaphore.withPermits {
                MainActor.assertIsolated()
                model.value += 1  // non-Sendable state, mutated without a hop
            }
        }.value
        #expect(await model.value == 1)
    }

    // MARK: - State machine

    @Test func stateMachine_acquireRequested_whenShort_enqueuesInOrder() {
        var machine = SemaphoreStateMachine(capacity: 4)
        guard case .acquired = machine.acquireRequested(3) else { Issue.record("expected fast path"); return }
        guard case .suspend = machine.acquireRequested(2) else { Issue.record("expected suspend"); return }
        guard case .suspend = machine.acquireRequested(1) else { Issue.record("expected suspend behind"); return }
        #expect(machine.waiters.payloads == [2, 1])
        #expect(machine.available == 1)
    }

    @Test func stateMachine_waiterCancelled_beforeSuspending_isSettledAndGrantsTheRest() {
        var machine = SemaphoreStateMachine(capacity: 4)
        _ = machine.acquireRequested(3)
        guard case .suspend(let head) = machine.acquireRequested(4) else { Issue.record("expected suspend"); return }
        guard case .suspend = machine.acquireRequested(1) else { Issue.record("expected suspend"); return }
        // The head is cancelled before installing its continuation; the 1-permit waiter fits.
        let resumptions = machine.waiterCancelled(head)
        #expect(resumptions.isEmpty)  // neither had suspended yet: both are settled in place
        #expect(machine.waiters.isEmpty)
        #expect(machine.available == 0)
        #expect(machine.waiters.settledCount == 2)
    }

    @Test func stateMachine_waiterCancelled_afterBeingServed_isANoOp() {
        var machine = SemaphoreStateMachine(capacity: 2)
        _ = machine.acquireRequested(2)
        guard case .suspend(let id) = machine.acquireRequested(1) else { Issue.record("expected suspend"); return }
        _ = machine.permitsReleased(2)
        #expect(machine.available == 1)
        #expect(machine.waiterCancelled(id).isEmpty)
        #expect(machine.available == 1)  // the served waiter keeps its permit
    }
}
