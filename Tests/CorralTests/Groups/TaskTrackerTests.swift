@testable import Corral
import CorralTesting
import Testing

@Suite("TaskTracker")
struct TaskTrackerTests {
    @Test func spawnedTasksRun_andWaitReturnsAfterCloseWhenAllFinished() async throws {
        let ran = Gauge()
        try await expectNoLeakedTasks {
            let tracker = TaskTracker(name: "basic", limit: 10)
            for _ in 0..<25 {
                try await tracker.spawn { ran.add(1) }
            }
            tracker.close()
            try await tracker.wait()
            #expect(tracker.count == 0)
        }
        #expect(ran.current == 25)
    }

    @Test func wait_doesNotReturnBeforeClose() async throws {
        let tracker = TaskTracker(limit: 2)
        let waited = Gauge()
        let waiter = Task {
            try await tracker.wait()
            waited.add(1)
        }
        await waitUntil { tracker.inspect(\.waiters.count) == 1 }
        #expect(waited.current == 0)  // open and idle: wait keeps waiting
        tracker.close()
        try await waiter.value
        #expect(waited.current == 1)
    }

    @Test func theLimit_isNeverExceeded_andSpawnWaitsForRoom() async throws {
        let running = Gauge()
        let gate = AsyncSemaphore(permits: 1)
        try await gate.acquire()
        let tracker = TaskTracker(limit: 3)
        for _ in 0..<3 {
            try await tracker.spawn {
                running.add(1)
                try await gate.acquire()
                gate.release()
                running.add(-1)
            }
        }
        #expect(!tracker.trySpawn {})  // at the limit
        let fourth = Task { try await tracker.spawn { running.add(1); running.add(-1) } }
        await waitUntil { tracker.inspect(\.spawners.count) == 1 }
        #expect(tracker.count == 3)
        gate.release()
        try await fourth.value
        tracker.close()
        try await tracker.wait()
        #expect(running.peak <= 3)
    }

    @Test func spawnAfterClose_isRefused() async throws {
        let tracker = TaskTracker(name: "closed one", limit: 1)
        tracker.close()
        #expect(tracker.isClosed)
        #expect(!tracker.trySpawn {})
        await #expect(throws: TaskTrackerError.closed(name: "closed one")) {
            try await tracker.spawn {}
        }
        try await tracker.wait()  // closed and empty: returns at once
    }

    @Test func close_failsSpawnersWaitingForRoom() async throws {
        let gate = AsyncSemaphore(permits: 1)
        try await gate.acquire()
        let tracker = TaskTracker(limit: 1)
        try await tracker.spawn { try await gate.acquire(); gate.release() }
        let waitingSpawner = Task { try await tracker.spawn {} }
        await waitUntil { tracker.inspect(\.spawners.count) == 1 }
        tracker.close()
        await #expect(throws: TaskTrackerError.self) { try await waitingSpawner.value }
        gate.release()
        try await tracker.wait()
    }

    @Test func spawnWaitingForRoom_isCancellable() async throws {
        let gate = AsyncSemaphore(permits: 1)
        try await gate.acquire()
        let tracker = TaskTracker(limit: 1)
        try await tracker.spawn { try await gate.acquire(); gate.release() }
        let ran = Gauge()
        let waitingSpawner = Task { try await tracker.spawn { ran.add(1) } }
        await waitUntil { tracker.inspect(\.spawners.count) == 1 }
        waitingSpawner.cancel()
        await #expect(throws: CancellationError.self) { try await waitingSpawner.value }
        #expect(tracker.inspect(\.spawners.count) == 0)
        gate.release()
        tracker.close()
        try await tracker.wait()
        #expect(ran.current == 0)
    }

    @Test func cancelAll_cancelsLiveTasks_withoutReportingTheirCancellation() async throws {
        let tracker = TaskTracker(limit: 10)
        let started = Gauge()
        for _ in 0..<5 {
            try await tracker.spawn {
                started.add(1)
                try await Task.sleep(for: .seconds(3600))
            }
        }
        await waitUntil { started.current == 5 }
        tracker.cancelAll()
        tracker.close()
        try await tracker.wait()
        #expect(tracker.errorCount == 0)
        // The tracker still works for tasks spawned after cancelAll.
        let later = TaskTracker(limit: 1)
        later.cancelAll()
        try await later.spawn { try await Task.sleep(for: .milliseconds(1)) }
        later.close()
        try await later.wait()
        #expect(later.errorCount == 0)
    }

    @Test func errors_areCollectedByDefault() async throws {
        let tracker = TaskTracker(limit: 4)
        for id in 0..<3 {
            try await tracker.spawn { throw TestError(id: id) }
        }
        tracker.close()
        try await tracker.wait()
        #expect(tracker.errorCount == 3)
        #expect(Set(tracker.errors.compactMap { ($0 as? TestError)?.id }) == [0, 1, 2])
    }

    @Test func errors_goToTheHandler_whenOneIsGiven() async throws {
        let handled = Log<Int>()
        let tracker = TaskTracker(limit: 4) { error in
            handled.append((error as? TestError)?.id ?? -1)
        }
        for id in 0..<3 {
            try await tracker.spawn { throw TestError(id: id) }
        }
        tracker.close()
        try await tracker.wait()
        #expect(Set(handled.elements) == [0, 1, 2])
        #expect(tracker.errorCount == 0)
    }

    @Test func waitIsCancellable_andLeavesTheTasksRunning() async throws {
        let tracker = TaskTracker(limit: 1)
        let gate = AsyncSemaphore(permits: 1)
        try await gate.acquire()
        try await tracker.spawn { try await gate.acquire(); gate.release() }
        tracker.close()
        let waiter = Task { try await tracker.wait() }
        await waitUntil { tracker.inspect(\.waiters.count) == 1 }
        waiter.cancel()
        await #expect(throws: CancellationError.self) { try await waiter.value }
        #expect(tracker.count == 1)
        gate.release()
        try await tracker.wait()
    }

    /// tokio's `JoinSet` keeps a handle per finished task until it is joined; a tracker must
    /// drop it at once. Checked with a count of held handles, not RSS.
    @Test func manySpawnedAndFinishedTasks_leaveNothingBehind() async throws {
        let total = stressIterations(default: 100) * 1_000
        let tracker = TaskTracker(limit: 64)
        var peakHandles = 0
        for index in 0..<total {
            try await tracker.spawn {}
            if index.isMultiple(of: 1_000) { peakHandles = max(peakHandles, tracker.heldHandles) }
        }
        tracker.close()
        try await tracker.wait()
        #expect(peakHandles <= 64)
        #expect(tracker.heldHandles == 0)
        #expect(tracker.count == 0)
    }

    @Test func trackedTasksInheritTaskLocals() async throws {
        let seen = Log<String>()
        let tracker = TaskTracker(limit: 2)
        try await TestContext.$requestID.withValue("r-7") {
            try await tracker.spawn { seen.append(TestContext.requestID) }
        }
        tracker.close()
        try await tracker.wait()
        #expect(seen.elements == ["r-7"])
    }
}

extension TaskTracker {
    /// Reads the tracker's state (tests only).
    func inspect<Value>(_ read: (TaskTrackerStateMachine) -> Value) -> Value {
        stateForTesting(read)
    }
}
