@testable import Corral
import CorralTesting
import Testing

@globalActor actor ErrorGroupTestActor {
    static let shared = ErrorGroupTestActor()
}

/// The body holds `ErrorGroupTestActor` while another task fails, so that a task isolated to
/// that actor can only get onto it after the group was cancelled.
@ErrorGroupTestActor
private func isolatedTaskAddedBeforeAFailure(limit: Int?) async -> [String] {
    let log = Log<String>()
    _ = try? await withErrorGroup(limit: limit) { group in
        try await group.addTask { @ErrorGroupTestActor in log.append("the isolated task ran") }
        try await group.addTask { throw TestError(id: 1) }
        // Spin without suspending: a suspension would let the actor run the isolated task.
        // (The failing task runs on the cooperative pool's other thread.)
        let giveUp = ContinuousClock.now + .seconds(30)
        while !group.isCancelled && ContinuousClock.now < giveUp {}
        log.append(group.isCancelled ? "group cancelled" : "timed out waiting for the failure")
    }
    return log.elements
}

@Suite("ErrorGroup")
struct ErrorGroupTests {
    @Test(arguments: [nil, 1] as [Int?])
    func addTask_afterTheDeadlinePassed_throwsTimeoutError_likeAWaitingOne(limit: Int?) async throws {
        let thrown = Log<String>()
        _ = try? await withTimeout(.milliseconds(1)) {
            try await withErrorGroup(limit: limit) { group in
                while !Task.isCancelled { await Task.yield() }  // the deadline passes
                do {
                    try await group.addTask {}
                } catch {
                    thrown.append(String(describing: type(of: error)))
                }
            }
        }
        #expect(thrown.elements == ["TimeoutError"])
    }

    @Test(arguments: [nil, 2] as [Int?])
    func anActorIsolatedTask_waitingForItsActor_neverStartsAfterTheFirstError(limit: Int?) async {
        let log = await isolatedTaskAddedBeforeAFailure(limit: limit)
        #expect(log == ["group cancelled"])
    }

    @Test(arguments: [nil, 1, 3, 8] as [Int?])
    func everyTaskRuns_andTheBodysValueIsReturned(limit: Int?) async throws {
        let ran = Log<Int>()
        let value = try await expectNoLeakedTasks {
            try await withErrorGroup(limit: limit) { group in
                for index in 0..<100 {
                    try await group.addTask { ran.append(index) }
                }
                return "done"
            }
        }
        #expect(value == "done")
        #expect(ran.elements.sorted() == Array(0..<100))
    }

    @Test(arguments: [1, 2, 5])
    func theLimit_isNeverExceeded(limit: Int) async throws {
        let running = Gauge()
        try await expectNoLeakedTasks {
            try await withErrorGroup(limit: limit) { group in
                for _ in 0..<200 {
                    try await group.addTask {
                        running.add(1)
                        await Task.yield()
                        running.add(-1)
                    }
                }
            }
        }
        #expect(running.peak <= limit)
        #expect(running.peak >= 1)
        #expect(running.current == 0)
    }

    @Test func theLimit_isReached_whenTasksBlock() async throws {
        let running = Gauge()
        let gate = AsyncSemaphore(permits: 4)
        try await gate.acquire(4)
        try await withErrorGroup(limit: 4) { group in
            for _ in 0..<4 {
                try await group.addTask {
                    running.add(1)
                    try await gate.acquire()
                    gate.release()
                    running.add(-1)
                }
            }
            await waitUntil("4 tasks running") { running.current == 4 }
            gate.release(4)
        }
        #expect(running.peak == 4)
    }

    @Test func addTask_suspendsWhenTheLimitIsRunningAndTheQueueIsFull() async throws {
        let gate = AsyncSemaphore(permits: 1)
        try await gate.acquire()
        let added = Gauge()
        let pending = ErrorGroupStateMachine.minimumPendingCapacity
        try await withErrorGroup(limit: 1) { group in
            // 1 running + `pending` queued fill the group; the next addTask must wait.
            try await group.addTask {
                try await gate.acquire()
                gate.release()
            }
            for _ in 0..<pending {
                try await group.addTask {}
            }
            added.add(1 + pending)
            let storage = group.storage
            let opener = Task {
                await waitUntil("the next addTask is parked") { storage.state.withLock { $0.adders.count } == 1 }
                #expect(added.current == 1 + pending)
                gate.release()
            }
            try await group.addTask {}  // parks until a worker takes a queued task
            added.add(1)
            await opener.value
        }
        #expect(added.current == 2 + pending)
    }

    @Test func tryAddTask_acceptsOnlyWhileFewerThanLimitRunOrWait() async throws {
        let gate = AsyncSemaphore(permits: 1)
        try await gate.acquire()
        try await withErrorGroup(limit: 2) { group in
            var accepted = 0
            for _ in 0..<10 {
                if group.tryAddTask({ try await gate.acquire(); gate.release() }) { accepted += 1 }
            }
            #expect(accepted == 2)  // Go's TryGo: refused once `limit` are running
            gate.release()
        }
    }

    @Test func tryAddTask_withoutALimit_alwaysAccepts() async throws {
        let ran = Gauge()
        try await withErrorGroup { group in
            for _ in 0..<20 { #expect(group.tryAddTask { ran.add(1) }) }
        }
        #expect(ran.current == 20)
    }

    @Test func firstError_cancelsTheOthers_andIsThrown_notACancellationError() async throws {
        let cancelled = Gauge()
        let started = Gauge()
        await #expect(throws: TestError(id: 1)) {
            try await withErrorGroup { group in
                for _ in 0..<10 {
                    try await group.addTask {
                        started.add(1)
                        do {
                            try await Task.sleep(for: .seconds(3600))
                        } catch {
                            cancelled.add(1)
                            throw error
                        }
                    }
                }
                await waitUntil { started.current == 10 }
                try await group.addTask { throw TestError(id: 1) }
            }
        }
        #expect(cancelled.current == 10)  // every sibling observed the cancellation
    }

    @Test func firstError_withALimit_cancelsRunningTasks_andQueuedOnesNeverStart() async throws {
        let started = Gauge()
        await #expect(throws: TestError(id: 2)) {
            try await withErrorGroup(limit: 2) { group in
                try await group.addTask {
                    started.add(1)
                    try await Task.sleep(for: .seconds(3600))
                }
                try await group.addTask {
                    started.add(1)
                    throw TestError(id: 2)
                }
                // The group is cancelled: the next addTask throws, and the body ends.
                while true {
                    try await group.addTask { started.add(1) }
                    await Task.yield()
                }
            }
        }
        #expect(started.current >= 2)
    }

    @Test func addTask_afterTheFirstError_throwsCancellationError() async throws {
        let laterAdd = Log<String>()
        await #expect(throws: TestError.self) {
            try await withErrorGroup(limit: 1) { group in
                try await group.addTask { throw TestError() }
                await waitUntil { group.isCancelled }
                laterAdd.append(group.tryAddTask {} ? "tryAddTask accepted" : "tryAddTask refused")
                do {
                    try await group.addTask {}
                    laterAdd.append("addTask accepted")
                } catch {
                    laterAdd.append("addTask threw \(type(of: error))")
                }
            }
        }
        #expect(laterAdd.elements == ["tryAddTask refused", "addTask threw CancellationError"])
    }

    @Test(arguments: [nil, 2] as [Int?])
    func collectAll_runsEveryTask_andThrowsEveryErrorInOrder(limit: Int?) async throws {
        let ran = Gauge()
        let turn = AsyncSemaphore(permits: 1)
        let failure = await #expect(throws: ErrorGroupFailure.self) {
            try await withErrorGroup(limit: limit, onError: .collectAll) { group in
                for id in 0..<6 {
                    // Serialise the tasks so the order of the errors is known.
                    try await turn.acquire()
                    try await group.addTask {
                        defer { turn.release() }
                        ran.add(1)
                        if id.isMultiple(of: 2) { throw TestError(id: id) }
                    }
                }
            }
        }
        #expect(ran.current == 6)
        #expect(failure?.errors.compactMap { ($0 as? TestError)?.id } == [0, 2, 4])
        #expect(failure?.bodyError == nil)
    }

    @Test func collectAll_withoutFailures_returnsNormally() async throws {
        let value = try await withErrorGroup(limit: 3, onError: .collectAll) { group in
            for _ in 0..<10 { try await group.addTask {} }
            return 7
        }
        #expect(value == 7)
    }

    @Test(arguments: [nil, 2] as [Int?])
    func bodyError_cancelsRunningTasks_awaitsThem_andIsThrown(limit: Int?) async throws {
        let started = Gauge(), finished = Gauge()
        await #expect(throws: TestError(id: 9)) {
            try await expectNoLeakedTasks {
                try await withErrorGroup(limit: limit) { group in
                    for _ in 0..<2 {
                        try await group.addTask {
                            started.add(1)
                            defer { finished.add(1) }
                            try await Task.sleep(for: .seconds(3600))
                        }
                    }
                    // Both running (a task not started yet when the body throws never starts).
                    await waitUntil("both tasks run") { started.current == 2 }
                    throw TestError(id: 9)
                }
            }
        }
        #expect(finished.current == 2)  // awaited before the call returned
    }

    @Test func collectAll_bodyErrorAndTaskErrors_areAllReported() async throws {
        let failed = Gauge()
        let failure = await #expect(throws: ErrorGroupFailure.self) {
            try await withErrorGroup(onError: .collectAll) { group in
                try await group.addTask {
                    defer { failed.add(1) }
                    throw TestError(id: 1)
                }
                // The task has run (a task not started when the body throws never starts).
                await waitUntil("the task failed") { failed.current == 1 }
                throw TestError(id: 2)
            }
        }
        #expect(failure?.bodyError as? TestError == TestError(id: 2))
    }

    @Test func callerCancellation_cancelsEveryTask_andThrowsCancellationError() async throws {
        let started = Gauge()
        let task = Task {
            try await withErrorGroup(limit: 3) { group in
                for _ in 0..<3 {
                    try await group.addTask {
                        started.add(1)
                        try await Task.sleep(for: .seconds(3600))
                    }
                }
                // Keeps adding until the cancellation makes addTask throw.
                while true {
                    try await group.addTask {}
                    await Task.yield()
                }
            }
        }
        await waitUntil { started.current == 3 }
        task.cancel()
        await #expect(throws: CancellationError.self) { try await task.value }
    }

    @Test func suspendedAddTask_isCancellable() async throws {
        let gate = AsyncSemaphore(permits: 1)
        try await gate.acquire()
        let addedLast = Gauge()
        let parked = Gauge()
        let task = Task {
            try await withErrorGroup(limit: 1) { group in
                try await group.addTask { try await gate.acquire(); gate.release() }
                for _ in 0..<ErrorGroupStateMachine.minimumPendingCapacity { try await group.addTask {} }
                let storage = group.storage
                let watcher = Task {
                    await waitUntil { storage.state.withLock { $0.adders.count } == 1 }
                    parked.add(1)
                }
                defer { watcher.cancel() }
                try await group.addTask { addedLast.add(1) }  // waits: 1 running, queue full
            }
        }
        await waitUntil { parked.current == 1 }
        task.cancel()
        await #expect(throws: CancellationError.self) { try await task.value }
        #expect(addedLast.current == 0)
    }

    @Test func tasksRunOnTheirOwnIsolation_andTheBodyOnTheCallers() async throws {
        @MainActor final class Counter { var value = 0 }
        let counter = Counter()
        try await Task { @MainActor in
            try await withErrorGroup(limit: 2) { group in
                MainActor.assertIsolated()
                for _ in 0..<5 {
                    try await group.addTask { @MainActor in counter.value += 1 }
                }
            }
        }.value
        #expect(await counter.value == 5)
    }

    @Test func taskLocals_ofTheCall_areSeenByTheTasks() async throws {
        let seen = Log<String>()
        try await TestContext.$requestID.withValue("r-1") {
            try await withErrorGroup(limit: 2) { group in
                for _ in 0..<4 {
                    try await group.addTask { seen.append(TestContext.requestID) }
                }
            }
        }
        #expect(seen.elements == Array(repeating: "r-1", count: 4))
    }
}

@Suite("ErrorGroup: the first error")
struct ErrorGroupFirstErrorTests {
    @Test func aQueuedTask_neverStarts_onceTheCallingTaskIsCancelled() async throws {
        // Limit 1: `a` runs, `b` waits in the queue. The calling task is cancelled; the body
        // does not notice (it waits without a cancellable wait), so the group itself is not
        // cancelled — only its worker's task is. `a` ends by cancellation; `b`, next in the
        // worker's hands, must not start. The call throws CancellationError.
        let aRunning = Gauge(), aEnded = Gauge(), bStarted = Gauge()
        let gate = try await closedGate()
        let caller = Task {
            try await withErrorGroup(limit: 1) { group in
                try await group.addTask {
                    aRunning.add(1)
                    defer { aEnded.add(1) }
                    try await gate.acquire()
                }
                try await group.addTask { bStarted.add(1) }
                await waitUntil("a ended") { aEnded.current == 1 }
            }
        }
        await waitUntil("a runs") { aRunning.current == 1 }
        caller.cancel()
        await #expect(throws: CancellationError.self) { try await caller.value }
        #expect(bStarted.current == 0)
    }

    @Test func aTaskHandedToAnIdleWorker_neverStarts_whenTheGroupIsCancelledBeforeTheWorkerResumes() async {
        // `.cancelAll`: tasks not started when the first error comes never start — including
        // one that addTask handed to an idle worker that has not resumed yet. Driven on the
        // state machine, where the order of the steps is certain: this test's own task plays
        // the parked worker.
        var machine = ErrorGroupStateMachine(policy: .cancelAll, limit: 1)
        guard case .startWorker = machine.addRequested(GroupJob(operation: {})) else {
            Issue.record("the first task should start a worker")
            return
        }
        guard case .park(let id) = machine.jobFinished() else {
            Issue.record("the worker should park, idle")
            return
        }
        var mayRun: Bool?
        let outcome = await withUnsafeContinuation { (continuation: UnsafeContinuation<ErrorGroupStateMachine.WorkerOutcome, Never>) in
            if let resumeNow = machine.workerSuspended(id, continuation) {
                Issue.record("the worker should stay parked")
                resumeNow.resume()
                return
            }
            // addTask hands a task to the parked worker; the first error cancels the group
            // before the worker resumes.
            guard case .accepted(let woken?) = machine.addRequested(GroupJob(operation: {})) else {
                Issue.record("the second task should be handed to the idle worker")
                continuation.resume(returning: .finish)
                return
            }
            guard case .cancelGroup = machine.taskFailed(TestError()) else {
                Issue.record("the first error should cancel the group")
                woken.resume()
                return
            }
            mayRun = machine.workerMayRun()
            woken.resume()
        }
        guard case .job = outcome else {
            Issue.record("the worker should have been handed the task")
            return
        }
        #expect(mayRun == false)  // the handed task is dropped
        #expect(machine.workers == 0)  // and its worker exits
    }
}

enum TestContext {
    @TaskLocal static var requestID = "none"
}
