@testable import Corral
import CorralTesting
import Testing

@Suite("Deadlines")
struct DeadlineTests {
    @Test func bodyThatFinishesInTime_returnsItsValue() async throws {
        let value = try await withTimeout(.seconds(60)) { 42 }
        #expect(value == 42)
    }

    @Test func bodyThatOverruns_throwsTimeoutError_notCancellationError() async throws {
        let deadline = ContinuousClock.now + .milliseconds(20)
        let error = await #expect(throws: TimeoutError.self) {
            try await withDeadline(deadline) {
                try await Task.sleep(for: .seconds(3600))
            }
        }
        #expect(error?.deadline == deadline)
    }

    @Test func timeout_doesNotCancelTheCaller() async throws {
        await #expect(throws: TimeoutError.self) {
            try await withTimeout(.milliseconds(10)) { try await Task.sleep(for: .seconds(3600)) }
        }
        #expect(!Task.isCancelled)
        try await Task.sleep(for: .milliseconds(1))  // would throw if this task were cancelled
    }

    @Test func passedDeadline_throwsAtOnce_withoutRunningTheBody() async throws {
        let ran = Log<Bool>()
        await #expect(throws: TimeoutError.self) {
            try await withTimeout(.zero) { ran.append(true) }
        }
        await #expect(throws: TimeoutError.self) {
            try await withDeadline(.now - .seconds(1)) { ran.append(true) }
        }
        #expect(ran.count == 0)
    }

    @Test func bodyErrors_passThrough() async throws {
        await #expect(throws: TestError(id: 7)) {
            try await withTimeout(.seconds(60)) { throw TestError(id: 7) }
        }
    }

    @Test func callerCancellation_throwsCancellationError_andCancelsTheBody() async throws {
        let started = AsyncSemaphore(permits: 1)
        try await started.acquire()
        let task = Task {
            try await withTimeout(.seconds(3600)) {
                started.release()
                try await Task.sleep(for: .seconds(3600))
            }
        }
        try await started.acquire()
        task.cancel()
        await #expect(throws: CancellationError.self) { try await task.value }
    }

    @Test func alreadyCancelledCaller_bodySeesCancellationFromItsFirstInstruction() async throws {
        let task = Task {
            withUnsafeCurrentTask { $0?.cancel() }
            return try await withTimeout(.seconds(60)) { Task.isCancelled }
        }
        #expect(try await task.value == true)
    }

    @Test func deadlineCurrent_isNilOutside_andTheDeadlineInside() async throws {
        #expect(Deadline.current == nil)
        #expect(Deadline.timeRemaining == nil)
        let deadline = ContinuousClock.now + .seconds(60)
        let inside = try await withDeadline(deadline) { Deadline.current }
        #expect(inside == deadline)
        #expect(Deadline.current == nil)
    }

    @Test func innerScope_cannotExtendTheOuterDeadline() async throws {
        let outer = ContinuousClock.now + .seconds(60)
        let seen = try await withDeadline(outer) {
            try await withDeadline(outer + .seconds(3600)) { Deadline.current }
        }
        #expect(seen == outer)
    }

    @Test func innerScope_canTighten_andTheOuterIsRestoredAfter() async throws {
        let outer = ContinuousClock.now + .seconds(60)
        let inner = ContinuousClock.now + .seconds(30)
        let seen = try await withDeadline(outer) {
            let insideInner = try await withDeadline(inner) { Deadline.current }
            return (insideInner, Deadline.current)
        }
        #expect(seen.0 == inner)
        #expect(seen.1 == outer)
    }

    @Test func outerDeadline_firesThroughAnInnerScopeThatAskedForMore() async throws {
        await #expect(throws: TimeoutError.self) {
            try await withTimeout(.milliseconds(20)) {
                try await withTimeout(.seconds(3600)) {
                    try await Task.sleep(for: .seconds(3600))
                }
            }
        }
    }

    @Test func innerTimeout_isCaughtInside_andTheOuterScopeContinues() async throws {
        let result = try await withTimeout(.seconds(60)) {
            do {
                try await withTimeout(.milliseconds(10)) { try await Task.sleep(for: .seconds(3600)) }
                return "no timeout"
            } catch is TimeoutError {
                try await Task.sleep(for: .milliseconds(1))  // the outer body is not cancelled
                return "recovered"
            }
        }
        #expect(result == "recovered")
    }

    @Test func childTasks_inheritTheDeadline() async throws {
        let deadline = ContinuousClock.now + .seconds(60)
        let seen = try await withDeadline(deadline) {
            await withTaskGroup(of: ContinuousClock.Instant?.self) { group in
                group.addTask { Deadline.current }
                return await group.next()!
            }
        }
        #expect(seen == deadline)
    }

    @Test func bodyThatIgnoresCancellation_isAwaited_andItsValueReturned() async throws {
        // Documented behaviour: Corral never abandons a task. The body below never checks for
        // cancellation; it spins until it observes that its task was cancelled by the deadline,
        // so the test does not depend on how long it runs.
        let value = try await withTimeout(.milliseconds(10)) {
            while !Task.isCancelled { await Task.yield() }
            return "finished late"
        }
        #expect(value == "finished late")
    }

    @Test func bodyThatNeverSuspends_butChecksCancellation_isStoppedByTheDeadline() async throws {
        let iterations = Log<Int>()
        await #expect(throws: TimeoutError.self) {
            try await withTimeout(.milliseconds(10)) {
                var count = 0
                defer { iterations.append(count) }
                while true {
                    try Task.checkCancellation()  // no await anywhere in this loop
                    count += 1
                }
            }
        }
        #expect(iterations.count == 1)
    }

    @Test func corralWaits_throwTimeoutError_whenTheDeadlinePasses() async throws {
        let semaphore = AsyncSemaphore(permits: 1)
        try await semaphore.acquire()
        let channel = BoundedChannel<Int>(capacity: 0)
        let error = await #expect(throws: TimeoutError.self) {
            try await withTimeout(.milliseconds(20)) {
                do {
                    try await semaphore.acquire()
                } catch is TimeoutError {
                    // The deadline has passed; the next wait fails at once, also as a timeout.
                    _ = try await channel.receive()
                }
            }
        }
        #expect(error != nil)
        semaphore.release()
    }

    @Test func manyConcurrentDeadlines_fireIndependently() async throws {
        let outcomes = try await expectNoLeakedTasks { await withTaskGroup(of: Bool.self) { group in
            for index in 0..<200 {
                group.addTask {
                    do {
                        // Even indices time out, odd ones finish in time.
                        try await withTimeout(index % 2 == 0 ? .milliseconds(5) : .seconds(3600)) {
                            if index % 2 == 0 { try await Task.sleep(for: .seconds(3600)) }
                        }
                        return index % 2 == 1
                    } catch is TimeoutError {
                        return index % 2 == 0
                    } catch {
                        return false
                    }
                }
            }
            var all: [Bool] = []
            for await outcome in group { all.append(outcome) }
            return all
        } }
        #expect(outcomes.count == 200)
        #expect(outcomes.allSatisfy { $0 })
    }

    @Test func withTimeout_runsTheBodyOnTheCallersActor() async throws {
        let onMain = try await Task { @MainActor in
            try await withTimeout(.seconds(60)) { @MainActor in
                MainActor.assertIsolated()
                return true
            }
        }.value
        #expect(onMain)
    }

    @Test func anUnstructuredTask_underAnEndedDeadline_timesOutOnItsOwn() async throws {
        // The task inherits the outer scope (a task-local) but is never cancelled by it: its
        // own, later deadline must arm a timer rather than rely on the outer one.
        let gate = AsyncSemaphore(permits: 1)
        try await gate.acquire()
        let task = try await withTimeout(.milliseconds(20)) {
            Task { try await withTimeout(.milliseconds(50)) { try await gate.acquire() } }
        }
        let watchdog = Task {
            try await Task.sleep(for: .seconds(5))
            task.cancel()  // the bug: it would wait forever; fail with CancellationError instead
        }
        defer { watchdog.cancel() }
        await #expect(throws: TimeoutError.self) { try await task.value }
    }

    @Test func aChildTasksLaterInnerDeadline_neverExtendsTheOuterOne() async throws {
        let outer = ContinuousClock.now + .seconds(30)
        try await withDeadline(outer) {
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask {
                    try await withTimeout(.seconds(600)) {
                        #expect(Deadline.current! <= outer, "the inner scope extended the outer one")
                    }
                }
                try await group.waitForAll()
            }
        }
    }

    @Test func aChildTasksLaterInnerDeadline_throwsTimeoutError_whenTheOuterOnePasses() async throws {
        let gate = try await closedGate()
        let seen = Log<String>()
        await #expect(throws: TimeoutError.self) {
            try await withTimeout(.milliseconds(50)) {
                try await withThrowingTaskGroup(of: Void.self) { group in
                    group.addTask {
                        do {
                            try await withTimeout(.seconds(600)) { try await gate.acquire() }
                        } catch {
                            seen.append(String(describing: type(of: error)))
                            throw error
                        }
                    }
                    try await group.waitForAll()
                }
            }
        }
        #expect(seen.elements == ["TimeoutError"])
    }
}
